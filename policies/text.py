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
DASHES = "‐‑‒–—―−ーｰ－"
_DASHES = re.compile(f"[{DASHES}]")

_HTML_DROP = re.compile(r"<(script|style|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_BREAK = re.compile(r"<\s*(?:br|/p|/div|/tr|/li|/h\d|/td|/th)\b[^>]*>", re.IGNORECASE)
_TAG = re.compile(r"<[^>]*>")


# Characters whose NFKC form is themselves, apart from full-width ASCII and the
# ideographic space, which map one to one. Everyday Japanese text stays inside this
# set, and for it NFKC (about 80 ns a character in CPython) is a cheap substitution.
# Combining marks (U+3099, U+309A) and compatibility kana and ideographs are outside,
# so any text that could compose or decompose takes the full path.
_SIMPLE = re.compile(
    "[^\x00-\x7f\u3000-\u3035\u3037\u303b-\u303f\u3041-\u3096\u30a1-\u30fe"
    "\u4e00-\u9fff\uff01-\uff5e]"
)
_FULL_WIDTH = re.compile("[\u3000\uff01-\uff5e]")


def _half_width(match: re.Match[str]) -> str:
    char = match.group()
    return " " if char == "\u3000" else chr(ord(char) - 0xFEE0)


def normalize(text: str) -> str:
    """NFKC: what subject and body patterns are matched against."""
    if unicodedata.is_normalized("NFKC", text):  # one pass in C, exact
        return text
    if _SIMPLE.search(text) is None:
        return _FULL_WIDTH.sub(_half_width, text)
    return unicodedata.normalize("NFKC", text)


def for_detectors(normalized: str) -> str:
    """Normalised text with every dash variant as '-', so `090ー1234ー5678` is a phone."""
    return _DASHES.sub("-", normalized)


def fold(text: str) -> str:
    """The form markers and names are matched in: NFKC and case-folded."""
    return normalize(text).casefold()


def html_to_text(markup: str) -> str:
    """Visible text of an HTML body, good enough for detectors and patterns."""
    markup = _HTML_DROP.sub(" ", markup)
    markup = _HTML_BREAK.sub("\n", markup)
    return html.unescape(_TAG.sub("", markup))
