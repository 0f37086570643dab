"""Japanese telephone numbers: mobile, IP, toll-free and landline, domestic or +81.

Numbering plan (総務省 電気通信番号計画): mobile 070/080/090 and IP 050 have 11
digits; landlines have 10 (0 + area code + subscriber, the area code 1–4 digits);
toll-free 0120 has 10 and 0800 has 11; navi-dial 0570 has 10.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from policies.detectors.base import AFTER, BEFORE, Finding, PiiKind, digits

_SEP = r"[ -]?"
_CANDIDATE = re.compile(
    BEFORE
    + r"(?:\+81" + _SEP + r"\(?0?\)?|\(?0)\d{1,4}\)?" + _SEP + r"\d{1,4}\)?" + _SEP + r"\d{3,4}"
    + AFTER
)
_VALID = re.compile(
    # Landlines exclude the prefixes above, so `090-1234-567` is no landline.
    r"0(?:[789]0\d{8}|50\d{8}|120\d{6}|800\d{7}|570\d{6}|(?![789]0|50|120|800|570)[1-9]\d{8})"
)


def domestic(text: str) -> str:
    number = digits(text)
    if text.lstrip().startswith("+81"):
        number = number[2:]
        number = number if number.startswith("0") else "0" + number
    return number


def is_phone(text: str) -> bool:
    return _VALID.fullmatch(domestic(text)) is not None


def mask(number: str) -> str:
    return f"{number[:3]}-****-{number[-4:]}"


def find(text: str) -> Iterator[Finding]:
    for match in _CANDIDATE.finditer(text):
        if is_phone(match.group()):
            yield Finding(PiiKind.PHONE_JP, mask(domestic(match.group())))
