"""The SMTP constructor finds its verbs, hooks and AUTH mechanisms once per class
(gateway.smtp_tables): the second connection reuses them, every attribute equals what
aiosmtpd's own constructor sets, and every verb still answers."""

from __future__ import annotations

import asyncio
import inspect
import ssl
import weakref
from pathlib import Path
from typing import Any

import aiosmtpd
import pytest
from aiosmtpd import smtp as aio
from aiosmtpd.smtp import SMTP, AuthResult

from gateway import smtp_tables
from gateway.smtp_in import GatewaySMTP, Handler
from gateway.smtp_tables import CachedInitSMTP, tables_for
from tests.conftest import Upstream, gateway_config, running
from tests.test_hostile_input import data_transaction, dialogue


class Hooks:
    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"

    async def auth_CRAM__MD5(self, server: Any, args: list[str]) -> AuthResult:
        return AuthResult(success=False)


def normal(value: Any, owner: object) -> Any:
    """An attribute's value with per-instance objects replaced by what they stand for."""
    if inspect.ismethod(value):
        return ("method", value.__func__, "self" if value.__self__ is owner else value.__self__)
    if isinstance(value, aio._AuthMechAttr):
        return ("auth", normal(value.method, owner), value.is_builtin)
    if isinstance(value, dict):
        return [(k, normal(v, owner)) for k, v in value.items()]  # order counts too
    if isinstance(value, weakref.ref):
        return ("weakref", type(value()))
    if isinstance(value, asyncio.Future):
        return ("future", value.done())
    if isinstance(value, asyncio.StreamReader):
        return ("reader", value._limit)  # type: ignore[attr-defined]
    return value


def reference(handler: Any, **kwargs: Any) -> CachedInitSMTP:
    server = CachedInitSMTP.__new__(CachedInitSMTP)
    SMTP.__init__(server, handler, **kwargs)
    return server


TLS = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
TLS.check_hostname = False
TLS.verify_mode = ssl.CERT_NONE
KWARGS = {
    "the gateway's": {
        "hostname": "gw.test",
        "ident": "Sekisho ESMTP",
        "data_size_limit": 1000,
        "enable_SMTPUTF8": True,
        "auth_require_tls": True,
        "auth_exclude_mechanism": ["PLAIN"],
        "timeout": 30.0,
        "command_call_limit": {"AUTH": 5, "*": 100},
    },
    "TLS and an authenticator": {
        "hostname": "gw.test",
        "tls_context": TLS,
        "require_starttls": True,
        "authenticator": lambda *a: AuthResult(success=False),
        "command_call_limit": 7,
        "proxy_protocol_timeout": 5.0,
    },
    "defaults": {"hostname": "gw.test"},
}


@pytest.mark.parametrize("kwargs", KWARGS.values(), ids=KWARGS.keys())
async def test_every_attribute_equals_what_aiosmtpds_constructor_sets(
    kwargs: dict[str, Any],
) -> None:
    assert aiosmtpd.__version__ == smtp_tables.REPLICATED_VERSION, "re-check the replica"
    handler = Hooks()
    for _ in range(2):  # the first finds the tables, the second reuses them
        cached = CachedInitSMTP(handler, **kwargs)
        ref = reference(handler, **kwargs)
        assert vars(cached).keys() == vars(ref).keys()
        for name, value in vars(ref).items():
            assert normal(getattr(cached, name), cached) == normal(value, ref), name


async def test_a_second_connection_reuses_the_tables_without_reflection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler = Hooks()
    first = CachedInitSMTP(handler, hostname="gw.test")

    def no_reflection(*args: Any) -> Any:
        raise AssertionError("reflection on a second connection")

    monkeypatch.setattr(smtp_tables.inspect, "getmembers", no_reflection)
    second = CachedInitSMTP(handler, hostname="gw.test")
    assert tables_for(second, handler) is tables_for(first, handler)
    assert second._smtp_methods["DATA"].__self__ is second
    assert second._handle_hooks["DATA"].__self__ is handler
    assert second._auth_methods["CRAM-MD5"].method.__self__ is handler


async def test_a_hook_set_on_the_handler_object_is_found() -> None:
    handler = Hooks()
    CachedInitSMTP(handler, hostname="gw.test")

    async def handle_NOOP(*args: Any) -> str:
        return "250 patched"

    handler.handle_NOOP = handle_NOOP  # type: ignore[attr-defined]
    server = CachedInitSMTP(handler, hostname="gw.test")
    assert server._handle_hooks["NOOP"] is handle_NOOP


DIALOGUE = [
    ("HELP", "250"),
    ("HELP MAIL", "250"),
    ("NOOP", "250"),
    ("HELO client.test", "250"),
    ("EHLO client.test", "250"),
    ("AUTH PLAIN AGJvYgB3cm9uZw==", "535"),
    ("VRFY bob@client.example", "252"),
    ("EXPN staff", "502"),
    ("RSET", "250"),
    ("MAIL FROM:<alice@example.com>", "250"),
    ("RCPT TO:<bob@client.example>", "250"),
    ("RSET", "250"),
    ("STARTTLS", "454"),
    ("BOGUS", "500"),
]


async def test_every_verb_answers_on_each_of_two_connections(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(tmp_path, sqlite_url, upstream.port)
    async with running(config) as gw:
        for n in range(2):
            async with dialogue(gw.smtp_port) as d:
                for line, code in DIALOGUE:
                    reply = await d.command(line)
                    assert reply.startswith(code), (n, line, reply)
                reply = await data_transaction(d, f"Subject: {n}\r\n\r\nok\r\n.\r\n".encode())
                assert reply.startswith("250 2.0.0 Ok: queued as "), reply
                assert (await d.command("QUIT")).startswith("221")
        await upstream.wait_for(2)


def test_the_gateways_smtp_class_uses_the_cached_constructor() -> None:
    assert issubclass(GatewaySMTP, CachedInitSMTP)
    tables = tables_for(GatewaySMTP.__new__(GatewaySMTP), Handler.__new__(Handler))
    assert {"DATA", "EHLO", "MAIL", "RCPT"} <= {command for command, _ in tables.hooks}
    assert ("DATA", "smtp_DATA") in tables.verbs
