"""Fuzzing the frame decoder (issue 10): seeded, bounded, every codec, and a real consumer.

1. ``test_fuzz_decoder_every_codec``: random and mutated NtNdArrays for every codec the decoder
   knows ('' / lz4 / bslz4 / blosc / zlib / lz4hdf5, HDF5-framed lz4 and bslz4, and jpeg, which
   must be refused by name), built from valid frames with the project's own encoders and then
   mutated (random payloads, bit flips, truncation, extension, lying ``uncompressedSize`` /
   ``compressedSize``, corrupt block sizes and codec headers, dimensions that disagree, empty,
   negative, 3-D/4-D, wrong dtypes and codec names, NTAttributes of any type). Each case ends in a decode (bit-exact when
   the payload, codec and item size were left alone) or a ``FrameError``, nothing else. The loop
   runs in a subprocess (``python tests/test_fuzz.py --fuzz``), so a segfault in a C decompressor
   is a failed test with its signal, not a dead pytest; under a 2 GiB address-space limit, so a
   decoder that allocates from a lying size fails too (MemoryError). Bounded by count and time.
2. ``test_real_consumer_survives_crafted_frames``: one real ``pvapy-hpc-consumer`` PeakNet consumer
   on loopback, fed a seeded mix of good frames (uncompressed and every lossless codec) and
   crafted compressed frames (the issue's segfault recipes and more): alive at the end, nBadFrames
   = bad frames sent, every good frame published exactly once (bit-exact image), and the status
   adds up (received = processed + dropped + bad).
3. ``test_real_consumer_survives_hostile_configure``: ``configure`` puts that used to kill a
   consumer (``min_peaks`` 2**32, ``batch_timeout_ms`` 1e16, ...) through the control channel:
   refused and logged, the status channel keeps answering, later frames are still processed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pva_helpers import (  # noqa: I001
    PEAKNET_CLASS,
    PEAKNET_CPU_ARGS,
    consumer_set,
    planted_frames,
    unique_tag,
    wait_until,
)
from test_codec import _compressed_nt

import pvaccess as pva  # noqa: E402

from peaknet_pva.errors import FrameError  # noqa: E402
from peaknet_pva.frames import SUPPORTED_DTYPES, PanelLayout  # noqa: E402
from peaknet_pva.loopback import loopback_env  # noqa: E402
from peaknet_pva.pva import codec, compression, procs  # noqa: E402
from peaknet_pva.pva.replay import ReplayServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEED = 20_241_010
#: Bounds of the fuzz loop (it stops at whichever comes first; ~1000 cases take ~3 s on one core).
#: PEAKNET_FUZZ_CASES / PEAKNET_FUZZ_SECONDS / PEAKNET_FUZZ_SEED change them for a longer local run.
MAX_CASES = int(os.environ.get("PEAKNET_FUZZ_CASES", 1000))
MAX_SECONDS = float(os.environ.get("PEAKNET_FUZZ_SECONDS", 20.0))
FUZZ_SEED = int(os.environ.get("PEAKNET_FUZZ_SEED", SEED))
#: Bound on the fuzz subprocess (imports + the fixed catalogue + the loop).
FUZZ_TIMEOUT_S = MAX_SECONDS + 100.0

#: Fuzzed variants: label -> (codec.name sent, HDF5-framed chunk).
VARIANTS: dict[str, tuple[str, bool]] = {
    "none": ("", False),
    "lz4": ("lz4", False),
    "bslz4": ("bslz4", False),
    "blosc": ("blosc", False),
    "zlib": ("zlib", False),
    "lz4hdf5": ("lz4hdf5", False),
    "lz4+hdf5": ("lz4", True),
    "bslz4+hdf5": ("bslz4", True),
    "jpeg": ("jpeg", False),
}
JPEG_REFUSAL = "codec 'jpeg' is not supported"
#: Panels of the live consumer (PEAKNET_CPU_ARGS) and of every good live frame.
LIVE_SHAPE = (2, 64, 64)

_SCALARS = {int(v): k for k, v in codec._SCALAR_BY_DTYPE.items()}  # pvData scalar type -> dtype


def _size_lies(x: int) -> list[int]:
    """Values a lying ``uncompressedSize`` / ``compressedSize`` takes (for a true value ``x``).
    2**63 itself cannot travel (the field is a signed 64-bit long): -2**63 is its bit pattern."""
    lies = [0, -1, 1, x - 1, x + 1, 2 * x, -x, 2**31 - 1, 2**31, 2**31 - 8, 2**31 + x, 2**32, 2**32 + x,
            2**63 - 1, -(2**63)]
    return [v for v in lies if -(2**63) <= v < 2**63]


# ---------------------------------------------------------------------------------------------
# building valid frames with the project's encoders


def _pixels(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Compressible (sparse counts), incompressible (random bits) or constant pixels, finite."""
    kind = int(rng.integers(3))
    if kind == 0:
        px = rng.poisson(3.0, size=shape) * (rng.random(shape) < 0.3)
        return px.astype(dtype)
    if kind == 1:
        if dtype.kind == "f":
            return rng.normal(0.0, 1e3, size=shape).astype(dtype)
        return rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8).view(dtype).reshape(shape)
    return np.full(shape, 7, dtype)


def _nt(px: np.ndarray, variant: str, *, uid: int, three_d: bool = False, block_bytes: int = 0) -> Any:
    """A valid NtNdArray of ``px`` as ``variant`` (ADCore's fields, via codec.encode_ntndarray /
    codec.compress_ntndarray, i.e. test_codec's ``_compressed_nt``); jpeg gets a fake JPEG stream."""
    name, framed = VARIANTS[variant]
    if variant == "jpeg":
        nt = codec.encode_ntndarray(px, unique_id=uid, three_d=three_d)
        fake = np.frombuffer(b"\xff\xd8\xff\xe0" + bytes(range(64)) + b"\xff\xd9", np.uint8)
        nt["value"] = {"ubyteValue": fake}
        nt["codec"] = {"name": "jpeg", "parameters": pva.PvInt(int(pva.UBYTE))}
        nt["compressedSize"] = int(fake.size)
        nt["uncompressedSize"] = int(px.nbytes)
        return nt
    if not three_d and not block_bytes:
        return _compressed_nt(px, name, uid=uid, hdf5_framed=framed) if name else codec.encode_ntndarray(px, unique_id=uid)
    nt = codec.encode_ntndarray(px, unique_id=uid, three_d=three_d)
    if not name:
        return nt
    codec.compress_ntndarray(nt, px, name, hdf5_framed=framed)
    if block_bytes:  # several blocks (lz4hdf5 / HDF5-framed), as the HDF5 filters may write them
        _set_payload(nt, compression.compress(name, px, hdf5_framed=framed, block_bytes=block_bytes))
    return nt


def _set_payload(nt: Any, payload: bytes) -> None:
    """Replace the compressed bytes (and ``compressedSize``, so only the bytes lie)."""
    arr = np.frombuffer(payload, np.uint8)
    nt["value"] = {"ubyteValue": arr}
    nt["compressedSize"] = int(arr.size)


def _payload(nt: Any) -> bytes:
    return bytes(np.ascontiguousarray(nt["value"][0][nt.getSelectedUnionFieldName()]).view(np.uint8))


def _dims(sizes: list[int]) -> list[Any]:
    return [pva.PvDimension(int(s), 0, int(s), 1, False) for s in sizes]


def _put(buf: bytes, fmt: str, offset: int, value: int) -> bytes:
    out = bytearray(buf)
    if offset + struct.calcsize(fmt) <= len(out):
        struct.pack_into(fmt, out, offset, value)
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# the crafted catalogue: named frames that must be refused (shared by the fuzz and the live test)


def _block2(payload: bytes, first: int) -> int:
    """Offset of the second per-block size in a bslz4 / lz4hdf5 stream whose first size is at ``first``."""
    return first + 4 + struct.unpack_from(">i", payload, first)[0]


def crafted_bad_frames(rng: np.random.Generator, shape: tuple[int, int, int] = LIVE_SHAPE) -> dict[str, Any]:
    """Compressed frames crafted to hit each decoder where pvapy's crashed (issue 10 item 1) and
    around it: every one must be a ``FrameError``. Built on valid ``shape`` frames (uniqueId 0)."""
    u16 = (rng.poisson(5.0, size=shape) * (rng.random(shape) < 0.2)).astype(np.uint16)
    f32 = rng.normal(10.0, 3.0, size=shape).astype(np.float32)
    out: dict[str, Any] = {}

    def make(label: str, px: np.ndarray, variant: str, edit: Callable[[Any, bytes], Any], **kw: Any) -> None:
        nt = _nt(px, variant, uid=0, **kw)
        edit(nt, _payload(nt))
        out[label] = nt

    def payload(new: Callable[[bytes], bytes]) -> Callable[[Any, bytes], None]:
        return lambda nt, p: _set_payload(nt, new(p))

    def fields(**values: Any) -> Callable[[Any, bytes], None]:
        def edit(nt: Any, _p: bytes) -> None:
            for k, v in values.items():
                nt[k] = v
        return edit

    n16 = u16.nbytes
    # bslz4: the three recipes of the issue
    make("bslz4 random bytes", u16, "bslz4", payload(lambda p: rng.integers(0, 256, len(p), dtype=np.uint8).tobytes()))
    make("bslz4 block size 2**31-1", u16, "bslz4", payload(lambda p: _put(p, ">i", 0, 2**31 - 1)))
    make("bslz4 block size -2**31", u16, "bslz4", payload(lambda p: _put(p, ">I", 0, 2**31)))
    make("bslz4 block size +1", u16, "bslz4", payload(lambda p: _put(p, ">i", 0, struct.unpack_from(">i", p, 0)[0] + 1)))
    make("bslz4 2nd block size 0", u16, "bslz4", payload(lambda p: _put(p, ">i", _block2(p, 0), 0)))
    make("bslz4 uncompressedSize 2**31-8", u16, "bslz4", fields(uncompressedSize=2**31 - 8))
    make("bslz4 uncompressedSize 2**32+n", u16, "bslz4", fields(uncompressedSize=2**32 + n16))
    make("bslz4 dims+size 2**31 bytes", u16, "bslz4", fields(uncompressedSize=2**31, dimension=_dims([2**15, 2**15])))
    make("bslz4 truncated", u16, "bslz4", payload(lambda p: p[: len(p) // 2]))
    # HDF5-framed bslz4 / lz4 and lz4hdf5: chunk headers that lie
    make("bslz4+hdf5 block bytes 7", u16, "bslz4+hdf5", payload(lambda p: _put(p, ">i", 8, 7)))
    make("bslz4+hdf5 block bytes -8", u16, "bslz4+hdf5", payload(lambda p: _put(p, ">i", 8, -8)))
    make("bslz4+hdf5 block size 2**31-1", u16, "bslz4+hdf5", payload(lambda p: _put(p, ">i", 12, 2**31 - 1)))
    make("lz4hdf5 block size 0", f32, "lz4hdf5", payload(lambda p: _put(p, ">i", 8, 0)))
    make("lz4hdf5 total 2**63-1", f32, "lz4hdf5", payload(lambda p: _put(p, ">Q", 0, 2**63 - 1)))
    make("lz4hdf5 block csize 2**31-1", f32, "lz4hdf5", payload(lambda p: _put(p, ">i", 12, 2**31 - 1)), block_bytes=4096)
    make("lz4+hdf5 2nd block csize -1", f32, "lz4+hdf5", payload(lambda p: _put(p, ">i", _block2(p, 12), -1)),
         block_bytes=4096)
    # blosc: the issue's header claiming more than uncompressedSize, and every other header field
    make("blosc nbytes 4x uncompressedSize", f32, "blosc", payload(lambda p: _put(p, "<I", 4, 4 * f32.nbytes)))
    make("blosc nbytes 2**32-1", f32, "blosc", payload(lambda p: _put(p, "<I", 4, 2**32 - 1)))
    make("blosc cbytes lie", f32, "blosc", payload(lambda p: _put(p, "<I", 12, len(p) + 1000)))
    make("blosc blocksize 0", f32, "blosc", payload(lambda p: _put(p, "<I", 8, 0)))
    make("blosc block offset out", f32, "blosc", payload(lambda p: _put(p, "<I", 16, 2**31)))
    make("blosc memcpyed flag", f32, "blosc", payload(lambda p: _put(p, "<B", 2, p[2] ^ 0x02)))
    noise = rng.integers(0, 256, size=shape, dtype=np.uint8)  # incompressible: blosc stores it raw
    make("blosc stored-raw flag cleared", noise, "blosc", payload(lambda p: _put(p, "<B", 2, p[2] & ~0x02)))
    make("blosc version 9", f32, "blosc", payload(lambda p: _put(p, "<B", 0, 9)))
    make("blosc 15 bytes", f32, "blosc", payload(lambda p: p[:15]))
    # lz4 / zlib
    make("lz4 truncated", f32, "lz4", payload(lambda p: p[:-7]))
    make("lz4 uncompressedSize 2**32+n", f32, "lz4", fields(uncompressedSize=2**32 + f32.nbytes))
    make("lz4 random bytes", f32, "lz4", payload(lambda p: rng.integers(0, 256, len(p), dtype=np.uint8).tobytes()))
    make("zlib trailing bytes", f32, "zlib", payload(lambda p: p + b"\x00\x01"))
    make("zlib stream 1 byte longer", f32, "zlib", payload(lambda p: zlib.compress(f32.tobytes() + b"x")))
    # sizes, parameters and names
    make("compressedSize 2**63-1", f32, "lz4", fields(compressedSize=2**63 - 1))
    make("compressedSize -2**63", u16, "bslz4", fields(compressedSize=-(2**63)))
    make("codec.parameters STRING", f32, "zlib", fields(codec={"name": "zlib", "parameters": pva.PvInt(int(pva.STRING))}))
    make("codec.parameters double", f32, "zlib", fields(codec={"name": "zlib", "parameters": pva.PvDouble(9.0)}))
    make("codec zstd", f32, "lz4", fields(codec={"name": "zstd", "parameters": pva.PvInt(int(pva.FLOAT))}))
    make("jpeg", u16.astype(np.uint8), "jpeg", lambda nt, p: None)
    return out


def live_sequence(seed: int = SEED) -> list[tuple[str, bool, np.ndarray | None, Any]]:
    """The frames sent to the live consumer, in order: ``(label, good, pixels, nt)``. Good frames
    are ``LIVE_SHAPE`` slabs, uncompressed or compressed with every lossless codec (float32 and
    uint16); bad ones are the crafted catalogue plus random-byte payloads, in a seeded order."""
    rng = np.random.default_rng(seed)
    goods: list[tuple[str, bool, np.ndarray | None, Any]] = []
    good_variants = ["none", "lz4", "bslz4", "blosc", "zlib", "lz4hdf5", "lz4+hdf5", "bslz4+hdf5"]
    frames = planted_frames(len(good_variants) * 4, seed=seed % 1000)
    for i, px in enumerate(frames):
        variant = good_variants[i % len(good_variants)]
        if i % 2:
            px = np.clip(px, 0, 65535).astype(np.uint16)
        goods.append((f"good {variant} {px.dtype}", True, px, _nt(px, variant, uid=0)))
    bads = [(f"bad {k}", False, None, nt) for k, nt in crafted_bad_frames(rng).items()]
    for variant in ("lz4", "bslz4", "blosc", "zlib", "lz4hdf5", "bslz4+hdf5"):  # random payloads, sizes consistent
        px = planted_frames(1, seed=int(rng.integers(1000)))[0]
        nt = _nt(px, variant, uid=0)
        _set_payload(nt, rng.integers(0, 256, int(rng.integers(16, 4000)), dtype=np.uint8).tobytes())
        bads.append((f"bad {variant} random payload", False, None, nt))
    order = rng.permutation(len(goods) + len(bads))
    everything = goods + bads
    return [everything[i] for i in order]


# ---------------------------------------------------------------------------------------------
# the fuzz loop (runs in a subprocess: ``python tests/test_fuzz.py --fuzz``)


class _Case:
    """One fuzz case: a valid frame's NtNdArray, what was changed, and what may come out."""

    def __init__(self, rng: np.random.Generator, variant: str, uid: int) -> None:
        self.variant = variant
        dtype = np.dtype("uint8") if variant == "jpeg" else SUPPORTED_DTYPES[int(rng.integers(len(SUPPORTED_DTYPES)))]
        self.three_d = bool(rng.random() < 0.3)
        shape = ((int(rng.integers(1, 4)), int(rng.integers(1, 25)), int(rng.integers(1, 25))) if self.three_d
                 else (int(rng.integers(1, 49)), int(rng.integers(1, 49))))
        self.px = _pixels(rng, dtype, shape)
        block = 0
        if variant == "lz4hdf5" or variant == "lz4+hdf5":
            block = int(rng.choice([0, 0, 64, 100, 1000, 4096]))
        elif variant == "bslz4+hdf5":
            block = int(rng.choice([0, 0, 8, 64, 256])) * dtype.itemsize
        self.nt = _nt(self.px, variant, uid=uid, three_d=self.three_d, block_bytes=block)
        self.name = VARIANTS[variant][0]
        self.itemsize = dtype.itemsize
        self.dims = [int(d["size"]) for d in self.nt["dimension"]]
        self.mutations: list[str] = []
        #: "payload" (bytes changed), "codec" (name changed), "itemsize" (uncompressed type's size changed)
        self.touched: set[str] = set()

    @property
    def payload(self) -> bytes:
        return _payload(self.nt)

    def set_payload(self, new: bytes, field: str | None = None) -> None:
        field = field or self.nt.getSelectedUnionFieldName()
        dtype = codec.DTYPE_BY_FIELD[field]
        new = new[: len(new) - len(new) % dtype.itemsize]
        if new != self.payload or field != self.nt.getSelectedUnionFieldName():
            self.touched.add("payload")
        self.nt["value"] = {field: np.frombuffer(new, dtype).copy()}
        self.nt["compressedSize"] = len(new)

    def set_dims(self, sizes: list[int]) -> None:
        self.dims = [min(max(int(s), -(2**31)), 2**31 - 1) for s in sizes]  # what an int32 size holds
        self.nt["dimension"] = _dims(self.dims)


def _mutate_payload(rng: np.random.Generator, c: _Case) -> str:
    p = c.payload
    n = len(p)
    op = str(rng.choice(["random", "bitflip", "byteset", "truncate", "extend", "splice", "zeros", "other_stream"]))
    if op == "random":
        size = int(rng.choice([0, 1, 4, 12, 15, 16, 17, n, max(n - 1, 0), n + 1, int(rng.integers(0, 2 * n + 64))]))
        c.set_payload(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    elif op == "bitflip" and n:
        b = bytearray(p)
        for _ in range(int(rng.integers(1, 9))):
            pos = int(rng.integers(8 * n))
            b[pos // 8] ^= 1 << (pos % 8)
        c.set_payload(bytes(b))
    elif op == "byteset" and n:
        b = bytearray(p)
        for _ in range(int(rng.integers(1, 5))):
            b[int(rng.integers(n))] = int(rng.choice([0x00, 0xFF, 0x7F, 0x80]))
        c.set_payload(bytes(b))
    elif op == "truncate":
        c.set_payload(p[: int(rng.integers(0, max(n, 1)))])
    elif op == "extend":
        extra = rng.integers(0, 256, int(rng.integers(1, 65)), dtype=np.uint8).tobytes()
        c.set_payload(p + (extra if rng.random() < 0.5 else bytes(len(extra))))
    elif op == "splice" and n > 2:
        i, j = sorted(int(v) for v in rng.integers(0, n, 2))
        c.set_payload(p[:j] + p[i:j] + p[j:])
    elif op == "zeros":
        c.set_payload(bytes(n))
    else:  # a valid stream of other pixels (more, fewer, another type) under this frame's fields
        op = "other_stream"
        dtype = SUPPORTED_DTYPES[int(rng.integers(len(SUPPORTED_DTYPES)))]
        other = _pixels(rng, dtype, (int(rng.integers(1, 40)), int(rng.integers(1, 40))))
        if c.name in ("", "jpeg"):
            c.set_payload(other.tobytes(), field=codec.FIELD_BY_DTYPE[dtype] if not c.name else None)
        else:
            framed = VARIANTS[c.variant][1]
            c.set_payload(compression.compress(c.name, other, hdf5_framed=framed))
    return f"payload:{op}"


def _mutate_header(rng: np.random.Generator, c: _Case) -> str:
    """Corrupt one field of the codec's own header / block structure (payload touched)."""
    p = c.payload
    if not p or c.name in ("", "jpeg"):
        return _mutate_payload(rng, c)
    n = len(p)
    lies = [0, -1, 1, -(2**31), 2**31 - 1, n, n + 1, n - 1, c.px.nbytes, 4 * c.px.nbytes, int(rng.integers(-(2**31), 2**31))]
    v = int(rng.choice(lies))
    framed = c.variant in ("lz4hdf5", "lz4+hdf5", "bslz4+hdf5")
    if c.variant == "blosc":
        off, fmt = [(0, "<B"), (1, "<B"), (2, "<B"), (3, "<B"), (4, "<I"), (8, "<I"), (12, "<I"), (16, "<I")][int(rng.integers(8))]
        v = v % (256 if fmt == "<B" else 2**32)
        c.set_payload(_put(p, fmt, off, v))
        return f"header:blosc@{off}"
    if c.variant == "zlib":
        pos = min(max(int(rng.choice([0, 1, n - 1, n - 4])), 0), n - 1)  # header (CMF, FLG) or Adler-32
        c.set_payload(_put(p, "<B", pos, (p[pos] + 1 + int(rng.integers(255))) % 256))
        return f"header:zlib@{pos}"
    if c.variant == "lz4":
        c.set_payload(_put(p, "<B", 0, int(rng.choice([0x00, 0x0F, 0xF0, 0xFF]))))
        return "header:lz4 token"
    # bslz4 / framed: total (8 B), block (4 B), then per-block big-endian sizes
    where = str(rng.choice(["total", "block", "csize", "csize2"] if framed else ["csize", "csize2"]))
    first = 12 if framed else 0
    if where == "total":
        c.set_payload(_put(p, ">q", 0, int(rng.choice([0, -1, 1, c.px.nbytes - 1, c.px.nbytes + 1, 2**31, 2**63 - 1]))))
    elif where == "block":
        c.set_payload(_put(p, ">i", 8, v))
    elif where == "csize":
        c.set_payload(_put(p, ">i", first, v))
    else:
        try:
            second = _block2(p, first)
        except struct.error:
            second = first
        c.set_payload(_put(p, ">i", second if 0 <= second <= n - 4 else first, v))
    return f"header:{where}"


def _mutate_sizes(rng: np.random.Generator, c: _Case) -> str:
    key = str(rng.choice(["uncompressedSize", "compressedSize"]))
    true = int(c.nt[key])
    c.nt[key] = int(rng.choice(_size_lies(true)))
    return f"size:{key}"


def _mutate_dims(rng: np.random.Generator, c: _Case) -> str:
    d = list(c.dims) or [1]  # an earlier mutation may have emptied them
    d = d + [1] * (2 - len(d))
    total = int(np.prod(d, dtype=object))
    op = str(rng.choice(["off_by_one", "swap", "empty", "1d", "3d_same", "4d", "zero", "negative",
                         "two_negative", "huge", "overflow", "consistent_huge", "pow2_32"]))
    i = int(rng.integers(len(d)))
    if op == "off_by_one":
        d[i] += int(rng.choice([-1, 1]))
    elif op == "swap":
        d = d[::-1]
    elif op == "empty":
        d = []
    elif op == "1d":
        d = [total]
    elif op == "3d_same":
        d = [d[0], int(np.prod(d[1:], dtype=object)), 1] if rng.random() < 0.5 else [total, 1, 1]
    elif op == "4d":
        d = d + [1] * (4 - len(d)) if len(d) < 4 else d + [1]
    elif op == "zero":
        d[i] = 0
    elif op == "negative":
        d[i] = -int(rng.choice([1, d[i], 2**31 - 1])) if d[i] else -1
    elif op == "two_negative":  # a positive product from negative sizes
        d = [-d[0], -d[1]] + d[2:]
    elif op == "huge":
        d[i] = 2**31 - 1
    elif op == "overflow":  # the product wraps in 32 and 64 bits
        d = [2**31 - 1] * int(rng.integers(2, 4))
    elif op == "consistent_huge":  # dims and uncompressedSize agree, beyond MAX_DECODED_BYTES
        d = [2**16, (compression.MAX_DECODED_BYTES // c.itemsize >> 16) + 1]
        c.nt["uncompressedSize"] = int(np.prod(d, dtype=object)) * c.itemsize
    else:  # 2**32 values: 0 after a 32-bit truncation
        d = [2**16, 2**16]
    c.set_dims(d)
    return f"dims:{op}"


def _mutate_dtype(rng: np.random.Generator, c: _Case) -> str:
    """codec.parameters (the uncompressed type) or, uncompressed, the value's union field."""
    if c.name == "" and rng.random() < 0.7:
        field = str(rng.choice(sorted(codec.DTYPE_BY_FIELD)))
        c.set_payload(c.payload, field=field)  # the same bytes read as another type
        return f"dtype:field {field}"
    kind = str(rng.choice(["int", "int", "int", "double", "string", "array"]))
    if kind == "int":
        v = int(rng.choice(list(range(13)) + [99, -1, 2**31 - 1]))
        param: Any = pva.PvInt(v)
        new = _SCALARS.get(v)
        if new is None or new.itemsize != c.itemsize:
            c.touched.add("itemsize")
    elif kind == "double":
        param = pva.PvDouble(float(rng.choice([4.0, 9.5, float("nan")])))
    elif kind == "string":
        param = pva.PvString(str(rng.choice(["float", "9", ""])))
    else:
        param = pva.PvScalarArray(pva.INT)
    c.nt["codec"] = {"name": c.nt["codec"]["name"], "parameters": param}
    return f"dtype:{kind}"


def _mutate_codec_name(rng: np.random.Generator, c: _Case) -> str:
    names = ["LZ4", "lz4 ", " bslz4", "BSLZ4", "zstd", "", "jpeg", "JPEG", "blosc2", "x" * 300, *compression.LOSSLESS_CODECS]
    new = str(rng.choice(names))
    if new != c.nt["codec"]["name"]:
        c.touched.add("codec")
    value = c.nt["codec"]["parameters"][0].get("value")  # kept when it is a type, else UBYTE
    param = pva.PvInt(int(value)) if isinstance(value, int) else pva.PvInt(int(pva.UBYTE))
    c.nt["codec"] = {"name": new, "parameters": param}
    return "codec_name"


def _odd_value(rng: np.random.Generator) -> tuple[str, Any]:
    """An NTAttribute value of any type and range."""
    kind = int(rng.integers(9))
    if kind == 0:
        return "int", pva.PvInt(int(rng.choice([0, 1, 2, 3, 7, -1, 2**31 - 1, -(2**31)])))
    if kind == 1:
        return "long", pva.PvLong(int(rng.choice([2**62, -(2**63), 2**32])))
    if kind == 2:
        return "ulong", pva.PvULong(2**64 - 1)
    if kind == 3:
        return "double", pva.PvDouble(float(rng.choice([np.inf, -np.inf, np.nan, 1e300, -0.5, 0.0, 2.0])))
    if kind == 4:
        return "string", pva.PvString(str(rng.choice(["", "0", "2", "RGB1", "inf", "1e999", "x" * 200])))
    if kind == 5:
        return "boolean", pva.PvBoolean(bool(rng.integers(2)))
    if kind == 6:
        return "ubyte", pva.PvUByte(int(rng.integers(256)))
    if kind == 7:
        return "float", pva.PvFloat(float(rng.choice([np.inf, np.nan, 3.0])))
    return "short", pva.PvShort(int(rng.integers(-(2**15), 2**15)))


def _mutate_colour(rng: np.random.Generator, c: _Case) -> str:
    """3-D dimensions (same values) with a ColorMode that is not mono, or not a number at all."""
    c.set_dims((c.dims + [1, 1, 1])[:3])
    if rng.random() < 0.5:
        c.nt["attribute"] = [pva.NtAttribute("ColorMode", pva.PvInt(int(rng.choice([2, 3, 4, 7]))))]
        return "colour_3d"
    kind, value = _odd_value(rng)
    c.nt["attribute"] = [pva.NtAttribute("ColorMode", value)]
    return f"colour_3d:{kind}"


def _mutate_attributes(rng: np.random.Generator, c: _Case) -> str:
    """ColorMode / PhotonEnergy / anything else of odd types and values, duplicates, empty names."""
    attrs = []
    for _ in range(int(rng.integers(0, 5))):
        name = str(rng.choice(["ColorMode", "PhotonEnergy", "", "ColorMode", "x" * 100]))
        attrs.append(pva.NtAttribute(name, _odd_value(rng)[1]))
    c.nt["attribute"] = attrs
    return "attributes"


MUTATIONS: dict[str, Callable[[np.random.Generator, _Case], str]] = {
    "payload": _mutate_payload,
    "header": _mutate_header,
    "sizes": _mutate_sizes,
    "dims": _mutate_dims,
    "dtype": _mutate_dtype,
    "codec_name": _mutate_codec_name,
    "colour": _mutate_colour,
    "attributes": _mutate_attributes,
}
#: How often each kind is drawn: mostly what reaches the C decompressors.
WEIGHTS = {"payload": 6, "header": 5, "sizes": 3, "dims": 3, "dtype": 2, "codec_name": 1, "colour": 1, "attributes": 1}
#: jpeg keeps its dimensions and name, so every case must be refused by name.
JPEG_MUTATIONS = ("payload", "sizes", "dtype")


def _check(c: _Case, frame: codec.DecodedFrame | None, error: FrameError | None, pristine: bool) -> str | None:
    """The invariants of one case; a violation's description, or None."""
    codec_untouched = "codec" not in c.touched
    if c.variant == "jpeg" and codec_untouched:
        if frame is not None:
            return "a jpeg frame was decoded"
        if JPEG_REFUSAL not in str(error):
            return f"jpeg refused without naming it: {error}"
        return None
    if pristine:
        if frame is None:
            return f"a valid frame was refused: {error}"
        want = c.px.shape if c.px.ndim == 3 else (1, *c.px.shape)
        if frame.pixels.shape != want or frame.pixels.dtype != c.px.dtype:
            return f"decoded as {frame.pixels.shape} {frame.pixels.dtype}, sent {want} {c.px.dtype}"
    if frame is None:
        return None
    if frame.pixels.dtype not in SUPPORTED_DTYPES:
        return f"decoded to unsupported dtype {frame.pixels.dtype}"
    if frame.pixels.size != int(np.prod(c.dims, dtype=object)):
        return f"decoded {frame.pixels.size} values for dimensions {c.dims}"
    if not frame.pixels.flags.c_contiguous or not frame.pixels.flags.writeable:
        return "decoded pixels are not a C-contiguous writable copy"
    if not c.touched & {"payload", "codec", "itemsize"} and frame.pixels.tobytes() != c.px.tobytes():
        return "payload untouched but the decoded bytes differ from the original"
    return None


def run_fuzz(seed: int, max_cases: int, max_seconds: float, trace: Path | None = None) -> dict[str, Any]:
    """The whole fuzz: the crafted catalogue, the live sequence, then the random loop. Returns counts."""
    rng = np.random.default_rng(seed)
    tr = open(trace, "w") if trace else None  # noqa: SIM115 - the last line names a case that crashed

    def note(text: str) -> None:
        if tr:
            tr.write(text + "\n")
            tr.flush()

    unexpected: list[str] = []
    violations: list[str] = []

    def decode(nt: Any, what: str, layout: PanelLayout | None = None) -> tuple[Any, FrameError | None]:
        note(what)
        try:
            return codec.decode_ntndarray(nt, layout), None
        except FrameError as exc:
            return None, exc
        except BaseException as exc:  # noqa: BLE001 - anything else is what this test is for
            unexpected.append(f"{what}: {exc!r}")
            return None, None

    # 1. the named catalogue: every crafted frame refused
    catalogue = crafted_bad_frames(np.random.default_rng(seed + 1))
    crafted = {"cases": 0, "refused": 0}
    for label, nt in catalogue.items():
        frame, err = decode(nt, f"crafted {label}", PanelLayout(LIVE_SHAPE[1:]))
        crafted["cases"] += 1
        crafted["refused"] += err is not None
        if frame is not None:
            violations.append(f"crafted {label}: decoded")
    # 2. the live test's sequence, as the consumer decodes it (its panel shape)
    live = {"good": 0, "bad": 0, "misclassified": []}
    for label, good, px, nt in live_sequence(SEED):  # exactly what the live test sends
        frame, err = decode(nt, f"live {label}", PanelLayout(LIVE_SHAPE[1:]))
        live["good" if good else "bad"] += 1
        ok = (frame is not None and px is not None and frame.pixels.tobytes() == px.tobytes()) if good else err is not None
        if not ok:
            live["misclassified"].append(label)
    # 3. the random loop, round robin over the variants, bounded in count and time
    per: dict[str, dict[str, int]] = {v: dict(cases=0, pristine=0, decoded=0, exact=0, refused=0, refused_by_name=0,
                                                  unexpected=0) for v in VARIANTS}
    by_mutation: dict[str, list[int]] = {}
    t0 = time.monotonic()
    n = 0
    while n < max_cases and time.monotonic() - t0 < max_seconds:
        variant = list(VARIANTS)[n % len(VARIANTS)]
        n += 1
        c = _Case(rng, variant, uid=n)
        pristine = (n - 1) // len(VARIANTS) % 8 == 0  # the first round, then one case in 8 of each variant
        if not pristine:
            pool = JPEG_MUTATIONS if variant == "jpeg" else tuple(MUTATIONS)
            weights = np.array([WEIGHTS[k] for k in pool], float)
            for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):
                c.mutations.append(MUTATIONS[str(rng.choice(pool, p=weights / weights.sum()))](rng, c))
        count = per[variant]
        count["cases"] += 1
        count["pristine"] += pristine
        n_unexpected = len(unexpected)
        frame, err = decode(c.nt, f"case {n} {variant} {c.px.dtype} {c.px.shape} {c.mutations}")
        if len(unexpected) > n_unexpected:
            count["unexpected"] += 1
            continue
        if frame is not None:
            count["decoded"] += 1
            count["exact"] += frame.pixels.tobytes() == c.px.tobytes() and frame.pixels.dtype == c.px.dtype
        else:
            count["refused"] += 1
            count["refused_by_name"] += JPEG_REFUSAL in str(err)
        for m in c.mutations or ["pristine"]:
            by_mutation.setdefault(m, [0, 0])[frame is None] += 1
        problem = _check(c, frame, err, pristine)
        if problem:
            violations.append(f"case {n} {variant} {c.px.dtype} {c.px.shape} {c.mutations}: {problem}")
    if tr:
        tr.close()
    return {
        "seed": seed,
        "cases": n,
        "elapsed_s": round(time.monotonic() - t0, 2),
        "per_codec": per,
        "by_mutation": by_mutation,
        "crafted": crafted,
        "live": live,
        "unexpected": unexpected,
        "violations": violations[:50],
        "n_violations": len(violations),
        "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


# ---------------------------------------------------------------------------------------------
# 1. the fuzz loop, in a subprocess


@pytest.mark.timeout(FUZZ_TIMEOUT_S + 30)
def test_fuzz_decoder_every_codec(tmp_path: Path) -> None:
    """Random and mutated NtNdArrays over every codec: a decode or a FrameError, nothing else."""
    missing = {v: compression.missing_modules(name) for v, (name, _) in VARIANTS.items() if name in compression.CODEC_MODULES}
    if any(missing.values()):
        pytest.skip(f"codec packages not installed ({compression.EXTRA_HINT}): {missing}")
    trace = tmp_path / "fuzz-trace.txt"
    cmd = [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), "--fuzz", "--seed", str(FUZZ_SEED),
           "--max-cases", str(MAX_CASES), "--max-seconds", str(MAX_SECONDS), "--trace", str(trace)]
    env = loopback_env(dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])))
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=FUZZ_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:  # the child is killed by subprocess.run
        last = trace.read_text().splitlines()[-1:] if trace.exists() else []
        pytest.fail(f"fuzz subprocess still running after {exc.timeout:.0f} s; last case: {last}")
    last = trace.read_text().splitlines()[-1:] if trace.exists() else []
    assert out.returncode == 0, (
        f"fuzz subprocess exited with {out.returncode} (negative = killed by that signal) while decoding "
        f"{last}\n{out.stderr[-4000:]}"
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({k: res[k] for k in ("cases", "elapsed_s", "per_codec", "crafted", "live", "maxrss_mb")}, indent=1))

    assert not res["unexpected"], "exceptions other than FrameError:\n" + "\n".join(res["unexpected"][:20])
    assert res["n_violations"] == 0, f"{res['n_violations']} violations:\n" + "\n".join(res["violations"])
    # the counts add up, every codec had its share, pristine frames decoded bit-exact
    per = res["per_codec"]
    assert sum(c["cases"] for c in per.values()) == res["cases"]
    assert res["cases"] >= min(MAX_CASES, 10 * len(VARIANTS)), res["cases"]
    assert res["cases"] <= MAX_CASES and res["elapsed_s"] <= MAX_SECONDS + 5
    for variant, c in per.items():
        assert c["decoded"] + c["refused"] + c["unexpected"] == c["cases"], (variant, c)
        assert c["cases"] >= res["cases"] // len(VARIANTS) and c["pristine"] >= 1, (variant, c)
        if variant == "jpeg":
            assert c["decoded"] == 0 and c["refused_by_name"] == c["cases"], c
        else:
            assert c["exact"] >= c["pristine"] and c["refused"] >= 1, (variant, c)
    # the fixed catalogue and the live sequence behave as the live test expects
    assert res["crafted"]["refused"] == res["crafted"]["cases"] >= 30, res["crafted"]
    assert not res["live"]["misclassified"], res["live"]
    assert res["maxrss_mb"] < 1500, res["maxrss_mb"]  # no decoder allocated from a lying size


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan, 1e300, "RGB1", 2**62], ids=str)
def test_colour_mode_of_any_value_is_mono_or_a_frame_error(value: Any) -> None:
    """Found by the fuzz loop: a 3-D frame whose ColorMode attribute was +-inf raised OverflowError
    out of decode_ntndarray (the consumer counted it only as "cannot decode update")."""
    px = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4)
    nt = codec.encode_ntndarray(px, unique_id=5, three_d=True)
    attr = pva.PvDouble(value) if isinstance(value, float) else pva.PvLong(value) if isinstance(value, int) else pva.PvString(value)
    nt["attribute"] = [pva.NtAttribute("ColorMode", attr)]
    try:
        frame = codec.decode_ntndarray(nt)
    except FrameError as exc:
        assert "ColorMode" in str(exc)
    else:
        np.testing.assert_array_equal(frame.pixels, px)


# ---------------------------------------------------------------------------------------------
# 2 + 3. a real consumer


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One real PeakNet consumer fed by a ReplayServer, with a monitor on its output channel."""
    tag = unique_tag("fuzz")
    image = f"{tag}:image"
    tmp = tmp_path_factory.mktemp("fuzz-live")
    with ReplayServer(image) as srv:
        with consumer_set(PEAKNET_CLASS, image, tag, tmp, role="pk", processor_args=PEAKNET_CPU_ARGS) as pk:
            with procs.OutputMonitor(pk.output_channels) as mon:
                mon.wait_connected(30)
                yield srv, pk, mon


def _status(pk: procs.ManagedProcess, after: float | None = None) -> dict[str, Any]:
    """The consumer's whole status object, newer than ``after`` (a time.time())."""
    deadline = time.monotonic() + 15
    while True:
        st = procs.read_status(pk.status_channels[0])
        if after is None or float(st.get("objectTime", 0.0)) > after:
            return st
        if time.monotonic() > deadline:
            raise TimeoutError("no fresh status")
        time.sleep(0.2)


def _settled(pk: procs.ManagedProcess, before: dict[str, Any], n_sent: int) -> bool:
    """Every frame sent since ``before`` has left the consumer (processed or counted bad/dropped)."""
    us, us0 = _status(pk, after=time.time())["userStats"], before["userStats"]
    done = sum(us[k] - us0[k] for k in ("nProcessed", "nDropped", "nBadFrames"))
    return us["nFramesIn"] - us0["nFramesIn"] == done == n_sent


def _add_up(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Deltas of the counters that must add up: received (pvapy's receiver and ours) = processed
    + dropped + bad, nothing queued, nothing lost upstream."""
    keys = ("nFramesIn", "nProcessed", "nDropped", "nBadFrames", "nMissedIds", "nEngineErrors", "nPublishErrors",
            "nNotPublished")
    d = {k: int(after["userStats"][k]) - int(before["userStats"][k]) for k in keys}
    d["received"] = int(after["receiverStats"]["nReceived"]) - int(before["receiverStats"]["nReceived"])
    d["overruns"] = int(after["receiverStats"]["nOverruns"]) - int(before["receiverStats"]["nOverruns"])
    d["published"] = int(after["publisherStats"]["nPublished"]) - int(before["publisherStats"]["nPublished"])
    assert after["userStats"]["ringFill"] == 0 and after["userStats"]["engineAlive"] == 1, after["userStats"]
    assert d["received"] == d["nFramesIn"] == d["nProcessed"] + d["nDropped"] + d["nBadFrames"], d
    assert d["published"] == d["nProcessed"], d  # forward_images=all: every processed frame published
    assert d["received"] == d["published"] + d["nDropped"] + d["nBadFrames"], d
    assert d["overruns"] == d["nMissedIds"] == d["nEngineErrors"] == d["nPublishErrors"] == d["nNotPublished"] == 0, d
    return d


@pytest.mark.pva
@pytest.mark.timeout(240)
def test_real_consumer_survives_crafted_frames(live: Any) -> None:
    """A seeded mix of good frames and crafted compressed frames (bslz4 random bytes, corrupt block
    size, uncompressedSize near 2**31, blosc header claiming more than uncompressedSize, ...)."""
    srv, pk, mon = live
    seq = live_sequence(SEED)
    before = _status(pk, after=time.time())
    sent: dict[int, tuple[str, bool, np.ndarray | None]] = {}
    for label, good, px, nt in seq:
        sent[srv.publish_prepared(nt)] = (label, good, px)
        time.sleep(0.005)
    good_ids = [u for u, (_, g, _) in sent.items() if g]
    bad_ids = [u for u, (_, g, _) in sent.items() if not g]
    missing = mon.wait_for(good_ids, timeout_s=60)
    assert not missing, f"good frames never published: {[sent[u][0] for u in sorted(missing)]}"
    wait_until(lambda: _settled(pk, before, len(sent)), 20, what="every frame counted")
    after = _status(pk, after=time.time())
    assert pk.poll() is None, pk.log_text()[-3000:]
    d = _add_up(before, after)
    assert d["nBadFrames"] == len(bad_ids) >= 35, (d, len(bad_ids))
    assert d["nProcessed"] == len(good_ids) and d["nDropped"] == 0, d
    published = mon.snapshot()
    assert not set(bad_ids) & set(published)
    for uid in good_ids:  # exactly once, with the sent pixels (dtype kept, bit-exact)
        assert len(published[uid]) == 1, (sent[uid][0], len(published[uid]))
        image = published[uid][0][2].image
        px = sent[uid][2]
        assert image is not None and image.dtype == px.dtype and image.tobytes() == px.tobytes(), sent[uid][0]
    log = pk.log_text()
    assert "Segmentation" not in log and "Traceback" not in log, log[-3000:]


@pytest.mark.pva
@pytest.mark.timeout(240)
def test_real_consumer_survives_hostile_configure(live: Any) -> None:
    """configure {"min_peaks": 2**32} / {"batch_timeout_ms": 1e16} (and neighbours) through the
    control channel: refused and logged, the status channel answers for two report periods and
    more, later frames are processed."""
    srv, pk, mon = live
    control = pk.control_channels[0]
    log_start = len(pk.log_text())
    before = _status(pk, after=time.time())
    hostile = [{"min_peaks": 2**32}, {"batch_timeout_ms": 1e16}, {"min_peaks": 2**63}, {"min_peaks": -1},
               {"batch_timeout_ms": -5}, {"batch_timeout_ms": float("inf")}, {"min_peaks": 2.5},
               {"min_peaks": 2**32, "batch_timeout_ms": 1e16}]
    for args in hostile:
        procs.send_control(control, "configure", args)
    # two report periods (1 s each) later the status still answers, from a live process
    t = time.time()
    first = _status(pk, after=t)
    second = _status(pk, after=float(first["objectTime"]))
    third = _status(pk, after=float(second["objectTime"]))
    assert float(third["objectTime"]) - t >= 2.0 * 0.9
    assert pk.poll() is None, pk.log_text()[-3000:]
    us = third["userStats"]
    assert us["minPeaks"] == PEAKNET_CPU_ARGS["min_peaks"] and us["engineAlive"] == 1, us
    assert us["nEngineErrors"] == before["userStats"]["nEngineErrors"], us
    wait_until(lambda: pk.log_text()[log_start:].count("rejected, keeping the old values") == len(hostile), 10,
               what="every hostile configure refused in the log")
    log = pk.log_text()[log_start:]
    assert "min_peaks must be <= 2147483647, got 4294967296" in log, log[-3000:]
    assert "batch_timeout_ms must be <= 3.6e+06, got 1e+16" in log, log[-3000:]
    # a valid value still goes through, and frames sent afterwards are processed (batch timeout 30 ms)
    procs.send_control(control, "configure", {"min_peaks": 2**31 - 1})
    wait_until(lambda: _status(pk, after=time.time())["userStats"]["minPeaks"] == 2**31 - 1, 15, what="minPeaks max")
    procs.send_control(control, "configure", {"min_peaks": PEAKNET_CPU_ARGS["min_peaks"]})
    wait_until(lambda: _status(pk, after=time.time())["userStats"]["minPeaks"] == PEAKNET_CPU_ARGS["min_peaks"], 15,
               what="minPeaks back")
    ids = [srv.publish(f) for f in planted_frames(5, seed=SEED % 997)]
    assert not mon.wait_for(ids, timeout_s=30), "frames after the configure puts were not processed"
    wait_until(lambda: _settled(pk, before, len(ids)), 15, what="the new frames counted")
    d = _add_up(before, _status(pk, after=time.time()))
    assert d["nProcessed"] == len(ids) and d["nBadFrames"] == 0, d
    assert pk.poll() is None
    assert all(len(mon.snapshot()[u]) == 1 for u in ids)


# ---------------------------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="fuzz the NtNdArray decoder; prints one JSON line of counts")
    p.add_argument("--fuzz", action="store_true", required=True)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--max-cases", type=int, default=MAX_CASES)
    p.add_argument("--max-seconds", type=float, default=MAX_SECONDS)
    p.add_argument("--trace", type=Path, default=None)
    p.add_argument("--max-vm-mb", type=int, default=2048,
                   help="address-space limit: a decoder allocating from a lying size gets MemoryError (0 = none)")
    args = p.parse_args(argv)
    if args.max_vm_mb > 0:  # ~340 MB are mapped after the imports
        resource.setrlimit(resource.RLIMIT_AS, (args.max_vm_mb << 20, resource.getrlimit(resource.RLIMIT_AS)[1]))
    res = run_fuzz(args.seed, args.max_cases, args.max_seconds, args.trace)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
