"""Batched peak extraction (``peaknet_pva.peaks.find_peaks``) vs the seed's per-panel loop.

Same data for both (seeded random blobs), results checked equal before timing, then the median of
``--repeats`` timed runs after ``--warmup`` untimed ones. Prints one JSON line per case.

Cases: ``a`` = 64 panels of 512x512 with ~100 blobs each (64 one-panel frames); ``b`` = 8 events of
16x352x384 with ~50 blobs per panel. With CuPy and a CUDA device it also times the CuPy batched path
(CuPy input, and torch CUDA input via DLPack when torch has CUDA) against the seed's CuPy loop.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_peaks.py --repeats 5
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_peaks.py --centroid intensity

Each row also times what our weights run by default (``centroid="signal"``, ``split=True``) on the
same masks, as ``signal_split_over_batched``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _seed import (  # noqa: E402
    blob_masks,
    seed_find_peaks,
    seed_find_peaks_cupy,
    seed_find_peaks_intensity,
)

from peaknet_pva.frames import PeakTable  # noqa: E402
from peaknet_pva.peaks import _import_cupy, find_peaks  # noqa: E402

CASES: dict[str, dict[str, Any]] = {
    "a": dict(name="64x512x512", n_frames=64, n_panels=1, shape=(512, 512), n_blobs=100),
    "b": dict(name="8x16x352x384", n_frames=8, n_panels=16, shape=(352, 384), n_blobs=50),
}


def median_time(
    fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[], None] | None = None
) -> float:
    """Median wall time in seconds of ``fn()`` (``sync`` is called before the clock starts and stops)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_same(
    tables: list[PeakTable],
    ref: list[list[list[float]]],
    ref_int: list[list[float]] | None,
    tol: float = 1e-4,
) -> int:
    """Raise if the batched tables differ from the seed's lists; return the total peak count."""
    if len(tables) != len(ref):
        raise AssertionError(f"{len(tables)} frames vs seed {len(ref)}")
    total = 0
    for f, (t, r) in enumerate(zip(tables, ref)):
        r = np.asarray(r, np.float64).reshape(-1, 3)
        if t.n != len(r) or not np.array_equal(t.panel, r[:, 0]):
            raise AssertionError(f"frame {f}: {t.n} peaks vs seed {len(r)} (or panels differ)")
        err = max(np.abs(t.y - r[:, 1]).max(initial=0.0), np.abs(t.x - r[:, 2]).max(initial=0.0))
        if err > tol:
            raise AssertionError(f"frame {f}: centroid differs by {err:.2e} px")
        if ref_int is not None and not np.allclose(t.intensity, ref_int[f], rtol=1e-5):
            raise AssertionError(f"frame {f}: intensities differ")
        total += t.n
    return total


def run_case(key: str, centroid: str, repeats: int, warmup: int, seed: int) -> list[dict[str, Any]]:
    c = CASES[key]
    n = c["n_frames"] * c["n_panels"]
    masks, images = blob_masks(n, c["shape"], c["n_blobs"], seed=seed)
    p = c["n_panels"]
    common = dict(case=c["name"], centroid=centroid, n_panels_total=n, density=round(float(masks.mean()), 5))
    rows = []

    if centroid == "mask":
        def seed_fn() -> Any:
            return seed_find_peaks(masks, p)

        ref, ref_int = seed_fn(), None
    else:
        def seed_fn() -> Any:
            return seed_find_peaks_intensity(masks, images, p)

        ref, ref_int = seed_fn()

    def batched() -> list[PeakTable]:
        return find_peaks(masks, images, n_panels=p, centroid=centroid, backend="scipy")

    # What our weights run by default: signal-weighted centroids and splitting at maxima.
    weights = np.square(np.maximum(images.astype(np.float32) - np.median(images), 0.0))

    def signal_split() -> list[PeakTable]:
        return find_peaks(masks, images, n_panels=p, centroid="signal", weights=weights, split=True, backend="scipy")

    n_peaks = check_same(batched(), ref, ref_int)
    t_seed = median_time(seed_fn, repeats, warmup)
    t_new = median_time(batched, repeats, warmup)
    t_split = median_time(signal_split, repeats, warmup)
    rows.append(dict(common, backend="scipy", baseline="seed scipy loop", n_peaks=n_peaks,
                     seed_median_s=round(t_seed, 5), batched_median_s=round(t_new, 5),
                     speedup=round(t_seed / t_new, 1), repeats=repeats,
                     signal_split_median_s=round(t_split, 5), signal_split_over_batched=round(t_split / t_new, 2),
                     signal_split_n_peaks=sum(t.n for t in signal_split())))

    cp = _import_cupy()
    if cp is None:
        return rows
    sync = cp.cuda.Device().synchronize
    m_d, im_d = cp.asarray(masks), cp.asarray(images)

    def batched_cupy() -> list[PeakTable]:
        return find_peaks(m_d, im_d, n_panels=p, centroid=centroid, backend="cupy")

    check_same(batched_cupy(), ref, ref_int)
    t_gpu = median_time(batched_cupy, repeats, warmup, sync)
    w_d = cp.asarray(weights)
    t_gpu_split = median_time(lambda: find_peaks(m_d, im_d, n_panels=p, centroid="signal", weights=w_d, split=True,
                                                 backend="cupy"), repeats, warmup, sync)
    row = dict(common, backend="cupy", n_peaks=n_peaks, batched_median_s=round(t_gpu, 6), repeats=repeats,
               signal_split_median_s=round(t_gpu_split, 6), signal_split_over_batched=round(t_gpu_split / t_gpu, 2))
    if centroid == "mask":  # the seed's CuPy loop only had the mask centroid
        check_same([PeakTable(*_cols(r)) for r in seed_find_peaks_cupy(m_d, p)], ref, None)
        t_seed_gpu = median_time(lambda: seed_find_peaks_cupy(m_d, p), max(1, repeats // 2), 1, sync)
        row.update(baseline="seed cupy loop", seed_median_s=round(t_seed_gpu, 5),
                   speedup=round(t_seed_gpu / t_gpu, 1))
    rows.append(row)

    try:
        import torch
    except ImportError:
        return rows
    if torch.cuda.is_available():
        m_t = torch.from_numpy(masks).cuda().bool()
        im_t = torch.from_numpy(images).cuda()

        def batched_torch() -> list[PeakTable]:
            return find_peaks(m_t, im_t, n_panels=p, centroid=centroid)  # auto -> cupy via DLPack

        check_same(batched_torch(), ref, ref_int)
        t_torch = median_time(batched_torch, repeats, warmup, torch.cuda.synchronize)
        rows.append(dict(common, backend="auto(torch cuda->cupy)", n_peaks=n_peaks,
                         batched_median_s=round(t_torch, 6), repeats=repeats))
    return rows


def _cols(peaks: list[list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.asarray(peaks, np.float64).reshape(-1, 3)
    return a[:, 0], a[:, 1], a[:, 2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=[*CASES, "all"], default="all")
    ap.add_argument("--centroid", choices=["mask", "intensity"], default="mask")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    machine = dict(host=platform.node(), cpu_count=os.cpu_count(), omp=os.environ.get("OMP_NUM_THREADS"))
    for key in CASES if args.case == "all" else [args.case]:
        for row in run_case(key, args.centroid, args.repeats, args.warmup, args.seed):
            print(json.dumps(dict(row, **machine)), flush=True)


if __name__ == "__main__":
    main()
