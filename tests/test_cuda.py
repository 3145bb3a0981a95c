"""CUDA paths against their CPU references: peakfinder8, PeakFinder (PeakNet) and the N-way pipeline.

Skipped without a CUDA device (CI has none); ``benchmarks/device_check.sh`` runs them (``-m gpu``)
on the first lent GPU. Tolerances: peakfinder8's float32 radial sums are reduced in another order
on the GPU, so a pixel exactly at a threshold could flip (equal counts are still required here);
PeakNet's convolutions use TF32/bf16 on the GPU, so masks may differ at a few borderline pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peaknet_pva.evaluate import match_peaks
from peaknet_pva.finder import PeakFinder, build_model
from peaknet_pva.peakfinder8 import Peakfinder8, tuned_params
from peaknet_pva.pipeline import PeakNetBackend, Pipeline
from peaknet_pva.simulate import DETECTORS, simulate_dataset

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)


def _agreement(a: list, b: list, max_dist: float = 0.5) -> tuple[int, int, int]:
    """(matched, peaks in a, peaks in b) over frames."""
    tp = na = nb = 0
    for ta, tb in zip(a, b):
        t, _, _, _ = match_peaks(ta, tb, max_dist=max_dist)
        tp, na, nb = tp + t, na + ta.n, nb + tb.n
    return tp, na, nb


@pytest.mark.parametrize("name,n", [("single", 3), ("epix10k2m", 2), ("jungfrau4m", 1)])
def test_peakfinder8_cuda_equals_cpu_on_presets(name, n):
    ds = simulate_dataset(n, detector=name, seed=7, progress=False)
    radius, good = DETECTORS[name].radius_map(), ~ds.bad_pixel_mask
    cpu = Peakfinder8(tuned_params(name), radius=radius, mask=good).find_peaks(ds.frames)
    gpu = Peakfinder8(tuned_params(name), radius=radius, mask=good, device="cuda")
    got = gpu.find_peaks(torch.from_numpy(np.ascontiguousarray(ds.frames, dtype=np.float32)).cuda())
    assert sum(t.n for t in cpu) > 0
    for a, b in zip(got, cpu):
        assert a.n == b.n
        assert np.array_equal(a.panel, b.panel)
        if a.n:
            assert np.abs(a.y - b.y).max() <= 1e-3 and np.abs(a.x - b.x).max() <= 1e-3
    # numpy input with device="cuda" runs on the GPU too
    again = gpu.find_peaks(ds.frames)
    assert [t.n for t in again] == [t.n for t in got]


@pytest.mark.parametrize("dtype,min_match", [("fp32", 0.98), ("bf16", 0.95)])
def test_peakfinder_cuda_matches_cpu(dtype, min_match):
    frames = np.asarray(simulate_dataset(3, detector="single", seed=3, progress=False).frames)[:, :, :256, :256]
    ref = PeakFinder(weights="default", device="cpu", batch_size=3).find(frames)
    got = PeakFinder(weights="default", device="cuda", batch_size=3, dtype=dtype).find(frames)
    tp, n_got, n_ref = _agreement(got, ref)
    assert n_ref > 0
    assert tp >= min_match * n_ref and tp >= min_match * n_got, (tp, n_got, n_ref)


@pytest.mark.parametrize("batch_size", [8, 32])
def test_cuda_pipeline_buffered_equals_sequential_peaknet(batch_size):
    ds = simulate_dataset(8, detector="single", seed=1, progress=False)
    frames = np.asarray(ds.frames, dtype=np.float32)[:, :, :256, :256]
    frames = frames[np.arange(3 * batch_size) % len(frames)]
    backend = PeakNetBackend(build_model("random", "peaknet-atto").to("cuda"), amp_dtype=torch.bfloat16)
    outs = []
    for n_buf in (1, 3):
        pipe = Pipeline(backend, device="cuda", batch_size=batch_size, num_buffers=n_buf)
        res = []
        for k, start in enumerate(range(0, len(frames), batch_size)):
            res.extend(pipe.submit(frames[start : start + batch_size], tag=k))
        res.extend(pipe.drain())
        assert [r.tag for r in res] == list(range(3))
        outs.append([t for r in res for t in r.peaks])
    assert len(outs[0]) == len(outs[1]) == len(frames)
    for a, b in zip(*outs):
        assert a.n == b.n and np.array_equal(a.y, b.y) and np.array_equal(a.x, b.x)


@pytest.mark.parametrize("norm", ["instance", "robust", "local"])
def test_preprocess_cuda_equals_cpu(norm):
    """The normalisations (medians, block statistics, interpolation) give the CPU's values on the GPU."""
    from peaknet_pva.preprocess import preprocess

    rng = np.random.default_rng(3)
    frames = (rng.poisson(30.0, (2, 3, 100, 150)) * 7 + 100).astype(np.uint16)
    frames[0, 1, 10:40, 20:60] = 0  # a dead region under the pedestal
    mask = np.zeros((3, 100, 150), bool)
    mask[2, :, :30] = True
    ref, _ = preprocess(torch.from_numpy(frames), norm=norm, mask=torch.from_numpy(mask))
    got, _ = preprocess(torch.from_numpy(frames).cuda(), norm=norm, mask=torch.from_numpy(mask).cuda())
    torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=1e-4)
