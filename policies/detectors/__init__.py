"""Personal-data detectors. Each takes normalised text and yields masked findings."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from policies.detectors import credit_card, email_addresses, my_number, phone_jp
from policies.detectors.base import Finding, PiiKind
from policies.text import for_detectors

__all__ = ["DETECTORS", "Finding", "PiiKind", "detect"]

DETECTORS: dict[PiiKind, Callable[[str], Iterator[Finding]]] = {
    PiiKind.CREDIT_CARD: credit_card.find,
    PiiKind.MY_NUMBER: my_number.find,
    PiiKind.PHONE_JP: phone_jp.find,
    PiiKind.EMAIL_ADDRESSES: email_addresses.find,
}


# Every number detector needs at least ten digits with separators. Scanning once for
# such runs (a pattern starting with a character set, which the regex engine scans for
# in C) and handing the detectors only those runs, keeps prose cheap to inspect. Two
# characters of context on each side keep the detectors' boundary checks exact.
# The look-behind (after the first character, to keep the fast scan) keeps a run from
# being tried again at each of its digits.
_NUMBER_RUN = re.compile(r"[\d+(](?<!\d[\d+(])[\d ()+-]{8,}\d")
_NUMBER_DETECTORS = (credit_card.find, my_number.find, phone_jp.find)


def detect(normalized: str) -> tuple[Finding, ...]:
    """Every finding of every detector in NFKC-normalised text."""
    if not normalized:
        return ()
    text = for_detectors(normalized)
    runs = "\n".join(text[max(0, m.start() - 2) : m.end() + 2] for m in _NUMBER_RUN.finditer(text))
    found = [f for find in _NUMBER_DETECTORS for f in find(runs)] if runs else []
    found.extend(email_addresses.find(text))
    return tuple(found)
