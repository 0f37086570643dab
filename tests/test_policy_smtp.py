"""The rules at work through real SMTP: refuse before the 250, hold, deliver."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import select

from quarantine.models import Message, Recipient
from tests.conftest import Upstream, gateway_config, running
from tests.policies.messages import plain, simple

CLIENTS = [
    {
        "name": "acme",
        "domains": ["acme.example"],
        "markers": ["ACME", "アクメ"],
        "zip_password": "acme-pass-1234",
    },
    {"name": "globex", "domains": ["globex.example"], "markers": ["GLOBEX"]},
]
RULES = [
    {
        "name": "wrong-client-attachment",
        "when": {"attachment_client_mismatch": True},
        "action": "refuse",
        "reason": "添付ファイルが宛先と異なる取引先のものです"
        " / attachment belongs to another client",
    },
    {
        "name": "personal-data",
        "when": {"pii": ["my_number", "credit_card"], "pii_min": 1},
        "action": "hold",
        "approvers": ["group:compliance"],
    },
]


def _config(tmp_path: Path, url: str, port: int) -> object:
    # notices about held mail are tested in test_workflow_notices
    return gateway_config(
        tmp_path,
        url,
        port,
        clients=CLIENTS,
        rules=RULES,  # type: ignore[arg-type]
        approval={"notify_by_mail": False},
    )


async def test_attachment_for_other_client_is_refused_with_the_rule_name(
    tmp_path: Path, store_url: str, upstream: Upstream
) -> None:
    raw = simple(
        "見積書です",
        [("ACME_見積書.csv", b"item,price\r\nwidget,100\r\n", "text/csv")],
        to="buyer@globex.example",
    )
    async with running(_config(tmp_path, store_url, upstream.port)) as gw:  # type: ignore[arg-type]
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp_port, start_tls=False)
        await client.connect()
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.sendmail("alice@example.com", ["buyer@globex.example"], raw)
        await client.quit()
        async with gw.store.read() as session:
            stored = (await session.scalars(select(Message))).all()
    assert refused.value.code == 550
    assert refused.value.message.startswith(
        "5.7.1 wrong-client-attachment: attachment belongs to another client"
    )
    assert stored == []  # nothing stored but the audit event
    events = [json.loads(line) for line in Path(gw.config.audit.path).read_text().splitlines()]
    refusal = [e for e in events if e["event"] == "message.refused"]
    assert len(refusal) == 1 and refusal[0]["rule"] == "wrong-client-attachment"
    assert upstream.received == []


async def test_personal_data_is_held_and_a_clean_message_is_delivered(
    tmp_path: Path, store_url: str, upstream: Upstream
) -> None:
    card = "4111 1111 1111 1111"
    held = plain(f"カード番号: {card}\r\n", to="buyer@acme.example")
    clean = plain("いつもお世話になっております。\r\n", to="buyer@acme.example")
    async with running(_config(tmp_path, store_url, upstream.port)) as gw:  # type: ignore[arg-type]
        for raw in (held, clean):
            await aiosmtplib.send(
                raw,
                sender="alice@example.com",
                recipients=["buyer@acme.example"],
                hostname="127.0.0.1",
                port=gw.smtp_port,
                start_tls=False,
            )
        await upstream.wait_for(1)
        await asyncio.sleep(0.3)
        async with gw.store.read() as session:
            messages = {m.state: m for m in (await session.scalars(select(Message))).all()}
            waiting = (
                await session.scalars(
                    select(Recipient).where(Recipient.message_id == messages["held"].id)
                )
            ).all()
    assert set(messages) == {"held", "delivered"}
    assert messages["held"].rule == "personal-data"
    assert messages["held"].verdict["approvers"] == ["group:compliance"]
    assert [r.state for r in waiting] == ["waiting"]
    assert [r.data for r in upstream.received] == [clean]
    trace = json.dumps(messages["held"].verdict, ensure_ascii=False)
    assert card not in trace and card.replace(" ", "") not in trace
    assert card not in Path(gw.config.audit.path).read_text()


def test_policy_test_command_prints_the_verdict_and_trace(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[organization]\ndomains = ["example.com"]\n'
        '[[clients]]\nname = "acme"\ndomains = ["acme.example"]\nmarkers = ["ACME"]\n'
        '[[clients]]\nname = "globex"\ndomains = ["globex.example"]\nmarkers = ["GLOBEX"]\n'
        '[[rules]]\nname = "wrong-client-attachment"\nwhen.attachment_client_mismatch = true\n'
        'action = "refuse"\nreason = "attachment belongs to another client"\n',
        encoding="utf-8",
    )
    eml = tmp_path / "m.eml"
    eml.write_bytes(simple("hi", [("ACME_report.csv", b"a,b\r\n", "text/csv")]))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "policy",
            "test",
            str(eml),
            "--config",
            str(config),
            "--from",
            "alice@example.com",
            "--to",
            "x@globex.example",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verdict"]["action"] == "refuse"
    assert report["verdict"]["rule"] == "wrong-client-attachment"
    names = [a["name"] for a in report["facts"]["attachments"]]
    assert names == ["ACME_report.csv"]
