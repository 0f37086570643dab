"""What a detector reports: the kind of personal data and the value, already masked.

Detectors never return the full value, so it cannot reach a trace, a log line or an
SMTP reply by accident.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class PiiKind(StrEnum):
    CREDIT_CARD = "credit_card"
    MY_NUMBER = "my_number"
    PHONE_JP = "phone_jp"
    EMAIL_ADDRESSES = "email_addresses"


@dataclass(frozen=True, slots=True)
class Finding:
    kind: PiiKind
    masked: str


# A digit run must not continue a code like `ORD-1234…` or `INV1234…`, nor be a slice
# of a longer grouped number: no ASCII letter or digit next to it, and no separator
# that joins it to one.
BEFORE = r"(?<![0-9A-Za-z])(?<![0-9A-Za-z]-)(?<!\d )"
AFTER = r"(?![0-9A-Za-z])(?!-[0-9A-Za-z])(?! \d)"

_NOT_DIGIT = re.compile(r"\D")


def digits(text: str) -> str:
    return _NOT_DIGIT.sub("", text)


def star_groups(count: int) -> list[str]:
    """`count` stars in groups of four, for readable masks like `4111 **** **** 1111`."""
    stars = "*" * count
    return [stars[i : i + 4] for i in range(0, count, 4)]
