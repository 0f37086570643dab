"""Personal-data detectors. Each takes normalised text and yields masked findings."""

from __future__ import annotations

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


def detect(normalized: str) -> tuple[Finding, ...]:
    """Every finding of every detector in NFKC-normalised text."""
    if not normalized:
        return ()
    text = for_detectors(normalized)
    return tuple(f for find in DETECTORS.values() for f in find(text))
