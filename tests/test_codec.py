"""NtNdArray codec: input decoding (2-D slab, 3-D, every dtype, bad frames) and the output
structure (DESIGN 2.1, 2.3). No processes, no network."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pva = pytest.importorskip("pvaccess")
pytest.importorskip("pvapy.utility.adImageUtility")

from peaknet_pva.errors import FrameError  # noqa: E402
from peaknet_pva.frames import SUPPORTED_DTYPES, PanelLayout, PeakTable  # noqa: E402
from peaknet_pva.pva import codec, compression  # noqa: E402
from peaknet_pva.pva.replay import BAD_KINDS, bad_frame  # noqa: E402

TS = 1_700_000_000_123_456_789


def _frame(dtype: np.dtype, shape=(2, 6, 5)) -> np.ndarray:
    return ((np.arange(int(np.prod(shape))) * 7) % 101).astype(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("three_d", [False, True], ids=["slab", "3d"])
def test_round_trip_every_dtype(dtype: np.dtype, three_d: bool) -> None:
    px = _frame(dtype)
    nt = codec.encode_ntndarray(
        px, unique_id=42, timestamp_ns=TS, data_timestamp_ns=TS + 5,
        attributes={"PhotonEnergy": 9500.5, "Label": "x"}, three_d=three_d,
    )
    dims = [d["size"] for d in nt["dimension"]]
    assert dims == ([5, 6, 2] if three_d else [5, 12])  # fastest axis first
    f = codec.decode_ntndarray(nt, PanelLayout((6, 5)))
    assert f.pixels.dtype == dtype and f.pixels.shape == (2, 6, 5)
    np.testing.assert_array_equal(f.pixels, px)
    assert f.pixels.flags.c_contiguous
    assert f.unique_id == 42 and f.timestamp_ns == TS and f.data_timestamp_ns == TS + 5
    assert f.photon_energy_ev == 9500.5
    assert f.attributes["Label"] == "x"
    assert f.panel_shape == (6, 5) and f.n_panels == 2


def test_slab_without_panel_shape_is_one_panel() -> None:
    px = _frame(np.dtype("uint16"), (12, 5))
    f = codec.decode_ntndarray(codec.encode_ntndarray(px, unique_id=1), PanelLayout(None))
    assert f.pixels.shape == (1, 12, 5)
    np.testing.assert_array_equal(f.pixels[0], px)


def test_3d_frame_without_panel_shape_keeps_its_panels() -> None:
    px = _frame(np.dtype("float32"))
    f = codec.decode_ntndarray(codec.encode_ntndarray(px, unique_id=1, three_d=True))
    assert f.pixels.shape == (2, 6, 5)


def test_pixels_are_a_copy() -> None:
    px = _frame(np.dtype("float32"))
    nt = codec.encode_ntndarray(px, unique_id=1)
    f = codec.decode_ntndarray(nt, PanelLayout((6, 5)))
    nt["value"] = {"floatValue": np.full(px.size, -1.0, np.float32)}  # pvapy reuses the object
    np.testing.assert_array_equal(f.pixels, px)


def test_photon_energy_attribute_name_is_configurable() -> None:
    nt = codec.encode_ntndarray(_frame(np.dtype("float32")), unique_id=1, attributes={"Energy_eV": 7000})
    f = codec.decode_ntndarray(nt, PanelLayout((6, 5)), photon_energy_attribute="Energy_eV")
    assert f.photon_energy_ev == 7000.0
    assert codec.decode_ntndarray(nt, PanelLayout((6, 5))).photon_energy_ev is None


def _bad(kind: str) -> object:
    like = _frame(np.dtype("float32"))
    nt = codec.encode_ntndarray(bad_frame(kind, like), unique_id=9)
    if kind == "empty":
        nt["dimension"] = []
    return nt


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_frames_raise_frame_error(kind: str) -> None:
    with pytest.raises(FrameError, match="frame 9"):
        codec.decode_ntndarray(_bad(kind), PanelLayout((6, 5)))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: codec.encode_ntndarray(np.zeros((0, 5), np.float32), unique_id=3), id="zero-rows"),
        pytest.param(lambda: codec.encode_ntndarray(np.zeros((12, 4), np.float32), unique_id=3), id="wrong-cols"),
        pytest.param(lambda: codec.encode_ntndarray(np.zeros((12, 5), np.uint64), unique_id=3), id="uint64"),
        pytest.param(lambda: codec.encode_ntndarray(np.zeros((12, 5), bool), unique_id=3), id="bool"),
        pytest.param(lambda: codec.encode_ntndarray(np.zeros((2, 2, 6, 5), np.float32), unique_id=3), id="4-d"),
    ],
)
def test_more_bad_frames(make) -> None:
    with pytest.raises(FrameError):
        codec.decode_ntndarray(make(), PanelLayout((6, 5)))


def test_size_not_matching_dimensions() -> None:
    nt = codec.encode_ntndarray(np.zeros((12, 5), np.float32), unique_id=3)
    nt["dimension"] = [pva.PvDimension(5, 0, 5, 1, False), pva.PvDimension(13, 0, 13, 1, False)]
    with pytest.raises(FrameError, match="do not fill"):
        codec.decode_ntndarray(nt, PanelLayout(None))


def test_no_value_selected() -> None:
    nt = pva.NtNdArray()
    nt["uniqueId"] = 4
    nt["dimension"] = [pva.PvDimension(5, 0, 5, 1, False), pva.PvDimension(6, 0, 6, 1, False)]
    with pytest.raises(FrameError, match="no value"):
        codec.decode_ntndarray(nt)


def test_colour_3d_frame_rejected() -> None:
    nt = codec.encode_ntndarray(_frame(np.dtype("uint8"), (3, 6, 5)), unique_id=5, attributes={"ColorMode": 2}, three_d=True)
    with pytest.raises(FrameError, match="ColorMode"):
        codec.decode_ntndarray(nt)


def test_unknown_codec() -> None:
    nt = codec.encode_ntndarray(np.zeros((6, 5), np.uint8), unique_id=6)
    nt["codec"] = pva.PvCodec("zstd-magic", pva.PvInt(int(pva.FLOAT)))
    with pytest.raises(FrameError, match="unknown compression codec 'zstd-magic'"):
        codec.decode_ntndarray(nt)


# -- compressed frames (ADCore NDPluginCodec, HDF5-framed chunks) ------------------------------

COMPRESSED_DTYPES = [np.dtype(d) for d in ("uint8", "int8", "int16", "uint16", "int32", "uint32", "float32", "float64")]


def _codec_installed(name: str) -> bool:
    return not compression.missing_modules(name)


def _compressed_nt(px: np.ndarray, name: str, *, uid: int = 8, hdf5_framed: bool = False) -> object:
    nt = codec.encode_ntndarray(px, unique_id=uid)
    return codec.compress_ntndarray(nt, px, name, hdf5_framed=hdf5_framed)


def test_compressed_frame_without_its_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Base install (no ``codecs`` extra): a compressed frame is a FrameError naming the extra."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m.startswith(("lz4", "blosc", "bitshuffle")) else real(m, *a))
    nt = codec.encode_ntndarray(np.zeros((6, 5), np.uint8), unique_id=7)
    for name in ("lz4", "bslz4", "blosc", "lz4hdf5"):
        nt["codec"] = pva.PvCodec(name, pva.PvInt(int(pva.FLOAT)))
        with pytest.raises(FrameError, match=r"frame 7: .*not installed \(pip install \"peaknet-pva\[codecs\]\"\)"):
            codec.decode_ntndarray(nt)


def test_jpeg_is_refused_by_name() -> None:
    nt = codec.encode_ntndarray(np.zeros((6, 5), np.uint8), unique_id=7)
    nt["codec"] = pva.PvCodec("jpeg", pva.PvInt(int(pva.UBYTE)))
    with pytest.raises(FrameError, match="codec 'jpeg' is not supported: it is lossy"):
        codec.decode_ntndarray(nt)


@pytest.mark.parametrize("name", compression.LOSSLESS_CODECS)
@pytest.mark.parametrize("dtype", COMPRESSED_DTYPES, ids=lambda d: d.name)
def test_compressed_round_trip_bit_exact(name: str, dtype: np.dtype) -> None:
    if not _codec_installed(name):
        pytest.skip(f"{name}: {compression.missing_modules(name)} not installed")
    rng = np.random.default_rng(3)
    px = (rng.poisson(4.0, size=(2, 37, 21)) * (rng.random((2, 37, 21)) < 0.4)).astype(dtype)  # n % 8 != 0
    if dtype.kind == "f":
        px += rng.normal(size=px.shape).astype(dtype)
    nt = _compressed_nt(px, name)
    # exactly as ADCore's NTNDArrayConverter sets the fields
    assert nt.getSelectedUnionFieldName() == "ubyteValue"
    assert nt["codec"]["name"] == name
    assert codec._attribute_value(nt["codec.parameters"]) == int(codec._SCALAR_BY_DTYPE[dtype])
    assert nt["uncompressedSize"] == px.nbytes
    assert nt["compressedSize"] == len(nt["value"][0]["ubyteValue"])
    f = codec.decode_ntndarray(nt, PanelLayout((37, 21)))
    assert f.pixels.dtype == dtype
    np.testing.assert_array_equal(f.pixels, px)


@pytest.mark.parametrize("name", ["lz4", "bslz4"])
def test_hdf5_framed_chunks_recognised_per_frame(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """HDF5 chunks (Eiger files, ``pvapy-ad-sim-server -hcm``) under the plain names decode
    per frame, mixed with raw frames in one stream, and PVAPY_COMPRESSED_PAYLOAD_START is ignored."""
    if not _codec_installed(name):
        pytest.skip("codec packages not installed")
    monkeypatch.setenv("PVAPY_COMPRESSED_PAYLOAD_START", "16")
    px = _frame(np.dtype("uint16"), (2, 40, 33))
    for framed in (True, False, True):
        nt = _compressed_nt(px, name, hdf5_framed=framed)
        payload = bytes(nt["value"][0]["ubyteValue"])
        assert (payload[:8] == px.nbytes.to_bytes(8, "big")) is framed
        np.testing.assert_array_equal(codec.decode_ntndarray(nt, PanelLayout((40, 33))).pixels, px)


def test_hdf5_chunks_written_by_the_hdf5_filters_decode() -> None:
    """Chunks as the real HDF5 filters write them (hdf5plugin: bitshuffle 32008, LZ4 32004),
    read with read_direct_chunk exactly as pvapy-ad-sim-server -hcm does."""
    hdf5plugin = pytest.importorskip("hdf5plugin")
    import h5py

    if not _codec_installed("bslz4"):
        pytest.skip("codec packages not installed")
    import io

    px = ((np.arange(3 * 50 * 70) * 13) % 977).astype(np.int32).reshape(3, 50, 70)
    bio = io.BytesIO()
    with h5py.File(bio, "w") as f:
        f.create_dataset("bs", data=px[None], chunks=(1, 3, 50, 70), **hdf5plugin.Bitshuffle(cname="lz4"))
        f.create_dataset("lz", data=px[None], chunks=(1, 3, 50, 70), **hdf5plugin.LZ4(nbytes=4096))
        chunks = {k: f[k].id.read_direct_chunk((0, 0, 0, 0))[1] for k in ("bs", "lz")}
    for key, names in (("bs", ["bslz4"]), ("lz", ["lz4", "lz4hdf5"])):
        for name in names:
            nt = codec.encode_ntndarray(px, unique_id=5)
            payload = np.frombuffer(chunks[key], np.uint8)
            nt["value"] = {"ubyteValue": payload}
            nt["codec"] = pva.PvCodec(name, pva.PvInt(int(pva.INT)))
            nt["compressedSize"] = payload.size
            nt["uncompressedSize"] = px.nbytes
            np.testing.assert_array_equal(codec.decode_ntndarray(nt, PanelLayout((50, 70))).pixels, px)


def test_bslz4_matches_the_bitshuffle_library() -> None:
    """Our bslz4 stream decodes what bshuf_compress_lz4 (ADCore's call) writes, and the numpy
    bit transpose equals the C one, for every element size and a tail of n % 8 elements."""
    bitshuffle = pytest.importorskip("bitshuffle")
    pytest.importorskip("lz4.block")
    for dtype in ("uint8", "int16", "float32", "float64"):
        x = ((np.arange(5003) * 2654435761) % 65521).astype(dtype)
        ref = np.asarray(bitshuffle.compress_lz4(x, 0))
        out = compression.decompress("bslz4", ref, x.dtype, x.size, uncompressed_size=x.nbytes, compressed_size=ref.size)
        np.testing.assert_array_equal(out, x)
        block = compression.bshuf_default_block_size(x.itemsize)
        shuffled = np.asarray(bitshuffle.bitshuffle(x, block)).view(np.uint8)
        np.testing.assert_array_equal(compression._bitshuffle_numpy(x.view(np.uint8), x.itemsize, block), shuffled)
        np.testing.assert_array_equal(
            compression._bitunshuffle_numpy(shuffled.copy(), x.itemsize, block, x.size), x.view(np.uint8)
        )
        own = compression._encode_bslz4_stream(x, block)  # the encoder used without the library
        np.testing.assert_array_equal(
            compression.decompress("bslz4", np.frombuffer(own, np.uint8), x.dtype, x.size, uncompressed_size=x.nbytes), x
        )


def _lying(nt: object, **fields: object) -> object:
    for k, v in fields.items():
        nt[k] = v
    return nt


@pytest.mark.parametrize("name", compression.LOSSLESS_CODECS)
def test_compressed_sizes_checked_before_decoding(name: str) -> None:
    """uncompressedSize / compressedSize / dimensions that disagree are FrameErrors, never a
    decoder call with a lying size (the segfaults of issue 10)."""
    if not _codec_installed(name):
        pytest.skip("codec packages not installed")
    px = _frame(np.dtype("uint16"), (2, 6, 5))
    good = lambda: _compressed_nt(px, name, uid=9)  # noqa: E731
    cases = {
        "uncompressedSize": (_lying(good(), uncompressedSize=2**31 - 1), "uncompressedSize"),
        "uncompressedSize+2": (_lying(good(), uncompressedSize=px.nbytes + 2), "uncompressedSize"),
        "uncompressedSize<0": (_lying(good(), uncompressedSize=-1), "uncompressedSize"),
        "compressedSize": (_lying(good(), compressedSize=10**9), "compressedSize"),
        "dims": (_lying(good(), dimension=[pva.PvDimension(5, 0, 5, 1, False), pva.PvDimension(13, 0, 13, 1, False)]),
                 "uncompressedSize"),
        "huge dims": (_lying(good(), dimension=[pva.PvDimension(2**30, 0, 2**30, 1, False)] * 2, uncompressedSize=2**61),
                      "larger than"),
    }
    for what, (nt, match) in cases.items():
        with pytest.raises(FrameError, match=f"frame 9: .*{match}"):
            codec.decode_ntndarray(nt, PanelLayout(None))
    nt = good()
    nt["codec"] = pva.PvCodec(name, pva.PvInt(int(pva.STRING)))
    with pytest.raises(FrameError, match="codec.parameters 11 is not a numeric"):
        codec.decode_ntndarray(nt)


def test_blosc_header_lies_are_caught() -> None:
    if not _codec_installed("blosc"):
        pytest.skip("blosc not installed")
    import struct

    px = _frame(np.dtype("float32"), (2, 16, 16))
    payload = bytearray(compression.compress("blosc", px))
    for offset, value, match in ((4, px.nbytes * 4, "header says"), (12, len(payload) + 100, "compressed bytes"),
                                 (8, 0, "block size"), (16, 2**31, "block offset")):
        bad = bytearray(payload)
        struct.pack_into("<I", bad, offset, value)
        with pytest.raises(FrameError, match=match):
            compression.decompress("blosc", np.frombuffer(bytes(bad), np.uint8), px.dtype, px.size,
                                   uncompressed_size=px.nbytes, compressed_size=len(bad))


def test_zlib_stream_longer_than_the_frame_is_refused() -> None:
    import zlib

    px = _frame(np.dtype("uint8"), (6, 5))
    for payload, match in ((zlib.compress(px.tobytes() + b"x"), "more than"), (zlib.compress(px.tobytes()) + b"zz", "trailing"),
                           (zlib.compress(px.tobytes())[:-6], "decodes to")):
        with pytest.raises(FrameError, match=match):
            compression.decompress("zlib", np.frombuffer(payload, np.uint8), px.dtype, px.size, uncompressed_size=px.nbytes)


# -- output structure ---------------------------------------------------------------------------


def _peaks() -> PeakTable:
    return PeakTable(panel=[0, 1, 1], y=[1.5, 2.0, 5.25], x=[3.0, 4.25, 0.0], intensity=[10, 20, 30], npix=[3, 4, 5])


def test_output_structure_identical_for_hit_and_non_hit() -> None:
    f = codec.decode_ntndarray(codec.encode_ntndarray(_frame(np.dtype("float32")), unique_id=11), PanelLayout((6, 5)))
    g = codec.decode_ntndarray(codec.encode_ntndarray(_frame(np.dtype("uint16")), unique_id=12), PanelLayout((6, 5)))
    hit = codec.build_output(f, _peaks(), include_image=True, photon_energy_ev=9000.0)
    miss = codec.build_output(f, PeakTable.empty(), include_image=False)
    other = codec.build_output(g, _peaks(), include_image=True)
    empty = codec.output_type()
    for obj in (miss, other, empty):
        assert codec.same_structure(hit, obj)
    assert hit.getStructureDict() == miss.getStructureDict()
    # The extra fields of DESIGN 2.3, with their types.
    types = hit.getStructureDict()
    assert types["nPeaks"] == pva.UINT and types["photonEnergy"] == pva.DOUBLE
    assert types["panelShape"] == [pva.UINT]
    assert types["peaks"] == {
        "panel": [pva.USHORT], "y": [pva.FLOAT], "x": [pva.FLOAT], "intensity": [pva.FLOAT], "npix": [pva.UINT],
    }


@pytest.mark.parametrize("three_d", [False, True])
def test_output_round_trip(three_d: bool) -> None:
    px = _frame(np.dtype("int16"))
    nt = codec.encode_ntndarray(px, unique_id=77, timestamp_ns=TS, data_timestamp_ns=TS + 1,
                                attributes={"PhotonEnergy": 8000.0}, three_d=three_d)
    f = codec.decode_ntndarray(nt, PanelLayout((6, 5)))
    out = codec.build_output(f, _peaks(), include_image=True)
    assert [d["size"] for d in out["dimension"]] == [5, 12]  # always the 2-D slab
    peaks, meta = codec.decode_output(out)
    np.testing.assert_array_equal(peaks.panel, _peaks().panel)
    np.testing.assert_array_equal(peaks.y, _peaks().y)
    np.testing.assert_array_equal(peaks.x, _peaks().x)
    np.testing.assert_array_equal(peaks.intensity, _peaks().intensity)
    np.testing.assert_array_equal(peaks.npix, _peaks().npix)
    assert meta.unique_id == 77 and meta.timestamp_ns == TS and meta.data_timestamp_ns == TS + 1
    assert meta.photon_energy_ev == 8000.0 and meta.n_peaks == 3 and meta.panel_shape == (6, 5)
    assert meta.image is not None and meta.image.dtype == np.int16
    np.testing.assert_array_equal(meta.image, px)

    _, meta2 = codec.decode_output(codec.build_output(f, _peaks(), include_image=False, photon_energy_ev=6000.0))
    assert meta2.image is None and meta2.photon_energy_ev == 6000.0 and meta2.n_peaks == 3


def test_output_without_energy_is_nan() -> None:
    f = codec.decode_ntndarray(codec.encode_ntndarray(_frame(np.dtype("float32")), unique_id=1), PanelLayout((6, 5)))
    _, meta = codec.decode_output(codec.build_output(f, PeakTable.empty(), include_image=False))
    assert np.isnan(meta.photon_energy_ev)


def test_decode_output_rejects_plain_ntndarray() -> None:
    with pytest.raises(FrameError, match="not a peaknet output"):
        codec.decode_output(codec.encode_ntndarray(np.zeros((6, 5), np.float32), unique_id=1))
