#!/usr/bin/env python
"""Frames on disk (or simulated) -> PeakNet peaks -> CXI files for CrystFEL. No PVA involved.

    .venv/bin/python examples/files_to_cxi.py                                  # 8 simulated frames
    .venv/bin/python examples/files_to_cxi.py --detector epix10k2m --n-frames 4
    .venv/bin/python examples/files_to_cxi.py frames.npy --panel-shape 352 384 --photon-energy-ev 9500

``frames.npy`` holds ``(F, P*H, W)`` slabs or ``(F, P, H, W)`` stacks (``peaknet-pva simulate``
writes such a file). Output: ``<out>/<prefix>-c1-<chunk>.cxi`` plus ``<out>/<prefix>.geom``, and a
JSON summary on stdout. With ``--weights default`` and no shipped weights in this install, the
script falls back to random weights and says so: the peaks are then meaningless (plumbing only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from peaknet_pva.cxi import CxiWriter, summarize_cxi
from peaknet_pva.finder import PeakFinder, default_weights_path
from peaknet_pva.frames import as_panel_stack
from peaknet_pva.geometry import DetectorGeometry, write_geometry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("frames", nargs="?", help=".npy of (F, P*H, W) or (F, P, H, W); omit to simulate")
    p.add_argument("--detector", default="single", help="simulator preset: single | epix10k2m | jungfrau4m")
    p.add_argument("--n-frames", type=int, default=8, help="frames to simulate (default 8)")
    p.add_argument("--panel-shape", type=int, nargs=2, metavar=("H", "W"), help="split .npy slabs into panels")
    p.add_argument("--photon-energy-ev", type=float, default=9500.0, help="for .npy input (eV, default 9500)")
    p.add_argument("--weights", default="default", help="default | random | a checkpoint path")
    p.add_argument("--model", default=None, help="preset name or YAML config (e.g. peaknet-673m)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda:N")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--min-peaks", type=int, default=0, help="write only frames with at least this many peaks")
    p.add_argument("--frames-per-file", type=int, default=100)
    p.add_argument("--out", default="out/files_to_cxi")
    p.add_argument("--prefix", default="example")
    args = p.parse_args(argv)

    # 1. Frames, as (F, P, H, W), with one photon energy (eV) per frame.
    truths = None
    if args.frames:
        frames = as_panel_stack(np.load(args.frames), tuple(args.panel_shape) if args.panel_shape else None)
        energies = np.full(frames.shape[0], args.photon_energy_ev)
    else:
        from peaknet_pva.simulate import simulate_dataset

        ds = simulate_dataset(args.n_frames, detector=args.detector, seed=0, progress=False)
        frames, energies, truths = ds.frames, ds.photon_energy_ev, ds.truths
    n_frames, n_panels, height, width = frames.shape
    print(f"frames: {n_frames} x {n_panels} panel(s) of {height}x{width} {frames.dtype}", file=sys.stderr)

    # 2. The finder. "default" needs the shipped weights; fall back to random (plumbing only).
    weights = args.weights
    if weights == "default" and not default_weights_path().exists():
        print(f"note: {default_weights_path()} is not in this install; using weights='random' "
              "(peaks are meaningless)", file=sys.stderr)
        weights = "random"
    finder = PeakFinder(
        weights,
        model=args.model,
        device=args.device,
        panel_shape=(height, width),
        batch_size=args.batch_size,
    )

    # 3. Peaks for every frame (PeakFinder batches and drains the pipeline itself).
    t0 = time.perf_counter()
    tables = finder.find(frames)
    elapsed = time.perf_counter() - t0

    # 4. Hits -> CXI chunks (.cxi.inprogress -> fsync -> rename), plus a matching geometry file.
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    geom_path = write_geometry(out / f"{args.prefix}.geom", DetectorGeometry.stacked(n_panels, (height, width)))
    with CxiWriter(out, file_prefix=args.prefix, consumer_id=1, frames_per_file=args.frames_per_file) as writer:
        for i, table in enumerate(tables):
            if table.n >= args.min_peaks:
                writer.add(frames[i], table, photon_energy_ev=float(energies[i]),
                           unique_id=i + 1, timestamp_ns=time.time_ns())

    # 5. Summary.
    summary = {
        "weights": weights,
        "device": str(finder.device),
        "frames": int(n_frames),
        "seconds": round(elapsed, 3),
        "peaks_total": int(sum(t.n for t in tables)),
        "peaks_per_frame_max": int(max(t.n for t in tables)),
        "frames_written": writer.n_frames_written,
        "files": [str(f) for f in writer.files],
        "geometry": str(geom_path),
    }
    if truths is not None:
        from peaknet_pva.evaluate import evaluate

        summary["vs_truth"] = evaluate(tables, truths).as_dict()
    if writer.files:
        summary["cxi"] = {k: v for k, v in summarize_cxi(writer.files, min_peaks=max(args.min_peaks, 1)).items()
                          if k in ("n_files", "n_frames", "n_peaks_total", "photon_energy_ev_range", "centroids")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
