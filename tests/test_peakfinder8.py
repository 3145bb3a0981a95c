"""peakfinder8 (torch): exact spots on synthetic frames, no peaks in noise, backends agree, params."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import erf

from peaknet_pva.errors import ConfigError, FrameError
from peaknet_pva.evaluate import evaluate, match_peaks
from peaknet_pva.frames import PeakTable
from peaknet_pva.peakfinder8 import Peakfinder8, Peakfinder8Params, TUNED_PARAMS, tuned_params
from peaknet_pva.simulate import DETECTORS, simulate_dataset


def _gauss(shape, y0, x0, sigma, total):
    """Pixel-integrated 2-D Gaussian of integral ``total`` centred at (y0, x0)."""
    h, w = shape

    def prof(n, c):
        e = np.arange(n + 1) - 0.5 - c
        return 0.5 * np.diff(erf(e / (np.sqrt(2) * sigma)))

    return total * np.outer(prof(h, y0), prof(w, x0))


def _spots_frame(rng, n_panels=2, shape=(96, 128), bg=50.0, total=6000.0, noise=True):
    """Flat background + a grid of well-separated sub-pixel Gaussian spots on every panel."""
    expected = np.full((n_panels,) + shape, bg)
    truth = []
    for p in range(n_panels):
        for gy in range(12, shape[0] - 8, 18):
            for gx in range(12, shape[1] - 8, 18):
                y0, x0 = gy + rng.uniform(-0.5, 0.5), gx + rng.uniform(-0.5, 0.5)
                sigma = rng.uniform(0.9, 1.3)
                expected[p] += _gauss(shape, y0, x0, sigma, total)
                truth.append((p, y0, x0, total))
    frame = rng.poisson(expected).astype(np.float32) if noise else expected.astype(np.float32)
    t = np.asarray(truth)
    table = PeakTable(panel=t[:, 0], y=t[:, 1], x=t[:, 2], intensity=t[:, 3], npix=np.zeros(len(t)))
    return frame, table


@pytest.fixture(scope="module")
def spots():
    rng = np.random.default_rng(0)
    frames, truths = zip(*[_spots_frame(rng) for _ in range(2)])
    return np.stack(frames), list(truths)


def test_isolated_spots_found_exactly_with_accurate_centroids(spots):
    frames, truths = spots
    tables = Peakfinder8(Peakfinder8Params()).find_peaks(frames)
    assert len(tables) == 2
    for found, truth in zip(tables, truths):
        assert found.centroid == "intensity"
        tp, fp, fn, pairs = match_peaks(found, truth, max_dist=1.0)
        assert (fp, fn) == (0, 0) and tp == truth.n
        err = np.hypot(found.y[pairs[:, 0]] - truth.y[pairs[:, 1]], found.x[pairs[:, 0]] - truth.x[pairs[:, 1]])
        assert err.max() < 0.1, err.max()
        # background-subtracted integrated intensity ~ the spot's photons (a little lost in the tails)
        ratio = found.intensity[pairs[:, 0]] / truth.intensity[pairs[:, 1]]
        assert np.all((ratio > 0.85) & (ratio < 1.05)), (ratio.min(), ratio.max())
        assert np.all(found.npix >= 9)


def test_noiseless_centroids_have_small_bias():
    frame, truth = _spots_frame(np.random.default_rng(5), n_panels=1, bg=0.0, noise=False)
    (found,) = Peakfinder8(Peakfinder8Params(adc_threshold=20.0, window_radius=5)).find_peaks(frame[None])
    tp, fp, fn, pairs = match_peaks(found, truth)
    assert (fp, fn) == (0, 0)
    dy = found.y[pairs[:, 0]] - truth.y[pairs[:, 1]]
    dx = found.x[pairs[:, 0]] - truth.x[pairs[:, 1]]
    # only the threshold cut of the faint tails biases a centroid, a few hundredths of a pixel
    assert np.hypot(dy, dx).max() < 0.05
    assert abs(dy.mean()) < 0.01 and abs(dx.mean()) < 0.01


@pytest.mark.parametrize("level", [1.0, 50.0, 2000.0])
def test_nothing_on_flat_poisson_noise(level):
    frames = np.random.default_rng(1).poisson(level, size=(3, 2, 128, 128)).astype(np.float32)
    tables = Peakfinder8(Peakfinder8Params()).find_peaks(frames)
    assert [t.n for t in tables] == [0, 0, 0]


def test_cpu_tensor_and_integer_input_equal_numpy(spots):
    frames, _ = spots
    pf8 = Peakfinder8(Peakfinder8Params())
    ref = pf8.find_peaks(frames)
    for other in (
        pf8.find_peaks(torch.from_numpy(frames)),
        pf8.find_peaks(frames.astype(np.uint16)),
        pf8.find_peaks(torch.from_numpy(frames.astype(np.int32))),
    ):
        for a, b in zip(ref, other):
            for name in ("panel", "y", "x", "intensity", "npix"):
                assert np.array_equal(getattr(a, name), getattr(b, name)), name
    # a batch gives the same peaks as frame by frame
    single = pf8.find_peaks(frames[1:2])[0]
    assert np.array_equal(single.y, ref[1].y) and np.array_equal(single.intensity, ref[1].intensity)
    # one 2-D panel is accepted as one frame
    flat = pf8.find_peaks(frames[0, 0])[0]
    assert flat.n == int((ref[0].panel == 0).sum())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(spots):
    frames, _ = spots
    pf8 = Peakfinder8(Peakfinder8Params())
    cpu = pf8.find_peaks(frames)
    gpu = pf8.find_peaks(torch.from_numpy(frames).cuda())
    for a, b in zip(cpu, gpu):
        assert a.n == b.n
        assert np.allclose(a.y, b.y, atol=1e-4) and np.allclose(a.x, b.x, atol=1e-4)


def test_mask_and_pixel_counts():
    frame = np.random.default_rng(2).poisson(20.0, size=(1, 1, 64, 64)).astype(np.float32)
    frame[0, 0, 10:12, 10:12] = 5000.0  # hot 2x2 cluster
    frame[0, 0, 30, 30] = 5000.0  # single hot pixel
    frame[0, 0, 40:47, 40:47] = 3000.0  # a 7x7 blob (49 px)
    base = Peakfinder8Params(min_pix_count=2, max_pix_count=60)
    found = Peakfinder8(base).find_peaks(frame)[0]
    # a plateau gives one peak at its centre
    assert np.allclose(found.y, [10.5, 43.0], atol=0.05) and np.allclose(found.x, [10.5, 43.0], atol=0.05)
    assert found.npix.tolist() == [4, 49]
    one = Peakfinder8(base.replace(min_pix_count=1)).find_peaks(frame)[0]
    assert one.n == 3
    small = Peakfinder8(base.replace(max_pix_count=20)).find_peaks(frame)[0]
    assert small.n == 1 and small.npix[0] == 4
    mask = np.ones((64, 64), bool)
    mask[10:12, 10:12] = False
    masked = Peakfinder8(base, mask=mask).find_peaks(frame)[0]
    assert masked.n == 1 and np.isclose(masked.y[0], 43.0, atol=0.05)


def test_max_num_peaks_keeps_strongest(spots):
    frames, _ = spots
    frames = frames.copy()
    frames[0, 1, 10:15, 10:15] += 40000.0  # one very strong blob
    full = Peakfinder8(Peakfinder8Params()).find_peaks(frames[:1])[0]
    capped = Peakfinder8(Peakfinder8Params(max_num_peaks=5)).find_peaks(frames[:1])[0]
    assert capped.n == 5 and capped.n_overflow == full.n - 5
    strongest = np.sort(full.intensity)[-5:]
    assert np.allclose(np.sort(capped.intensity), strongest)
    assert capped.intensity.max() > 1e5


def test_radius_map_limits_and_stats_scope():
    rng = np.random.default_rng(3)
    # panel 0: quiet, panel 1: very noisy; one modest spot on panel 0
    frame = np.stack([rng.poisson(10.0, (64, 64)), rng.normal(1000.0, 300.0, (64, 64))]).astype(np.float32)
    frame[0] += _gauss((64, 64), 32.2, 31.7, 1.1, 800.0).astype(np.float32)
    radius = np.broadcast_to(np.hypot(*np.mgrid[0:64, 0:64] - 31.5), (2, 64, 64)).copy()
    prm = Peakfinder8Params()
    per_panel = Peakfinder8(prm, radius=radius).find_peaks(frame[None])[0]  # auto -> frame scope
    assert per_panel.n == 0  # panel 1's noise swamps the shared statistics
    scoped = Peakfinder8(prm.replace(stats_scope="panel"), radius=radius).find_peaks(frame[None])[0]
    assert scoped.n == 1 and scoped.panel[0] == 0
    default = Peakfinder8(prm).find_peaks(frame[None])[0]  # no radius: per-panel stats
    assert default.n == 1
    outside = Peakfinder8(prm.replace(stats_scope="panel", min_radius=5.0), radius=radius).find_peaks(frame[None])[0]
    assert outside.n == 0
    inside = Peakfinder8(prm.replace(stats_scope="panel", max_radius=5.0), radius=radius).find_peaks(frame[None])[0]
    assert inside.n == 1
    with pytest.raises(FrameError, match="radius"):
        Peakfinder8(prm, radius=radius[:, :32]).find_peaks(frame[None])


def test_sigma_clipping_ignores_bright_pixels():
    rng = np.random.default_rng(4)
    frame = rng.poisson(100.0, (1, 1, 128, 128)).astype(np.float32)
    hot = np.zeros((128, 128), bool)
    hot[::4, ::4] = True  # many bright single pixels inflate the unclipped sigma...
    hot[52:74, 55:77] = False  # ...but none touches the spot
    frame[0, 0][hot] += 2000.0
    frame[0, 0] += _gauss((128, 128), 62.3, 65.6, 1.2, 1500.0).astype(np.float32)
    one = Peakfinder8(Peakfinder8Params(min_pix_count=3, sigma_clip_iterations=1, clip_snr=100.0)).find_peaks(frame)[0]
    clipped = Peakfinder8(Peakfinder8Params(min_pix_count=3, sigma_clip_iterations=3, clip_snr=3.0)).find_peaks(frame)[0]
    assert one.n == 0
    assert clipped.n == 1 and abs(clipped.y[0] - 62.3) < 0.3


def test_params_validation_names_the_field():
    for kwargs, name in [
        ({"min_snr": 0.0}, "min_snr"),
        ({"adc_threshold": -1.0}, "adc_threshold"),
        ({"min_pix_count": 0}, "min_pix_count"),
        ({"max_pix_count": 1, "min_pix_count": 2}, "max_pix_count"),
        ({"max_pix_count": 100, "window_radius": 4}, "max_pix_count"),
        ({"window_radius": 1, "local_max_radius": 2}, "window_radius"),
        ({"stats_scope": "detector"}, "stats_scope"),
        ({"radius_bin_width": 0.0}, "radius_bin_width"),
        ({"max_radius": 1.0, "min_radius": 2.0}, "max_radius"),
        ({"sigma_clip_iterations": 1.5}, "sigma_clip_iterations"),
        ({"max_candidates": 10}, "max_candidates"),
    ]:
        with pytest.raises(ConfigError, match=name):
            Peakfinder8Params(**kwargs)
    with pytest.raises(FrameError):
        Peakfinder8().find_peaks(np.zeros((2, 3, 4), np.float32))


def test_tuned_params_on_simulated_frames():
    assert set(TUNED_PARAMS) == set(DETECTORS)
    with pytest.raises(ConfigError, match="detector_name"):
        tuned_params("pilatus")
    ds = simulate_dataset(4, detector="single", seed=21, progress=False)
    pf8 = Peakfinder8(tuned_params("single"), radius=DETECTORS["single"].radius_map(), mask=~ds.bad_pixel_mask)
    m = evaluate(pf8.find_peaks(ds.frames), ds.truths)
    assert m.f1 > 0.95 and m.rmse_px < 0.3, m.as_dict()
