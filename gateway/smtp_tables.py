"""aiosmtpd's `SMTP.__init__` without its reflection on every connection.

`SMTP.__init__` finds the AUTH mechanisms, the handler's hooks and the SMTP verbs with
`inspect.getmembers` and `dir()` on every new connection (5-8% of the gateway's CPU
under relay load). Which names those are depends only on the two classes, so they
are found once per (server class, handler class) and bound to each new connection.

The constructor below is aiosmtpd 1.4.6's, step for step, with the reflection replaced
by the cached names; `tests/test_smtp_tables.py` compares the two on every attribute.
Another aiosmtpd version gets aiosmtpd's own constructor.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from warnings import warn

import aiosmtpd
from aiosmtpd import smtp as aio
from aiosmtpd.smtp import SMTP

REPLICATED_VERSION = "1.4.6"


@dataclass(frozen=True, slots=True)
class Tables:
    """The names `SMTP.__init__` finds by reflection."""

    auth: tuple[tuple[str, str, bool], ...]  # (mechanism, attribute, the server's own)
    hooks: tuple[tuple[str, str], ...]  # (command, handler attribute)
    verbs: tuple[tuple[str, str], ...]  # (command, server attribute)
    ehlo_hook_ver: str | None


_tables: dict[tuple[type, type], Tables] = {}


def _find(server: SMTP, handler: Any) -> Tables:
    """The same walks as `SMTP.__init__`, keeping names instead of bound methods."""
    auth: dict[str, tuple[str, bool]] = {
        getattr(mfunc, "__auth_mechanism_name__", mname.replace("auth_", "").replace("__", "-")): (
            mname,
            obj is server,
        )
        for obj in (server, handler)
        for mname, mfunc in inspect.getmembers(obj)
        if mname.startswith("auth_")
    }
    hooks = tuple((m.replace("handle_", ""), m) for m in dir(handler) if m.startswith("handle_"))
    verbs = tuple((m.replace("smtp_", ""), m) for m in dir(server) if m.startswith("smtp_"))
    ehlo = dict(hooks).get("EHLO")
    ehlo_ver = None if ehlo is None else _ehlo_hook_ver(getattr(handler, ehlo))
    return Tables(
        tuple((mech, name, own) for mech, (name, own) in auth.items()), hooks, verbs, ehlo_ver
    )


def _ehlo_hook_ver(hook: Callable[..., Any]) -> str:
    parameters = inspect.signature(hook).parameters
    if len(parameters) == 4:
        warn(
            "Use the 5-argument handle_EHLO() hook instead of the 4-argument handle_EHLO() "
            "hook; support for the 4-argument handle_EHLO() hook will be removed in version 2.0",
            DeprecationWarning,
            stacklevel=4,
        )
        return "old"
    if len(parameters) == 5:
        return "new"
    raise RuntimeError("Unsupported EHLO Hook")


def tables_for(server: SMTP, handler: Any) -> Tables:
    # Hooks set on the handler object itself (not its class) are found afresh.
    own = getattr(handler, "__dict__", {})
    if any(name.startswith(("handle_", "auth_")) for name in own):
        return _find(server, handler)
    key = (type(server), type(handler))
    found = _tables.get(key)
    if found is None:
        found = _tables[key] = _find(server, handler)
    return found


class CachedInitSMTP(SMTP):
    def __init__(self, handler: Any, **kwargs: Any) -> None:
        if aiosmtpd.__version__ != REPLICATED_VERSION:
            super().__init__(handler, **kwargs)
            return
        self._init_1_4_6(handler, **kwargs)

    def _init_1_4_6(
        self,
        handler: Any,
        *,
        data_size_limit: int | None = aio.DATA_SIZE_DEFAULT,
        enable_SMTPUTF8: bool = False,
        decode_data: bool = False,
        hostname: str | None = None,
        ident: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        timeout: float = 300,
        auth_required: bool = False,
        auth_require_tls: bool = True,
        auth_exclude_mechanism: Iterable[str] | None = None,
        auth_callback: Any = None,
        command_call_limit: int | dict[str, int] | None = None,
        authenticator: Any = None,
        proxy_protocol_timeout: float | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.__ident__ = ident or aio.__ident__
        self.loop = loop if loop else aio.make_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )
        self.event_handler = handler
        assert data_size_limit is None or isinstance(data_size_limit, int)
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = decode_data
        self.command_size_limits.clear()
        self.hostname = hostname if hostname else socket.getfqdn()
        self.tls_context = tls_context
        if tls_context:
            if tls_context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:
                aio.log.warning(
                    "tls_context.verify_mode not in {CERT_NONE, CERT_OPTIONAL}; "
                    "this might cause client connection problems"
                )
            elif tls_context.check_hostname:
                aio.log.warning(
                    "tls_context.check_hostname == True; this might cause client "
                    "connection problems"
                )
        self.require_starttls = tls_context and require_starttls
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        if not auth_require_tls and auth_required:
            warn(
                "Requiring AUTH while not requiring TLS can lead to security vulnerabilities!",
                stacklevel=3,
            )
            aio.log.warning("auth_required == True but auth_require_tls == False")
        self._auth_require_tls = auth_require_tls
        if proxy_protocol_timeout is not None:
            if proxy_protocol_timeout <= 0:
                raise ValueError("proxy_protocol_timeout must be > 0")
            if proxy_protocol_timeout < 3.0:
                aio.log.warning("proxy_protocol_timeout < 3.0")
        self._proxy_timeout = proxy_protocol_timeout
        if authenticator is not None:
            self._authenticator = authenticator
            self._auth_callback = None
        else:
            self._auth_callback = auth_callback or aio.login_always_fail
            self._authenticator = None
        self._auth_required = auth_required
        self._bind_tables(handler, auth_exclude_mechanism)
        self._init_call_limit(command_call_limit)

    def _bind_tables(self, handler: Any, auth_exclude_mechanism: Iterable[str] | None) -> None:
        tables = tables_for(self, handler)
        self._auth_methods = {
            mech: aio._AuthMechAttr(getattr(self if own else handler, name), own)
            for mech, name, own in tables.auth
        }
        for mechanism in auth_exclude_mechanism or []:
            self._auth_methods.pop(mechanism, None)
        if aio.log.isEnabledFor(logging.INFO):
            aio.log.info(
                "Available AUTH mechanisms: "
                + " ".join(
                    m + "(builtin)" if impl.is_builtin else m
                    for m, impl in sorted(self._auth_methods.items())
                )
            )
        self._handle_hooks = {command: getattr(handler, name) for command, name in tables.hooks}
        self._ehlo_hook_ver = tables.ehlo_hook_ver
        self._smtp_methods = {command: getattr(self, name) for command, name in tables.verbs}

    def _init_call_limit(self, command_call_limit: int | dict[str, int] | None) -> None:
        if command_call_limit is None:
            self._enforce_call_limit = False
            return
        self._enforce_call_limit = True
        if isinstance(command_call_limit, int):
            self._call_limit_base = {}
            self._call_limit_default = command_call_limit
        elif isinstance(command_call_limit, dict):
            if not all(map(aio.is_int, command_call_limit.values())):
                raise TypeError("All command_call_limit values must be int")
            self._call_limit_base = command_call_limit
            self._call_limit_default = command_call_limit.get("*", aio.CALL_LIMIT_DEFAULT)
        else:
            raise TypeError("command_call_limit must be int or Dict[str, int]")


__all__ = ["REPLICATED_VERSION", "CachedInitSMTP", "Tables", "tables_for"]
