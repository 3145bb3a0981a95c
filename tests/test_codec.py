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
from peaknet_pva.pva import codec  # noqa: E402
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


@pytest.mark.parametrize("name", sorted(codec.CODEC_PACKAGES))
def test_compressed_frame_needs_its_package(name: str) -> None:
    module, package = codec.CODEC_PACKAGES[name]
    try:
        installed = importlib.util.find_spec(module) is not None
    except ImportError:
        installed = False
    if installed:
        pytest.skip(f"{package} is installed here")
    nt = codec.encode_ntndarray(np.zeros((6, 5), np.uint8), unique_id=7)
    nt["codec"] = pva.PvCodec(name, pva.PvInt(int(pva.FLOAT)))
    nt["uncompressedSize"] = 6 * 5 * 4
    with pytest.raises(FrameError, match=f"package '{package}' is not installed"):
        codec.decode_ntndarray(nt)


def test_lz4_round_trip_when_installed() -> None:
    lz4_block = pytest.importorskip("lz4.block")
    px = _frame(np.dtype("float32"))
    payload = np.frombuffer(lz4_block.compress(px.tobytes(), store_size=False), np.uint8)
    nt = codec.encode_ntndarray(np.zeros((12, 5), np.uint8), unique_id=8)
    nt["value"] = {"ubyteValue": payload}
    nt["codec"] = pva.PvCodec("lz4", pva.PvInt(int(pva.FLOAT)))
    nt["uncompressedSize"] = px.nbytes
    f = codec.decode_ntndarray(nt, PanelLayout((6, 5)))
    np.testing.assert_array_equal(f.pixels, px)


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
