"""Compressed NTNDArray payloads: decoders that cannot be made to crash, and ADCore-faithful encoders.

areaDetector's NDPluginCodec (ADCore ``NDCodec.cpp``: ``"", jpeg, zlib, blosc, lz4, lz4hdf5,
bslz4``) publishes a compressed frame as ``value.ubyteValue`` = the compressed bytes,
``compressedSize`` = their number, ``uncompressedSize`` = dims x itemsize, ``codec.name`` and
``codec.parameters`` = a PVInt holding the pvData scalar type of the uncompressed pixels.

Payload formats (what each encoder writes and each decoder accepts):

- ``lz4``: one raw LZ4 block (``LZ4_compress_default``).
- ``bslz4``: bitshuffle + LZ4 (``bshuf_compress_lz4``, default block size): per block a 4-byte
  big-endian compressed size and the LZ4 data; the last ``n % 8`` elements stored raw.
- ``lz4hdf5``: the HDF5 LZ4 filter (32004) chunk: 8-byte BE total size, 4-byte BE block size,
  then per block a 4-byte BE compressed size and the data (stored raw when it did not shrink).
- ``blosc``: one c-blosc 1 frame (16-byte header: version, versionlz, flags, typesize, nbytes,
  blocksize, cbytes, little-endian).
- ``zlib``: one zlib (or gzip) stream.
- ``jpeg``: lossy 8-bit; refused with a clear error (peak finding needs the counts).

HDF5-framed chunks as Eiger files hold them (``pvapy-ad-sim-server -hcm`` sends the raw chunk
under the name ``lz4`` or ``bslz4``) are recognised per frame from the payload itself: a chunk
whose first 8 bytes are the expected total size, big-endian, carries the 12-byte HDF5 header.
A raw LZ4 block cannot start that way (its first token would have no literals and a match with
nothing before it) and neither can raw bslz4 (its first 4 bytes are a non-zero block size), so no
process-wide ``PVAPY_COMPRESSED_PAYLOAD_START`` is needed.

Why not pvapy's ``AdImageUtility``: its decompressors size the output from unchecked fields and
hand untrusted lengths to C (``blosc.decompress_ptr`` into a buffer of ``uncompressedSize``,
``bitshuffle.decompress_lz4`` which reads block sizes from the payload with no input length), so
one crafted frame segfaults the consumer. Here every size is checked against dims x itemsize and
the payload length before any decompressor runs, LZ4 blocks go through ``LZ4_decompress_safe``
into buffers of the validated size, and bitshuffle is only used for the in-memory bit transpose
of an already-sized buffer. Every failure is a ``FrameError``.

This module does not import pvaccess (the fuzz test runs it in bare subprocesses).
"""

from __future__ import annotations

import importlib
import importlib.util
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import FrameError

#: Codec names as ADCore's NDCodec.cpp spells them (``""`` = uncompressed).
ADCORE_CODECS = ("jpeg", "zlib", "blosc", "lz4", "lz4hdf5", "bslz4")
#: Codecs decoded here (bit-exact) and emitted by ``peaknet-pva replay --codec``.
LOSSLESS_CODECS = ("lz4", "bslz4", "blosc", "zlib", "lz4hdf5")

#: Python modules each codec needs (all in the ``codecs`` extra); zlib is in the standard library.
CODEC_MODULES: dict[str, tuple[str, ...]] = {
    "lz4": ("lz4.block",),
    "lz4hdf5": ("lz4.block",),
    "bslz4": ("lz4.block", "bitshuffle"),
    "blosc": ("blosc",),
    "zlib": (),
}
#: pip package providing each module.
PACKAGE_OF_MODULE: dict[str, str] = {"lz4.block": "lz4", "bitshuffle": "bitshuffle", "blosc": "blosc"}
EXTRA_HINT = 'pip install "peaknet-pva[codecs]"'

#: Largest decoded frame accepted (bytes): LZ4's own input limit is ~2.1 GB, and no detector frame
#: comes near it. ``max_frame_mpix`` in the processor is the tighter, configurable bound.
MAX_DECODED_BYTES = 0x7E000000
#: bitshuffle: target block size in bytes, block multiple, minimum (``bshuf_default_block_size``).
_BSHUF_TARGET_BYTES = 8192
_BSHUF_MULT = 8
_BSHUF_MIN_BLOCK = 128
_BLOSC_HEADER = 16
_BLOSC_MEMCPYED = 0x02
_H5_HEADER = 12


def bshuf_default_block_size(itemsize: int) -> int:
    """bitshuffle's default block size in elements (stable across versions by design)."""
    block = (_BSHUF_TARGET_BYTES // itemsize) // _BSHUF_MULT * _BSHUF_MULT
    return max(block, _BSHUF_MIN_BLOCK)


def missing_modules(codec: str) -> list[str]:
    """The pip packages ``codec`` needs that are not installed (empty: it can be decoded)."""
    out = []
    for module in CODEC_MODULES.get(codec, ()):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(PACKAGE_OF_MODULE[module])
    return out


def check_codec(codec: str) -> None:
    """Raise ``FrameError`` unless frames compressed with ``codec`` can be decoded here."""
    if codec == "jpeg":
        raise FrameError(
            "codec 'jpeg' is not supported: it is lossy and 8-bit only, so peak intensities would be "
            "wrong; send frames uncompressed or with a lossless codec (" + ", ".join(LOSSLESS_CODECS) + ")"
        )
    if codec not in CODEC_MODULES:
        raise FrameError(f"unknown compression codec {codec!r}; supported: {', '.join(LOSSLESS_CODECS)}")
    missing = missing_modules(codec)
    if missing:
        raise FrameError(
            f"frame is compressed with {codec!r} but {', '.join(missing)} is not installed ({EXTRA_HINT})"
        )


def _lz4_block() -> Any:
    return importlib.import_module("lz4.block")


def _lz4_exact(src: memoryview | bytes, size: int, what: str) -> bytes:
    """Decode one raw LZ4 block that must give exactly ``size`` bytes (LZ4_decompress_safe)."""
    try:
        out = _lz4_block().decompress(src, uncompressed_size=size)
    except Exception as exc:  # lz4.block.LZ4BlockError, ValueError, MemoryError
        raise FrameError(f"{what}: corrupt LZ4 data ({exc})") from None
    if len(out) != size:
        raise FrameError(f"{what}: LZ4 data decodes to {len(out)} bytes, expected {size}")
    return out


def _be_u64(buf: memoryview, pos: int) -> int:
    return int(struct.unpack_from(">Q", buf, pos)[0])


def _be_i32(buf: memoryview, pos: int) -> int:
    return int(struct.unpack_from(">i", buf, pos)[0])


def has_hdf5_header(payload: memoryview, expected: int) -> bool:
    """True if ``payload`` starts with the 12-byte HDF5 chunk header for ``expected`` bytes."""
    return len(payload) >= _H5_HEADER and _be_u64(payload, 0) == expected


# ---------------------------------------------------------------------------------------------
# decoders: (payload, expected bytes, itemsize) -> exactly ``expected`` bytes, or FrameError


def _decode_lz4hdf5(payload: memoryview, expected: int, itemsize: int, name: str = "lz4hdf5") -> bytes | bytearray:
    if not has_hdf5_header(payload, expected):
        total = _be_u64(payload, 0) if len(payload) >= 8 else None
        raise FrameError(f"{name}: HDF5 chunk header says {total} bytes, expected {expected}")
    block = _be_i32(payload, 8)
    if block <= 0:
        raise FrameError(f"{name}: invalid block size {block} in the HDF5 chunk header")
    block = min(block, expected)
    n_blocks = -(-expected // block)
    if _H5_HEADER + 4 * n_blocks > len(payload):
        raise FrameError(f"{name}: {n_blocks} blocks of {block} bytes cannot fit in {len(payload)} bytes")
    out = bytearray(expected)
    view = memoryview(out)
    pos, done = _H5_HEADER, 0
    for i in range(n_blocks):
        if pos + 4 > len(payload):
            raise FrameError(f"{name}: truncated at block {i} of {n_blocks}")
        csize = _be_i32(payload, pos)
        pos += 4
        this = min(block, expected - done)
        if csize <= 0 or pos + csize > len(payload):
            raise FrameError(f"{name}: block {i} claims {csize} bytes, {len(payload) - pos} left")
        if csize == this:  # stored raw: did not shrink
            view[done : done + this] = payload[pos : pos + csize]
        else:
            view[done : done + this] = _lz4_exact(payload[pos : pos + csize], this, f"{name} block {i}")
        pos += csize
        done += this
    if pos != len(payload):
        raise FrameError(f"{name}: {len(payload) - pos} trailing bytes after the last block")
    return out


def _decode_lz4(payload: memoryview, expected: int, itemsize: int) -> bytes | bytearray:
    if has_hdf5_header(payload, expected):  # an HDF5 chunk (Eiger file, pvapy-ad-sim-server -hcm)
        return _decode_lz4hdf5(payload, expected, itemsize, name="lz4 (HDF5-framed)")
    return _lz4_exact(payload, expected, "lz4")


def _bitunshuffle(raw: np.ndarray, itemsize: int, block: int) -> np.ndarray:
    """Undo bitshuffle on ``raw`` (uint8, n * itemsize bytes, blocks of ``block`` elements)."""
    n = raw.size // itemsize
    dtype = np.dtype(f"V{itemsize}") if itemsize not in (1, 2, 4, 8) else np.dtype(f"u{itemsize}")
    arr = raw.view(dtype)
    try:
        bitshuffle = importlib.import_module("bitshuffle")
        return np.asarray(bitshuffle.bitunshuffle(arr, block)).view(np.uint8)
    except ImportError:
        return _bitunshuffle_numpy(raw, itemsize, block, n)


def _bitunshuffle_numpy(raw: np.ndarray, itemsize: int, block: int, n: int) -> np.ndarray:
    """bitshuffle's inverse in numpy (slow; used only without the ``bitshuffle`` package)."""
    out = raw.copy()
    bits = itemsize * 8
    start = 0
    while n - start >= _BSHUF_MULT:
        m = min(block, (n - start) // _BSHUF_MULT * _BSHUF_MULT)
        seg = raw[start * itemsize : (start + m) * itemsize].reshape(bits, m // 8)
        planes = np.unpackbits(seg, axis=1, bitorder="little")  # (bits, m): bit j of every element
        elem_bits = planes.reshape(itemsize, 8, m).transpose(2, 0, 1)  # (m, byte, bit)
        out[start * itemsize : (start + m) * itemsize] = np.packbits(elem_bits, axis=2, bitorder="little").reshape(-1)
        start += m
    return out


def _decode_bslz4(payload: memoryview, expected: int, itemsize: int) -> bytes | bytearray | np.ndarray:
    if expected % itemsize:
        raise FrameError(f"bslz4: {expected} bytes is not a whole number of {itemsize}-byte values")
    n = expected // itemsize
    if has_hdf5_header(payload, expected):  # HDF5 bitshuffle filter (32008) chunk
        block_bytes = _be_i32(payload, 8)
        if block_bytes <= 0 or block_bytes % itemsize:
            raise FrameError(f"bslz4 (HDF5-framed): invalid block size {block_bytes} bytes for {itemsize}-byte values")
        block = block_bytes // itemsize
        pos = _H5_HEADER
        name = "bslz4 (HDF5-framed)"
    else:
        block = bshuf_default_block_size(itemsize)
        pos = 0
        name = "bslz4"
    if block % _BSHUF_MULT:
        raise FrameError(f"{name}: block of {block} values is not a multiple of {_BSHUF_MULT}")
    full, rest = divmod(n, block)
    sizes = [block] * full
    last = rest - rest % _BSHUF_MULT
    if last:
        sizes.append(last)
    leftover = (n % _BSHUF_MULT) * itemsize
    if pos + 4 * len(sizes) + leftover > len(payload):
        raise FrameError(f"{name}: {len(sizes)} blocks cannot fit in {len(payload)} bytes")
    raw = np.empty(expected, np.uint8)
    done = 0
    for i, m in enumerate(sizes):
        if pos + 4 > len(payload):
            raise FrameError(f"{name}: truncated at block {i} of {len(sizes)}")
        csize = _be_i32(payload, pos)
        pos += 4
        if csize <= 0 or pos + csize > len(payload):
            raise FrameError(f"{name}: block {i} claims {csize} bytes, {len(payload) - pos} left")
        nb = m * itemsize
        raw[done : done + nb] = np.frombuffer(_lz4_exact(payload[pos : pos + csize], nb, f"{name} block {i}"), np.uint8)
        pos += csize
        done += nb
    if pos + leftover != len(payload):
        raise FrameError(f"{name}: {len(payload) - pos} bytes left for {leftover} raw trailing bytes")
    if leftover:
        raw[done:] = np.frombuffer(payload[pos:], np.uint8)
    return _bitunshuffle(raw, itemsize, block)


def _decode_blosc(payload: memoryview, expected: int, itemsize: int) -> bytes:
    if len(payload) < _BLOSC_HEADER:
        raise FrameError(f"blosc: {len(payload)} bytes is shorter than the 16-byte header")
    version, _versionlz, flags, _typesize, nbytes, blocksize, cbytes = struct.unpack_from("<BBBBIII", payload, 0)
    if version == 0 or version > 2:
        raise FrameError(f"blosc: header format version {version} is not c-blosc 1 (1 or 2)")
    if nbytes != expected:
        raise FrameError(f"blosc: header says {nbytes} bytes, the frame's dimensions need {expected}")
    if cbytes != len(payload):
        raise FrameError(f"blosc: header says {cbytes} compressed bytes, the frame has {len(payload)}")
    if flags & _BLOSC_MEMCPYED:
        if cbytes != nbytes + _BLOSC_HEADER:
            raise FrameError(f"blosc: stored-raw frame of {cbytes} bytes for {nbytes} bytes of data")
    else:
        if blocksize == 0 or blocksize > nbytes:
            raise FrameError(f"blosc: block size {blocksize} for {nbytes} bytes")
        n_blocks = -(-nbytes // blocksize)
        if _BLOSC_HEADER + 4 * n_blocks > cbytes:
            raise FrameError(f"blosc: {n_blocks} block offsets do not fit in {cbytes} bytes")
        starts = np.frombuffer(payload, "<u4", count=n_blocks, offset=_BLOSC_HEADER)
        if starts.size and (int(starts.min()) < _BLOSC_HEADER + 4 * n_blocks or int(starts.max()) >= cbytes):
            raise FrameError("blosc: a block offset points outside the frame")
    blosc = importlib.import_module("blosc")
    try:
        out = blosc.decompress(bytes(payload))
    except Exception as exc:  # blosc raises RuntimeError / ValueError
        raise FrameError(f"blosc: corrupt data ({exc})") from None
    if len(out) != expected:
        raise FrameError(f"blosc: decodes to {len(out)} bytes, expected {expected}")
    return out


def _decode_zlib(payload: memoryview, expected: int, itemsize: int) -> bytes:
    d = zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip header
    try:
        out = d.decompress(payload, expected)  # never more than the frame needs
    except zlib.error as exc:
        raise FrameError(f"zlib: corrupt data ({exc})") from None
    if len(out) != expected:
        raise FrameError(f"zlib: decodes to {len(out)}{'+' if not d.eof else ''} bytes, expected {expected}")
    if not d.eof:
        try:
            more = d.decompress(d.unconsumed_tail, 1)
        except zlib.error as exc:
            raise FrameError(f"zlib: corrupt data ({exc})") from None
        if more or not d.eof:
            raise FrameError(f"zlib: stream holds more than the {expected} bytes the dimensions need")
    if d.unused_data:
        raise FrameError(f"zlib: {len(d.unused_data)} trailing bytes after the stream")
    return out


_DECODERS: dict[str, Callable[[memoryview, int, int], Any]] = {
    "lz4": _decode_lz4,
    "lz4hdf5": _decode_lz4hdf5,
    "bslz4": _decode_bslz4,
    "blosc": _decode_blosc,
    "zlib": _decode_zlib,
}


def decompress(
    codec: str,
    payload: Any,
    dtype: np.dtype,
    n_values: int,
    *,
    uncompressed_size: int,
    compressed_size: int | None = None,
) -> np.ndarray:
    """Decode one compressed payload into ``n_values`` values of ``dtype`` (a new array).

    Every size is checked before any decompressor runs: ``uncompressed_size`` must equal
    ``n_values * itemsize`` (the frame's dimensions), which must be positive and at most
    ``MAX_DECODED_BYTES``; ``compressed_size`` (when given) must equal the payload's length.

    Raises:
        FrameError: unknown/unsupported codec, missing package, any size mismatch, corrupt data.
    """
    check_codec(codec)
    dtype = np.dtype(dtype)
    n_values = int(n_values)
    expected = n_values * dtype.itemsize
    if n_values <= 0:
        raise FrameError(f"compressed frame ({codec}) with {n_values} values")
    if expected > MAX_DECODED_BYTES:
        raise FrameError(f"compressed frame ({codec}) of {expected} bytes is larger than {MAX_DECODED_BYTES}")
    if int(uncompressed_size) != expected:
        raise FrameError(
            f"compressed frame ({codec}): uncompressedSize {int(uncompressed_size)} != {expected} bytes "
            f"({n_values} x {dtype.name} from the dimensions)"
        )
    buf = np.ascontiguousarray(payload)
    if buf.dtype.kind not in "biu":
        raise FrameError(f"compressed frame ({codec}) payload of type {buf.dtype}; need bytes (ubyteValue)")
    view = memoryview(buf.reshape(-1).view(np.uint8))
    if compressed_size is not None and int(compressed_size) != len(view):
        raise FrameError(f"compressed frame ({codec}): compressedSize {int(compressed_size)} != {len(view)} bytes sent")
    if len(view) == 0:
        raise FrameError(f"compressed frame ({codec}) without payload")
    out = _DECODERS[codec](view, expected, dtype.itemsize)
    arr = np.frombuffer(out, np.uint8) if not isinstance(out, np.ndarray) else out.reshape(-1).view(np.uint8)
    if arr.size != expected:  # every decoder checks this; kept as the last line of defence
        raise FrameError(f"{codec}: decoded {arr.size} bytes, expected {expected}")
    return arr.view(dtype).copy() if not arr.flags.writeable else arr.view(dtype)


# ---------------------------------------------------------------------------------------------
# encoders (replay server, tests): what ADCore's NDPluginCodec emits


def _bitshuffle_numpy(raw: np.ndarray, itemsize: int, block: int) -> np.ndarray:
    out = raw.copy()
    n = raw.size // itemsize
    bits = itemsize * 8
    start = 0
    while n - start >= _BSHUF_MULT:
        m = min(block, (n - start) // _BSHUF_MULT * _BSHUF_MULT)
        seg = raw[start * itemsize : (start + m) * itemsize].reshape(m, itemsize)
        elem_bits = np.unpackbits(seg[:, :, None], axis=2, bitorder="little")  # (m, byte, bit)
        planes = elem_bits.transpose(1, 2, 0).reshape(bits, m)
        out[start * itemsize : (start + m) * itemsize] = np.packbits(planes, axis=1, bitorder="little").reshape(-1)
        start += m
    return out


def _encode_bslz4_stream(pixels: np.ndarray, block: int) -> bytes:
    itemsize = pixels.dtype.itemsize
    raw = np.ascontiguousarray(pixels).reshape(-1).view(np.uint8)
    n = raw.size // itemsize
    shuffled = _bitshuffle_numpy(raw, itemsize, block)
    lz4b = _lz4_block()
    parts = []
    start = 0
    while n - start >= _BSHUF_MULT:
        m = min(block, (n - start) // _BSHUF_MULT * _BSHUF_MULT)
        c = lz4b.compress(shuffled[start * itemsize : (start + m) * itemsize].tobytes(), store_size=False)
        parts.append(struct.pack(">I", len(c)) + c)
        start += m
    parts.append(raw[start * itemsize :].tobytes())
    return b"".join(parts)


def compress(codec: str, pixels: np.ndarray, *, hdf5_framed: bool = False, block_bytes: int = 0) -> bytes:
    """Compress ``pixels`` (any shape, C order) the way ADCore's NDPluginCodec does.

    ``hdf5_framed`` (lz4, bslz4): emit the HDF5 chunk instead, as Eiger files hold it and
    ``pvapy-ad-sim-server -hcm`` sends it. ``block_bytes`` (lz4hdf5 / framed): block size in
    bytes, 0 = one block (the HDF5 LZ4 filter's default) or bitshuffle's default.
    """
    pixels = np.ascontiguousarray(pixels)
    data = pixels.tobytes()
    itemsize = pixels.dtype.itemsize
    if codec == "zlib":
        return zlib.compress(data, 6)
    if codec == "blosc":
        blosc = importlib.import_module("blosc")
        return blosc.compress(data, typesize=itemsize, clevel=5, shuffle=blosc.SHUFFLE, cname="blosclz")
    if codec == "lz4" and not hdf5_framed:
        return _lz4_block().compress(data, store_size=False)
    if codec in ("lz4hdf5", "lz4"):
        block = block_bytes if block_bytes > 0 else max(len(data), 1)
        lz4b = _lz4_block()
        parts = [struct.pack(">QI", len(data), block)]
        for off in range(0, len(data), block):
            chunk = data[off : off + block]
            c = lz4b.compress(chunk, store_size=False)
            if len(c) >= len(chunk):
                c = chunk  # stored raw, as the HDF5 LZ4 filter does
            parts.append(struct.pack(">I", len(c)) + c)
        return b"".join(parts)
    if codec == "bslz4":
        block = block_bytes // itemsize if block_bytes > 0 else bshuf_default_block_size(itemsize)
        try:  # the C library ADCore calls (bshuf_compress_lz4); LZ4 output differs by LZ4 version
            bitshuffle = importlib.import_module("bitshuffle")
            stream = np.asarray(bitshuffle.compress_lz4(pixels.reshape(-1), block)).tobytes()
        except ImportError:
            stream = _encode_bslz4_stream(pixels, block)
        if hdf5_framed:
            return struct.pack(">QI", len(data), block * itemsize) + stream
        return stream
    raise FrameError(f"cannot encode codec {codec!r}; lossless codecs: {', '.join(LOSSLESS_CODECS)}")
