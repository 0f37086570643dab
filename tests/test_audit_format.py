"""The audit line's bytes, hash and chaining stay what `audit verify` and the operators'
tools read, and lines stay whole under threads, processes, a full disk and a close."""

from __future__ import annotations

import enum
import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit import GENESIS, AuditLog, verify

START = datetime(2026, 5, 9, 7, 35, 25, 123456, tzinfo=UTC)
JSON: dict[str, Any] = {"separators": (",", ":"), "ensure_ascii": False, "default": str}

# Written by the structlog-based implementation that this format was first defined by.
GOLDEN = [
    '{"ts":"2026-05-09T07:35:25.123Z","event":"delivery.sent","id":"01JTX8Q4Z6M1V8K2N3P4R5S6T7",'
    '"actor":"system","rcpt":"bob@client.example","code":250,'
    '"response":"250 2.0.0 Ok: queued as 4ZsK1x2Y3z","attempt":1,"retry_at":null,'
    '"instance":"gw-a","prev":"0000000000000000000000000000000000000000000000000000000000000000",'
    '"hash":"8f4320e8eb5d0608dd647566fbfa6ae749cc34504c14336b178593e5db357e92"}',
    '{"ts":"2026-05-09T07:35:26.123Z","event":"message.accepted","id":"m2",'
    '"actor":"alice@corp.example","mail_from":"alice@corp.example",'
    '"rcpt":["b@client.example","山田@例え.jp"],"size":5120,"state":"queued","rule":null,'
    '"client":"10.0.0.7","instance":"gw-a",'
    '"prev":"8f4320e8eb5d0608dd647566fbfa6ae749cc34504c14336b178593e5db357e92",'
    '"hash":"51dde7d4693643269210595ddcaa2df4d382514adad7de628a944e44f2c0ac89"}',
    '{"ts":"2026-05-09T07:35:27.123Z","event":"auth.failed","id":null,"actor":"system",'
    '"password":"[redacted]","token":"[redacted]","login":"alice","zip_password":"[redacted]",'
    '"data":"[redacted]","instance":"gw-a",'
    '"prev":"51dde7d4693643269210595ddcaa2df4d382514adad7de628a944e44f2c0ac89",'
    '"hash":"9ddf11bf2f044a5496fdc3609753aab095223488e5f6d62a7a9eae92de10ec21"}',
    '{"ts":"2026-05-09T07:35:28.123Z","event":"odd.values","id":null,"actor":"system",'
    '"nested":{"z":1,"a":[1.5,{"y":true,"b":null}]},"when":"2026-01-02 03:04:05+00:00",'
    '"amount":"1.10","big":100000000000000000000,'
    '"quote":"he said \\"hi\\"\\n\\ttab \u2028 \\u0000","emoji":"✉️","instance":"gw-a",'
    '"prev":"9ddf11bf2f044a5496fdc3609753aab095223488e5f6d62a7a9eae92de10ec21",'
    '"hash":"d0afd8827f8f447472511a1a6b0b2a47fb1f2f83fb358ac393ee56fb0e456b99"}',
    '{"ts":"2026-05-09T07:35:29.123Z","event":"gateway.started","id":null,"actor":"system",'
    '"instance":"gw-a",'
    '"prev":"d0afd8827f8f447472511a1a6b0b2a47fb1f2f83fb358ac393ee56fb0e456b99",'
    '"hash":"743ba6c2d7a151b5b0cd1579d98f9133b70efc05be54684963e0de86c3900dfd"}',
]


def ticking(start: datetime = START) -> Callable[[], datetime]:
    ticks = itertools.count()
    return lambda: start + timedelta(seconds=next(ticks))


def emit_golden_events(log: AuditLog) -> None:
    log.emit(
        "delivery.sent",
        id="01JTX8Q4Z6M1V8K2N3P4R5S6T7",
        rcpt="bob@client.example",
        code=250,
        response="250 2.0.0 Ok: queued as 4ZsK1x2Y3z",
        attempt=1,
        retry_at=None,
    )
    log.emit(
        "message.accepted",
        id="m2",
        actor="alice@corp.example",
        mail_from="alice@corp.example",
        rcpt=["b@client.example", "山田@例え.jp"],
        size=5120,
        state="queued",
        rule=None,
        client="10.0.0.7",
    )
    log.emit(
        "auth.failed",
        password="hunter2",
        token="skt_abc",
        login="alice",
        zip_password="z",
        data=b"x",
    )
    log.emit(
        "odd.values",
        nested={"z": 1, "a": [1.5, {"y": True, "b": None}]},
        when=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        amount=Decimal("1.10"),
        big=10**20,
        quote='he said "hi"\n\ttab \u2028 \x00',
        emoji="✉️",
    )
    log.emit("gateway.started")


def test_lines_are_byte_for_byte_the_established_format(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), clock=ticking(), instance="gw-a")
    emit_golden_events(log)
    # on disk when emit returns, before any close: operators tail the file
    assert path.read_bytes() == "".join(line + "\n" for line in GOLDEN).encode()
    log.close()
    assert verify(str(path)).ok


def test_a_line_without_instance_has_no_instance_key(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    AuditLog(str(path), clock=ticking()).emit("delivery.sent", id="m", code=250)
    assert path.read_text() == (
        '{"ts":"2026-05-09T07:35:25.123Z","event":"delivery.sent","id":"m","actor":"system",'
        '"code":250,"prev":"0000000000000000000000000000000000000000000000000000000000000000",'
        '"hash":"b6ebe33e648260f2b8f9c8af7b379ac6df4fe48af9cc13ce4d24fc48c761355e"}\n'
    )


def test_hash_is_sha256_of_sorted_json_without_hash_and_chains_from_genesis(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), clock=ticking(), instance="gw-a")
    emit_golden_events(log)
    log.close()
    prev = GENESIS
    for raw in path.read_bytes().split(b"\n")[:-1]:
        entry = json.loads(raw)
        assert list(entry)[:4] == ["ts", "event", "id", "actor"]
        assert list(entry)[-3:] == ["instance", "prev", "hash"]
        claimed = entry.pop("hash")
        assert entry["prev"] == prev
        assert (
            claimed
            == hashlib.sha256(json.dumps(entry, sort_keys=True, **JSON).encode()).hexdigest()
        )
        prev = claimed


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class State(enum.StrEnum):
    HELD = "held"


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()  # NaN and infinities too: json writes them as NaN and Infinity
    | st.text()
    | st.sampled_from([Colour.RED, Level.HIGH, State.HELD, Decimal("2.50"), START, b"x"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ordinary_keys = st.text(min_size=1, max_size=12).filter(
    lambda key: (
        key not in {"ts", "event", "id", "actor", "prev", "hash", "instance"}
        and key
        not in {"password", "zip_password", "secret", "token", "raw", "body", "content", "data"}
    )
)


@settings(max_examples=300, deadline=None)
@given(details=st.dictionaries(ordinary_keys, values, max_size=8), id=st.none() | st.text())
def test_any_details_are_written_as_json_dumps_would_and_verify(
    details: dict[str, Any], id: str | None
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "audit.log"
        log = AuditLog(str(path), clock=ticking(), instance="gw")
        log.emit("first")
        log.emit("any", id=id, **details)
        log.close()
        first, line = path.read_text(encoding="utf-8").split("\n")[:2]
        entry = {"ts": "2026-05-09T07:35:26.123Z", "event": "any", "id": id, "actor": "system"}
        entry |= details | {"instance": "gw", "prev": json.loads(first)["hash"]}
        entry["hash"] = hashlib.sha256(
            json.dumps(entry, sort_keys=True, **JSON).encode()
        ).hexdigest()
        assert line == json.dumps(entry, **JSON)
        assert verify(str(path)).ok


@pytest.mark.parametrize("key", ["ts", "prev", "hash"])
def test_a_caller_cannot_pass_the_logs_own_keys(tmp_path: Path, key: str) -> None:
    log = AuditLog(str(tmp_path / "audit.log"))
    with pytest.raises(TypeError):
        log.emit("forged", **{key: "2000-01-01T00:00:00.000Z"})
    log.emit("honest")
    log.close()
    assert verify(str(tmp_path / "audit.log")).ok


def test_secrets_are_redacted_but_observers_get_the_event(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), instance="gw")
    seen: list[dict[str, Any]] = []
    log.subscribe(seen.append)
    log.emit("auth.failed", id="m", secret="s3cret", body="Dear Bob", raw=b"x", login="alice")
    log.close()
    entry = json.loads(path.read_text())
    assert {entry[k] for k in ("secret", "body", "raw")} == {"[redacted]"}
    assert "s3cret" not in path.read_text() and "Dear Bob" not in path.read_text()
    assert seen == [
        {"event": "auth.failed", "id": "m", "actor": "system", "secret": "s3cret"}
        | {"body": "Dear Bob", "raw": b"x", "login": "alice", "instance": "gw"}
    ]


def test_threads_emitting_together_keep_every_line_whole_and_chained(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), instance="gw")
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(400):
            log.emit("delivery.sent", id=f"t{n}-{i}", response="x" * (i * 37 % 5000))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    result = verify(str(path))
    assert result.ok and result.lines == 3200, result
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert sorted(ids) == sorted(f"t{n}-{i}" for n in range(8) for i in range(400))
    for n in range(8):  # each thread's lines in the order it wrote them
        assert [i for i in ids if i.startswith(f"t{n}-")] == [f"t{n}-{i}" for i in range(400)]


WRITER = """
import sys
from gateway.audit import AuditLog
log = AuditLog(sys.argv[1], instance=sys.argv[2])
for i in range(1000):
    log.emit("delivery.sent", id=f"{sys.argv[2]}-{i}", response="y" * (i * 53 % 9000))
log.close()
"""


def test_processes_sharing_one_file_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"gw-{n}"]) for n in range(4)
    ]
    assert [writer.wait(timeout=60) for writer in writers] == [0] * 4
    result = verify(str(path))
    assert result.ok and result.lines == 4000, result


def test_a_writer_starting_leaves_a_line_another_is_writing(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    running = AuditLog(str(path), instance="gw-a")
    running.emit("gateway.started")
    with open(path, "ab") as handle:  # what a reader may see of a line being written
        handle.write(b'{"ts":"2026-11-24T00:00:00.000Z","event":"deliv')
    starting = AuditLog(str(path), instance="gw-b")
    assert path.read_bytes().endswith(b'"event":"deliv')
    running.close()
    starting.close()
    AuditLog(str(path), instance="gw-a").close()  # alone now: a torn tail, trimmed
    assert path.read_bytes().endswith(b"}\n") and verify(str(path)).ok


def test_a_full_disk_counts_failures_and_never_raises() -> None:
    log = AuditLog("/dev/full", instance="gw")
    log.emit("message.accepted", id="m1")
    log.emit("delivery.sent", id="m1")
    assert log.write_failures == 2
    log.close()


def test_emit_after_close_writes_nowhere(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.log"))
    log.emit("gateway.stopped")
    log.close()
    log.close()
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)  # may reuse the closed fd
    try:
        log.emit("late")
        assert log.write_failures == 1
        assert os.fstat(other).st_size == 0
    finally:
        os.close(other)
    assert len((tmp_path / "audit.log").read_text().splitlines()) == 1


def test_dash_writes_verifiable_lines_to_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = AuditLog("-", clock=ticking(), instance="gw-a")
    emit_golden_events(log)
    log.close()
    out = capsys.readouterr().out
    assert out == "".join(line + "\n" for line in GOLDEN)
