"""Message ids minted at intake: the same 22 characters as the plain base32 loop gives,
ordered by time, and unique across threads and forked worker processes."""

from __future__ import annotations

import itertools
import os
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import ids
from gateway.ids import created_ms, is_valid_id, new_id

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def reference_id(ms: int, random62: int) -> str:
    """The id as first written: 22 base32 digits of (ms << 62 | random), one at a time."""
    value = (ms << 62) | random62
    chars = []
    for _ in range(22):
        value, digit = divmod(value, 32)
        chars.append(ALPHABET[digit])
    return "".join(reversed(chars))


@settings(max_examples=500)
@given(st.integers(min_value=0, max_value=2**48 - 1), st.integers(0, 2**62 - 1))
def test_an_id_is_the_plain_base32_of_time_and_randomness(ms: int, random62: int) -> None:
    original = ids._random62
    ids._random62 = lambda: random62
    try:
        assert new_id(ms) == reference_id(ms, random62)
    finally:
        ids._random62 = original


def test_ids_sort_by_time_whatever_their_random_part() -> None:
    rng = random.Random(7)
    times = sorted(rng.randrange(1_600_000_000_000, 1_900_000_000_000) for _ in range(2000))
    times += [2**k - 1 for k in range(40, 48)] + [2**k for k in range(40, 48)]
    times.sort()
    minted = [new_id(ms) for ms in times]
    assert [created_ms(i) for i in minted] == times
    distinct_times = [i for i, (a, b) in enumerate(itertools.pairwise(times)) if a < b]
    assert all(minted[i] < minted[i + 1] for i in distinct_times)


def test_ids_are_22_characters_of_the_alphabet() -> None:
    for message_id in (new_id() for _ in range(1000)):
        assert len(message_id) == 22 and set(message_id) <= set(ALPHABET)
        assert is_valid_id(message_id)


def test_ids_of_one_millisecond_are_unique() -> None:
    minted = [new_id(1_700_000_000_000) for _ in range(100_000)]  # many refills of the pool
    assert len(set(minted)) == len(minted)


def test_threads_never_share_an_id() -> None:
    minted: list[list[str]] = [[] for _ in range(8)]

    def mint(into: list[str]) -> None:
        into.extend(new_id(1_700_000_000_000) for _ in range(5000))

    threads = [threading.Thread(target=mint, args=(out,)) for out in minted]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for out in minted for i in out]
    assert len(set(every)) == len(every) == 40_000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_does_not_reuse_its_parents_random_numbers() -> None:
    new_id()  # the parent has random numbers buffered
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.write(write, " ".join(new_id(1) for _ in range(20)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        in_child = set(pipe.read().split())
    os.waitpid(child, 0)
    in_parent = {new_id(1) for _ in range(20)}
    assert len(in_child) == 20 and not in_child & in_parent
