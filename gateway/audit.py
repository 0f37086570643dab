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
import stat
import sys
import threading
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import structlog

if sys.platform != "win32":
    import fcntl

log = logging.getLogger(__name__)
GENESIS = "0" * 64
# An event and its fields, held back until the transaction it describes has committed.
Event = tuple[str, dict[str, Any]]
# Keys that could carry a message body or a secret. A caller passing one is a bug:
# the value is replaced rather than written, and the line says so.
FORBIDDEN_KEYS = frozenset(
    {"password", "zip_password", "secret", "token", "raw", "body", "content", "data"}
)


# Made once: json.dumps would build a new JSONEncoder on every call. `_CANONICAL` gives
# the hashed form; `_DISPLAY` keeps the caller's key order for people who tail the file.
# Neither keeps state between calls, so threads may share them.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
)
_DISPLAY = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)
# The function both encoders use for a str when ensure_ascii is off.
_quote: Callable[[str], str] = json.encoder.encode_basestring
# Values written the same in both forms, as those encoders write them (exact types only:
# an IntEnum or a str subclass goes through the encoders).
_SCALARS: dict[type, Callable[[Any], str]] = {
    str: _quote,
    int: int.__repr__,
    bool: lambda value: "true" if value else "false",
    type(None): lambda _: "null",
}
# The keys every line starts with, in this order.
_HEAD = ("ts", "event", "id", "actor")
# The log's own keys, which a caller may not pass.
_RESERVED = frozenset({"ts", "prev", "hash"})
_CHECKED_KEYS = FORBIDDEN_KEYS | _RESERVED


def canonical(entry: dict[str, Any]) -> bytes:
    return _CANONICAL.encode(entry).encode("utf-8")


def line_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


def _members(entry: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Each `"key":value` of `entry` as the canonical form writes it (by key) and as the
    line shows it (in order). The two forms differ only inside nested objects, whose
    keys the canonical form sorts, so a scalar is encoded once for both: this is what
    `canonical` would give, at about half the cost of encoding the entry twice."""
    hashed: dict[str, str] = {}
    shown: list[str] = []
    for key, value in entry.items():
        scalar = _SCALARS.get(type(value))
        if scalar is not None:
            member = hashed[key] = f"{_quote(key)}:{scalar(value)}"
            shown.append(member)
        else:
            hashed[key] = f"{_quote(key)}:{_CANONICAL.encode(value)}"
            shown.append(f"{_quote(key)}:{_DISPLAY.encode(value)}")
    return hashed, shown


Observer = Callable[[dict[str, Any]], None]


class AuditLog:
    """Appends chained lines; `instance` names this writer's chain.

    Several gateways on one store each keep their own chain: every line carries
    `instance`, `prev` links to the previous line of the same instance, and `verify`
    follows each chain separately. They may share one file (each line is one
    O_APPEND write) or use one file each with `{instance}` in `[audit].path`.

    A line has been written when `emit` returns. Lines are not batched: a 250 is
    answered right after `message.accepted`, and a crash must not lose the line of a
    message the client was told is queued.
    """

    def __init__(self, path: str, *, clock: Any = None, instance: str | None = None) -> None:
        self.instance = instance
        self.path = path.replace("{instance}", _file_safe(instance or "default"))
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._observers: list[Observer] = []
        self.write_failures = 0
        self._stream: IO[str] | None = None
        self._fd = -1
        if self.path == "-":
            self._stream = sys.stdout
            self._prev = GENESIS
        else:
            file = Path(self.path)
            file.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                self._prev = _resume(file, self._fd, instance)
            except BaseException:
                os.close(self._fd)
                raise
        # structlog is the front of the log; its one processor renders the chained
        # line and the "logger" appends it (under self._lock, see emit).
        self._logger = structlog.wrap_logger(
            _Appender(self._write), processors=[self._chain], cache_logger_on_first_use=True
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
        # Written in this order, then prev and hash, for people who tail the file; the
        # hash is over the canonical form, whose keys are sorted.
        entry = {"ts": stamp, "event": event, "id": id, "actor": actor, **details}
        if not _CHECKED_KEYS.isdisjoint(details):
            _check_keys(entry, details)
        try:
            with self._lock:  # from taking prev to writing the line that carries it
                self._logger.info(**entry)
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

    def _chain(self, _logger: Any, _name: str, entry: MutableMapping[str, Any]) -> str:
        """The line: `entry` in its order, then prev, then the hash of the canonical
        form, whose keys are sorted; the next line's prev is that hash."""
        # structlog puts `event` last; the line starts ts, event, id, actor.
        hashed, shown = _members({key: entry.pop(key) for key in _HEAD} | dict(entry))
        prev = hashed["prev"] = f'"prev":"{self._prev}"'
        text = "{" + ",".join([hashed[key] for key in sorted(hashed)]) + "}"
        digest = self._prev = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return "{" + ",".join(shown) + f',{prev},"hash":"{digest}"}}\n'

    def _write(self, line: str) -> None:
        if self._stream is not None:
            self._stream.write(line)
            self._stream.flush()
        else:
            _write_all(self._fd, line.encode("utf-8"))

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1  # a later emit fails (EBADF), never a reused fd
        if fd < 0:
            return
        try:
            os.fsync(fd)
        except OSError as error:  # a full disk must not stop the shutdown
            log.error("audit log %s could not be synced on close: %s", self.path, error)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)


class _Appender:
    """The logger structlog hands each rendered line to."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.msg = self.info = write


def _check_keys(entry: dict[str, Any], details: dict[str, Any]) -> None:
    if reserved := sorted(details.keys() & _RESERVED):
        raise TypeError(f"emit() got the audit log's own key(s): {', '.join(reserved)}")
    for key in details.keys() & FORBIDDEN_KEYS:
        entry[key] = "[redacted]"


def _write_all(fd: int, data: bytes) -> None:
    """One write() on an O_APPEND descriptor: the kernel appends the whole line at once,
    so the lines of several processes sharing the file never interleave. Only a full
    disk or a signal makes it short; then the rest follows, as a buffered file would."""
    written = os.write(fd, data)
    while written < len(data):
        written += os.write(fd, data[written:])


def _resume(file: Path, fd: int, instance: str | None) -> str:
    """Continue this instance's chain from its last complete line; drop a torn tail.

    A line is written with one write() call, so only a power cut can leave half of
    one. That half was never complete, so it held nothing anyone relied on. A reader
    can also see half of a line that another process is writing at that moment, so
    the tail is trimmed only when no other writer has the file open: each holds a
    shared flock on its descriptor for as long as it does.
    """
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return GENESIS  # a device such as /dev/full, or a pipe: no chain to resume
    if _flock(fd, exclusive=True):
        with open(file, "rb+") as handle:
            _trim_torn_tail(handle, handle.seek(0, os.SEEK_END))
    _flock(fd, exclusive=False)
    if file.stat().st_size == 0:
        return GENESIS
    with open(file, "rb") as handle:
        for raw in _lines_backwards(handle):
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("instance") == instance:
                return str(entry["hash"])
    return GENESIS


def _flock(fd: int, *, exclusive: bool) -> bool:
    """Take the exclusive lock if nobody holds one (True if taken), or wait for a
    shared one. Where there is no flock, or the file system refuses it, a writer
    trims as if it were alone."""
    if sys.platform == "win32":
        return exclusive
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
    except BlockingIOError:
        return False
    except OSError:
        return exclusive
    return True


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
