"""Pipeline frames/s: buffered end-to-end vs compute-only vs a plain sequential loop, side by side.

    python benchmarks/bench_pipeline.py [--device auto] [--batch-size 8] [--batches 20]
    python benchmarks/bench_pipeline.py --device cuda --dtype bf16 --preset peaknet-atto,peaknet-tiny \
        --detector single,epix10k2m --batch-size 8,32,64 --frames 256 --repeats 3

- compute-only: preprocess + network + mask on frames already on the device (no copies, no peaks).
- sequential:   Pipeline with num_buffers=1 (copy in, compute, extract, wait; then the next batch).
- buffered:     Pipeline with num_buffers=N (copy, compute and extraction of different batches overlap).
Frames are simulated still shots (float32; ``--detector`` picks the preset: one 512x512 panel by
default) so masks are realistic. Prints one JSON line per mode and one with the ratios, per
(detector, preset, batch size); medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from peaknet_pva.finder import build_model
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


def _csv(kind: type):
    def parse(text: str) -> list:
        return [kind(v) for v in str(text).split(",") if v.strip()]

    return parse


def run_config(
    preset: str, frames: np.ndarray, batch_size: int, n_batches: int, args: argparse.Namespace, device: torch.device
) -> list[dict]:
    """The three modes for one (preset, frame shape, batch size); JSON-ready rows."""
    model = build_model("random", preset).to(device)
    backend = PeakNetBackend(model, amp_dtype=resolve_amp_dtype(args.dtype, device))
    idx = np.arange(n_batches * batch_size) % frames.shape[0]
    batches = [frames[idx[i : i + batch_size]] for i in range(0, len(idx), batch_size)]

    results: dict[str, list[float]] = {"compute_only": [], "sequential": [], "buffered": []}
    pipes = {
        "sequential": Pipeline(backend, device=device, batch_size=batch_size, num_buffers=1),
        "buffered": Pipeline(backend, device=device, batch_size=batch_size, num_buffers=args.num_buffers),
    }
    for pipe in pipes.values():  # warm-up: allocation, cuDNN autotune
        run_pipeline(pipe, batches[:2])
    run_compute_only(backend, batches[:2], device)
    for _ in range(args.repeats):
        results["compute_only"].append(run_compute_only(backend, batches, device))
        for name, pipe in pipes.items():
            results[name].append(run_pipeline(pipe, batches))

    med = {k: statistics.median(v) for k, v in results.items()}
    common = {"device": str(device), "preset": preset, "batch_size": batch_size,
              "frame": list(frames.shape[1:]), "batches": n_batches, "repeats": args.repeats,
              "dtype": str(backend.amp_dtype).replace("torch.", "")}
    rows = [{"mode": k, "frames_per_s": round(v, 2), **common} for k, v in med.items()]
    rows.append({
        "ratio_buffered_vs_compute_only": round(med["buffered"] / med["compute_only"], 3),
        "ratio_buffered_vs_sequential": round(med["buffered"] / med["sequential"], 3),
        "num_buffers": args.num_buffers,
        **common,
    })
    del model, backend, pipes
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=_csv(int), default=[8], help="one or more, comma-separated")
    p.add_argument("--batches", type=int, default=20,
                   help="batches per timed run (with several batch sizes: at most this many, ~--frames frames)")
    p.add_argument("--frames", type=int, default=None, help="frames per timed run (sets the batches per size)")
    p.add_argument("--num-buffers", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--preset", type=_csv(str), default=["peaknet-atto"],
                   help="model preset(s), comma-separated (random weights)")
    p.add_argument("--detector", type=_csv(str), default=["single"],
                   help="simulated frames: single (1x512x512), epix10k2m (16x352x384), ... comma-separated")
    p.add_argument("--unique", type=int, default=16, help="distinct simulated frames per detector")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    for det in args.detector:
        ds = simulate_dataset(args.unique, detector=det, seed=0, progress=False)
        frames = np.asarray(ds.frames, dtype=np.float32)
        for preset in args.preset:
            for bs in args.batch_size:
                n_batches = args.batches if args.frames is None else max(3, min(args.batches, args.frames // bs))
                for row in run_config(preset, frames, bs, n_batches, args, device):
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
