"""The gateway's failures, written down once.

SmtpFailure
├── TemporaryFailure  4xx: try again later (deferred, retried with backoff)
└── PermanentFailure  5xx: will not work (bounced to the sender)
"""

from __future__ import annotations


class SmtpFailure(Exception):
    default_code = 451
    default_status = "4.3.0"

    def __init__(self, message: str, *, code: int | None = None, status: str | None = None) -> None:
        super().__init__(message)
        self.code = code if code is not None else self.default_code
        self.status = status if status is not None else self.default_status
        self.message = message

    def reply(self) -> str:
        return f"{self.code} {self.status} {self.message}"


class TemporaryFailure(SmtpFailure):
    default_code = 451
    default_status = "4.3.0"


class PermanentFailure(SmtpFailure):
    default_code = 550
    default_status = "5.0.0"
