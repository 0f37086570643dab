"""The ZipCrypto writer against the spec's readers: 7-Zip, Info-ZIP unzip and zipfile."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.transforms import numpy_or_none, zipcrypto
from policies.transforms.zipcrypto import ZipCryptoError, ZipCryptoWriter

from .tools import extract_7z, extract_unzip, files_in, methods_7z, require, run

DATE = (2025, 4, 1, 9, 30, 0)
PASSWORD = "Kx7#mQ2v-Rt9pWz4"
FILES = {
    "見積書.csv": "顧客,金額\n".encode() * 5000,
    "写真.bin": random.Random(1).randbytes(300_000),
    "empty.txt": b"",
}


def _archive(files: dict[str, bytes], password: str = PASSWORD, seed: int = 7) -> bytes:
    rng = random.Random(seed)
    out = io.BytesIO()
    writer = ZipCryptoWriter(out, password, random_bytes=rng.randbytes)
    for name, data in files.items():
        writer.add(name, data, date_time=DATE, compress=name.endswith(".csv"))
    writer.close()
    return out.getvalue()


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "protected.zip"
    path.write_bytes(_archive(FILES))
    return path


def test_7z_decrypts_contents_and_japanese_names(archive: Path, tmp_path: Path) -> None:
    result = extract_7z(archive, PASSWORD, tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    assert files_in(tmp_path / "out") == FILES


def test_unzip_decrypts_contents_and_japanese_names(archive: Path, tmp_path: Path) -> None:
    result = extract_unzip(archive, PASSWORD, tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    assert files_in(tmp_path / "out") == FILES


def test_unzip_lists_japanese_names(archive: Path) -> None:
    listing = run(require("unzip"), "-Z1", archive)
    assert listing.stdout.split() == list(FILES)


@pytest.mark.parametrize("extract", [extract_7z, extract_unzip], ids=["7z", "unzip"])
def test_wrong_password_is_refused(archive: Path, tmp_path: Path, extract: object) -> None:
    assert callable(extract)
    result = extract(archive, "not-the-password", tmp_path / "out")
    assert result.returncode != 0
    assert not (tmp_path / "out").exists() or files_in(tmp_path / "out") != FILES


def test_central_directory_methods_flags_and_sizes(archive: Path) -> None:
    with zipfile.ZipFile(archive) as read:
        infos = {i.filename: i for i in read.infolist()}
    assert infos["見積書.csv"].compress_type == zipfile.ZIP_DEFLATED
    assert infos["写真.bin"].compress_type == zipfile.ZIP_STORED
    assert infos["見積書.csv"].flag_bits == 0x0801  # encrypted, UTF-8 name, no descriptor
    assert infos["empty.txt"].flag_bits == 0x0001
    assert infos["写真.bin"].compress_size == 300_000 + 12  # the encryption header
    assert infos["見積書.csv"].date_time == DATE
    assert methods_7z(archive, PASSWORD) == {
        "見積書.csv": "ZipCrypto Deflate", "写真.bin": "ZipCrypto Store",
        "empty.txt": "ZipCrypto Store",
    }


def test_zipfile_reads_it_with_the_password(archive: Path) -> None:
    with zipfile.ZipFile(archive) as read:
        assert {n: read.read(n, pwd=PASSWORD.encode()) for n in read.namelist()} == FILES
        with pytest.raises(RuntimeError, match="password"):
            read.read("写真.bin", pwd=b"wrong")


def test_same_random_bytes_same_archive_different_ones_differ() -> None:
    assert _archive(FILES, seed=1) == _archive(FILES, seed=1)
    assert _archive(FILES, seed=1) != _archive(FILES, seed=2)


def test_password_is_not_kept_or_shown() -> None:
    writer = ZipCryptoWriter(io.BytesIO(), PASSWORD)
    assert PASSWORD not in repr(writer)
    assert PASSWORD not in repr(vars(writer))


def test_archive_over_4_gib_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zipcrypto, "_LIMIT", 1000)  # the fault: pretend 1000 B is 4 GiB
    writer = ZipCryptoWriter(io.BytesIO(), PASSWORD)
    with pytest.raises(ZipCryptoError, match="ZIP64"):
        writer.add("big.bin", os.urandom(2000), date_time=DATE, compress=False)


def test_dates_before_1980_are_refused() -> None:
    writer = ZipCryptoWriter(io.BytesIO(), PASSWORD)
    with pytest.raises(ZipCryptoError, match="1980"):
        writer.add("a.txt", b"a", date_time=(1979, 12, 31, 0, 0, 0), compress=False)


@pytest.mark.skipif(numpy_or_none() is None, reason="numpy is not installed")
@settings(max_examples=25, deadline=None)
@given(data=st.binary(min_size=0, max_size=20_000), password=st.binary(min_size=1, max_size=20))
def test_vector_kernel_matches_the_reference_loop(data: bytes, password: bytes) -> None:
    from policies.transforms import _zipcrypto_vector

    keys = zipcrypto.initial_keys(password)
    padded = data * (1 + 5000 // (len(data) + 1))  # long enough for the kernel
    assert _zipcrypto_vector.encrypt(
        padded, keys, zipcrypto.CRC_TABLE, zipcrypto.KEYSTREAM
    ) == zipcrypto.encrypt_py(padded, keys)


def test_chunked_encryption_carries_the_keys_across_chunks() -> None:
    data = random.Random(3).randbytes(50_000)
    keys = zipcrypto.initial_keys(b"pw")
    whole, end = zipcrypto.encrypt_py(data, keys)
    first, middle = zipcrypto.encrypt(data[:20_000], keys)
    second, end2 = zipcrypto.encrypt(data[20_000:], middle)
    assert (first + second, end2) == (whole, end)


def test_numpy_is_imported_on_the_first_encryption_not_at_start_up() -> None:
    """~60 ms of the gateway's start-up went to importing numpy for the fast kernels."""
    if numpy_or_none() is None:
        pytest.skip("numpy is not installed")
    probe = (
        "import sys, gateway.app, gateway.cli; assert 'numpy' not in sys.modules, 'at start';"
        "from policies.transforms import zipcrypto;"
        "zipcrypto.encrypt(bytes(8192), zipcrypto.initial_keys(b'pw'));"
        "assert 'numpy' in sys.modules, 'not used by a large encryption'"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
