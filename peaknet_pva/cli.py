"""``peaknet-pva``: the library's stages from the shell, on files, with no PVA unless asked.

Each subcommand is a thin adapter: it parses arguments and calls one library function. Imports are
lazy so ``--help`` is instant and a missing optional part only fails the command that needs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("peaknet_pva")


def _panel_shape(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    parts = text.lower().replace("x", ",").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"panel shape must be H,W (e.g. 352,384), got {text!r}")
    return int(parts[0]), int(parts[1])


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import save_dataset, simulate_dataset

    ds = simulate_dataset(args.n_frames, detector=args.detector, seed=args.seed, progress=True)
    out = save_dataset(ds, args.out)
    print(f"wrote {args.n_frames} {args.detector} frames to {out}")
    return 0


def _cmd_replay(args: argparse.Namespace, rest: list[str]) -> int:
    from .pva.replay import replay_main

    return int(replay_main(rest) or 0)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(
        Path(args.out),
        duration_s=args.duration,
        fps=args.fps,
        n_consumers=args.consumers,
        detector=args.detector,
        weights=args.weights,
    )
    print(summary.as_text())
    return 0 if summary.ok else 1


def _cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from .train import train_main

    return int(train_main(rest) or 0)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if getattr(args, "matrix", False):
        from .robustness import matrix_main

        return int(matrix_main(args) or 0)
    from .evaluate import evaluate_main

    if args.backends is None:
        args.backends = "peaknet,peaknet:intensity,peakfinder8"
    return int(evaluate_main(args) or 0)


def _cmd_infer(args: argparse.Namespace) -> int:
    import numpy as np

    from .cxi import CxiWriter
    from .finder import PeakFinder
    from .frames import as_panel_stack

    frames = np.load(args.frames, mmap_mode="r")
    finder = PeakFinder(
        weights=args.weights,
        model=args.model,
        backend=args.backend,
        device=args.device,
        panel_shape=args.panel_shape,
        batch_size=args.batch_size,
        centroid=args.centroid,
    )
    n_hits = 0
    with CxiWriter(args.out, file_prefix=args.prefix, frames_per_file=args.frames_per_file) as writer:
        bs = args.batch_size
        for start in range(0, frames.shape[0], bs):
            chunk = as_panel_stack(np.asarray(frames[start : start + bs]), args.panel_shape)
            for i, table in enumerate(finder.find(chunk)):
                if table.n >= args.min_peaks:
                    n_hits += 1
                    writer.add(
                        chunk[i],
                        table,
                        photon_energy_ev=args.photon_energy_ev,
                        unique_id=start + i + 1,
                        timestamp_ns=0,
                    )
    print(json.dumps({"frames": int(frames.shape[0]), "hits": n_hits, "files": [str(p) for p in writer.files]}))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .cxi import summarize_cxi

    summary = summarize_cxi([Path(p) for p in args.files], min_peaks=args.min_peaks)
    if args.png:
        from .cxi import read_cxi
        from .plotting import plot_frame_peaks

        contents = read_cxi(Path(args.files[0]))
        frame_index = min(args.frame, len(contents.peaks) - 1)
        frame = contents.frame(frame_index)
        plot_frame_peaks(frame, contents.peaks[frame_index], path=Path(args.png),
                         title=f"{args.files[0]} frame {frame_index}")
        summary["png"] = args.png
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_geometry(args: argparse.Namespace) -> int:
    from .geometry import DetectorGeometry, write_geometry

    geom = DetectorGeometry.stacked(args.n_panels, args.panel_shape, clen_m=args.clen_m)
    write_geometry(Path(args.out), geom)
    print(f"wrote {args.out}: {args.n_panels} panels of {args.panel_shape}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_main

    return int(bench_main(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peaknet-pva", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="simulated still shots with exact ground truth (.npy + truth.h5)")
    s.add_argument("--detector", default="single", help="single | epix10k2m | jungfrau4m")
    s.add_argument("--n-frames", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="out/sim", help="output directory")
    s.set_defaults(func=_cmd_simulate)

    s = sub.add_parser("replay", help="stream frames as NtNdArray over PVA (loopback); see 'replay --help'",
                       add_help=False)
    s.set_defaults(func=_cmd_replay, passthrough=True)

    s = sub.add_parser("demo", help="the whole system on loopback for ~30 s, then a summary")
    s.add_argument("--out", default="out/demo")
    s.add_argument("--duration", type=float, default=30.0, help="seconds of streaming")
    s.add_argument("--fps", type=float, default=4.0, help="source frame rate (Hz)")
    s.add_argument("--consumers", type=int, default=2, help="consumers per set (-nc)")
    s.add_argument("--detector", default="single")
    s.add_argument("--weights", default="default")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("train", help="train PeakNet on simulated frames; see 'train --help'", add_help=False)
    s.set_defaults(func=_cmd_train, passthrough=True)

    s = sub.add_parser("evaluate", help="precision/recall/F1/RMSE of each backend on simulated frames")
    s.add_argument("--data", help="a simulated dataset directory (else one is simulated)")
    s.add_argument("--detector", default="single")
    s.add_argument("--n-frames", type=int, default=20)
    s.add_argument("--seed", type=int, default=1000)
    s.add_argument("--backends", default=None,
                   help="comma list: peaknet (mask centroid), peaknet:intensity, peakfinder8 "
                        "(default: all three; with --matrix: peaknet,peakfinder8)")
    s.add_argument("--weights", default="default")
    s.add_argument("--device", default="auto")
    s.add_argument("--png", help="write an overlay PNG of one frame here")
    s.add_argument("--json", help="write the metrics as JSON here")
    m = s.add_argument_group("robustness matrix (--matrix; frames from peaknet_pva.robustness, not the simulator)")
    m.add_argument("--matrix", action="store_true",
                   help="score the backends on every cell of the robustness matrix; write DIR/matrix.{json,md,png}")
    m.add_argument("--out", default="out/matrix", metavar="DIR", help="--matrix output directory")
    m.add_argument("--frames-per-cell", type=int, default=None, help="--matrix frames per cell (default 4; quick 1)")
    m.add_argument("--quick", action="store_true", help="--matrix: a 12-cell subset, 1 frame each")
    m.add_argument("--tune-seed", type=int, default=None,
                   help="--matrix: seed of the peakfinder8 tuning frames (default seed+7919; never the eval seed)")
    m.add_argument("--threads", type=int, default=None, help="--matrix: torch CPU threads (default: torch's)")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("infer", help="find peaks in a .npy stack of frames and write CXI files")
    s.add_argument("frames", help=".npy of (F, P*H, W) slabs or (F, P, H, W)")
    s.add_argument("--out", default="out/cxi")
    s.add_argument("--prefix", default="peaknet")
    s.add_argument("--weights", default="default")
    s.add_argument("--model", default=None)
    s.add_argument("--backend", default="peaknet")
    s.add_argument("--device", default="auto")
    s.add_argument("--panel-shape", type=_panel_shape, default=None, help="H,W of one panel")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--centroid", default="mask")
    s.add_argument("--min-peaks", type=int, default=10)
    s.add_argument("--frames-per-file", type=int, default=100)
    s.add_argument("--photon-energy-ev", type=float, default=9500.0)
    s.set_defaults(func=_cmd_infer)

    s = sub.add_parser("inspect", help="summary of CXI files: frames, peaks, hit rate, photon energy")
    s.add_argument("files", nargs="+")
    s.add_argument("--min-peaks", type=int, default=10)
    s.add_argument("--png", help="write a PNG of one frame with its peaks")
    s.add_argument("--frame", type=int, default=0)
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("geometry", help="write a CrystFEL .geom for a stacked panel layout")
    s.add_argument("--n-panels", type=int, required=True)
    s.add_argument("--panel-shape", type=_panel_shape, required=True, help="H,W")
    s.add_argument("--clen-m", type=float, default=0.1)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_geometry)

    s = sub.add_parser("bench", help="frames/s of PeakFinder on this machine (no PVA)")
    s.add_argument("--detector", default="single")
    s.add_argument("--n-frames", type=int, default=32)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--weights", default="default")
    s.add_argument("--device", default="auto")
    s.add_argument("--backend", default="peaknet")
    s.set_defaults(func=_cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # replay and train own their argument parsers: hand them everything after the subcommand.
    if argv and argv[0] in ("replay", "train"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        func = _cmd_replay if argv[0] == "replay" else _cmd_train
        return func(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
