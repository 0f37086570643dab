"""Text as the engine compares it: NFKC-normalised, and HTML reduced to text.

NFKC folds full-width ASCII (`ＡＣＭＥ`, `４１１１`) to half width and half-width
katakana (`ｱｸﾒ`) to full width, so markers, patterns and detectors see one form of
what a Japanese sender may type in either.
"""

from __future__ import annotations

import html
import re
import unicodedata

# Dashes Japanese text uses between digit groups; NFKC leaves these alone.
_DASHES = str.maketrans({c: "-" for c in "‐‑‒–—―−ーｰ－"})

_HTML_DROP = re.compile(r"<(script|style|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_BREAK = re.compile(r"<\s*(?:br|/p|/div|/tr|/li|/h\d|/td|/th)\b[^>]*>", re.IGNORECASE)
_TAG = re.compile(r"<[^>]*>")


def normalize(text: str) -> str:
    """NFKC: what subject and body patterns are matched against."""
    return unicodedata.normalize("NFKC", text)


def for_detectors(normalized: str) -> str:
    """Normalised text with every dash variant as '-', so `090ー1234ー5678` is a phone."""
    return normalized.translate(_DASHES)


def fold(text: str) -> str:
    """The form markers and names are matched in: NFKC and case-folded."""
    return unicodedata.normalize("NFKC", text).casefold()


def html_to_text(markup: str) -> str:
    """Visible text of an HTML body, good enough for detectors and patterns."""
    markup = _HTML_DROP.sub(" ", markup)
    markup = _HTML_BREAK.sub("\n", markup)
    return html.unescape(_TAG.sub("", markup))
