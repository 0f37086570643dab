"""MAIL/RCPT paths: the gateway's fast parse of the plain form answers exactly what
aiosmtpd's full parse answers, and hands everything else to it."""

from __future__ import annotations

import asyncio
import string
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.smtp_in import GatewaySMTP
from tests.conftest import Upstream, gateway_config, running

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
atom = st.text(alphabet=ATEXT, min_size=1, max_size=8)
label = st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=8)
local = st.lists(atom, min_size=1, max_size=3).map(".".join)
domain = st.lists(label, min_size=1, max_size=3).map(".".join)
tail = st.sampled_from(
    ["", " SIZE=100", "  BODY=8BITMIME", " SIZE=1 ", "SIZE=1", "\tSIZE=1", " (c) SIZE=1", " x y"]
)
# what a client may put around or inside the plain form
odd = st.sampled_from(
    [
        '"q s"@x.example',
        "a..b@x.example",
        ".a@x.example",
        "a@[127.0.0.1]",
        "@r.example:a@x.example",
        "a@x..example",
        "a@-x.example",
        "a@x.example.",
        "",
        "a",
        "a@",
    ]
)


def _answer(parse: Any, arg: str) -> Any:
    try:
        return parse(arg)
    except Exception as error:  # the stock parser raises on some inputs (e.g. "<>")
        return type(error)


def _parser(limit: int = 0) -> Any:
    server = GatewaySMTP.__new__(GatewaySMTP)  # only the parsing methods are used
    server.local_part_limit = limit
    return server


def _stock(arg: str, limit: int = 0) -> Any:
    server = SMTP.__new__(SMTP)
    server.local_part_limit = limit
    return SMTP._getaddr(server, arg)


@settings(max_examples=400, deadline=None)
@given(local=local, domain=domain, tail=tail, lead=st.sampled_from(["", " "]))
def test_the_fast_path_answers_what_aiosmtpd_answers(
    local: str, domain: str, tail: str, lead: str
) -> None:
    arg = f"{lead}<{local}@{domain}>{tail}"
    assert _parser()._getaddr(arg) == _stock(arg)


@settings(max_examples=100, deadline=None)
@given(path=odd, tail=tail)
def test_other_forms_get_aiosmtpds_answer(path: str, tail: str) -> None:
    for arg in (f"<{path}>{tail}", f"{path}{tail}"):
        assert _answer(_parser()._getaddr, arg) == _answer(_stock, arg)


@pytest.mark.parametrize("limit", [0, 64])
def test_a_long_local_part_is_refused_as_aiosmtpd_refuses_it(limit: int) -> None:
    arg = f"<{'a' * 65}@x.example> SIZE=1"
    assert _parser(limit)._getaddr(arg) == _stock(arg, limit)
    assert (_parser(limit)._getaddr(arg)[0] is None) == bool(limit)


def test_the_plain_form_does_not_touch_the_full_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any) -> Any:
        raise AssertionError("the full parser was used for a plain path")

    monkeypatch.setattr(SMTP, "_getaddr", refuse)
    assert _parser()._getaddr("<alice@example.com> SIZE=5120") == ("alice@example.com", "SIZE=5120")


async def test_a_multiline_reply_is_written_once(
    tmp_path: Path, sqlite_url: str, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiosmtpd writes each line of a reply on its own: EHLO's six lines were six sends.
    writes: list[bytes] = []
    original = asyncio.StreamWriter.write

    def write(self: asyncio.StreamWriter, data: bytes) -> None:
        writes.append(bytes(data))
        original(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", write)
    config = gateway_config(tmp_path, sqlite_url, upstream.port)
    async with running(config) as gw:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp_port, start_tls=False)
        await client.connect()
        await client.ehlo()
        extensions = dict(client.esmtp_extensions)
        await client.quit()
    (ehlo,) = [w for w in writes if w.startswith(b"250-")]
    lines = ehlo.split(b"\r\n")
    assert lines[-1] == b"" and lines[-2] == b"250 HELP"
    assert all(line.startswith(b"250-") for line in lines[:-2]) and len(lines) >= 5
    assert "size" in extensions and "8bitmime" in extensions and "smtputf8" in extensions
