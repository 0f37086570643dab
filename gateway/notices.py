"""Notices the gateway writes itself: the ZIP password to pass on by another channel.

Templates are Japanese and English; operators can override them in `[templates]`
with Python format fields: {original_id}, {subject}, {lines}.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from policies.mime import SMTP_POLICY

PASSWORD_NOTICE = """\
送信したメール「{subject}」の添付ファイルは、暗号化ZIPにして送られました。
パスワードは、メール以外の手段（電話、チャットなど）で宛先にお伝えください。

The attachments of your message "{subject}" were sent as encrypted ZIP files.
Please give the password to the recipients by another channel (phone, chat).

{lines}

Sekisho queue id: {original_id}
"""

METHOD_NAMES = {
    "aes256": "AES-256 (7-Zip / macOS)",
    "zipcrypto": "ZipCrypto (Windows Explorer)",
}


def password_notice(
    *,
    hostname: str,
    to: Sequence[str],
    original_id: str,
    original_subject: str | None,
    lines: Sequence[tuple[str, str, str]],
    now: datetime,
    template: str | None = None,
) -> bytes:
    subject = original_subject or "(no subject)"
    listing = "\n".join(
        f"宛先 / To: {address}\n  パスワード / Password: {password}\n"
        f"  方式 / Method: {METHOD_NAMES.get(method, method)}"
        for address, password, method in lines
    )
    body = (template or PASSWORD_NOTICE).format(
        subject=subject, lines=listing, original_id=original_id
    )
    return build_notice(
        hostname=hostname,
        to=to,
        now=now,
        body=body,
        subject=f"添付ファイルのパスワード / Attachment password: {subject}",
    )


def build_notice(
    *, hostname: str, to: Sequence[str], subject: str, body: str, now: datetime
) -> bytes:
    """A mail the gateway writes itself, from postmaster, marked auto-generated so that
    no auto-responder answers it (RFC 3834). The body is base64: the text is
    Japanese and English, and some smarthosts still lack 8BITMIME."""
    notice = EmailMessage(policy=SMTP_POLICY)
    notice["From"] = f"Sekisho <postmaster@{hostname}>"
    notice["To"] = ", ".join(to)
    notice["Subject"] = f"[Sekisho] {subject}"
    notice["Date"] = format_datetime(now)
    notice["Message-ID"] = make_msgid(domain=hostname)
    notice["Auto-Submitted"] = "auto-generated"
    notice.set_content(body, cte="base64")
    return notice.as_bytes(policy=SMTP_POLICY)
