"""The client book: which company a domain belongs to, and which markers name it.

Markers are matched in `fold`ed form (NFKC and case-folded), so `ＡＣＭＥ`, `acme` and
`ACME` are one marker, and `ｱｸﾒ` is `アクメ`. An ASCII marker must not sit inside a
longer word (`ACME` is not found in `ACMEDIA`), but may touch digits and punctuation
(`ACME2024_見積.xlsx`). Other markers are found anywhere: Japanese has no spaces.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from policies.config import ClientSpec
from policies.text import fold


@dataclass(frozen=True, slots=True)
class MarkerHit:
    client: str
    marker: str  # as the operator wrote it


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().strip("<>").lower().rstrip(".")


def domain_matches(domain: str, globs: Sequence[str]) -> bool:
    return any(fnmatchcase(domain, g) for g in globs)


class ClientBook:
    """Compiled `[[clients]]`. The first client in the book wins an overlapping domain."""

    def __init__(self, specs: Sequence[ClientSpec] = ()) -> None:
        self.specs: tuple[ClientSpec, ...] = tuple(specs)
        self._by_folded: dict[str, list[MarkerHit]] = {}
        for spec in self.specs:
            for marker in spec.markers:
                self._by_folded.setdefault(fold(marker), []).append(MarkerHit(spec.name, marker))
        self._pattern = _marker_pattern(self._by_folded)

    def __iter__(self) -> Iterator[ClientSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def client_for(self, address: str) -> ClientSpec | None:
        domain = domain_of(address)
        return next((c for c in self.specs if domain_matches(domain, c.domains)), None)

    def markers_in(self, text: str) -> tuple[MarkerHit, ...]:
        """Each (client, marker) found in `text`, once, in book order."""
        return self.markers_in_folded(fold(text)) if text else ()

    def markers_in_folded(self, folded: str) -> tuple[MarkerHit, ...]:
        """As `markers_in`, for text already NFKC-normalised and case-folded."""
        if self._pattern is None or not folded:
            return ()
        found = {m.group() for m in self._pattern.finditer(folded)}
        return tuple(hit for key in self._by_folded if key in found for hit in self._by_folded[key])


def _marker_pattern(folded: dict[str, list[MarkerHit]]) -> re.Pattern[str] | None:
    if not folded:
        return None
    alternatives = []
    for marker in sorted(folded, key=len, reverse=True):  # longest first: "acme-jp" before "acme"
        escaped = re.escape(marker)
        if marker.isascii():
            # The look-behind follows the literal, so that the pattern starts with the
            # markers' first characters, which the regex engine scans for quickly.
            escaped = rf"{escaped}(?<![a-z]{escaped})(?![a-z])"
        alternatives.append(escaped)
    return re.compile("|".join(alternatives))
