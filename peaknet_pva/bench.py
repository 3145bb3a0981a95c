"""``peaknet-pva bench``: frames/s of PeakFinder on simulated frames on this machine (no PVA).

A quick check of what a consumer can sustain; the side-by-side benchmarks live in ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from .finder import PeakFinder
from .simulate import simulate_dataset


def bench_main(args: argparse.Namespace) -> int:
    ds = simulate_dataset(args.n_frames, detector=args.detector, seed=0, progress=False)
    finder = PeakFinder(weights=args.weights, device=args.device, backend=args.backend, batch_size=args.batch_size)
    finder.warmup(tuple(ds.frames.shape[1:]), ds.frames.dtype)
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        tables = finder.find(ds.frames)
        rates.append(len(tables) / (time.perf_counter() - t0))
    print(json.dumps({
        "detector": args.detector, "frame": list(ds.frames.shape[1:]), "backend": args.backend,
        "device": str(finder.device), "batch_size": args.batch_size, "frames": args.n_frames,
        "frames_per_s_median": round(statistics.median(rates), 3),
        "peaks_per_frame": round(sum(t.n for t in tables) / len(tables), 1),
    }))
    return 0
