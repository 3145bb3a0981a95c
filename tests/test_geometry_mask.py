"""Geometry and masks as first-class inputs (issue 11, part 1).

Geometry files here are written the way CrystFEL's own examples are (``doc/examples`` in
CrystFEL: ``jf-swissfel-16M.geom``, ``pilatus.geom``, ``Eiger16M-binning2-nativefiles.geom``):
comments, ``min_fs = 0.0`` floats, rotated ``fs``/``ss`` vectors, ``mask_file``/``mask``/
``mask_good``/``mask_bad``, ``bad_*`` regions in fs/ss (with or without ``panel``) and in lab x/y.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from peaknet_pva import geometry as g
from peaknet_pva.cxi import CxiWriter, read_cxi
from peaknet_pva.errors import ConfigError, FrameError
from peaknet_pva.evaluate import match_peaks
from peaknet_pva.finder import PeakFinder
from peaknet_pva.simulate import DETECTORS, get_detector, simulate_dataset

# -- a Jungfrau-style 4M: 8 modules of 512 x 1024, each 2 x 4 ASICs of 256 x 256 (64 panels) ---------


def jungfrau4m_geom(tmp_path, *, with_mask: bool = True) -> tuple[str, np.ndarray]:
    """A CrystFEL-style JF4M file; returns (path, the mask array written to its mask_file)."""
    lines = [
        "; Jungfrau 4M, 8 modules of 2x4 ASICs, written like CrystFEL's jf-swissfel-16M.geom",
        "adu_per_eV = 0.0001",
        "res = 13333.3  ; 75 micron pixels",
        "clen = 120.0 mm",
        "photon_energy = 9500 eV",
        "",
        "dim0 = %",
        "dim1 = ss",
        "dim2 = fs",
        "data = /data/data",
        "",
    ]
    mask = np.ones((4096, 1024), np.uint16)  # mask_good = 1: a pixel needs bit 0 to be good
    mask[1000:1004, 100:104] = 0
    mask[3000, :] = 2  # bit 0 missing -> bad
    if with_mask:
        with h5py.File(tmp_path / "jf4m-mask.h5", "w") as fh:
            fh["/mask"] = mask
        lines += ["mask_file = jf4m-mask.h5", "mask = /mask", "mask_good = 0x1", "mask_bad = 0x0", ""]
    lines += [
        "bad_bs/min_fs = 0", "bad_bs/max_fs = 30", "bad_bs/min_ss = 2048", "bad_bs/max_ss = 2100",
        "bad_bs/panel = m4a0", "",
    ]
    for m in range(8):
        row, col = divmod(m, 2)  # 4 rows x 2 columns of modules in the lab, rotated by 90 degrees
        for a in range(8):
            ar, ac = divmod(a, 4)
            name = f"m{m}a{a}"
            ss0, fs0 = m * 512 + ar * 256, ac * 256
            # module fs runs along -y, ss along -x (as in the SwissFEL example), 2 px ASIC gaps
            cx = 1100.0 - col * 1100 - ar * 258
            cy = 1100.0 - row * 550 - ac * 258 + (40 if row >= 2 else 0)
            lines += [
                f"{name}/min_fs = {fs0}.0", f"{name}/max_fs = {fs0 + 255}.0",
                f"{name}/min_ss = {ss0}.0", f"{name}/max_ss = {ss0 + 255}.0",
                f"{name}/fs = 0.0000710x -0.9999990y", f"{name}/ss = -0.9999990x -0.0000710y",
                f"{name}/corner_x = {cx}", f"{name}/corner_y = {cy}", "",
            ]
    path = tmp_path / "jf4m.geom"
    path.write_text("\n".join(lines))
    return str(path), mask


def pilatus_geom(tmp_path) -> str:
    """One large module 619 x 981 (ss x fs) with gaps, written like CrystFEL's pilatus.geom."""
    text = """\
photon_energy = 9800
adu_per_eV = 0.0001
clen = 0.2
res = 5814.0  ; 172 micron pixel size

0/min_fs = 0
0/max_fs = 980
0/min_ss = 0
0/max_ss = 618
0/corner_x = -480.37
0/corner_y = -300.8
0/fs = x
0/ss = y

bad_beamstop/min_x = -500
bad_beamstop/max_x = 5
bad_beamstop/min_y = -5
bad_beamstop/max_y = 5

bad_v1/min_fs = 487
bad_v1/max_fs = 493
bad_v1/min_ss = 0
bad_v1/max_ss = 618

bad_h1/min_ss = 195
bad_h1/max_ss = 211
bad_h1/min_fs = 0
bad_h1/max_fs = 980

bad_h2/min_ss = 407
bad_h2/max_ss = 423
bad_h2/min_fs = 0
bad_h2/max_fs = 980
"""
    path = tmp_path / "pilatus.geom"
    path.write_text(text)
    return str(path)


def spot(frame: np.ndarray, y: int, x: int, value: float = 800.0) -> None:
    frame[y - 1 : y + 2, x - 1 : x + 2] += value / 4
    frame[y, x] += value


PF8 = {"min_snr": 5.0, "min_pix_count": 1}


# -- presets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_preset_geometry_round_trip_gives_its_radius_map(tmp_path, name):
    det = get_detector(name)
    path = tmp_path / f"{name}.geom"
    g.write_geometry(path, g.from_preset(det))
    geom = g.read_geometry(path)
    assert g.tile_shape_for(geom) == det.panel_shape
    np.testing.assert_allclose(g.radius_map(geom).reshape(det.frame_shape), det.radius_map(), atol=1e-3)
    assert not g.geometry_bad_pixels(geom).any()
    assert geom.clen_m == pytest.approx(det.distance_m) and geom.res == pytest.approx(1 / det.pixel_size_m)


def test_geometry_radius_map_beats_panel_centres_on_16_panels_with_a_ring(tmp_path):
    """The issue's claim: per-panel-centre radii give many false peaks on the water ring."""
    ds = simulate_dataset(2, detector="epix10k2m", seed=3, progress=False)
    path = tmp_path / "epix.geom"
    g.write_geometry(path, g.from_preset(get_detector("epix10k2m")))
    counts = {}
    for name, kw in (("geometry", {"geometry": str(path)}), ("centres", {"panel_shape": (352, 384)})):
        finder = PeakFinder(backend="peakfinder8", device="cpu", batch_size=2, peakfinder8={"min_snr": 5.0},
                            mask=ds.bad_pixel_mask, mask_convention="nonzero_bad", **kw)
        tp = fp = fn = 0
        for table, truth in zip(finder.find(ds.frames), ds.truths):
            a, b, c, _ = match_peaks(table, truth)
            tp, fp, fn = tp + a, fp + b, fn + c
        counts[name] = (fp, 2 * tp / (2 * tp + fp + fn))
    (fp_geom, f1_geom), (fp_centre, f1_centre) = counts["geometry"], counts["centres"]
    assert fp_geom * 10 < fp_centre and f1_geom > 0.97 and f1_geom > f1_centre + 0.05, counts


# -- Jungfrau-style 4M ---------------------------------------------------------------------------


def test_jungfrau4m_geometry_tiles_radius_and_masks(tmp_path):
    path, mask = jungfrau4m_geom(tmp_path)
    geom = g.read_geometry(path)
    assert geom.n_panels == 64 and geom.slab_shape == (4096, 1024) and geom.clen_m == pytest.approx(0.12)
    assert g.tile_shape_for(geom) == (256, 1024)
    assert g.tile_shape_for(geom, (512, 1024)) == (512, 1024)
    with pytest.raises(ConfigError, match="crosses a tile boundary"):
        g.tile_shape_for(geom, (128, 1024))
    with pytest.raises(ConfigError, match="does not tile"):
        g.tile_shape_for(geom, (300, 1024))
    # radius: pixel (ss, fs) centre = corner + (fs+0.5)*fs_vec + (ss+0.5)*ss_vec
    p = geom.panels[geom.panel_index("m3a5")]
    ss, fs = p.min_ss + 10, p.min_fs + 20
    x = p.corner_x + 20.5 * p.fs[0] + 10.5 * p.ss[0]
    y = p.corner_y + 20.5 * p.fs[1] + 10.5 * p.ss[1]
    assert g.radius_map(geom)[ss, fs] == pytest.approx(np.hypot(x, y), rel=1e-6)
    bad = g.geometry_bad_pixels(geom, base_dir=tmp_path)
    assert bad[1000:1004, 100:104].all() and bad[3000].all()  # mask_file, CrystFEL bits
    m4a0 = geom.panels[geom.panel_index("m4a0")]
    assert bad[2048:2101, 0:31].all() and m4a0.min_ss == 2048  # bad region, on its panel only
    assert not bad[2048:2101, 31:40].any()
    assert int(bad.sum()) == 16 + 1024 + 53 * 31


def test_jungfrau4m_peakfinder8_mask_and_cxi(tmp_path):
    path, _ = jungfrau4m_geom(tmp_path)
    rng = np.random.default_rng(0)
    frame = rng.normal(10.0, 1.0, (4096, 1024)).astype(np.float32)
    spot(frame, 700, 600)        # m1, a good pixel
    spot(frame, 1001, 101)       # masked by the mask file
    spot(frame, 2060, 10)        # in the bad region
    spot(frame, 2060, 300)       # same panel row, outside the region
    finder = PeakFinder(backend="peakfinder8", device="cpu", geometry=path, peakfinder8=PF8, batch_size=1)
    assert finder.panel_shape == (256, 1024) and finder.frame_shape == (16, 256, 1024)
    (table,) = finder.find(frame[None])
    slab = np.stack([table.panel.astype(np.int64) * 256 + np.rint(table.y), np.rint(table.x)], 1).astype(int)
    assert {(700, 600), (2060, 300)} <= set(map(tuple, slab))
    assert (1001, 101) not in set(map(tuple, slab)) and (2060, 10) not in set(map(tuple, slab))
    assert not finder.bad_pixels.reshape(4096, 1024)[slab[:, 0], slab[:, 1]].any()
    with pytest.raises(FrameError, match="do not fit"):
        finder.find(frame[None, :2048])
    # the CXI writer uses the same geometry: CrystFEL (adds 0.5) puts each peak on its own ASIC
    geom = g.read_geometry(path)
    with CxiWriter(tmp_path / "cxi", geometry=geom) as w:
        w.add(frame.reshape(16, 256, 1024), table, photon_energy_ev=9500.0, unique_id=1, timestamp_ns=0)
    back = read_cxi(w.files[0])
    np.testing.assert_allclose(back.peaks[0].y, table.y)
    with h5py.File(w.files[0]) as fh:
        ss = fh["entry_1/result_1/peakYPosRaw"][0, : table.n] + 0.5
        fs = fh["entry_1/result_1/peakXPosRaw"][0, : table.n] + 0.5
    owner = g.panel_index_map(geom)[np.floor(ss).astype(int), np.floor(fs).astype(int)]
    assert (owner >= 0).all()


# -- Pilatus/Eiger-style single large module with gaps --------------------------------------------


def test_single_module_with_gaps(tmp_path):
    path = pilatus_geom(tmp_path)
    geom = g.read_geometry(path)
    assert geom.n_panels == 1 and g.tile_shape_for(geom) == (619, 981)
    bad = g.geometry_bad_pixels(geom)
    assert bad[:, 487:494].all() and bad[195:212].all() and bad[407:424].all()
    # beam stop in lab x/y: x in [-500, 5], y in [-5, 5] -> fs + 0.5 - 480.37, ss + 0.5 - 300.8
    assert bad[300, 10] and bad[300, 484] and not bad[300, 485] and not bad[300, 487 + 20] and not bad[250, 10]
    rng = np.random.default_rng(1)
    frame = rng.normal(50.0, 2.0, (619, 981)).astype(np.float32)
    spot(frame, 100, 200)        # on a module
    spot(frame, 100, 490)        # in the vertical gap
    spot(frame, 300, 100)        # under the beam stop
    spot(frame, 500, 800)
    finder = PeakFinder(backend="peakfinder8", device="cpu", geometry=path, peakfinder8=PF8, batch_size=1)
    (table,) = finder.find(frame)
    found = set(zip(np.rint(table.y).astype(int), np.rint(table.x).astype(int)))
    assert {(100, 200), (500, 800)} <= found and (100, 490) not in found and (300, 100) not in found
    # radius from the geometry's beam centre (x = y = 0), not the panel centre
    r = finder.radius.reshape(619, 981)
    iy, ix = np.unravel_index(np.argmin(r), r.shape)
    assert abs(ix + 0.5 - 480.37) <= 1 and abs(iy + 0.5 - 300.8) <= 1


# -- masks: conventions, files, PeakNet -----------------------------------------------------------


def test_mask_conventions_and_files(tmp_path):
    values = np.array([[0, 1, 2], [3, 0, 1]], np.uint8)
    np.testing.assert_array_equal(g.bad_from_array(values, "om"), values == 0)
    np.testing.assert_array_equal(g.bad_from_array(values, "nonzero_bad"), values != 0)
    np.testing.assert_array_equal(
        g.bad_from_array(values, "crystfel", good_bits=0x1, bad_bits=0x2), [[1, 0, 1], [1, 1, 0]]
    )
    with pytest.raises(ConfigError, match="mask_convention"):
        g.bad_from_array(values, "pyfai")
    with h5py.File(tmp_path / "om.h5", "w") as fh:
        fh["/data/data"] = np.ones((64, 64), np.uint8)
        fh["/data/data"][10, 10] = 0
    assert g.read_mask_array(tmp_path / "om.h5").shape == (64, 64)
    with h5py.File(tmp_path / "two.h5", "w") as fh:
        fh["a"] = np.ones((4, 4), np.uint8)
        fh["b"] = np.ones((4, 4), np.uint8)
    with pytest.raises(ConfigError, match="mask_dataset"):
        g.read_mask_array(tmp_path / "two.h5")
    assert g.read_mask_array(f"{tmp_path / 'two.h5'}:/b").shape == (4, 4)
    with pytest.raises(ConfigError, match="no such file"):
        g.read_mask_array(tmp_path / "missing.h5")


def test_mask_shape_that_does_not_fit_is_one_line(tmp_path):
    path = tmp_path / "m.npy"
    np.save(path, np.ones((100, 64), np.uint8))
    with pytest.raises(ConfigError) as err:
        PeakFinder(backend="peakfinder8", device="cpu", panel_shape=(64, 64), mask=str(path))
    assert "\n" not in str(err.value) and "mask" in str(err.value)
    geom_path = tmp_path / "s.geom"
    g.write_geometry(geom_path, g.DetectorGeometry.stacked(2, (64, 64)))
    with pytest.raises(ConfigError, match="does not fit frames of 128 x 64"):
        PeakFinder(backend="peakfinder8", device="cpu", geometry=str(geom_path), mask=str(path))


def test_peaknet_masked_pixels_never_hold_a_peak(tmp_path):
    frames = np.random.default_rng(2).poisson(5.0, (2, 2 * 64, 64)).astype(np.float32)
    for f in frames:
        spot(f, 20, 20, 3000.0)
        spot(f, 64 + 30, 40, 3000.0)
    good = np.ones((128, 64), np.uint8)
    good[64:, :] = 0  # OM convention: the whole second panel is bad
    with h5py.File(tmp_path / "mask.h5", "w") as fh:
        fh["/mask"] = good
    finder = PeakFinder(weights="random", device="cpu", panel_shape=(64, 64), mask=str(tmp_path / "mask.h5"),
                        batch_size=2)
    backend = finder.pipeline.backend
    assert backend.bad_pixels is not None and backend.bad_pixels.shape == (2, 64, 64)
    assert bool(backend.bad_pixels[1].all()) and not bool(backend.bad_pixels[0].any())
    for table in finder.find(frames):
        assert not np.any(table.panel == 1)


# -- the PVA processor takes geometry and mask ---------------------------------------------------


def test_processor_geometry_and_mask(tmp_path):
    pytest.importorskip("pvaccess")
    from pva_helpers import FakePublisher, wait_until

    from peaknet_pva.pva import codec
    from peaknet_pva.pva.peaknet_processor import PeakNetImageProcessor, PeakNetProcessorParams

    geom = tmp_path / "two.geom"
    g.write_geometry(geom, g.DetectorGeometry.stacked(2, (64, 64)))
    good = np.ones((128, 64), np.uint8)
    good[64:] = 0  # panel 1 bad (OM convention)
    with h5py.File(tmp_path / "mask.h5", "w") as fh:
        fh["/mask"] = good
    args = {"backend": "peakfinder8", "device": "cpu", "geometry": str(geom), "mask": str(tmp_path / "mask.h5"),
            "mask_convention": "om", "min_peaks": 0, "forward_images": "all", "photon_energy_ev": 9000.0,
            "batch_size": 1, "batch_timeout_ms": 10, "peakfinder8": PF8}
    params = PeakNetProcessorParams.from_config(args)
    assert params.geometry == str(geom) and params.mask_convention == "om"
    with pytest.raises(ConfigError, match="mask_convention"):
        PeakNetProcessorParams.from_config(dict(args, mask_convention="bad"))
    proc = PeakNetImageProcessor(dict(args))
    pub = FakePublisher()
    proc.outputChannel, proc.dataPublisher = "test:output", pub
    frame = np.random.default_rng(0).poisson(3.0, (128, 64)).astype(np.float32)
    spot(frame, 20, 20, 2000.0)
    spot(frame, 64 + 20, 20, 2000.0)
    proc.start()
    proc.process(codec.encode_ntndarray(frame, unique_id=1))
    proc.process(codec.encode_ntndarray(frame[:64], unique_id=2))  # does not fit the geometry
    wait_until(lambda: len(pub.objects) == 1, 60, what="1 output")
    stats = proc.getStats()
    proc.stop()
    peaks, meta = codec.decode_output(pub.objects[0])
    assert peaks.n >= 1 and set(peaks.panel.tolist()) == {0}
    assert stats["nBadFrames"] == 1


def test_no_index_edge_pixels_and_in_file_mask(tmp_path, caplog):
    text = g.format_geometry(g.DetectorGeometry.stacked(2, (16, 16)))
    text += "\nmask_edge_pixels = 1\nmask = /entry_1/data_1/mask\nmask_good = 0x1\np1/no_index = 1\n"
    path = tmp_path / "e.geom"
    path.write_text(text)
    geom = g.read_geometry(path)
    with caplog.at_level("WARNING"):
        bad = g.geometry_bad_pixels(geom)
    assert bad[16:].all()  # no_index
    assert bad[0].all() and bad[15].all() and bad[:16, 0].all() and not bad[1:15, 1:15].any()
    assert any("mask=" in r.getMessage() for r in caplog.records)  # in-file mask: not applied, said so


def test_peaknet_with_geometry_never_peaks_in_module_gaps(tmp_path):
    path = pilatus_geom(tmp_path)
    frame = np.random.default_rng(4).poisson(20.0, (619, 981)).astype(np.float32)
    frame[:, 487:494] = 5000.0  # hot gap columns: would be peaks (or poison the normalisation) unmasked
    spot(frame, 100, 200, 5000.0)
    finder = PeakFinder(weights="random", device="cpu", geometry=path, batch_size=1)
    backend = finder.pipeline.backend
    assert backend.bad_pixels is not None and tuple(backend.bad_pixels.shape) == (1, 619, 981)
    assert bool(backend.bad_pixels[0, :, 487:494].all())
    (table,) = finder.find(frame)
    x = np.rint(table.x).astype(int)
    y = np.rint(table.y).astype(int)
    assert not np.any((x >= 487) & (x <= 493))
    assert not np.any(((y >= 195) & (y <= 211)) | ((y >= 407) & (y <= 423)))


def test_cxi_processor_writes_the_users_geometry_for_our_cxi(tmp_path):
    pytest.importorskip("pvaccess")
    from peaknet_pva.pva.cxi_processor import CxiFileProcessor

    path, _ = jungfrau4m_geom(tmp_path)
    proc = CxiFileProcessor({"output_dir": str(tmp_path / "out"), "geometry": path, "min_peaks": 0})
    proc._write_geometry_once((16, 256, 1024))
    written = g.read_geometry(tmp_path / "out" / "peaknet.geom")
    assert written.n_panels == 64 and written.panels == g.read_geometry(path).panels
    assert written.data == "/entry_1/data_1/data" and written.peak_list == "/entry_1/result_1"
    assert written.dims == ("%", "ss", "fs") and written.photon_energy == "/LCLS/photon_energy_eV"
    assert written.extra["mask_file"] == str((tmp_path / "jf4m-mask.h5").resolve())
    assert "bad_bs/panel" in written.extra
    proc.writer.close()
