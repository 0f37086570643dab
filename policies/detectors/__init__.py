"""Personal-data detectors. Each takes normalised text and yields masked findings."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from policies.detectors import credit_card, email_addresses, my_number, phone_jp
from policies.detectors.base import Finding, PiiKind
from policies.text import DASHES, for_detectors

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
# being tried again at each of its digits. The dashes `for_detectors` turns into "-"
# are separators too, so that only the runs, not the whole text, need turning.
_RUN = r"[\d+(](?<!\d[\d+(])[\d ()+\-{dashes}]{{8,}}\d"
_NUMBER_RUN = re.compile(_RUN.format(dashes=DASHES))
# In ASCII text, \d is [0-9] either way; compiled for ASCII, the scan is a table look-up
# per character instead of a Unicode category check, and text without a digit (the
# bulk of plain English mail) cannot hold a run at all.
_ASCII_NUMBER_RUN = re.compile(_RUN.format(dashes=""), re.ASCII)
_NUMBER_DETECTORS = (credit_card.find, my_number.find, phone_jp.find)


def detect(normalized: str) -> tuple[Finding, ...]:
    """Every finding of every detector in NFKC-normalised text."""
    if not normalized:
        return ()
    runs = for_detectors("\n".join(
        normalized[max(0, m.start() - 2) : m.end() + 2] for m in _number_runs(normalized)
    ))
    found = [f for find in _NUMBER_DETECTORS for f in find(runs)] if runs else []
    if normalized.count("@") > email_addresses.LIST_THRESHOLD:  # else no list can be found
        found.extend(email_addresses.find(for_detectors(normalized)))
    return tuple(found)


def _number_runs(text: str) -> Iterator[re.Match[str]]:
    if not text.isascii():
        return _NUMBER_RUN.finditer(text)
    if not any(digit in text for digit in "0123456789"):
        return iter(())
    return _ASCII_NUMBER_RUN.finditer(text)
