"""Payment card numbers: 13–19 digits, Luhn-valid (ISO/IEC 7812-1), known issuer prefix.

Grouping must be one of the layouts cards are printed in, with one separator kind,
so that order numbers and dates with dashes do not look like cards.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from policies.detectors.base import AFTER, BEFORE, Finding, PiiKind, digits, star_groups

_CANDIDATE = re.compile(BEFORE + r"\d(?:[ -]?\d){12,18}" + AFTER)
_LAYOUTS = {(4, 4, 4, 4), (4, 4, 4, 4, 3), (4, 6, 5), (4, 6, 4), (4, 4, 4, 2), (4, 4, 5)}

# (first digits as a range, allowed lengths): Visa, Mastercard, Amex, JCB, Diners,
# Discover, UnionPay.
_ISSUERS: tuple[tuple[int, int, frozenset[int]], ...] = (
    (4, 4, frozenset({13, 16, 19})),
    (51, 55, frozenset({16})),
    (2221, 2720, frozenset({16})),
    (34, 34, frozenset({15})),
    (37, 37, frozenset({15})),
    (3528, 3589, frozenset({16, 17, 18, 19})),
    (300, 305, frozenset({14, 16, 17, 18, 19})),
    (36, 36, frozenset({14, 16, 17, 18, 19})),
    (38, 39, frozenset({16, 17, 18, 19})),
    (6011, 6011, frozenset({16, 17, 18, 19})),
    (644, 649, frozenset({16, 17, 18, 19})),
    (65, 65, frozenset({16, 17, 18, 19})),
    (62, 62, frozenset({16, 17, 18, 19})),
)


def luhn_valid(number: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(number)):
        value = int(char)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def known_issuer(number: str) -> bool:
    for low, high, lengths in _ISSUERS:
        prefix = int(number[: len(str(low))])
        if low <= prefix <= high and len(number) in lengths:
            return True
    return False


def _well_grouped(text: str) -> bool:
    separators = set(re.findall(r"[ -]", text))
    if not separators:
        return True
    if len(separators) > 1:
        return False
    return tuple(len(g) for g in re.split(r"[ -]", text)) in _LAYOUTS


def is_card(text: str) -> bool:
    number = digits(text)
    return (
        13 <= len(number) <= 19
        and _well_grouped(text)
        and known_issuer(number)
        and luhn_valid(number)
    )


def mask(number: str) -> str:
    return " ".join([number[:4], *star_groups(len(number) - 8), number[-4:]])


def find(text: str) -> Iterator[Finding]:
    """Cards in `text`, which must already be normalised (half-width digits)."""
    for match in _CANDIDATE.finditer(text):
        if is_card(match.group()):
            yield Finding(PiiKind.CREDIT_CARD, mask(digits(match.group())))
