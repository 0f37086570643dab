"""Delivery status notifications (RFC 3464) for recipients that bounced."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage, Message
from email.utils import format_datetime, make_msgid

from policies.mime import SMTP_POLICY

_STATUS = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
HEADERS_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class Failed:
    address: str
    code: int | None
    response: str


def build_dsn(
    *,
    reporting_host: str,
    original_id: str,
    original_from: str,
    original: bytes,
    failed: Sequence[Failed],
    arrival: datetime,
    now: datetime,
) -> bytes:
    """A multipart/report with a readable part, the per-recipient status and the
    original headers (never the original body: it may carry what the sender must not
    get back unprotected, and RFC 3462 allows headers only)."""
    report = EmailMessage(policy=SMTP_POLICY)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_host}>"
    report["To"] = original_from
    report["Subject"] = "Undelivered Mail Returned to Sender / 配信できませんでした"
    report["Date"] = format_datetime(now)
    report["Message-ID"] = make_msgid(domain=reporting_host)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: no auto-reply to this
    report.set_content(_human(original_id, failed), cte="quoted-printable")
    report.make_mixed()
    report.replace_header("Content-Type", "multipart/report; report-type=delivery-status")
    report.set_boundary(f"sekisho-dsn-{original_id}")
    status = EmailMessage(policy=SMTP_POLICY)
    status["Content-Type"] = "message/delivery-status"
    status.set_payload(list[Message | str](_machine(reporting_host, original_id, failed, arrival)))
    report.attach(status)
    headers = EmailMessage(policy=SMTP_POLICY)
    end = original.find(b"\r\n\r\n")
    headers.set_payload(
        original[: end + 2 if end >= 0 else HEADERS_LIMIT][:HEADERS_LIMIT].decode(
            "ascii", "replace"
        )
    )
    headers["Content-Type"] = "text/rfc822-headers"
    report.attach(headers)
    return report.as_bytes(policy=SMTP_POLICY)


def _human(original_id: str, failed: Sequence[Failed]) -> str:
    lines = [
        f"Your message {original_id} could not be delivered to the following recipients.",
        "次の宛先へメッセージを配信できませんでした。",
        "",
    ]
    lines += [f"  <{f.address}>: {f.response}" for f in failed]
    return "\n".join(lines) + "\n"


def _fields(pairs: Sequence[tuple[str, str]]) -> Message:
    block = Message(policy=SMTP_POLICY)
    for name, value in pairs:
        block[name] = value
    return block


def _machine(
    host: str, original_id: str, failed: Sequence[Failed], arrival: datetime
) -> list[Message]:
    """Per-message fields, then one block of per-recipient fields each (RFC 3464 §2.2-2.3)."""
    blocks = [
        _fields(
            [
                ("Reporting-MTA", f"dns; {host}"),
                ("X-Sekisho-Queue-ID", original_id),
                ("Arrival-Date", format_datetime(arrival)),
            ]
        )
    ]
    for f in failed:
        match = _STATUS.search(f.response)
        status = match.group(1) if match and match.group(1)[0] == "5" else "5.0.0"
        diagnostic = f"smtp; {f.code} {f.response}" if f.code else f"X-Sekisho; {f.response}"
        blocks.append(
            _fields(
                [
                    ("Final-Recipient", f"rfc822; {f.address}"),
                    ("Action", "failed"),
                    ("Status", status),
                    ("Diagnostic-Code", " ".join(diagnostic.split())[:900]),
                ]
            )
        )
    return blocks
