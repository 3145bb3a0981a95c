"""End-to-end PeakFinder frames/s on the CPU: the input normalisation and post-processing variants
side by side (same weights, same frames, repeats alternated so machine load hits all alike).

Variants (``--variants``, comma list of ``norm/centroid/split``):

- ``robust/mask/off``: the 2026-12-04 (first session) defaults: panel-wide robust norm, mask
  centroids, one peak per component;
- ``local/signal/on``: per-block (local) robust norm, signal-weighted centroids, touching spots
  split at their maxima;
- anything else of the same form (``robust/signal/on``, ...).

Forcing a norm the weights were not trained with gives wrong peaks but a fair time: this measures
cost, not accuracy (docs/ACCURACY.md has that). Prints one JSON line per shape with the median
seconds per frame of each variant and each one's ratio to the first.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_finder_cpu.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from peaknet_pva import PeakFinder
from peaknet_pva.simulate import simulate_dataset

SHAPES = {"single": 4, "epix10k2m": 1}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="robust/mask/off,local/signal/on")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default="default")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for detector, n_frames in SHAPES.items():
        ds = simulate_dataset(n_frames, detector=detector, seed=5, progress=False)
        frames = np.asarray(ds.frames)
        finders = {}
        for v in variants:
            norm, centroid, split = v.split("/")
            finders[v] = PeakFinder(weights=args.weights, device="cpu", batch_size=n_frames, norm=norm,
                                    centroid=centroid, split=split == "on", panel_shape=ds.panel_shape)
            finders[v].find(frames)  # warm-up
        times: dict[str, list[float]] = {v: [] for v in variants}
        peaks: dict[str, int] = {}
        for _ in range(args.repeats):
            for v, f in finders.items():
                t0 = time.perf_counter()
                tables = f.find(frames)
                times[v].append((time.perf_counter() - t0) / n_frames)
                peaks[v] = sum(t.n for t in tables)
        med = {v: statistics.median(t) for v, t in times.items()}
        first = variants[0]
        print(json.dumps({
            "detector": detector, "frame_shape": list(frames.shape[1:]), "threads": args.threads,
            "repeats": args.repeats,
            "median_s_per_frame": {v: round(m, 4) for v, m in med.items()},
            "ratio_to_" + first: {v: round(m / med[first], 3) for v, m in med.items()},
            "peaks": peaks,
        }))


if __name__ == "__main__":
    main()
