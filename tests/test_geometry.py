"""CrystFEL geometry: stacked layout, .geom write/read, slab coordinates and edge clamping."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from peaknet_pva.errors import ConfigError, FrameError
from peaknet_pva.geometry import (
    DEFAULT_RES,
    DetectorGeometry,
    PanelGeometry,
    panel_to_slab,
    parse_geometry,
    read_geometry,
    slab_bounds,
    write_geometry,
)


def crystfel_panel(geom: DetectorGeometry, ss: np.ndarray, fs: np.ndarray) -> np.ndarray:
    """What indexamajig --peaks=cxi does with a stored float32 peak: add 0.5 (in double, stored
    as float), then take the panel with min <= v < max + 1. -1 where no panel matches."""
    ss = (np.asarray(ss, np.float32).astype(np.float64) + 0.5).astype(np.float32)
    fs = (np.asarray(fs, np.float32).astype(np.float64) + 0.5).astype(np.float32)
    out = np.full(ss.shape, -1, np.int64)
    for i, p in enumerate(geom.panels):
        hit = (ss >= p.min_ss) & (ss < p.max_ss + 1) & (fs >= p.min_fs) & (fs < p.max_fs + 1)
        assert not np.any(hit & (out >= 0)), "ambiguous panel"
        out[hit] = i
    return out


# -- stacked layout -----------------------------------------------------------------------------


def test_stacked_layout_slab_and_lab() -> None:
    g = DetectorGeometry.stacked(4, (352, 384), gap_px=10.0)
    assert g.n_panels == 4
    assert [p.name for p in g.panels] == ["p0", "p1", "p2", "p3"]
    assert g.slab_shape == (4 * 352, 384)
    assert g.panel_shape == (352, 384)
    assert g.is_stacked_slab((352, 384))
    for i, p in enumerate(g.panels):
        assert (p.min_ss, p.max_ss, p.min_fs, p.max_fs) == (i * 352, i * 352 + 351, 0, 383)
        assert p.fs == (1.0, 0.0, 0.0) and p.ss == (0.0, 1.0, 0.0)
        assert p.corner_x == -192.0
    # stacked along +y with a 10 px gap, beam (0, 0) in the middle of the stack
    ys = [p.corner_y for p in g.panels]
    assert np.allclose(np.diff(ys), 352 + 10)
    top = g.panels[-1].corner_y + 352
    assert ys[0] == -top
    assert g.clen == 0.1 and g.clen_m == 0.1 and g.res == DEFAULT_RES
    assert g.photon_energy == "/LCLS/photon_energy_eV"
    assert g.dims == ("%", "ss", "fs")
    assert g.data == "/entry_1/data_1/data"
    assert g.peak_list == "/entry_1/result_1" and g.peak_list_type == "cxi"


def test_stacked_options_and_errors() -> None:
    g = DetectorGeometry.stacked(1, (64, 32), clen_m=0.25, res=1 / 110e-6, photon_energy_ev=9500.0, gap_px=0)
    assert g.clen == 0.25 and g.photon_energy == 9500.0 and g.res == pytest.approx(9090.909, rel=1e-6)
    assert g.panels[0].corner_x == -16.0 and g.panels[0].corner_y == -32.0
    with pytest.raises(ConfigError):
        DetectorGeometry.stacked(0, (8, 8))
    with pytest.raises(ConfigError):
        DetectorGeometry.stacked(2, (0, 8))
    with pytest.raises(ConfigError):
        DetectorGeometry.stacked(2, (8, 8), clen_m=-1)
    with pytest.raises(ConfigError):
        DetectorGeometry.stacked(2, (8, 8), photon_energy_ev=float("nan"))


def test_panel_and_geometry_validation() -> None:
    with pytest.raises(ConfigError, match="reserves"):
        PanelGeometry("bad0", 0, 7, 0, 7, 0, 0)
    with pytest.raises(ConfigError, match="ranges"):
        PanelGeometry("p0", 8, 7, 0, 7, 0, 0)
    with pytest.raises(ConfigError, match="vector"):
        PanelGeometry("p0", 0, 7, 0, 7, 0, 0, fs=(0, 0, 0))
    p = PanelGeometry("p0", 0, 7, 0, 7, 0, 0)
    with pytest.raises(ConfigError, match="duplicate"):
        DetectorGeometry(panels=(p, p))
    with pytest.raises(ConfigError):
        DetectorGeometry(panels=())
    hash(DetectorGeometry.stacked(2, (8, 8)))  # usable as a cache key


# -- .geom writing / reading ----------------------------------------------------------------------


def test_written_geom_has_crystfel_keys(tmp_path: Path) -> None:
    g = DetectorGeometry.stacked(2, (8, 16))
    path = write_geometry(tmp_path / "det.geom", g)
    text = path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["det.geom"]
    lines = {ln.split("=")[0].strip(): ln.split("=", 1)[1].strip()
             for ln in text.splitlines() if "=" in ln and not ln.lstrip().startswith(";")}
    assert lines["dim0"] == "%"
    assert lines["dim1"] == "ss"
    assert lines["dim2"] == "fs"
    assert lines["data"] == "/entry_1/data_1/data"
    assert lines["peak_list"] == "/entry_1/result_1"
    assert lines["peak_list_type"] == "cxi"
    assert lines["photon_energy"] == "/LCLS/photon_energy_eV"
    assert float(lines["clen"]) == 0.1
    assert float(lines["res"]) == pytest.approx(1 / 75e-6)
    assert float(lines["adu_per_photon"]) == 1.0
    for n, (lo, hi) in enumerate([(0, 7), (8, 15)]):
        assert lines[f"p{n}/min_fs"] == "0" and lines[f"p{n}/max_fs"] == "15"
        assert lines[f"p{n}/min_ss"] == str(lo) and lines[f"p{n}/max_ss"] == str(hi)
        assert lines[f"p{n}/fs"] == "+1.0x"
        assert lines[f"p{n}/ss"] == "+1.0y"
        float(lines[f"p{n}/corner_x"]), float(lines[f"p{n}/corner_y"])
    # global section first, then one block per panel
    assert text.index("dim0") < text.index("p0/min_fs") < text.index("p1/min_fs")
    # every non-comment line is 'key = value'
    for ln in text.splitlines():
        if ln.strip() and not ln.startswith(";"):
            assert re.fullmatch(r"[\w/%]+ = \S.*", ln), ln


@pytest.mark.parametrize("energy", [None, 9500.0])
def test_geometry_round_trip(tmp_path: Path, energy: float | None) -> None:
    g = DetectorGeometry.stacked(3, (352, 384), clen_m=0.123, res=1 / 110e-6, photon_energy_ev=energy, gap_px=7.5)
    write_geometry(tmp_path / "g.geom", g)
    back = read_geometry(tmp_path / "g.geom")
    assert back == g
    # a second trip is byte-identical
    write_geometry(tmp_path / "g2.geom", back)
    assert (tmp_path / "g.geom").read_text() == (tmp_path / "g2.geom").read_text()


REAL_WORLD = """\
; Example CSPAD-style geometry, hand edited
; Camera length from the LCLS data
clen = /LCLS/detector_1/EncoderValue mm
coffset = 0.573224
photon_energy = 9.5 keV
adu_per_eV = 0.00338
res = 9097.52   ; pixels per metre
max_adu = 15000

data = /entry_1/data_1/data
dim0 = %
dim1 = ss
dim2 = fs
mask = /entry_1/data_1/mask
mask_good = 0x0000
mask_bad = 0xffff

q0a0/min_fs = 0
q0a0/min_ss = 0
q0a0/max_fs = 193
q0a0/max_ss = 184
q0a0/fs = +0.004806x -0.999987y
q0a0/ss = +0.999987x+0.004806y
q0a0/corner_x = 443.819
q0a0/corner_y = -49.8719
q0a0/coffset = 0.001
q0a0/no_index = 0

q0a1/min_fs = 194
q0a1/min_ss = 0
q0a1/max_fs = 387
q0a1/max_ss = 184
q0a1/fs = -x
q0a1/ss = 1e0y +0z
q0a1/corner_x = 444.75
q0a1/corner_y = -246.864
q0a1/res = 9000

badjet/min_x = -20.0
badjet/max_x = 20.0
rigid_group_q0 = q0a0,q0a1
rigid_group_collection_quadrants = q0
"""


def test_read_real_world_geometry(tmp_path: Path) -> None:
    path = tmp_path / "cspad.geom"
    path.write_text(REAL_WORLD)
    g = read_geometry(path)
    assert [p.name for p in g.panels] == ["q0a0", "q0a1"]
    assert g.clen == "/LCLS/detector_1/EncoderValue mm" and g.clen_m is None
    assert g.photon_energy == pytest.approx(9500.0)
    assert g.adu_per_ev == pytest.approx(0.00338) and g.adu_per_photon is None
    assert g.res == pytest.approx(9097.52)
    assert g.dims == ("%", "ss", "fs")
    assert g.peak_list is None and g.peak_list_type is None
    a0, a1 = g.panels
    assert (a0.min_fs, a0.max_fs, a0.min_ss, a0.max_ss) == (0, 193, 0, 184)
    assert a0.fs == pytest.approx((0.004806, -0.999987, 0.0))
    assert a0.ss == pytest.approx((0.999987, 0.004806, 0.0))
    assert a0.corner_x == pytest.approx(443.819) and a0.corner_y == pytest.approx(-49.8719)
    assert a0.coffset == pytest.approx(0.001) and a0.extra == {"no_index": "0"}
    assert a1.fs == (-1.0, 0.0, 0.0) and a1.ss == (0.0, 1.0, 0.0) and a1.res == 9000.0
    assert g.panel_shape == (185, 194) and g.slab_shape == (185, 388)
    assert not g.is_stacked_slab((185, 194))
    for key in ("coffset", "max_adu", "mask", "mask_good", "mask_bad", "badjet/min_x",
                "rigid_group_q0", "rigid_group_collection_quadrants"):
        assert key in g.extra
    # unknown lines survive a write/read trip
    write_geometry(tmp_path / "again.geom", g)
    assert read_geometry(tmp_path / "again.geom") == g


def test_read_geometry_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no panels"):
        parse_geometry("clen = 0.1\n")
    with pytest.raises(ConfigError, match="p0 lacks corner_y"):
        parse_geometry("p0/min_fs = 0\np0/max_fs = 1\np0/min_ss = 0\np0/max_ss = 1\np0/corner_x = 0\n")
    with pytest.raises(ConfigError, match="direction vector"):
        parse_geometry("p0/min_fs=0\np0/max_fs=1\np0/min_ss=0\np0/max_ss=1\np0/corner_x=0\n"
                       "p0/corner_y=0\np0/fs = +1.0q\n")
    with pytest.raises(ConfigError, match=r"x\.geom:2"):
        parse_geometry("clen = 0.1\nthis line has no equals sign\n", source="x.geom")
    with pytest.raises(ConfigError, match="integer"):
        parse_geometry("p0/min_fs = 0.5\np0/max_fs=1\np0/min_ss=0\np0/max_ss=1\np0/corner_x=0\np0/corner_y=0\n")
    with pytest.raises(ConfigError, match="cannot read"):
        read_geometry(tmp_path / "missing.geom")


def test_length_and_energy_units() -> None:
    base = "p0/min_fs=0\np0/max_fs=1\np0/min_ss=0\np0/max_ss=1\np0/corner_x=0\np0/corner_y=0\n"
    assert parse_geometry("clen = 120 mm\n" + base).clen == pytest.approx(0.12)
    assert parse_geometry("clen = 0.12 m\n" + base).clen == pytest.approx(0.12)
    assert parse_geometry("photon_energy = 9000 eV\n" + base).photon_energy == 9000.0
    assert parse_geometry("photon_energy = /LCLS/photon_energy_eV\n" + base).photon_energy == "/LCLS/photon_energy_eV"


# -- slab coordinates -----------------------------------------------------------------------------


H, W = 8, 16


@pytest.fixture()
def geom4() -> DetectorGeometry:
    return DetectorGeometry.stacked(4, (H, W))


def test_panel_to_slab_math(geom4: DetectorGeometry) -> None:
    panel = np.array([0, 1, 2, 3, 3], np.uint16)
    y = np.array([0.0, 3.25, 7.0, 0.5, 6.75], np.float32)
    x = np.array([0.0, 15.0, 4.5, 0.25, 9.0], np.float32)
    ss, fs = panel_to_slab(panel, y, x, geom4)
    assert ss.dtype == np.float32 and fs.dtype == np.float32
    np.testing.assert_array_equal(ss, panel * H + y)
    np.testing.assert_array_equal(fs, x)
    back_panel, back_y, back_x = geom4.slab_to_panel(ss, fs)
    np.testing.assert_array_equal(back_panel, panel)
    np.testing.assert_allclose(back_y, y)
    np.testing.assert_allclose(back_x, x)
    assert np.all(crystfel_panel(geom4, ss, fs) == panel)


def test_panel_to_slab_clamps_at_panel_edges(geom4: DetectorGeometry) -> None:
    p = 1
    lo_ss, hi_ss = p * H - 0.5, p * H + H - 0.5  # CrystFEL: [min - 0.5, max + 0.5)
    cases_y = {
        H - 1 + 0.49: p * H + H - 1 + 0.49,  # inside the last pixel's outer half: unchanged
        -0.49: p * H - 0.49,
        -0.5: lo_ss,  # exactly the lower bound: allowed
        -0.7: lo_ss,
        -3.0: lo_ss,
    }
    for y_in, expected in cases_y.items():
        ss, _ = panel_to_slab(np.array([p]), np.array([y_in]), np.array([1.0]), geom4)
        assert ss[0] == np.float32(expected), (y_in, ss[0])
    for y_in in (H - 0.5, H - 0.5 + 1e-6, H, H + 5.0):
        ss, _ = panel_to_slab(np.array([p]), np.array([y_in]), np.array([1.0]), geom4)
        assert lo_ss <= ss[0] < hi_ss
        assert ss[0] == np.nextafter(np.float32(hi_ss), np.float32(-np.inf))
    # fast scan, both edges
    _, fs = panel_to_slab(np.array([p, p, p]), np.zeros(3), np.array([-2.0, W - 0.5, W - 1 + 0.49]), geom4)
    assert fs[0] == np.float32(-0.5)
    assert fs[1] == np.nextafter(np.float32(W - 0.5), np.float32(-np.inf))
    assert fs[2] == np.float32(W - 1 + 0.49)


def test_clamped_peaks_stay_on_their_panel_in_crystfel(geom4: DetectorGeometry) -> None:
    rng = np.random.default_rng(1)
    n = 20000
    panel = rng.integers(0, 4, n)
    y = rng.uniform(-2, H + 2, n)
    x = rng.uniform(-2, W + 2, n)
    # plus the exact edges
    panel = np.concatenate([panel, np.repeat(np.arange(4), 4)])
    y = np.concatenate([y, np.tile([-0.5, H - 0.5, H - 1 + 0.49, -0.5 + 1e-7], 4)])
    x = np.concatenate([x, np.tile([-0.5, W - 0.5, W - 1 + 0.49, 0.0], 4)])
    ss, fs = panel_to_slab(panel, y, x, geom4)
    assert np.all(crystfel_panel(geom4, ss, fs) == panel)
    np.testing.assert_array_equal(geom4.slab_to_panel(ss, fs)[0], panel)


def test_clamp_holds_for_large_slabs_in_float32() -> None:
    # float32 spacing grows with the row index: the bound must hold after rounding to float32.
    g = DetectorGeometry.stacked(32, (512, 1024))
    panel = np.arange(32)
    for y_edge in (511.5, 511.4999, 600.0):
        ss, fs = panel_to_slab(panel, np.full(32, y_edge), np.full(32, 1023.5), g)
        assert np.all(crystfel_panel(g, ss, fs) == panel)
    ss64, _ = panel_to_slab(panel, np.full(32, 600.0), np.zeros(32), g, dtype=np.float64)
    assert ss64.dtype == np.float64 and np.all(ss64 < panel * 512 + 511.5)
    lo, hi, _, _ = slab_bounds(g)
    assert np.all(lo == panel * 512 - 0.5) and np.all(hi < panel * 512 + 511.5)


def test_panel_to_slab_rejects_bad_input(geom4: DetectorGeometry) -> None:
    with pytest.raises(FrameError, match="out of range"):
        panel_to_slab(np.array([4]), np.array([0.0]), np.array([0.0]), geom4)
    with pytest.raises(FrameError, match="out of range"):
        panel_to_slab(np.array([-1]), np.array([0.0]), np.array([0.0]), geom4)
    with pytest.raises(FrameError, match="NaN"):
        panel_to_slab(np.array([0]), np.array([np.nan]), np.array([0.0]), geom4)
    with pytest.raises(FrameError, match="shape"):
        panel_to_slab(np.array([0, 1]), np.array([0.0]), np.array([0.0]), geom4)
    with pytest.raises(FrameError):
        geom4.slab_to_panel(np.array([-3.0]), np.array([0.0]))
    ss, fs = panel_to_slab(np.zeros(0, np.uint16), np.zeros(0), np.zeros(0), geom4)
    assert ss.shape == fs.shape == (0,)


def test_panel_to_slab_general_geometry() -> None:
    # panels side by side along fs in the slab (not our stacked layout): offsets come from the geometry
    panels = (
        PanelGeometry("a", 0, 9, 0, 19, 0.0, 0.0),
        PanelGeometry("b", 0, 9, 20, 39, 30.0, 0.0),
    )
    g = DetectorGeometry(panels=panels)
    ss, fs = panel_to_slab(np.array([0, 1, 1]), np.array([2.0, 3.0, 3.0]), np.array([19.9, 0.0, -0.9]), g)
    np.testing.assert_array_equal(ss, [2.0, 3.0, 3.0])
    assert fs[0] < 19.5 and fs[1] == 20.0 and fs[2] == np.float32(19.5)
    assert np.all(crystfel_panel(g, ss, fs) == [0, 1, 1])
    assert g.panel_index("b") == 1
    with pytest.raises(ConfigError):
        g.panel_index("c")


def test_write_geometry_without_overwrite_keeps_the_existing_file(tmp_path):
    path = tmp_path / "d.geom"
    write_geometry(path, DetectorGeometry.stacked(2, (64, 64)))
    before = path.read_text()
    with pytest.raises(FileExistsError):
        write_geometry(path, DetectorGeometry.stacked(4, (32, 32)), overwrite=False)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.geom"]  # no temporary file left behind
    write_geometry(path, DetectorGeometry.stacked(4, (32, 32)))  # default: replace
    assert read_geometry(path).n_panels == 4
