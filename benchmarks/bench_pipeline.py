"""Pipeline frames/s: buffered end-to-end vs compute-only vs a plain sequential loop, side by side.

    python benchmarks/bench_pipeline.py [--device auto] [--batch-size 8] [--batches 20]

- compute-only: preprocess + network + mask on frames already on the device (no copies, no peaks).
- sequential:   Pipeline with num_buffers=1 (copy in, compute, extract, wait; then the next batch).
- buffered:     Pipeline with num_buffers=N (copy, compute and extraction of different batches overlap).
Frames are simulated still shots (uint16-like float32, one 512x512 panel) so masks are realistic.
Prints one JSON line per mode and one with the ratios; medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from peaknet_pva.finder import DEFAULT_PRESET, build_model, default_weights_path
from peaknet_pva.pipeline import PeakNetBackend, Pipeline, resolve_amp_dtype, resolve_device
from peaknet_pva.simulate import simulate_dataset


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pipeline(pipe: Pipeline, batches: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    n = 0
    for b in batches:
        n += sum(len(r.peaks) for r in pipe.submit(b))
    n += sum(len(r.peaks) for r in pipe.drain())
    dt = time.perf_counter() - t0
    assert n == sum(len(b) for b in batches)
    return n / dt


def run_compute_only(backend: PeakNetBackend, batches: list[np.ndarray], device: torch.device) -> float:
    dev = [torch.from_numpy(b).to(device) for b in batches]
    _sync(device)
    t0 = time.perf_counter()
    for d in dev:
        backend.compute(d)
    _sync(device)
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--num-buffers", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--preset", default="peaknet-atto", help="model preset (random weights)")
    args = p.parse_args()

    device = resolve_device(args.device)
    model = build_model("random", args.preset).to(device)
    backend = PeakNetBackend(model, amp_dtype=resolve_amp_dtype(args.dtype, device))
    n_unique = min(args.batches * args.batch_size, 32)
    ds = simulate_dataset(n_unique, detector="single", seed=0, progress=False)
    frames = np.asarray(ds.frames, dtype=np.float32)
    idx = np.arange(args.batches * args.batch_size) % n_unique
    batches = [frames[idx[i : i + args.batch_size]] for i in range(0, len(idx), args.batch_size)]

    results: dict[str, list[float]] = {"compute_only": [], "sequential": [], "buffered": []}
    pipes = {
        "sequential": Pipeline(backend, device=device, batch_size=args.batch_size, num_buffers=1),
        "buffered": Pipeline(backend, device=device, batch_size=args.batch_size, num_buffers=args.num_buffers),
    }
    for pipe in pipes.values():  # warm-up: allocation, cuDNN autotune
        run_pipeline(pipe, batches[:2])
    run_compute_only(backend, batches[:2], device)
    for _ in range(args.repeats):
        results["compute_only"].append(run_compute_only(backend, batches, device))
        for name, pipe in pipes.items():
            results[name].append(run_pipeline(pipe, batches))

    med = {k: statistics.median(v) for k, v in results.items()}
    common = {"device": str(device), "preset": args.preset, "batch_size": args.batch_size,
              "frame": [1, 512, 512], "batches": args.batches, "repeats": args.repeats}
    for k, v in med.items():
        print(json.dumps({"mode": k, "frames_per_s": round(v, 2), **common}))
    print(json.dumps({
        "ratio_buffered_vs_compute_only": round(med["buffered"] / med["compute_only"], 3),
        "ratio_buffered_vs_sequential": round(med["buffered"] / med["sequential"], 3),
        "num_buffers": args.num_buffers,
        **common,
    }))


if __name__ == "__main__":
    main()
