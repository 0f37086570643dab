"""Optional numpy kernel for ZipCrypto (APPNOTE.TXT §6.1.6), about 30× the plain loop.

The three keys look sequential, but each is a recurrence that can be split into
blocks and run for all blocks at once:
- key0 is a CRC-32 register fed with the plaintext, so the register at every block
  boundary comes from `zlib.crc32`, and the registers inside the blocks are then
  stepped for all blocks together, one column per step;
- key1 is affine mod 2**32 (x -> (x + a) * C + 1), so each block is run from 0 and
  shifted by C**(j+1) * start once the block starts are chained;
- key2 is a CRC-32 register fed with the high bytes of key1: as key0.

The result is checked byte for byte against the reference loop in the tests. numpy
is not a declared dependency of `policies`; without it the reference loop is used.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np  # imported only where numpy is installed (zipcrypto.encrypt)

_MULT = 134775813
_MASK = 0xFFFFFFFF

Keys = tuple[int, int, int]
Array = Any  # numpy.ndarray; kept loose so `policies` type-checks without numpy


def encrypt(data: bytes, keys: Keys, crc_table: tuple[int, ...], keystream: bytes) -> tuple[
    bytes, Keys
]:
    if not data:
        return b"", keys
    k0, k1, k2 = keys
    table = np.array(crc_table, dtype=np.uint32)
    n = len(data)
    lanes, steps = _shape(n + 1)  # +1: key0 is needed *after* the last byte
    plain = np.zeros(lanes * steps, dtype=np.uint8)
    plain[:n] = np.frombuffer(data, dtype=np.uint8)
    # key0 after byte i is the register before byte i + 1.
    low0 = _registers(plain, k0, table, lanes, steps).astype(np.uint8).reshape(-1)[1 : n + 1]
    high1, k1_end = _key1_high_bytes(low0, k1, lanes, steps)
    fed = np.zeros(lanes * steps, dtype=np.uint8)
    fed[:n] = high1
    reg2 = _registers(fed, k2, table, lanes, steps).reshape(-1)[:n]
    index = (reg2 >> 2) & 0x3FFF
    stream = np.frombuffer(keystream, dtype=np.uint8)[index]
    cipher = np.bitwise_xor(plain[:n], stream)
    k0_end = _register_after(data, k0)
    k2_end = _register_after(high1.tobytes(), k2)
    return cipher.tobytes(), (k0_end, k1_end, k2_end)


def _shape(size: int) -> tuple[int, int]:
    """Lanes × steps covering `size`; about square, so that both loops stay short."""
    steps = max(32, int(size**0.5) // 8)
    lanes = -(-size // steps)
    return lanes, steps


def _register_after(data: bytes, register: int) -> int:
    # zlib.crc32 pre- and post-inverts the register (the CRC-32 convention); the ZIP
    # key update (§6.1.5 crc32()) does not.
    return zlib.crc32(data, register ^ _MASK) ^ _MASK


def _registers(stream: Array, start: int, table: Array, lanes: int, steps: int) -> Array:
    """The CRC register *before* every byte of `stream`, in stream order."""
    raw = stream.tobytes()
    starts = [start]
    for lane in range(lanes - 1):
        starts.append(_register_after(raw[lane * steps : (lane + 1) * steps], starts[-1]))
    columns = np.ascontiguousarray(stream.reshape(lanes, steps).T)
    out = np.empty((steps, lanes), dtype=np.uint32)
    register = np.array(starts, dtype=np.uint32)
    index = np.empty(lanes, dtype=np.uint8)
    for step in range(steps):
        out[step] = register
        np.bitwise_xor(register, columns[step], out=index, casting="unsafe")
        np.right_shift(register, 8, out=register)
        np.bitwise_xor(register, table.take(index), out=register)
    return np.ascontiguousarray(out.T)


def _key1_high_bytes(low0: Array, k1: int, lanes: int, steps: int) -> tuple[Array, int]:
    """High byte of key1 after every byte, and key1 after the last byte."""
    n = len(low0)
    padded = np.zeros(lanes * steps, dtype=np.uint32)
    padded[:n] = low0
    # (x + a) * C + 1 == x * C + (a * C + 1): the second term for all bytes at once.
    columns = np.ascontiguousarray(padded.reshape(lanes, steps).T)
    columns *= np.uint32(_MULT)
    columns += np.uint32(1)
    local = np.empty((steps, lanes), dtype=np.uint32)
    value = np.zeros(lanes, dtype=np.uint32)
    multiplier = np.uint32(_MULT)
    for step in range(steps):  # each lane from 0; uint32 arithmetic wraps mod 2**32
        np.multiply(value, multiplier, out=value)
        np.add(value, columns[step], out=value)
        local[step] = value
    powers = [pow(_MULT, j + 1, 1 << 32) for j in range(steps)]
    starts = [k1]
    for lane in range(lanes - 1):  # chain the affine maps: start' = C**steps * start + end
        starts.append((powers[-1] * starts[-1] + int(local[-1, lane])) & _MASK)
    local += np.multiply.outer(np.array(powers, dtype=np.uint32), np.array(starts, dtype=np.uint32))
    true = local.T.reshape(-1)[:n]
    return (true >> 24).astype(np.uint8), int(true[-1])
