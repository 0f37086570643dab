"""Upstream transaction cost: `SmtpTransport.send` into Postfix's `smtp-sink`, with
aiosmtplib's `sendmail` (one round trip per command: the path before PIPELINING was
used, `[delivery] pipelining = false`) beside the pipelined one, in the same run.

    python bench/upstream.py [--messages 5000] [--size 5120] [--recipients 1]
                             [--rounds 3] [--big-mb 50] [--loop uvloop|asyncio]
                             [--no-strace]

For each path, against the same smtp-sink (which offers PIPELINING), on one pooled
connection, one transaction after the other:

- CPU µs of this process per transaction (`time.process_time`), and wall µs; the
  median of `--rounds` rounds, the paths alternating;
- system calls per transaction, from `strace -f -c` on a child process doing the same
  sends (the difference between 2N and N sends, divided by N, so start-up is left out):
  writes (write/sendto/sendmsg/writev), reads (read/recvfrom) and wake-ups (epoll_wait);
- the peak of traced memory (tracemalloc) while sending one `--big-mb` MB message,
  above what was allocated before (the message itself), in MB and as a multiple of the
  message.

The event loop is uvloop, as `sekisho serve` runs it, unless `--loop asyncio`.
This is a benchmark, not a test: it fails only when a send does not get a 250.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import DeliveryConfig
from gateway.transports import SmtpTransport

SMTP_SINK = "/usr/sbin/smtp-sink"
HOST = "127.0.0.1"
PATHS = {"sendmail": False, "pipelined": True}  # the path's name: pipelining
WRITES = ("write", "sendto", "sendmsg", "writev")
READS = ("read", "recvfrom", "recvmsg", "readv")
WAKEUPS = ("epoll_wait", "epoll_pwait")
T = TypeVar("T")
_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextmanager
def sink() -> Iterator[int]:
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
    process = subprocess.Popen(
        [SMTP_SINK, *user, f"{HOST}:{port}", "256"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("smtp-sink did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(5)


def message(size: int) -> bytes:
    head = (
        b"From: alice@example.com\r\nTo: bob@client.example\r\nSubject: quarterly figures\r\n"
        b"Message-ID: <bench@example.com>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    line = b"The figures for the quarter are attached, as agreed on the phone. Thanks\r\n"
    body = line * (max(0, size - len(head)) // len(line) + 1)
    return head + body[: max(0, size - len(head) - 2)] + b"\r\n"


def transport(port: int, pipelining: bool) -> SmtpTransport:
    config = DeliveryConfig.model_validate(
        {
            "upstream": f"smtp://{HOST}:{port}",
            "starttls": "off",
            "connections": 1,
            "pipelining": pipelining,
        }
    )
    return SmtpTransport(config)


async def send_many(port: int, pipelining: bool, count: int, data: bytes, rcpts: int) -> None:
    sender = transport(port, pipelining)
    to = [f"r{i}@client.example" for i in range(rcpts)]
    try:
        for _ in range(count):
            results = await sender.send("alice@example.com", to, data)
            if any(code != 250 for code, _ in results.values()):
                raise SystemExit(f"not delivered: {results}")
    finally:
        await sender.close()


async def timed(port: int, pipelining: bool, args: argparse.Namespace) -> tuple[float, float]:
    """CPU and wall µs per transaction, after one warm-up send opened the connection."""
    data = message(args.size)
    sender = transport(port, pipelining)
    to = [f"r{i}@client.example" for i in range(args.recipients)]
    try:
        await sender.send("alice@example.com", to, data)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(args.messages):
            results = await sender.send("alice@example.com", to, data)
            if any(code != 250 for code, _ in results.values()):
                raise SystemExit(f"not delivered: {results}")
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await sender.close()
    return cpu / args.messages * 1e6, wall / args.messages * 1e6


async def peak_memory(port: int, pipelining: bool, megabytes: int) -> float:
    """Peak traced bytes above the baseline while one message of `megabytes` MB is sent."""
    data = message(megabytes * 1024 * 1024)
    sender = transport(port, pipelining)
    try:
        await sender.send("alice@example.com", ["bob@client.example"], message(1024))
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        results = await sender.send("alice@example.com", ["bob@client.example"], data)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        await sender.close()
    if any(code != 250 for code, _ in results.values()):
        raise SystemExit(f"not delivered: {results}")
    return (peak - base) / len(data)


def syscalls(port: int, pipelining: bool, args: argparse.Namespace) -> dict[str, float]:
    """Per transaction, from strace -c of a child doing 2N and N sends."""
    counts = [_strace_child(port, pipelining, n, args) for n in (args.messages, 2 * args.messages)]
    per = {
        kind: (sum(counts[1].get(s, 0) for s in names) - sum(counts[0].get(s, 0) for s in names))
        / args.messages
        for kind, names in (("writes", WRITES), ("reads", READS), ("wakeups", WAKEUPS))
    }
    return per


def _strace_child(port: int, pipelining: bool, n: int, args: argparse.Namespace) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "strace"
        command = [
            "strace", "-f", "-c", "-o", str(out), sys.executable, __file__, "--child",
            "--port", str(port), "--pipelining", str(int(pipelining)), "--messages", str(n),
            "--size", str(args.size), "--recipients", str(args.recipients), "--loop", args.loop,
        ]  # fmt: skip
        subprocess.run(command, check=True, stdin=subprocess.DEVNULL)
        counts: dict[str, int] = {}
        for row in out.read_text().splitlines():
            match = _STRACE_ROW.match(row)
            if match:
                counts[match[2]] = int(match[1])
        return counts


def run(work: Callable[[], Coroutine[Any, Any, T]], loop: str) -> T:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(work())
    return asyncio.run(work())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--recipients", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big-mb", type=int, default=50)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--no-strace", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pipelining", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        data = message(args.size)
        pipe = bool(args.pipelining)
        run(partial(send_many, args.port, pipe, args.messages, data, args.recipients), args.loop)
        return 0
    with sink() as port:
        print(
            f"{args.messages} transactions of {args.size} bytes, {args.recipients} recipient(s), "
            f"one connection, {args.loop}, smtp-sink on {HOST}:{port}"
        )
        cpu: dict[str, list[float]] = {name: [] for name in PATHS}
        wall: dict[str, list[float]] = {name: [] for name in PATHS}
        for _ in range(args.rounds):
            for name, pipelining in PATHS.items():
                c, w = run(partial(timed, port, pipelining, args), args.loop)
                cpu[name].append(c)
                wall[name].append(w)
        strace = shutil.which("strace") and not args.no_strace
        for name, pipelining in PATHS.items():
            line = (
                f"{name:>10}: CPU {statistics.median(cpu[name]):6.1f} µs/transaction, "
                f"wall {statistics.median(wall[name]):6.1f} µs"
            )
            if strace:
                calls = syscalls(port, pipelining, args)
                line += "; per transaction: " + ", ".join(f"{v:.2f} {k}" for k, v in calls.items())
            print(line, flush=True)
        ratio = statistics.median(cpu["sendmail"]) / statistics.median(cpu["pipelined"])
        print(f"CPU per transaction, sendmail / pipelined: {ratio:.2f}x")
        if args.big_mb:
            for name, pipelining in PATHS.items():
                times = run(partial(peak_memory, port, pipelining, args.big_mb), args.loop)
                print(
                    f"{name:>10}: one {args.big_mb} MB message: traced peak "
                    f"{times * args.big_mb:.1f} MB above the message ({times:.2f}x its size)"
                )
    print(json.dumps({"cpu_us": cpu, "wall_us": wall}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
