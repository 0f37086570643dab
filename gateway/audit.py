"""The audit log: one JSON object per line, each chained to the one before by SHA-256.

Every line carries `ts`, `event`, `id` (the message id, or null), `actor`, the event's
details, `prev` (the previous line's hash) and `hash`, which is SHA-256 over the
canonical JSON of the line without `hash` — and that includes `prev`, so changing,
removing or reordering any line breaks every hash after it.

Message bodies and secrets never reach it: keys that could carry them are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import structlog

log = logging.getLogger(__name__)
GENESIS = "0" * 64
# An event and its fields, held back until the transaction it describes has committed.
Event = tuple[str, dict[str, Any]]
# Keys that could carry a message body or a secret. A caller passing one is a bug:
# the value is replaced rather than written, and the line says so.
FORBIDDEN_KEYS = frozenset(
    {"password", "zip_password", "secret", "token", "raw", "body", "content", "data"}
)


def canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    ).encode("utf-8")


def line_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


class _Chain:
    """A structlog processor that links each line to the last one written."""

    def __init__(self, prev: str) -> None:
        self.prev = prev

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> str:
        head = {k: event[k] for k in ("ts", "event", "id", "actor") if k in event}
        entry = head | {k: v for k, v in event.items() if k not in head}
        entry["prev"] = self.prev
        entry["hash"] = line_hash(entry)
        self.prev = entry["hash"]
        # Written in the caller's order (ts, event, id, actor first) for people who
        # tail the file; the hash is over the sorted canonical form, so order is free.
        return json.dumps(entry, separators=(",", ":"), ensure_ascii=False, default=str)


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    leaked = sorted(k for k in event if k in FORBIDDEN_KEYS)
    for key in leaked:
        event[key] = "[redacted]"
    return event


class _LineWriter:
    """Writes each rendered line with one write() on an O_APPEND file and flushes it."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def msg(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    info = msg


Observer = Callable[[dict[str, Any]], None]


class AuditLog:
    """Appends chained lines; `instance` names this writer's chain.

    Several gateways on one PostgreSQL each keep their own chain: every line carries
    `instance`, `prev` links to the previous line of the same instance, and `verify`
    follows each chain separately. They may share one file (each line is one
    O_APPEND write) or use one file each with `{instance}` in `[audit].path`.
    """

    def __init__(self, path: str, *, clock: Any = None, instance: str | None = None) -> None:
        self.instance = instance
        self.path = path.replace("{instance}", _file_safe(instance or "default"))
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._observers: list[Observer] = []
        self.write_failures = 0
        if self.path == "-":
            self._stream: IO[str] = sys.stdout
            prev = GENESIS
        else:
            file = Path(self.path)
            file.parent.mkdir(parents=True, exist_ok=True)
            prev = _resume(file, instance)
            self._stream = open(file, "a", encoding="utf-8")  # noqa: SIM115 - held for the process
        self._chain = _Chain(prev)
        self._logger = structlog.wrap_logger(
            _LineWriter(self._stream),
            processors=[_redact, self._chain],
            cache_logger_on_first_use=True,
        )

    def subscribe(self, observer: Observer) -> None:
        """Call `observer` with every event written (metrics count steps this way)."""
        self._observers.append(observer)

    def emit(
        self, event: str, *, id: str | None = None, actor: str = "system", **details: Any
    ) -> None:
        stamp = self._clock().isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self.instance is not None:
            details["instance"] = self.instance
        try:
            with self._lock:
                self._logger.info(ts=stamp, event=event, id=id, actor=actor, **details)
        except (OSError, ValueError) as error:
            # Never let a failed audit write change what already happened: a message
            # committed and then answered 451 would be sent again by the client. The
            # gap shows in `audit verify` (the next line's prev is the lost line's hash).
            self.write_failures += 1
            log.error("audit write failed for %s %s: %s", event, id or "", error)
        for observer in self._observers:
            try:
                observer({"event": event, "id": id, "actor": actor, **details})
            except Exception:
                log.exception("audit observer failed for %s", event)

    def close(self) -> None:
        if self._stream is sys.stdout:
            return
        try:
            self._stream.flush()
            os.fsync(self._stream.fileno())
        except OSError as error:  # a full disk must not stop the shutdown
            log.error("audit log %s could not be synced on close: %s", self.path, error)
        finally:
            with contextlib.suppress(OSError):
                self._stream.close()


def _resume(file: Path, instance: str | None = None) -> str:
    """Continue this instance's chain from its last complete line; drop a torn tail.

    A line is written with one write() call, so only a power cut can leave half of
    one. That half was never complete, so it held nothing anyone relied on.
    """
    if not file.exists() or file.stat().st_size == 0:
        return GENESIS
    with open(file, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        _trim_torn_tail(handle, size)
        for raw in _lines_backwards(handle):
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("instance") == instance:
                return str(entry["hash"])
    return GENESIS


def _trim_torn_tail(handle: IO[bytes], size: int) -> None:
    start = max(0, size - 65536)
    handle.seek(start)
    tail = handle.read()
    if tail and not tail.endswith(b"\n"):
        handle.truncate(start + tail.rfind(b"\n") + 1)


def _lines_backwards(handle: IO[bytes], chunk: int = 65536) -> Iterator[bytes]:
    position = handle.seek(0, os.SEEK_END)
    rest = b""
    while position > 0:
        step = min(chunk, position)
        position -= step
        handle.seek(position)
        block = handle.read(step) + rest
        lines = block.split(b"\n")
        rest = lines[0]
        for line in reversed(lines[1:]):
            if line:
                yield line
    if rest:
        yield rest


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


@dataclass(frozen=True, slots=True)
class Verification:
    lines: int
    broken_at: int | None = None  # 1-based line number
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def verify(path: str) -> Verification:
    prevs: dict[str | None, str] = {}
    count = 0
    for number, raw in _lines(path):
        count = number
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError:
            return Verification(count, number, "not a JSON object")
        if not isinstance(entry, dict) or "hash" not in entry:
            return Verification(count, number, "no hash")
        claimed = entry.pop("hash")
        chain = entry.get("instance")
        if entry.get("prev") != prevs.get(chain, GENESIS):
            return Verification(
                count,
                number,
                "prev does not match the line before" + (f" of instance {chain}" if chain else ""),
            )
        if line_hash(entry) != claimed:
            return Verification(count, number, "hash does not match the line's content")
        prevs[chain] = claimed
    return Verification(count)


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            yield number, raw.rstrip(b"\r\n")
