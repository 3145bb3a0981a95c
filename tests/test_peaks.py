"""peaks.find_peaks (SciPy backend) against the seed's per-panel loop and hand computations."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from peaknet_pva import peaks as peaks_mod
from peaknet_pva.errors import ConfigError, FrameError
from peaknet_pva.frames import PeakTable
from peaknet_pva.peaks import find_peaks

_BENCH = str(Path(__file__).resolve().parents[1] / "benchmarks")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)
from _seed import blob_masks, seed_find_peaks  # noqa: E402


def assert_same_as_seed(tables: list[PeakTable], ref: list[list[list[float]]], tol: float = 1e-4) -> None:
    assert len(tables) == len(ref)
    for f, (t, r) in enumerate(zip(tables, ref)):
        r = np.asarray(r, np.float64).reshape(-1, 3)
        assert t.n == len(r), f"frame {f}: {t.n} peaks, seed {len(r)}"
        np.testing.assert_array_equal(t.panel, r[:, 0].astype(np.uint16), err_msg=f"frame {f} panels")
        np.testing.assert_allclose(t.y, r[:, 1], atol=tol, rtol=0, err_msg=f"frame {f} y")
        np.testing.assert_allclose(t.x, r[:, 2], atol=tol, rtol=0, err_msg=f"frame {f} x")


def reference_intensity(masks: np.ndarray, images: np.ndarray, n_panels: int) -> list[tuple[np.ndarray, ...]]:
    """Per frame (sum, y, x) of the intensity-weighted centroid, computed panel by panel with scipy."""
    out = []
    for f in range(len(masks) // n_panels):
        sums, ys, xs = [], [], []
        for p in range(n_panels):
            k = f * n_panels + p
            lab, n = ndimage.label(masks[k], np.ones((3, 3)))
            idx = np.arange(1, n + 1)
            img = images[k].astype(np.float64)
            sums.append(ndimage.sum_labels(img, lab, idx))
            com = np.asarray(ndimage.center_of_mass(img, lab, idx)).reshape(-1, 2)
            ys.append(com[:, 0])
            xs.append(com[:, 1])
        out.append(tuple(np.concatenate(v) for v in (sums, ys, xs)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_seed_on_random_blobs(seed: int) -> None:
    masks, images = blob_masks(12, (48, 80), 25, seed=seed)
    ref = seed_find_peaks(masks, 4)
    tables = find_peaks(masks, images, n_panels=4)
    assert_same_as_seed(tables, ref)
    assert all(t.centroid == "mask" for t in tables)
    # images given: intensity and npix match a panel-by-panel scipy reference
    for t, (sums, _, _) in zip(tables, reference_intensity(masks, images, 4)):
        np.testing.assert_allclose(t.intensity, sums, rtol=1e-6)
        assert t.npix.sum() == 0 or t.npix.min() >= 1
    assert sum(int(t.npix.sum()) for t in tables) == int(masks.sum())


@pytest.mark.parametrize("seed", [4, 5])
def test_intensity_centroid_matches_scipy_center_of_mass(seed: int) -> None:
    masks, images = blob_masks(6, (40, 56), 20, seed=seed)
    tables = find_peaks(masks, images, n_panels=3, centroid="intensity")
    for t, (sums, ys, xs) in zip(tables, reference_intensity(masks, images, 3)):
        assert t.centroid == "intensity"
        np.testing.assert_allclose(t.intensity, sums, rtol=1e-6)
        np.testing.assert_allclose(t.y, ys, atol=1e-4, rtol=0)
        np.testing.assert_allclose(t.x, xs, atol=1e-4, rtol=0)


def test_one_label_call_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = peaks_mod.ndimage.label

    def counting_label(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(peaks_mod.ndimage, "label", counting_label)
    masks, _ = blob_masks(16, (32, 32), 5, seed=7)
    find_peaks(masks, n_panels=4)
    assert calls == [(16, 32, 32)]


def test_blobs_touching_every_edge() -> None:
    h, w = 20, 24
    m = np.zeros((2, h, w), np.uint8)
    for k in range(2):
        m[k, 0, 10:13] = 1  # top edge
        m[k, h - 1, 5:8] = 1  # bottom edge
        m[k, 8:11, 0] = 1  # left edge
        m[k, 12:14, w - 1] = 1  # right edge
        m[k, 0:2, 0:2] = 1  # corners
        m[k, 0:2, w - 2 :] = 1
        m[k, h - 2 :, 0:2] = 1
        m[k, h - 1, w - 1] = 1
    tables = find_peaks(m, n_panels=2)
    assert len(tables) == 1 and tables[0].n == 16
    assert_same_as_seed(tables, seed_find_peaks(m, 2))
    t = tables[0]
    assert t.y.min() == 0.0 and t.x.min() == 0.0
    assert t.y.max() == h - 1 and t.x.max() == w - 1


def test_empty_panels_and_frames() -> None:
    masks, images = blob_masks(9, (32, 40), 8, seed=11)
    masks[1] = 0  # empty panel in frame 0
    masks[3:6] = 0  # frame 1 entirely empty
    masks[8] = 0  # last panel empty
    tables = find_peaks(masks, images, n_panels=3)
    assert_same_as_seed(tables, seed_find_peaks(masks, 3))
    assert tables[1].n == 0 and tables[1].n_overflow == 0
    assert 1 not in tables[0].panel and 2 not in tables[2].panel

    empty = find_peaks(np.zeros((6, 32, 32), bool), n_panels=2, centroid="intensity")
    assert len(empty) == 3 and all(t.n == 0 and t.n_overflow == 0 for t in empty)
    assert find_peaks(np.zeros((0, 32, 32), bool), n_panels=2) == []


def test_max_peaks_keeps_strongest_in_order() -> None:
    m = np.zeros((2, 16, 16), np.uint8)
    img = np.ones((2, 16, 16), np.float32)
    spots = [(1, 1, 5.0), (1, 5, 50.0), (1, 9, 1.0), (5, 1, 40.0), (5, 5, 2.0), (9, 9, 30.0)]
    for y, x, v in spots:
        m[0, y, x] = 1
        img[0, y, x] = v
    m[1, 3, 3] = 1  # frame 1: one peak, under the cap
    t0, t1 = find_peaks(m, img, n_panels=1, max_peaks=3)
    assert t0.n == 3 and t0.n_overflow == 3
    np.testing.assert_array_equal(t0.intensity, [50.0, 40.0, 30.0])  # strongest, raster order kept
    np.testing.assert_array_equal(np.stack([t0.y, t0.x], 1), [[1, 5], [5, 1], [9, 9]])
    assert t1.n == 1 and t1.n_overflow == 0

    # without images intensity = npix: the biggest blobs survive
    m2 = np.zeros((1, 16, 16), np.uint8)
    m2[0, 0, 0] = 1
    m2[0, 4:7, 4:7] = 1
    m2[0, 10:12, 10:12] = 1
    (t,) = find_peaks(m2, n_panels=1, max_peaks=2)
    np.testing.assert_array_equal(t.npix, [9, 4])
    assert t.n_overflow == 1
    (t,) = find_peaks(m2, n_panels=1, max_peaks=0)
    assert t.n == 0 and t.n_overflow == 3


def test_panels_never_merge() -> None:
    m = np.zeros((4, 8, 8), np.uint8)
    m[0, 7, 2:5] = 1  # bottom row of panel 0 ...
    m[1, 0, 2:5] = 1  # ... touches the top row of panel 1 in the stacked array
    m[1, 7, 7] = 1  # last pixel of the last panel of frame 0 ...
    m[2, 0, 0] = 1  # ... next to the first pixel of frame 1
    m[3, :, :] = 1  # a full panel next to a non-empty one
    t0, t1 = find_peaks(m, n_panels=2)
    assert t0.n == 3 and t1.n == 2
    np.testing.assert_array_equal(t0.panel, [0, 1, 1])
    np.testing.assert_array_equal(t1.panel, [0, 1])
    np.testing.assert_array_equal(t0.y, [7, 0, 7])
    np.testing.assert_array_equal(t1.npix, [1, 64])
    assert_same_as_seed([t0, t1], seed_find_peaks(m, 2))


def test_padding_components_dropped_and_straddling_kept() -> None:
    hp, wp, h, w = 40, 48, 33, 35
    m = np.zeros((2, hp, wp), np.uint8)
    m[0, 35:38, 5:8] = 1  # only in the bottom padding: dropped
    m[0, 10:12, 40:44] = 1  # only in the right padding: dropped
    m[0, 36:38, 40:42] = 1  # in the corner padding: dropped
    m[0, 31:35, 20:22] = 1  # straddles the bottom edge (rows 31, 32 valid): kept whole
    m[1, 3:5, 33:37] = 1  # straddles the right edge (cols 33, 34 valid): kept whole
    m[1, 20, 20] = 1  # ordinary
    img = np.zeros((2, h, w), np.float32)
    img[0, 31:33, 20:22] = [[1.0, 2.0], [3.0, 4.0]]
    img[1, 3:5, 33:35] = 10.0
    img[1, 20, 20] = 7.0

    t0, t1 = find_peaks(m, img, n_panels=1, centroid="mask")
    assert t0.n == 1 and t1.n == 2
    assert t0.npix[0] == 8 and t0.intensity[0] == pytest.approx(10.0)
    assert (t0.y[0], t0.x[0]) == (32.5, 20.5)  # mask centroid over all 8 pixels
    np.testing.assert_array_equal(t1.npix, [8, 1])
    np.testing.assert_allclose(t1.intensity, [40.0, 7.0])

    (c0, c1) = find_peaks(m, img, n_panels=1, centroid="intensity")
    # weights only from valid pixels: rows 31, 32 with (1+2) and (3+4)
    assert c0.y[0] == pytest.approx((31 * 3 + 32 * 7) / 10)
    assert c0.x[0] == pytest.approx((20 * 4 + 21 * 6) / 10)
    assert (c1.y[0], c1.x[0]) == pytest.approx((3.5, 33.5))

    # no images: valid_shape given explicitly, intensity = npix
    t0, t1 = find_peaks(m, n_panels=1, valid_shape=(h, w))
    assert t0.n == 1 and t1.n == 2 and t0.intensity[0] == 8
    # no images, no valid_shape: nothing is padding
    t0, _ = find_peaks(m, n_panels=1)
    assert t0.n == 4


def test_intensity_hand_example() -> None:
    m = np.zeros((1, 4, 5), np.uint8)
    m[0, 1, 1:4] = 1  # pixels (1,1) (1,2) (1,3) ...
    m[0, 2, 3] = 1  # ... and (2,3): one component
    m[0, 3, 0] = 1  # a second component whose weight sum is <= 0
    img = np.zeros((1, 4, 5), np.int32)
    img[0, 1, 1:4] = [1, 2, 3]
    img[0, 2, 3] = 4
    img[0, 3, 0] = -5
    (t,) = find_peaks(m, img, n_panels=1, centroid="intensity")
    assert t.centroid == "intensity"
    np.testing.assert_allclose(t.intensity, [10.0, -5.0])
    np.testing.assert_array_equal(t.npix, [4, 1])
    # y = (1*1 + 1*2 + 1*3 + 2*4) / 10, x = (1*1 + 2*2 + 3*3 + 3*4) / 10
    assert t.y[0] == pytest.approx(1.4) and t.x[0] == pytest.approx(2.6)
    assert (t.y[1], t.x[1]) == (3.0, 0.0)  # fallback to the mask centroid

    (t,) = find_peaks(m, img, n_panels=1, centroid="mask")
    assert t.y[0] == pytest.approx(1.25) and t.x[0] == pytest.approx(2.25)

    (t,) = find_peaks(m, None, n_panels=1, centroid="intensity")  # no images: mask centroid
    assert t.centroid == "mask" and t.y[0] == pytest.approx(1.25)
    np.testing.assert_array_equal(t.intensity, [4.0, 1.0])


def test_signal_hand_example() -> None:
    """``signal`` weighs by ``weights`` (negatives count 0) while ``intensity`` stays the raw sum."""
    m = np.zeros((1, 4, 5), np.uint8)
    m[0, 1, 1:4] = 1
    m[0, 2, 3] = 1
    m[0, 3, 0] = 1  # weights all <= 0: mask centroid
    img = np.full((1, 4, 5), 1000, np.int32)  # a pedestal: raw intensity would be ~ the mask centroid
    wt = np.zeros((1, 4, 5), np.float32)
    wt[0, 1, 1:4] = [0.0, 1.0, -2.0]
    wt[0, 2, 3] = 3.0
    wt[0, 3, 0] = -1.0
    (t,) = find_peaks(m, img, n_panels=1, centroid="signal", weights=wt)
    assert t.centroid == "signal"
    np.testing.assert_allclose(t.intensity, [4000.0, 1000.0])
    # y = (1*1 + 2*3) / 4, x = (2*1 + 3*3) / 4
    assert t.y[0] == pytest.approx(1.75) and t.x[0] == pytest.approx(2.75)
    assert (t.y[1], t.x[1]) == (3.0, 0.0)
    import torch

    got = find_peaks(torch.from_numpy(m), torch.from_numpy(img), n_panels=1, centroid="signal",
                     weights=torch.from_numpy(wt))
    assert got[0].y[0] == t.y[0] and got[0].x[0] == t.x[0]
    with pytest.raises(ConfigError, match="needs weights"):
        find_peaks(m, img, n_panels=1, centroid="signal")
    with pytest.raises(ConfigError, match="only used by"):
        find_peaks(m, img, n_panels=1, centroid="intensity", weights=wt)
    with pytest.raises(ConfigError, match="split needs weights"):
        find_peaks(m, img, n_panels=1, centroid="mask", split=True)
    with pytest.raises(FrameError, match="do not match"):
        find_peaks(m, img, n_panels=1, centroid="signal", weights=wt[:, :3])


def test_torch_cpu_tensors() -> None:
    torch = pytest.importorskip("torch")
    masks, images = blob_masks(8, (32, 64), 10, seed=3)
    ref = find_peaks(masks, images, n_panels=4, centroid="intensity")
    as_bool = torch.from_numpy(masks).bool()[:, None]  # (B*P, 1, H, W), like argmax(keepdim=True)
    as_long = torch.from_numpy(masks).long()
    for m in (as_bool, as_long):
        got = find_peaks(m, torch.from_numpy(images), n_panels=4, centroid="intensity")
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a.panel, b.panel)
            np.testing.assert_array_equal(a.y, b.y)
            np.testing.assert_array_equal(a.intensity, b.intensity)


def test_input_variants() -> None:
    masks, images = blob_masks(6, (32, 40), 8, seed=9)
    img16 = images.astype(np.uint16)
    ref = find_peaks(masks, img16, n_panels=3)
    # (B, P, H, W) images, masks with a non-1 foreground value, explicit backend
    got = find_peaks(masks * 3, img16.reshape(2, 3, 32, 40), n_panels=3, backend="scipy")
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.intensity, b.intensity)
        assert a.intensity.sum() > 0


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(centroid="brightest"), ConfigError),
        (dict(backend="opencl"), ConfigError),
        (dict(max_peaks=-1), ConfigError),
        (dict(n_panels=0), ConfigError),
        (dict(n_panels=5), FrameError),  # 6 panels is not a whole number of 5-panel frames
        (dict(valid_shape=(40, 10)), FrameError),  # larger than the masks
        (dict(valid_shape=(0, 10)), FrameError),
    ],
)
def test_bad_arguments(kwargs: dict, exc: type) -> None:
    masks = np.zeros((6, 32, 32), np.uint8)
    args = dict(n_panels=3) | kwargs
    with pytest.raises(exc):
        find_peaks(masks, **args)


def test_bad_shapes() -> None:
    with pytest.raises(FrameError, match="masks must be"):
        find_peaks(np.zeros((32, 32), np.uint8), n_panels=1)
    with pytest.raises(FrameError, match="bool or integer"):
        find_peaks(np.zeros((2, 32, 32), np.float32), n_panels=1)
    with pytest.raises(FrameError, match="images must be"):
        find_peaks(np.zeros((2, 32, 32), np.uint8), np.zeros((3, 32, 32)), n_panels=1)
    with pytest.raises(FrameError, match="do not cover"):
        find_peaks(np.zeros((2, 32, 32), np.uint8), np.zeros((2, 20, 20)), n_panels=1, valid_shape=(30, 30))


def test_cupy_backend_without_cupy_is_a_config_error() -> None:
    if peaks_mod._import_cupy() is not None:
        pytest.skip("CuPy and a CUDA device are present")
    with pytest.raises(ConfigError, match="CuPy"):
        find_peaks(np.zeros((1, 32, 32), np.uint8), n_panels=1, backend="cupy")
    # auto on host data never needs CuPy
    assert find_peaks(np.ones((1, 32, 32), np.uint8), n_panels=1, backend="auto")[0].n == 1


def _gauss(h: int, w: int, spots: list[tuple[float, float, float, float, float]]) -> np.ndarray:
    """Sum of Gaussians (y, x, amplitude, sigma_y, sigma_x) on an (h, w) grid."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w))
    for y, x, a, sy, sx in spots:
        out += a * np.exp(-0.5 * (((yy - y) / sy) ** 2 + ((xx - x) / sx) ** 2))
    return out


def test_split_separates_touching_spots_and_keeps_streaks_faint_spots_and_order_whole() -> None:
    """One merged component of two bright spots 6 px apart -> two peaks at the spots; a long
    streak, a faint double bump and a lone spot stay one peak each; peaks keep label order."""
    h, w = 40, 120
    z = _gauss(h, w, [(10.0, 10.0, 8.0, 1.2, 1.2),  # lone spot, first in raster order
                      (20.3, 40.2, 60.0, 0.9, 0.9), (21.0, 46.4, 25.0, 0.9, 0.9),  # touching pair
                      (20.0, 80.0, 40.0, 1.0, 8.0),  # a streak along x
                      (30.0, 100.0, 2.5, 0.9, 0.9), (30.0, 105.0, 2.5, 0.9, 0.9)])  # faint pair
    mask = (z > 1.0).astype(np.uint8)
    mask[19:23, 40:47] = 1  # the pair is one component (as a bloated segmentation gives it)
    mask[29:32, 100:106] = 1
    img = (z + 100.0).astype(np.float32)[None]  # raw values carry a pedestal
    wt = (z * z).astype(np.float32)[None]
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    assert n == 4
    (whole,) = find_peaks(mask[None], img, n_panels=1, centroid="signal", weights=wt)
    assert whole.n == 4
    (t,) = find_peaks(mask[None], img, n_panels=1, centroid="signal", weights=wt, split=True)
    assert t.n == 5
    got = sorted(zip(np.round(t.y, 1), np.round(t.x, 1)))
    assert (10.0, 10.0) in got and (20.0, 80.0) in got
    assert any(abs(y - 20.3) < 0.15 and abs(x - 40.2) < 0.15 for y, x in got)
    assert any(abs(y - 21.0) < 0.15 and abs(x - 46.4) < 0.15 for y, x in got)
    assert any(abs(y - 30.0) < 0.2 and abs(x - 102.5) < 0.3 for y, x in got)  # faint pair: whole
    # Order: the lone spot, the pair's two maxima (raster order), the streak, the faint pair.
    np.testing.assert_allclose(t.x[:3], [10.0, 40.2, 46.4], atol=0.15)
    # The pair's rows: intensity is the raw sum over its pixels within 2 px, pixels counted.
    y0, x0 = 20, 40
    win = (lab == lab[y0, x0])[y0 - 2 : y0 + 3, x0 - 2 : x0 + 3]
    assert t.npix[1] == int(win.sum())
    assert t.intensity[1] == pytest.approx(float(img[0, y0 - 2 : y0 + 3, x0 - 2 : x0 + 3][win].sum()), rel=1e-6)
    # Components but not one maximum strong enough anywhere: exactly the unsplit peaks.
    (weak,) = find_peaks(mask[None], img, n_panels=1, centroid="signal", weights=wt * 1e-3, split=True)
    assert weak.n == 4 and np.array_equal(weak.y, whole.y) and np.array_equal(weak.x, whole.x)
    # split without weights is refused; a batch of empty panels is fine.
    empty = find_peaks(np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 8), np.float32), n_panels=1,
                       centroid="signal", weights=np.zeros((2, 8, 8), np.float32), split=True)
    assert [e.n for e in empty] == [0, 0]
