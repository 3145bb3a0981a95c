"""The robustness-matrix generator (peaknet_pva.robustness) and run_matrix on a tiny spec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from peaknet_pva import robustness as rb
from peaknet_pva.frames import PeakTable
from peaknet_pva.robustness import (
    Cell,
    MatrixSpec,
    cell_frames,
    false_peaks_per_mpix,
    noise_only_cell,
    noise_only_frames,
    radius_map,
    run_matrix,
)

SMALL = "1x128x128"


def test_cells_are_deterministic_by_seed():
    cell = Cell(10, noise="poisson+read", hot_pixels=True, size="aniso", geometry=SMALL)
    f1, t1 = cell_frames(cell, 2, seed=3)
    f2, t2 = cell_frames(cell, 2, seed=3)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(t1[1].y, t2[1].y)
    np.testing.assert_array_equal(t1[0].hot, t2[0].hot)
    f3, _ = cell_frames(cell, 1, seed=3)
    np.testing.assert_array_equal(f3[0], f1[0])  # frame i does not depend on n_frames
    f4, _ = cell_frames(cell, 1, seed=4)
    assert not np.array_equal(f4[0], f1[0])
    # the label is not part of the frames, the axes are
    f5, _ = cell_frames(Cell(10, variant="other", noise="poisson+read", hot_pixels=True, size="aniso",
                             geometry=SMALL), 1, seed=3)
    np.testing.assert_array_equal(f5[0], f1[0])


def test_shapes_dtypes_and_truth_fields():
    frames, truths = cell_frames(Cell(50, geometry="4x64x64", gain="g30p"), 2, seed=1)
    assert frames.shape == (2, 4, 64, 64) and frames.dtype == np.uint16
    t = truths[0]
    assert t.panel.min() >= 0 and t.panel.max() <= 3
    assert len(t.y) == len(t.x) == len(t.detectable) == len(t.snr) == t.n
    assert ((t.y >= -0.5) & (t.y < 63.5)).all()
    assert t.detectable.dtype == bool
    # the rule: detectable => SNR >= 6 and away from the edge
    d = t.detectable
    assert (t.snr[d] >= rb.DETECTABLE_SNR).all()
    assert (np.minimum.reduce([t.y[d], 63 - t.y[d], t.x[d], 63 - t.x[d]]) >= rb.EDGE_MARGIN_PX - 1e-9).all()


def test_rendered_centroid_is_the_truth_position_noise_free():
    # render_spots takes corner-convention centres; the truth is centre-at-integer (u - 0.5)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    for _ in range(10):
        uy, ux = rng.uniform(20, 28, 2)
        img = rb.render_spots((48, 48), np.array([uy]), np.array([ux]), np.array([1000.0]), np.array([1.7]),
                              np.array([0.8]), np.array([rng.uniform(0, np.pi)]), np.array([0.3]))
        assert abs(img.sum() - 1000.0) < 5.0
        assert abs((img * yy).sum() / img.sum() - (uy - 0.5)) < 0.01
        assert abs((img * xx).sum() / img.sum() - (ux - 0.5)) < 0.01


@pytest.mark.parametrize("size", ["small", "aniso"])
def test_truth_agrees_with_frame_centroids_on_isolated_bright_spots(size: str):
    cell = Cell(0, size=size, density="dense", geometry="1x256x256")  # no background: a plain centroid
    frames, truths = cell_frames(cell, 2, seed=11)
    errs = []
    for frame, t in zip(frames, truths):
        img = frame[0].astype(np.float64)
        for j in np.flatnonzero(t.snr > 30):
            d = np.hypot(t.y - t.y[j], t.x - t.x[j])
            d[j] = np.inf
            y, x = t.y[j], t.x[j]
            if d.min() < 16 or min(y, x, 255 - y, 255 - x) < 10:
                continue
            iy, ix = int(round(y)), int(round(x))
            win = img[iy - 8 : iy + 9, ix - 8 : ix + 9]
            gy, gx = np.mgrid[iy - 8 : iy + 9, ix - 8 : ix + 9]
            errs.append(((win * gy).sum() / win.sum() - y, (win * gx).sum() / win.sum() - x))
    errs = np.abs(np.array(errs))
    assert len(errs) >= 5
    assert np.median(errs) < 0.05, errs  # a half-pixel convention slip would show as ~0.5
    assert errs.max() < 0.2, errs


@pytest.mark.parametrize("level", [0.0, 1.0, 10.0, 50.0, 300.0])
def test_noise_only_frames_have_the_mean_background_and_no_spots(level: float):
    frames = noise_only_frames(level, hot_pixels=False, n_frames=2, shape=(1, 128, 128), seed=5)
    assert frames.shape == (2, 1, 128, 128)
    n = frames.size
    tol = 4 * np.sqrt((level + rb.READ_NOISE_PHOTONS**2) / n) + 1e-6
    assert abs(float(frames.mean()) - level) < tol
    # nothing far above the expected map (no spots, no hot pixels)
    expected = rb._background_map(level, "ring", (1, 128, 128))
    z = (frames - expected[None]) / np.sqrt(expected[None] + rb.READ_NOISE_PHOTONS**2)
    assert z.max() < 7.0
    _, truths = cell_frames(noise_only_cell(level, hot_pixels=True, shape=(1, 128, 128)), 1, seed=5)
    assert truths[0].n == 0 and len(truths[0].hot) > 0


def test_ring_background_is_radial_about_the_beam_centre():
    frames = noise_only_frames(300, hot_pixels=False, n_frames=1, shape=(1, 256, 256), seed=2, noise="poisson")
    r = radius_map("1x256x256")[0]
    ring = rb._background_map(300, "ring", (1, 256, 256))[0]
    ring_r = r[np.unravel_index(np.argmax(ring), ring.shape)]
    on = np.abs(r - ring_r) < 3
    off = np.abs(r - ring_r - 30) < 3
    assert frames[0, 0][on].mean() > 1.3 * frames[0, 0][off].mean()


def test_hot_pixels_present_only_when_asked():
    shape = (1, 256, 256)
    full = rb.GAINS["g1"][4]
    hot = noise_only_frames(10, hot_pixels=True, n_frames=1, shape=shape, seed=0)
    cold = noise_only_frames(10, hot_pixels=False, n_frames=1, shape=shape, seed=0)
    assert int((hot == full).sum()) == round(rb.HOT_PER_512SQ * 256 * 256 / 512**2)
    assert int((cold == full).sum()) == 0
    frames, truths = cell_frames(Cell(10, hot_pixels=True, geometry="1x256x256", density="dense"), 1, seed=0)
    t = truths[0]
    assert (frames[0][tuple(t.hot.T)] == full).all()
    d = np.hypot(t.hot[:, 1, None] - t.y[None], t.hot[:, 2, None] - t.x[None])
    assert d.min() >= 6.0 - 1e-9  # hot pixels are never on a spot


def test_gain_pedestal_and_kev():
    shape = (1, 128, 128)
    g30 = noise_only_frames(10, hot_pixels=False, n_frames=1, shape=shape, seed=1, gain="g30p", noise="poisson")
    assert g30.dtype == np.uint16
    assert abs(float(g30.mean()) - (1000 + 30 * 10)) < 30 * 0.5
    assert (((g30.astype(np.int64) - 1000) % 30) == 0).all()  # photons x 30 + pedestal
    kev = noise_only_frames(10, hot_pixels=False, n_frames=1, shape=shape, seed=1, gain="kev", noise="poisson")
    assert kev.dtype == np.float32
    assert abs(float(kev.mean()) - 95.0) < 9.5 * 0.5
    np.testing.assert_allclose(kev / 9.5, np.rint(kev / 9.5), atol=1e-3)
    kev0 = noise_only_frames(0, hot_pixels=False, n_frames=1, shape=shape, seed=1, gain="kev")
    assert kev0.min() < 0 and abs(float(kev0.std()) - 2.0 * 9.5) < 1.0  # calibrated: read noise, no clip
    g1 = noise_only_frames(0, hot_pixels=True, n_frames=1, shape=shape, seed=1, gain="g30p")
    assert g1.min() >= 0 and g1.max() == 65535


def test_false_peaks_per_mpix():
    tables = [PeakTable(panel=np.zeros(3), y=np.ones(3), x=np.ones(3), intensity=np.ones(3), npix=np.ones(3)),
              PeakTable.empty()]
    assert false_peaks_per_mpix(tables, (2, 1, 500, 1000)) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        false_peaks_per_mpix(tables, (3, 1, 10, 10))


def test_bad_cells_and_seeds_are_refused():
    with pytest.raises(ValueError):
        Cell(10, gain="g2")
    with pytest.raises(ValueError):
        Cell(-1)
    with pytest.raises(ValueError):
        MatrixSpec((), (), seed=5, tune_seed=5).resolved_tune_seed()


def _tiny_spec() -> MatrixSpec:
    cells = (Cell(10, geometry=SMALL, density="dense"), Cell(10, variant="hot", hot_pixels=True, geometry=SMALL,
                                                            density="dense"))
    noise = (noise_only_cell(10, hot_pixels=False, shape=(1, 128, 128)),
             noise_only_cell(10, hot_pixels=True, shape=(1, 128, 128)))
    grid = {"min_snr": (4.5, 6.0), "adc_photons": (2.0,), "min_pix_count": (1, 2)}
    return MatrixSpec(cells, noise, frames_per_cell=2, noise_frames=2, seed=21, tune_grid=grid)


def test_run_matrix_peakfinder8_tiny(tmp_path: Path):
    result = run_matrix(_tiny_spec(), finders=["peakfinder8"], out_dir=tmp_path, progress=False, threads=1)
    for name in ("matrix.json", "matrix.md", "matrix.png"):
        assert (tmp_path / name).stat().st_size > 100
    assert (tmp_path / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "matrix.json").read_text())
    assert data["meta"]["tune_seed"] != data["meta"]["seed"]
    assert set(data["tuned_peakfinder8"]) == {"10"}
    base = data["cells"][0]["results"]["peakfinder8"]
    assert base["n_truth"] > 20 and base["f1"] > 0.85 and base["rmse_px"] < 0.5, base
    assert base["n_found"] > 0 and 0 <= base["precision"] <= 1
    assert data["noise_only"][0]["results"]["peakfinder8"]["false_per_mpix"] < 50
    md = (tmp_path / "matrix.md").read_text()
    assert "base@10" in md and "noise+hot@10" in md and "pf8 (tuned) F1" in md
    assert result["cells"][1]["name"] == "hot@10"


def test_cli_evaluate_matrix(tmp_path: Path, monkeypatch, capsys):
    from peaknet_pva.cli import main

    monkeypatch.setattr(rb, "default_spec", lambda **kw: _tiny_spec())
    out = tmp_path / "m"
    assert main(["evaluate", "--matrix", "--backends", "peakfinder8", "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "matrix.json").exists() and (out / "matrix.md").exists() and (out / "matrix.png").exists()
    summary = json.loads(capsys.readouterr().out)
    assert summary["cells"] == 2 and summary["peakfinder8"]["median_f1"] > 0.8
