"""peakfinder8 CPU time: ours (torch/NumPy, ``method="sparse"``) vs OM's C++ peakfinder8, side by side.

Same frames (``simulate_dataset(n, detector, seed)``, as stored: uint16 for ePix, float32 for the
others; OM gets them pre-converted to the contiguous float32 slab it takes, outside its timing),
same radius map (the preset's
``radius_map()``), same good-pixel mask and the preset's tuned thresholds for both. One thread
(``torch.set_num_threads(1)``; OM's C++ is single-threaded). Each timed run goes through every
frame, one frame per call, alternating OM and ours frame by frame so that load on a shared machine
hits both alike; the printed times are medians over ``--repeats`` runs (after one warm-up run,
which also builds our per-geometry tables) of the mean time per frame, and ``ratio`` = ours / OM.

Before timing it checks that the sparse path gives the peaks of the dense reference (the
every-pixel statistics of the original implementation, ``method="dense"``): equal counts and
positions within 1e-3 px. With ``--dense`` it also times the dense path (slow). With
``--baseline FILE`` it also times another version of ``peaknet_pva/peakfinder8.py`` (e.g. the last
commit's) in the same runs, interleaved frame by frame like OM, checks that it gives the same
peaks, and prints ``baseline_ms``, ``baseline_ratio`` (baseline / OM) and ``vs_baseline`` (ours /
baseline). Without ``ondamonitor`` (``pip install -e '.[bench]'``) the OM columns are null.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_peakfinder8.py --repeats 5
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_peakfinder8.py --layout epix10k2m --dense
    git show HEAD:peaknet_pva/peakfinder8.py > /tmp/pf8_head.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_peakfinder8.py --layout single --baseline /tmp/pf8_head.py
    python benchmarks/bench_peakfinder8.py --device cuda --repeats 10     # GPU path vs the CPU path

Prints one JSON line per layout, then one summary line (median ratio over the layouts).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _om import OmPeakfinder8, load_om, om_version  # noqa: E402

from peaknet_pva.evaluate import match_peaks  # noqa: E402
from peaknet_pva.frames import PeakTable  # noqa: E402
from peaknet_pva.peakfinder8 import Peakfinder8, tuned_params  # noqa: E402
from peaknet_pva.simulate import get_detector, simulate_dataset  # noqa: E402

LAYOUTS = {"single": 8, "epix10k2m": 4, "jungfrau4m": 3}  # preset -> frames (hits and misses)


def same_peaks(a: list[PeakTable], b: list[PeakTable], tol: float = 1e-3) -> float:
    """Raise unless the tables have equal counts and panels and positions within ``tol``; return
    the largest position difference."""
    worst = 0.0
    for f, (ta, tb) in enumerate(zip(a, b, strict=True)):
        if ta.n != tb.n or not np.array_equal(ta.panel, tb.panel):
            raise AssertionError(f"frame {f}: {ta.n} vs {tb.n} peaks (or panels differ)")
        if ta.n:
            worst = max(worst, float(np.abs(ta.y - tb.y).max()), float(np.abs(ta.x - tb.x).max()))
    if worst > tol:
        raise AssertionError(f"positions differ by {worst:.2e} px")
    return worst


def agreement(ours: list[PeakTable], om: list[PeakTable]) -> dict[str, Any]:
    """How many of OM's peaks ours finds (within 1 px) and how close, and the reverse."""
    tp = n_om = n_ours = 0
    dist: list[np.ndarray] = []
    for a, b in zip(ours, om):
        n_om += b.n
        n_ours += a.n
        t, _, _, pairs = match_peaks(a, b, max_dist=1.0)
        tp += t
        if t:
            dist.append(np.hypot(a.y[pairs[:, 0]] - b.y[pairs[:, 1]], a.x[pairs[:, 0]] - b.x[pairs[:, 1]]))
    d = np.concatenate(dist) if dist else np.zeros(0)
    return dict(
        om_peaks=n_om, our_peaks=n_ours, matched=tp,
        om_found_frac=round(tp / n_om, 4) if n_om else None,
        ours_in_om_frac=round(tp / n_ours, 4) if n_ours else None,
        dist_p95_px=round(float(np.percentile(d, 95)), 4) if d.size else None,
    )


def load_baseline(path: str) -> Any:
    """Another version of ``peaknet_pva/peakfinder8.py`` as a module (its relative imports resolve
    in ``peaknet_pva``)."""
    spec = importlib.util.spec_from_file_location("peaknet_pva._baseline_peakfinder8", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline: cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def run_layout(name: str, n_frames: int, repeats: int, seed: int, dense: bool, baseline: Any = None) -> dict[str, Any]:
    ds = simulate_dataset(n_frames, detector=name, seed=seed, progress=False)
    frames = ds.frames
    radius = get_detector(name).radius_map()
    good = ~ds.bad_pixel_mask
    prm = tuned_params(name)
    ours = Peakfinder8(prm, radius=radius, mask=good, method="sparse")
    ref = Peakfinder8(prm, radius=radius, mask=good, method="dense")
    om = OmPeakfinder8(prm, radius, good) if load_om() is not None else None
    base = None
    if baseline is not None:
        base = baseline.Peakfinder8(baseline.tuned_params(name), radius=radius, mask=good, method="sparse")

    ours_tables = [ours.find_peaks(f[None])[0] for f in frames]  # also builds the tables
    ref_tables = ref.find_peaks(frames)
    worst = same_peaks(ours_tables, ref_tables)
    row: dict[str, Any] = dict(
        layout=name, frame=list(frames.shape[1:]), dtype=str(frames.dtype), frames=n_frames,
        peaks=sum(t.n for t in ours_tables), same_as_dense=True, max_pos_diff_px=worst,
    )
    if om is not None:
        om_tables = om.find_peaks(frames)
        row.update(agreement(ours_tables, om_tables))
    if base is not None:
        row["baseline_max_pos_diff_px"] = same_peaks(ours_tables, [base.find_peaks(f[None])[0] for f in frames])

    t_ours: list[float] = []
    t_om: list[float] = []
    t_base: list[float] = []
    slabs = [om.slab(f) for f in frames] if om is not None else []  # OM times its C++ call alone
    for run in range(repeats + 1):  # run 0 is the warm-up
        s_ours = s_om = s_base = 0.0
        for i, f in enumerate(frames):
            if om is not None:
                t0 = time.perf_counter()
                om.raw(slabs[i])
                s_om += time.perf_counter() - t0
            if base is not None:
                t0 = time.perf_counter()
                base.find_peaks(f[None])
                s_base += time.perf_counter() - t0
            t0 = time.perf_counter()
            ours.find_peaks(f[None])
            s_ours += time.perf_counter() - t0
        if run:
            t_ours.append(s_ours / n_frames)
            t_om.append(s_om / n_frames)
            t_base.append(s_base / n_frames)
    row["ours_ms"] = round(1e3 * statistics.median(t_ours), 2)
    if om is not None:
        row["om_ms"] = round(1e3 * statistics.median(t_om), 2)
        row["ratio"] = round(statistics.median(t_ours) / statistics.median(t_om), 3)
        # per-run ratios: how stable the ratio is under the machine's load
        rr = [a / b for a, b in zip(t_ours, t_om)]
        row["ratio_min_max"] = [round(min(rr), 3), round(max(rr), 3)]
    else:
        row["om_ms"] = row["ratio"] = None
    if base is not None:
        row["baseline_ms"] = round(1e3 * statistics.median(t_base), 2)
        row["baseline_ratio"] = None
        if om is not None:
            row["baseline_ratio"] = round(statistics.median(t_base) / statistics.median(t_om), 3)
        row["vs_baseline"] = round(statistics.median(t_ours) / statistics.median(t_base), 3)
    if dense:
        td = []
        for _ in range(max(1, repeats // 2)):
            t0 = time.perf_counter()
            for f in frames:
                ref.find_peaks(f[None])
            td.append((time.perf_counter() - t0) / n_frames)
        row["dense_ms"] = round(1e3 * statistics.median(td), 2)
        row["speedup_vs_dense"] = round(statistics.median(td) / statistics.median(t_ours), 2)
    row["repeats"] = repeats
    return row


def run_layout_cuda(name: str, n_frames: int, repeats: int, seed: int, device: str) -> dict[str, Any]:
    """GPU peakfinder8 (the dense path on CUDA tensors): ms per frame one frame per call and as one
    batch, and whether its peaks are the CPU path's (equal counts, positions within 1e-3 px)."""
    ds = simulate_dataset(n_frames, detector=name, seed=seed, progress=False)
    frames = ds.frames
    radius = get_detector(name).radius_map()
    good = ~ds.bad_pixel_mask
    prm = tuned_params(name)
    cpu = Peakfinder8(prm, radius=radius, mask=good)
    gpu = Peakfinder8(prm, radius=radius, mask=good, device=device)
    ref = [cpu.find_peaks(f[None])[0] for f in frames]
    dev_frames = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).to(device)
    got = gpu.find_peaks(dev_frames)  # warm-up too
    row: dict[str, Any] = dict(layout=name, frame=list(frames.shape[1:]), device=str(dev_frames.device),
                               frames=n_frames, peaks=sum(t.n for t in ref), gpu_name=torch.cuda.get_device_name())
    try:
        row["max_pos_diff_px"] = same_peaks(got, ref)
        row["same_as_cpu"] = True
    except AssertionError as exc:
        row["same_as_cpu"] = False
        row["difference"] = str(exc)

    def timed(fn) -> float:
        ts = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    row["gpu_batch_ms_per_frame"] = round(1e3 * timed(lambda: gpu.find_peaks(dev_frames)) / n_frames, 3)
    row["gpu_single_ms"] = round(1e3 * timed(lambda: [gpu.find_peaks(dev_frames[i : i + 1]) for i in range(n_frames)]) / n_frames, 3)
    t_cpu = []
    for _ in range(max(1, repeats // 2)):
        t0 = time.perf_counter()
        for f in frames:
            cpu.find_peaks(f[None])
        t_cpu.append((time.perf_counter() - t0) / n_frames)
    row["cpu_sparse_ms"] = round(1e3 * statistics.median(t_cpu), 2)
    row["speedup_gpu_batch_vs_cpu"] = round(row["cpu_sparse_ms"] / row["gpu_batch_ms_per_frame"], 1)
    row["repeats"] = repeats
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", choices=[*LAYOUTS, "all"], default="all")
    ap.add_argument("--frames", type=int, default=None, help="frames per layout (default: per preset)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--dense", action="store_true", help="also time the dense reference path")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu (vs OM), or cuda[:N]: the GPU path vs the CPU path")
    ap.add_argument("--baseline", default=None, metavar="FILE",
                    help="another peakfinder8.py (git show HEAD:peaknet_pva/peakfinder8.py) timed in the same runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        for name in LAYOUTS if args.layout == "all" else [args.layout]:
            row = run_layout_cuda(name, args.frames or LAYOUTS[name], args.repeats, args.seed, args.device)
            print(json.dumps(dict(row, torch=torch.__version__)), flush=True)
        return 0
    machine = dict(host=platform.node(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                   torch=torch.__version__, numpy=np.__version__, ondamonitor=om_version())
    ratios = []
    baseline = load_baseline(args.baseline) if args.baseline else None
    for name in LAYOUTS if args.layout == "all" else [args.layout]:
        row = run_layout(name, args.frames or LAYOUTS[name], args.repeats, args.seed, args.dense, baseline)
        if row["ratio"] is not None:
            ratios.append(row["ratio"])
        print(json.dumps(dict(row, **machine)), flush=True)
    print(json.dumps(dict(summary=True, median_ratio=round(statistics.median(ratios), 3) if ratios else None,
                          ratios=ratios, load_avg=[round(v, 2) for v in os.getloadavg()])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
