"""CuPy backend == SciPy backend (and the seed's CuPy loop). Skipped without CuPy or a CUDA device."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from peaknet_pva.frames import PeakTable
from peaknet_pva.peaks import find_peaks

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy")
try:
    _n_devices = cp.cuda.runtime.getDeviceCount()
except Exception:  # CUDA driver/runtime missing or broken
    _n_devices = 0
if _n_devices < 1:
    pytest.skip("no CUDA device visible to CuPy", allow_module_level=True)

_BENCH = str(Path(__file__).resolve().parents[1] / "benchmarks")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)
from _seed import blob_masks, seed_find_peaks_cupy  # noqa: E402


def assert_same(got: list[PeakTable], ref: list[PeakTable], tol: float = 1e-4) -> None:
    assert len(got) == len(ref)
    for f, (a, b) in enumerate(zip(got, ref)):
        assert a.n == b.n, f"frame {f}: {a.n} vs {b.n} peaks"
        np.testing.assert_array_equal(a.panel, b.panel)
        np.testing.assert_allclose(a.y, b.y, atol=tol, rtol=0)
        np.testing.assert_allclose(a.x, b.x, atol=tol, rtol=0)
        np.testing.assert_array_equal(a.npix, b.npix)
        np.testing.assert_allclose(a.intensity, b.intensity, rtol=1e-5)
        assert a.n_overflow == b.n_overflow and a.centroid == b.centroid


def padded_blobs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(12, 64, 96) masks holding (12, 50, 70) valid panels, with extra blobs in the padding."""
    masks, images = blob_masks(12, (50, 70), 30, seed=seed)
    m = np.zeros((12, 64, 96), np.uint8)
    m[:, :50, :70] = masks
    m[:, 55:58, 10:12] = 1  # padding only: dropped
    m[:, 49:52, 30] = 1  # straddles: kept
    return m, images


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("centroid", ["mask", "intensity", "signal"])
def test_cupy_equals_scipy_on_random_blobs(seed: int, centroid: str) -> None:
    masks, images = padded_blobs(seed)
    wt = None
    if centroid == "signal":  # e.g. squared signal above the median, negatives clipped by find_peaks
        wt = (images.astype(np.float32) - np.median(images)) * np.abs(images - np.median(images))
    ref = find_peaks(masks, images, n_panels=4, centroid=centroid, max_peaks=100, backend="scipy", weights=wt)
    got = find_peaks(cp.asarray(masks), cp.asarray(images), n_panels=4, centroid=centroid, max_peaks=100,
                     weights=None if wt is None else cp.asarray(wt))
    assert_same(got, ref)
    # host inputs with backend="cupy" are copied over and give the same answer
    assert_same(find_peaks(masks, images, n_panels=4, centroid=centroid, max_peaks=100, backend="cupy", weights=wt), ref)


def test_cupy_equals_seed_cupy_loop() -> None:
    masks, _ = blob_masks(8, (64, 64), 20, seed=5)
    got = find_peaks(cp.asarray(masks), n_panels=4, backend="cupy")
    for t, r in zip(got, seed_find_peaks_cupy(cp.asarray(masks), 4)):
        r = np.asarray(r, np.float64).reshape(-1, 3)
        assert t.n == len(r)
        np.testing.assert_array_equal(t.panel, r[:, 0])
        np.testing.assert_allclose(t.y, r[:, 1], atol=1e-4, rtol=0)
        np.testing.assert_allclose(t.x, r[:, 2], atol=1e-4, rtol=0)


def test_empty_batch_on_device() -> None:
    got = find_peaks(cp.zeros((6, 32, 32), cp.uint8), n_panels=3, backend="cupy")
    assert len(got) == 2 and all(t.n == 0 for t in got)


def test_torch_cuda_tensors_via_dlpack() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    masks, images = padded_blobs(3)
    ref = find_peaks(masks, images, n_panels=4, centroid="intensity", backend="scipy")
    m = torch.from_numpy(masks).cuda()
    im = torch.from_numpy(images).cuda()
    for mm in (m.bool()[:, None], m.long()):  # argmax(keepdim=True) layout and int64 masks
        assert_same(find_peaks(mm, im, n_panels=4, centroid="intensity"), ref)  # auto -> cupy


def test_torch_side_stream_is_respected() -> None:
    """Masks written on a non-default torch stream are labelled after that work, without a sync."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    masks, images = blob_masks(16, (256, 256), 60, seed=8)
    ref = find_peaks(masks, images, n_panels=4, backend="scipy")
    img = torch.from_numpy(images).cuda()
    thr = torch.from_numpy(masks).cuda().bool()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(20):  # queue enough work that a racing reader would see a half-written mask
            out = torch.zeros_like(thr)
            out = out | thr
        got = find_peaks(out, img, n_panels=4)
    assert_same(got, ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_cupy_split_equals_scipy(seed: int) -> None:
    """``split=True`` (maxima, ring test, window sums) gives the host's peaks on the device."""
    masks, images = padded_blobs(seed)
    rng = np.random.default_rng(seed)
    wt = (rng.random(images.shape) * 40.0).astype(np.float32)  # many maxima: lots of splitting
    ref = find_peaks(masks, images, n_panels=4, centroid="signal", weights=wt, split=True, backend="scipy")
    assert sum(t.n for t in ref) > sum(t.n for t in find_peaks(masks, images, n_panels=4, centroid="signal", weights=wt))
    got = find_peaks(cp.asarray(masks), cp.asarray(images), n_panels=4, centroid="signal",
                     weights=cp.asarray(wt), split=True)
    assert_same(got, ref)
