"""The Japanese individual number (マイナンバー): 12 digits, the last a check digit.

The check digit is defined by the Ordinance of the Ministry of Internal Affairs and
Communications No. 85 of 2014, art. 5: with P(n) the n-th digit counted leftwards from
the check digit and Q(n) = n + 1 for n ≤ 6, n − 5 for n ≥ 7, the remainder
r = Σ P(n)·Q(n) mod 11 gives the check digit 0 if r ≤ 1, else 11 − r.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime

from policies.detectors.base import AFTER, BEFORE, Finding, PiiKind, digits

# Twelve digits in a row, or 4-4-4 with one kind of separator.
_CANDIDATE = re.compile(BEFORE + r"(?:\d{12}|\d{4}([ -])\d{4}\1\d{4})" + AFTER)


# Q(n) for P(1)…P(11), listed left to right (P(11) first).
_WEIGHTS = tuple(n + 1 if n <= 6 else n - 5 for n in range(11, 0, -1))


def check_digit(first_eleven: str) -> int:
    total = sum(int(p) * q for p, q in zip(first_eleven, _WEIGHTS, strict=True))
    remainder = total % 11
    return 0 if remainder <= 1 else 11 - remainder


def is_valid(number: str) -> bool:
    return len(number) == 12 and number.isdigit() and check_digit(number[:11]) == int(number[11])


def _looks_like_timestamp(number: str) -> bool:
    """`202401151230` (yyyymmddHHMM) is a date with a time, not a person."""
    try:
        datetime.strptime(number, "%Y%m%d%H%M")
    except ValueError:
        return False
    return number[:2] in ("19", "20")


def mask(number: str) -> str:
    return f"**** **** {number[-4:]}"


def find(text: str) -> Iterator[Finding]:
    for match in _CANDIDATE.finditer(text):
        number = digits(match.group())
        if is_valid(number) and not _looks_like_timestamp(number):
            yield Finding(PiiKind.MY_NUMBER, mask(number))
