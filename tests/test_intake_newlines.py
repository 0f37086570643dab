"""Line-end normalisation at intake (RFC 5321 §2.3.8) rewrites a window at a time: the
result is the whole-message substitution's, and it holds no piece per line."""

from __future__ import annotations

import re
import tracemalloc

from hypothesis import given
from hypothesis import strategies as st

from gateway.intake import normalize_newlines

WHOLE = re.compile(rb"\r\n|\r|\n")
LINE_ENDS = st.binary().map(lambda b: bytes(b"ab\r\n."[x % 5] for x in b))


@given(data=LINE_ENDS, window=st.integers(min_value=1, max_value=8))
def test_windowed_normalisation_equals_the_whole_message_substitution(
    data: bytes, window: int
) -> None:
    assert normalize_newlines(data, window=window) == WHOLE.sub(b"\r\n", data)


def test_a_crlf_across_a_window_edge_stays_one_line_end() -> None:
    data = b"a\r" + b"\n" + b"b\nc\r"
    for window in range(1, len(data) + 1):
        assert normalize_newlines(data, window=window) == b"a\r\nb\r\nc\r\n"


def test_a_message_without_bare_line_ends_is_returned_as_is() -> None:
    data = b"Subject: x\r\n\r\nbody\r\n"
    assert normalize_newlines(data) is data


def test_normalising_a_large_message_holds_no_piece_per_line() -> None:
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz01\r\n"
    data = b"Subject: x\r\n\r\nbare\n" + line * 40_000  # 3 MB, one bare LF
    tracemalloc.start()
    try:
        normalized = normalize_newlines(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert normalized == data.replace(b"bare\n", b"bare\r\n")
    # The result plus one window; a substitution over the whole message holds a bytes
    # object per line as well (~4.7x the message).
    assert peak < 1.3 * len(data), peak
