"""PeakNet on the CPU: what channels-last, torch.compile, bf16 autocast and frozen-graph fusions give.

Same preprocessed input for every variant, the shipped preset with the default weights (random if
not shipped), ``torch.set_num_threads(--threads)`` (1 by default). Variants:

- ``fp32``: eager, inference mode (today's CPU path);
- ``channels_last``: model and input in channels-last memory format;
- ``compile``: ``torch.compile`` (inductor, CPU), contiguous; ``compile_cl``: the same, channels-last;
- ``bf16``: eager under CPU bf16 autocast;
- ``jit_freeze``: ``torch.jit.trace`` + ``torch.jit.freeze`` + ``optimize_for_inference`` (folds
  and fuses convolutions for oneDNN).

For each: median ms per forward over ``--repeats`` after warm-up (compile time reported apart),
the ratio to ``fp32``, and how its masks (``logit1 > logit0``) and peaks compare with ``fp32``'s:
pixels that differ, peak counts, and whether the peaks are identical (same count and centroids
within 1e-4 px). Timings alternate variants repeat by repeat, so machine load hits all alike.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_peaknet_cpu.py --repeats 5
    .venv/bin/python benchmarks/bench_peaknet_cpu.py --shape 512 --variants fp32,channels_last
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peaknet_pva.finder import DEFAULT_PRESET, build_model, default_weights_path  # noqa: E402
from peaknet_pva.peaks import find_peaks  # noqa: E402
from peaknet_pva.preprocess import preprocess  # noqa: E402
from peaknet_pva.simulate import simulate_dataset  # noqa: E402

SHAPES = {"512": ("single", (1, 512, 512)), "epix": ("epix10k2m", (16, 352, 384))}
VARIANTS = ("fp32", "channels_last", "compile", "compile_cl", "bf16", "jit_freeze")


def make_variant(name: str, model: torch.nn.Module, x: torch.Tensor) -> tuple[Any, torch.Tensor, float]:
    """(callable, its input, seconds spent building/compiling incl. the first call)."""
    t0 = time.perf_counter()
    cl = name in ("channels_last", "compile_cl")
    m = model.to(memory_format=torch.channels_last) if cl else model.to(memory_format=torch.contiguous_format)
    xin = x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()
    ctx: Any = contextlib.nullcontext
    if name in ("compile", "compile_cl"):
        fn = torch.compile(m)
    elif name == "jit_freeze":
        with torch.no_grad():
            traced = torch.jit.trace(m, xin, check_trace=False)
            fn = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    else:
        fn = m
    if name == "bf16":
        def ctx() -> Any:
            return torch.autocast("cpu", dtype=torch.bfloat16)

    def run() -> torch.Tensor:
        with torch.inference_mode(), ctx():
            return fn(xin).float()

    run()  # first call: compile / trace warm-up
    return run, xin, time.perf_counter() - t0


def masks_of(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, 1] > logits[:, 0]).to(torch.uint8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default=None, help="default (if shipped) or random")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = args.weights or ("default" if default_weights_path().exists() else "random")
    variants = [v for v in args.variants.split(",") if v]
    for key in SHAPES if args.shape == "all" else [args.shape]:
        det, shape = SHAPES[key]
        ds = simulate_dataset(1, detector=det, seed=args.seed, progress=False)
        frames = torch.from_numpy(np.ascontiguousarray(ds.frames, dtype=np.float32))
        model = build_model(weights, None if weights != "random" else DEFAULT_PRESET)
        norm = getattr(getattr(model, "config", None), "norm", "instance")
        x, (h, w) = preprocess(frames, norm=norm)
        built: dict[str, Any] = {}
        for v in variants:
            try:
                built[v] = make_variant(v, model, x)
            except Exception as exc:  # e.g. no C++ compiler for inductor
                print(json.dumps({"shape": list(shape), "variant": v, "error": f"{type(exc).__name__}: {exc}"[:300]}))
        times: dict[str, list[float]] = {v: [] for v in built}
        for _ in range(args.repeats):
            for v, (run, _, _) in built.items():
                t0 = time.perf_counter()
                run()
                times[v].append(time.perf_counter() - t0)
        ref_logits = built["fp32"][0]() if "fp32" in built else None
        ref_mask = None if ref_logits is None else masks_of(ref_logits)
        p = shape[0]

        def peaks(mask: torch.Tensor) -> list:
            return find_peaks(mask, frames.reshape(p, *shape[1:]), n_panels=p, valid_shape=(h, w))

        ref_peaks = None if ref_mask is None else peaks(ref_mask)
        base = statistics.median(times["fp32"]) if "fp32" in times else None
        for v, (run, _, build_s) in built.items():
            med = statistics.median(times[v])
            row: dict[str, Any] = {
                "shape": list(shape), "variant": v, "weights": weights, "threads": torch.get_num_threads(),
                "ms": round(1e3 * med, 1), "ratio_vs_fp32": round(med / base, 3) if base else None,
                "build_s": round(build_s, 1), "repeats": args.repeats,
            }
            if ref_mask is not None:
                mk = masks_of(run())
                got = peaks(mk)
                n_ref = sum(t.n for t in ref_peaks)
                n_got = sum(t.n for t in got)
                same = n_ref == n_got and all(
                    a.n == b.n and np.allclose(a.y, b.y, atol=1e-4) and np.allclose(a.x, b.x, atol=1e-4)
                    for a, b in zip(got, ref_peaks)
                )
                row.update(mask_pixels_differ=int((mk != ref_mask).sum()), peaks=n_got, peaks_fp32=n_ref,
                           identical_peaks=bool(same))
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
