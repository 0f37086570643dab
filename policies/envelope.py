"""The SMTP envelope as the policy engine sees it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Envelope(BaseModel):
    model_config = ConfigDict(frozen=True)

    mail_from: str
    rcpt_tos: tuple[str, ...]
    sender_user: str | None = None
    sender_groups: tuple[str, ...] = ()
