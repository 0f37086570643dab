"""A list of e-mail addresses: more than LIST_THRESHOLD distinct ones in one place.

One address in a signature is not personal data leaving; a pasted customer list is.
The threshold is counted per source (the body, or one attachment), so an export of
a mailing list is found where it is. Each address of the list is one finding, so
`pii_min` counts addresses.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from policies.detectors.base import Finding, PiiKind

LIST_THRESHOLD = 10

# Practical, not RFC 5322 complete: enough to count addresses in a list.
_ADDRESS = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


def mask(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"


def find(text: str) -> Iterator[Finding]:
    # Each distinct address has an "@" of its own: with no more "@" than the
    # threshold, no list can be found, and the costly scan is skipped.
    if text.count("@") <= LIST_THRESHOLD:
        return
    distinct = dict.fromkeys(m.lower() for m in _ADDRESS.findall(text))
    if len(distinct) <= LIST_THRESHOLD:
        return
    for address in distinct:
        yield Finding(PiiKind.EMAIL_ADDRESSES, mask(address))
