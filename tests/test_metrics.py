"""/metrics tells operators what the gateway did: outcomes by reply class, verdicts by
rule, refusals, queue depth, held waits and store latency."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib
import httpx
import pytest

from tests.conftest import Upstream, gateway_config, running

RULES = [
    {
        "name": "no-secrets",
        "when": {"subject_matches": ["(?i)secret"]},
        "action": "refuse",
        "reason": "secret in the subject",
    },
    {"name": "hold-reports", "when": {"subject_matches": ["(?i)report"]}, "action": "hold"},
]


def _value(text: str, prefix: str) -> float:
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == prefix:
            return float(value)
    raise AssertionError(f"{prefix} not in metrics")


async def test_metrics_count_outcomes_verdicts_and_refusals(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    upstream.rcpt_reply = lambda a: "550 5.1.1 no such user" if a.startswith("gone@") else None
    config = gateway_config(
        tmp_path, sqlite_url, upstream.port, rules=RULES, approval={"notify_by_mail": False}
    )
    async with running(config) as gw:

        async def send(subject: str, rcpts: list[str]) -> None:
            await aiosmtplib.send(
                f"Subject: {subject}\r\n\r\nx\r\n".encode(),
                sender="alice@example.com",
                recipients=rcpts,
                hostname="127.0.0.1",
                port=gw.smtp_port,
                start_tls=False,
            )

        await send("hello", ["ok@client.example", "gone@client.example"])
        await send("monthly report", ["ok@client.example"])
        with pytest.raises(aiosmtplib.SMTPDataError):
            await send("top secret", ["ok@client.example"])
        await upstream.wait_for(2)  # the delivery and the DSN for gone@
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{gw.http_port}/metrics")).text
    assert _value(text, 'sekisho_deliveries_total{code_class="2xx",result="sent"}') == 2
    assert _value(text, 'sekisho_deliveries_total{code_class="5xx",result="bounced"}') == 1
    assert _value(text, 'sekisho_verdicts_total{rule="hold-reports",state="held"}') == 1
    assert _value(text, 'sekisho_verdicts_total{rule="no-secrets",state="refused"}') == 1
    assert _value(text, 'sekisho_smtp_refusals_total{reason="no-secrets"}') == 1
    assert _value(text, 'sekisho_messages{state="held"}') == 1
    assert _value(text, 'sekisho_held_waiting{le="60"}') == 0
    assert _value(text, "sekisho_store_ping_seconds") < 1.0
    assert "sekisho_smtp_sessions " in text
