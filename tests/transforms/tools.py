"""The archive tools recipients use, run for real: 7-Zip (`7z`) and Info-ZIP `unzip`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

# A UTF-8 locale, so that both tools write Japanese names to the file system as such.
_ENV = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"`{tool}` is not installed (Debian: p7zip-full / unzip)")
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env=_ENV, timeout=60,
        stdin=subprocess.DEVNULL, check=False,
    )


def extract_7z(archive: Path, password: str, into: Path) -> subprocess.CompletedProcess[str]:
    return run(require("7z"), "x", f"-p{password}", f"-o{into}", "-y", archive)


def extract_unzip(archive: Path, password: str, into: Path) -> subprocess.CompletedProcess[str]:
    return run(require("unzip"), "-o", "-P", password, archive, "-d", into)


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def methods_7z(archive: Path, password: str) -> dict[str, str]:
    """Path -> Method (e.g. "ZipCrypto Store", "AES-256 Deflate") from `7z l -slt`."""
    listing = run(require("7z"), "l", "-slt", f"-p{password}", archive).stdout
    methods: dict[str, str] = {}
    path = None
    for line in listing.splitlines():
        if line.startswith("Path = "):
            path = line[7:]
        elif line.startswith("Method = ") and path is not None:
            methods[path] = line[9:]
    methods.pop(str(archive), None)
    return methods
