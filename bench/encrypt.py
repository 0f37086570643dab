"""Attachment encryption throughput: `encrypt_attachments` against raw pyzipper.

Run: python bench/encrypt.py   (from the repository root)

For a 10 MB CSV (deflated) and an 8 MB incompressible file (stored), prints MB/s of
attachment data through the whole transform (scan, skeleton parse, base64 decode, ZIP,
base64 encode, splice) for each method, the raw pyzipper AES figure for the same data
and compression in the same run, their ratio (target: >= 0.90 for aes256), and for
reference what a full email-package parse + re-serialise of the message alone costs
(the transform no longer does one). Best of 5, as the machine may be shared.
"""

from __future__ import annotations

import io
import os
import random
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from functools import partial
from pathlib import Path

import pyzipper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from policies.mime import SMTP_POLICY, parse
from policies.transforms.encrypt import ZipMethod, encrypt_attachments

PASSWORD = "Hk4pXr7tWm2qZs9v"
DATE = (2025, 4, 1, 9, 30, 0)


def csv_data(size: int) -> bytes:
    rng = random.Random(1)
    names = ["山田", "佐藤", "鈴木", "高橋", "田中", "伊藤"]
    rows, total = [], 0
    while total < size:
        row = (
            f"{rng.randrange(10**6)},{rng.choice(names)},03-{rng.randrange(10**4):04d}-"
            f"{rng.randrange(10**4):04d},{rng.randrange(10**5)}\n".encode()
        )
        rows.append(row)
        total += len(row)
    return b"".join(rows)[:size]


def message(name: str, data: bytes) -> bytes:
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"], msg["To"], msg["Subject"] = "a@corp.example", "b@client.example", "bench"
    msg.set_content("本文")
    msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return msg.as_bytes()


def raw_pyzipper(name: str, data: bytes, compress: int) -> None:
    with pyzipper.AESZipFile(
        io.BytesIO(), "w", compression=compress, encryption=pyzipper.WZ_AES
    ) as archive:
        archive.setpassword(PASSWORD.encode())
        archive.writestr(archive.zipinfo_cls(name, date_time=DATE), data, compress_type=compress)


def round_trip(raw: bytes) -> bytes:
    return parse(raw).as_bytes(policy=SMTP_POLICY)


def best(run: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    cases = [
        ("customers.csv", csv_data(10 * 10**6), pyzipper.ZIP_DEFLATED),
        ("random.bin", os.urandom(8 * 10**6), pyzipper.ZIP_STORED),
    ]
    print(
        f"{'file':<14} {'method':<10} {'transform':>11} {'raw pyzipper':>13} {'ratio':>6}"
        f" {'email parse+serialise':>22}"
    )
    for name, data, compress in cases:
        raw = message(name, data)
        mb = len(data) / 1e6
        base = best(partial(raw_pyzipper, name, data, compress))
        mime = best(partial(round_trip, raw))
        for method in ZipMethod:
            took = best(
                partial(encrypt_attachments, raw, password=PASSWORD, method=method, date_time=DATE)
            )
            print(
                f"{name:<14} {method.value:<10} {mb / took:>7.1f} MB/s {mb / base:>8.1f} MB/s"
                f" {base / took:>6.2f} {mb / mime:>17.1f} MB/s"
            )


if __name__ == "__main__":
    main()
