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


@pytest.mark.gpu
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


# ---- the sparse CPU path (method="sparse", the CPU default) against the dense reference ----
def _assert_same_tables(a: list[PeakTable], b: list[PeakTable], tol: float = 1e-3) -> None:
    assert len(a) == len(b)
    for f, (ta, tb) in enumerate(zip(a, b)):
        assert ta.n == tb.n, (f, ta.n, tb.n)
        assert np.array_equal(ta.panel, tb.panel), f
        assert np.array_equal(ta.npix, tb.npix), f
        assert ta.n_overflow == tb.n_overflow, f
        if ta.n:
            assert np.abs(ta.y - tb.y).max() <= tol and np.abs(ta.x - tb.x).max() <= tol, f
            assert np.allclose(ta.intensity, tb.intensity, rtol=1e-4, atol=1e-3), f


def _both(prm, frames, **kw):
    dense = Peakfinder8(prm, method="dense", **kw).find_peaks(frames)
    sparse = Peakfinder8(prm, method="sparse", **kw).find_peaks(frames)
    return dense, sparse


@pytest.mark.parametrize("name,n", [("single", 3), ("epix10k2m", 2), ("jungfrau4m", 1)])
def test_sparse_equals_dense_on_detector_presets(name, n):
    """Identical peaks (counts, panels, pixel counts; positions within 1e-3 px) on seeded frames
    of the three presets, with their tuned params, radius maps and bad-pixel masks."""
    ds = simulate_dataset(n, detector=name, seed=7, progress=False)
    radius = DETECTORS[name].radius_map()
    dense, sparse = _both(tuned_params(name), ds.frames, radius=radius, mask=~ds.bad_pixel_mask)
    assert sum(t.n for t in dense) > 0
    _assert_same_tables(sparse, dense)
    # "auto" is the sparse path on the CPU; frame by frame equals the batch
    auto = Peakfinder8(tuned_params(name), radius=radius, mask=~ds.bad_pixel_mask)
    _assert_same_tables([auto.find_peaks(f[None])[0] for f in ds.frames], dense)


def _edge_frames(rng):
    """Frames that exercise the sparse path's corner cases (not realistic, only hard)."""
    base = rng.poisson(3.0, size=(3, 2, 64, 80)).astype(np.float32)
    base[0, 0, 20:24, 30:33] += 400.0  # a spot
    base[0, 1, 5, 5] = np.nan  # non-finite pixels
    base[0, 1, 6, 40] = np.inf
    base[1] = 7.0  # constant frame: sigma 0 everywhere
    base[1, 0, 30:32, 30:32] = 50.0
    base[2, 0] = rng.normal(100.0, 10.0, (64, 80))  # one panel continuous and bright...
    base[2, 0][::3, ::3] += 5000.0  # ...with many hot pixels (cores have to move to the tail)
    base[2, 0, 40:44, 40:44] += 3000.0
    base[2, 1, 0:3, 0:3] = 900.0  # a spot in a corner (windows clipped by the panel edge)
    return base


@pytest.mark.parametrize(
    "changes,kw",
    [
        ({}, {}),
        ({"min_pix_count": 1}, {}),  # isolated maxima kept
        ({"local_max_radius": 2, "window_radius": 5}, {}),
        ({"stats_scope": "panel"}, {"radius": True}),
        ({"sigma_clip_iterations": 1, "clip_snr": 1.5}, {}),
        ({"max_candidates": 40, "max_num_peaks": 3, "min_pix_count": 1, "min_snr": 1.0}, {}),  # caps bind
        ({"max_candidates": 40, "max_num_peaks": 3, "min_snr": 1.0}, {}),
        ({"min_radius": 10.0, "max_radius": 30.0, "min_bin_pixels": 50}, {"radius": True}),
    ],
)
def test_sparse_equals_dense_on_edge_cases(changes, kw):
    rng = np.random.default_rng(11)
    frames = _edge_frames(rng)
    mask = np.ones((2, 64, 80), bool)
    mask[1, 10:20, :] = False  # a masked band
    extra = {"mask": mask}
    if kw.get("radius"):
        extra["radius"] = np.broadcast_to(np.hypot(*np.mgrid[0:64, 0:80] - np.array([31.5, 39.5])[:, None, None]), (2, 64, 80)).copy()
    prm = Peakfinder8Params(min_snr=4.0, adc_threshold=2.0).replace(**changes)
    dense, sparse = _both(prm, frames, **extra)
    _assert_same_tables(sparse, dense)
    # integer input (the integer-valued shortcut of the core check) and torch input
    ints = np.nan_to_num(frames, nan=0.0, posinf=0.0).astype(np.int32)
    _assert_same_tables(*reversed(_both(prm, ints, **extra)))
    d_t, s_t = _both(prm, torch.from_numpy(frames), **extra)
    _assert_same_tables(s_t, dense)
    # steps 4-8 in torch (the CUDA code) on the CPU equal the NumPy version used on the CPU
    pf8 = Peakfinder8(prm, method="dense", **extra)
    pf8._torch_finish = True
    _assert_same_tables(pf8.find_peaks(frames), dense, tol=1e-4)
    assert np.isnan(frames[0, 1, 5, 5])  # the caller's frames are not modified


@pytest.mark.parametrize("core_sigmas", [0.05, 50.0])
def test_sparse_result_does_not_depend_on_the_core(core_sigmas, monkeypatch):
    """The guess only sets the speed: with a tiny core (almost every pixel in the tail) or a huge
    one (cores moved to the tail in nearly every group, at every round), float or integer input,
    with non-finite pixels, the sparse path still gives the dense path's peaks."""
    import peaknet_pva.peakfinder8 as pf8_module

    monkeypatch.setattr(pf8_module, "_CORE_SIGMAS", core_sigmas)
    frames = _edge_frames(np.random.default_rng(11))
    frames[2, 0, 7, 7] = np.nan  # non-finite pixels where cores have to move
    frames[2, 1, 3, 3] = -np.inf
    mask = np.ones((2, 64, 80), bool)
    mask[1, 10:20, :] = False
    prm = Peakfinder8Params(min_snr=4.0, adc_threshold=2.0)
    dense, sparse = _both(prm, frames, mask=mask)
    assert sum(t.n for t in dense) >= 3
    _assert_same_tables(sparse, dense)
    ints = np.nan_to_num(frames, nan=0.0, posinf=0.0, neginf=0.0).astype(np.int32)
    _assert_same_tables(*reversed(_both(prm, ints, mask=mask)))


def test_sparse_equals_dense_with_fully_masked_groups():
    """Radius groups whose pixels are all masked (here the outermost ones) hold no pixel in the
    sparse path's group order: the sums of their neighbours stay exact."""
    from peaknet_pva.peakfinder8 import _clipped_stats

    rng = np.random.default_rng(3)
    frames = rng.poisson(20.0, size=(2, 2, 64, 80)).astype(np.float32)
    frames[:, 0, 30:33, 40:43] += 500.0
    frames[:, 1, 50:52, 70:72] += 400.0  # next to the masked outer region
    frames[1, 1, 8, 8] = np.nan
    centre = np.array([31.5, 39.5])[:, None, None]
    radius = np.broadcast_to(np.hypot(*np.mgrid[0:64, 0:80] - centre), (2, 64, 80)).copy()
    mask = (radius < 42.0) & ~((radius >= 20.0) & (radius < 24.0))
    prm = Peakfinder8Params(min_snr=4.0, adc_threshold=2.0, min_bin_pixels=20)
    dense, sparse = _both(prm, frames, radius=radius, mask=mask)
    assert sum(t.n for t in dense) >= 2
    _assert_same_tables(sparse, dense)
    # the clipped means themselves (more sensitive than the peaks): sparse vs every-pixel stats
    pf8 = Peakfinder8(prm, radius=radius, mask=mask, method="sparse")
    st = pf8._sparse_tables((2, 64, 80))
    assert st["n_good"][-1] == 0  # the case in point: the last group has no good pixel
    xf = frames[0].reshape(-1)
    mean = pf8._sparse_stats(st, xf, None, st["n_good"])[0]
    ref, _, _ = _clipped_stats(
        torch.from_numpy(xf[None]), torch.from_numpy(st["good"][None]), torch.from_numpy(st["gid_np"]),
        st["groups"], prm.sigma_clip_iterations, prm.clip_snr,
    )
    has = st["n_good"] > 0
    assert np.allclose(mean[has], ref[0].numpy()[has], rtol=1e-5, atol=1e-4)


def test_sparse_tail_round_is_the_float32_selection():
    """A clipping round over the tail selects exactly the values with ``|fl32(x - r)| <= h`` per
    group, including ties, signed zeros, tiny values and zero-width windows, and sums them per
    group (empty groups included)."""
    from peaknet_pva.peakfinder8 import _Tail

    rng = np.random.default_rng(5)
    groups = 40
    g = np.sort(rng.integers(1, groups - 3, 4000))  # the first and the last groups stay empty
    v = rng.normal(0.0, 1.0, g.size).astype(np.float32)
    v[::7] = np.round(v[::7])  # ties
    v[::11] = np.float32(-0.0)
    v[::13] = rng.normal(0.0, 1e-30, v[::13].size).astype(np.float32)  # tiny values near 0
    shift = rng.normal(0.0, 0.1, groups)
    tail = _Tail(v, np.bincount(g, minlength=groups), shift)
    e = v.astype(np.float64) - shift[g]
    n, s1, s2 = tail.total()
    assert np.array_equal(n, np.bincount(g, minlength=groups))
    assert np.allclose(s1, np.bincount(g, weights=e, minlength=groups), rtol=1e-12, atol=1e-12)
    assert np.allclose(s2, np.bincount(g, weights=e * e, minlength=groups), rtol=1e-12, atol=1e-12)
    for trial in range(20):
        r32 = rng.normal(0.0, 1.0, groups).astype(np.float32)
        h32 = np.abs(rng.normal(0.0, 1.0, groups)).astype(np.float32)
        if trial % 3 == 0:
            h32 = np.abs(r32)  # window edge at 0: tiny values decide
        if trial % 5 == 0:
            h32[:5] = 0.0
        sel_ref = np.abs(v - r32[g]) <= h32[g]
        sel, cnt, s1, s2 = tail.round(r32, h32)
        assert np.array_equal(sel[:-1], sel_ref) and not sel[-1]
        assert np.array_equal(cnt, np.bincount(g, weights=sel_ref, minlength=groups))
        assert np.allclose(s1, np.bincount(g, weights=e * sel_ref, minlength=groups), rtol=1e-12, atol=1e-12)
        assert np.allclose(s2, np.bincount(g, weights=e * e * sel_ref, minlength=groups), rtol=1e-12, atol=1e-12)


def test_sparse_method_validation():
    with pytest.raises(ConfigError, match="method"):
        Peakfinder8(method="fast")
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sparse"):
            Peakfinder8(method="sparse").find_peaks(torch.zeros((1, 1, 8, 8), device="cuda"))


def _om():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _om import OmPeakfinder8, load_om

    return OmPeakfinder8 if load_om() is not None else None


def test_om_peakfinder8_agrees_when_installed():
    """With ``ondamonitor`` (extra ``bench``): ours finds >= 99 % of the peaks of OM's C++
    peakfinder8 on the same frames, radius map, mask and thresholds, within 0.5 px at p95."""
    om_cls = _om()
    if om_cls is None:
        pytest.skip("ondamonitor not installed (pip install -e '.[bench]')")
    ds = simulate_dataset(4, detector="single", seed=7, progress=False)
    radius, good = DETECTORS["single"].radius_map(), ~ds.bad_pixel_mask
    prm = tuned_params("single")
    ours = Peakfinder8(prm, radius=radius, mask=good).find_peaks(ds.frames)
    om = om_cls(prm, radius, good).find_peaks(ds.frames)
    n_om = sum(t.n for t in om)
    assert n_om > 50
    tp, dist = 0, []
    for a, b in zip(ours, om):
        t, _, _, pairs = match_peaks(a, b, max_dist=1.0)
        tp += t
        dist.append(np.hypot(a.y[pairs[:, 0]] - b.y[pairs[:, 1]], a.x[pairs[:, 0]] - b.x[pairs[:, 1]]))
    assert tp / n_om >= 0.99
    assert np.percentile(np.concatenate(dist), 95) < 0.5
