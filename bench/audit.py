"""CPU time of one audit line: `AuditLog.emit` for a delivery.sent event.

    python bench/audit.py [--lines N] [--repeats R] [--dir PATH] [--parts]

Prints µs of CPU time (`time.process_time`: user and system, so the write() counts)
per `emit`, the median over `--repeats` batches of `--lines` lines each, for:

- `emit`: the gateway's `AuditLog` (one chain instance, a file in `--dir`);
- `previous`: the implementation it replaced, kept below (a structlog logger whose
  processors redact, chain and render with two json.dumps each, and a buffered text
  file flushed per line), so that old and new are compared in one session. Both go
  through structlog; the current one has a single processor that encodes each
  value once for the hashed and the shown form, and appends with one os.write().

Before timing, both write the same events under a fixed clock and the bench checks
that the bytes are identical. `--parts` adds what the pieces of a line cost alone
(timestamp, the two JSON encodings of the old way, SHA-256, one write() per line
against one write() for three lines, which is what coalescing could save).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.audit import FORBIDDEN_KEYS, GENESIS, AuditLog, canonical

DETAILS: dict[str, Any] = {  # what delivery.py writes for a delivered recipient
    "id": "01JTX8Q4Z6M1V8K2N3P4R5S6T7",
    "rcpt": "yamada@client.example",
    "code": 250,
    "response": "2.0.0 Ok: queued as 4ZsK1x2Y3z",
    "attempt": 1,
    "retry_at": None,
}


class ReferenceAuditLog:
    """The structlog-based writer as it was before it was made cheaper (on a new file)."""

    def __init__(self, path: str, *, clock: Any = None, instance: str | None = None) -> None:
        self.instance = instance
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._stream: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._chain = _Chain(GENESIS)
        self._logger = structlog.wrap_logger(
            _LineWriter(self._stream),
            processors=[_redact, self._chain],
            cache_logger_on_first_use=True,
        )

    def emit(
        self, event: str, *, id: str | None = None, actor: str = "system", **details: Any
    ) -> None:
        stamp = self._clock().isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self.instance is not None:
            details["instance"] = self.instance
        with self._lock:
            self._logger.info(ts=stamp, event=event, id=id, actor=actor, **details)

    def close(self) -> None:
        self._stream.close()


class _Chain:
    def __init__(self, prev: str) -> None:
        self.prev = prev

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> str:
        head = {k: event[k] for k in ("ts", "event", "id", "actor") if k in event}
        entry = head | {k: v for k, v in event.items() if k not in head}
        entry["prev"] = self.prev
        entry["hash"] = hashlib.sha256(canonical(entry)).hexdigest()
        self.prev = entry["hash"]
        return json.dumps(entry, separators=(",", ":"), ensure_ascii=False, default=str)


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in sorted(k for k in event if k in FORBIDDEN_KEYS):
        event[key] = "[redacted]"
    return event


class _LineWriter:
    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def info(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


JSON: dict[str, Any] = {"separators": (",", ":"), "ensure_ascii": False, "default": str}
Writer = type[AuditLog] | type[ReferenceAuditLog]
WRITERS: dict[str, Writer] = {"emit": AuditLog, "previous": ReferenceAuditLog}


def same_bytes(folder: Path) -> bool:
    """Both writers, a fixed clock, events with nesting, secrets and non-JSON values."""
    texts: list[bytes] = []
    start = datetime(2026, 5, 9, 7, 35, 25, 123456, tzinfo=UTC)
    for writer in WRITERS.values():
        path = folder / f"same-{len(texts)}.log"
        log = writer(str(path), clock=_ticking(start), instance="gw")
        log.emit("delivery.sent", **DETAILS)
        log.emit("message.accepted", id="m", actor="a@corp.example", rcpt=["b@x.example"])
        log.emit("auth.failed", password="hunter2", login="山田")
        log.emit("odd", nested={"z": 1, "a": [1.5, {"y": True}]}, when=start, n=10**20)
        log.close()
        texts.append(path.read_bytes())
    return texts[0] == texts[1]


def _ticking(start: datetime) -> Callable[[], datetime]:
    ticks = itertools.count()
    return lambda: start + timedelta(seconds=next(ticks))


def per_call(run: Callable[[], object], lines: int, repeats: int) -> float:
    """Median µs of CPU time per call over `repeats` batches of `lines` calls."""
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(lines):
            run()
        samples.append((time.process_time() - started) / lines * 1e6)
    return statistics.median(samples)


def bench_writers(folder: Path, lines: int, repeats: int) -> dict[str, float]:
    """Batches of the writers alternate, so that a busy neighbour slows both alike."""
    logs = {
        name: w(str(folder / f"{w.__name__}.log"), instance="gw-a") for name, w in WRITERS.items()
    }
    samples: dict[str, list[float]] = {name: [] for name in logs}
    try:
        for _ in range(repeats):
            for name, log in logs.items():
                emit = functools.partial(log.emit, "delivery.sent", **DETAILS)
                samples[name].append(per_call(emit, lines, 1))
    finally:
        for log in logs.values():
            log.close()
    return {name: statistics.median(figures) for name, figures in samples.items()}


def parts(folder: Path, lines: int, repeats: int) -> dict[str, float]:
    entry = {"ts": "2026-05-09T07:35:25.123Z", "event": "delivery.sent", "actor": "system"}
    entry |= DETAILS | {"instance": "gw-a", "prev": GENESIS}
    text = canonical(entry)
    line = text + b"\n"
    fd = os.open(folder / "parts.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        return {
            "timestamp (now + isoformat)": per_call(
                lambda: datetime.now(UTC).isoformat(timespec="milliseconds"), lines, repeats
            ),
            "json.dumps, sorted (canonical)": per_call(
                lambda: json.dumps(entry, sort_keys=True, **JSON),
                lines,
                repeats,
            ),
            "json.dumps, in order (display)": per_call(
                lambda: json.dumps(entry, **JSON), lines, repeats
            ),
            "sha256 hexdigest": per_call(lambda: hashlib.sha256(text).hexdigest(), lines, repeats),
            "one write() per line": per_call(lambda: os.write(fd, line), lines, repeats),
            "one write() for three lines, per line": per_call(
                lambda: os.write(fd, line * 3), lines, repeats
            )
            / 3,
        }
    finally:
        os.close(fd)


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        identical = same_bytes(folder)
        print(f"same bytes from both writers: {'yes' if identical else 'NO'}")
        figures = bench_writers(folder, args.lines, args.repeats)
        for name, figure in figures.items():
            print(f"{name:40s} {figure:7.2f} µs per line")
        ratio = figures["previous"] / figures["emit"]
        print(f"{'ratio (previous / emit)':40s} {ratio:7.2f}")
        if args.parts:
            for name, figure in parts(folder, args.lines, args.repeats).items():
                print(f"  {name:38s} {figure:7.2f} µs")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20_000, help="emits per batch")
    parser.add_argument("--repeats", type=int, default=7, help="batches; the median is shown")
    parser.add_argument("--dir", help="where the log files go (default: the system temp dir)")
    parser.add_argument("--parts", action="store_true", help="also time the pieces of a line")
    main(parser.parse_args())
