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

#: Exit status of a user error (bad argument, missing file, invalid config): argparse's.
USAGE_ERROR = 2


class UsageError(Exception):
    """A user error the CLI reports as one line (exit 2); the message names the argument."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a user error is one line on stderr (no usage block), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _panel_shape(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    parts = text.lower().replace("x", ",").split(",")
    try:
        h, w = (int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"panel shape must be H,W (e.g. 352,384), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"panel shape must be H,W with H, W > 0, got {text!r}")
    return h, w


def _existing(path: str | None, arg: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise UsageError(f"argument {arg}: no such file or directory: {path}")
    return p


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import DETECTORS, save_dataset, simulate_dataset

    if args.detector not in DETECTORS:
        raise UsageError(f"argument --detector: unknown detector {args.detector!r} (known: {', '.join(sorted(DETECTORS))})")
    if args.n_frames < 1:
        raise UsageError(f"argument --n-frames: must be >= 1, got {args.n_frames}")

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
        monitor_port=None if args.no_monitor else args.monitor_port,
        linger_s=args.linger,
        channel_prefix=args.prefix,
    )
    print(summary.as_text())
    return 0 if summary.ok else 1


def _cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    if "-h" in rest or "--help" in rest:  # without importing torch
        from .train_params import build_parser

        build_parser().parse_args(rest)
    from .train import train_main

    return int(train_main(rest) or 0)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    _existing(args.data, "--data")
    if not getattr(args, "matrix", False):
        from .simulate import DETECTORS

        if not args.data and args.detector not in DETECTORS:
            raise UsageError(
                f"argument --detector: unknown detector {args.detector!r} (known: {', '.join(sorted(DETECTORS))})"
            )
    if getattr(args, "matrix", False):
        from .robustness import matrix_main

        return int(matrix_main(args) or 0)
    from .evaluate import evaluate_main

    if args.backends is None:
        args.backends = "peaknet,peaknet:mask,peakfinder8"
    return int(evaluate_main(args) or 0)


def _load_infer_input(path: Path, data_path: str) -> tuple[object, object]:
    """``(frames, per-frame photon energies in eV or None)`` from a .npy, a ``simulate`` output
    directory (frames.npy + truth.h5) or an HDF5/CXI file (``data_path``; energies from
    /LCLS/photon_energy_eV, /entry_1/instrument_1/source_1/energy (J) or the data's
    ``photon_energy_eV`` attribute)."""
    import numpy as np

    if path.is_dir():
        npy = path / "frames.npy"
        if not npy.exists():
            raise UsageError(f"argument frames: directory {path} has no frames.npy (a 'simulate' output)")
        energy = None
        if (path / "truth.h5").exists():
            import h5py

            with h5py.File(path / "truth.h5", "r") as fh:
                if "photon_energy_ev" in fh:
                    energy = np.asarray(fh["photon_energy_ev"][()], np.float64).reshape(-1)
        return np.load(npy, mmap_mode="r"), energy
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r"), None
        except ValueError as exc:
            raise UsageError(f"argument frames: cannot read {path}: {exc}") from None
    if path.suffix in (".h5", ".hdf5", ".cxi", ".nxs"):
        import h5py

        from .cxi import EV_TO_J

        fh = h5py.File(path, "r")
        if data_path not in fh:
            fh.close()
            raise UsageError(f"argument --data-path: {path} has no dataset {data_path}")
        dset = fh[data_path]
        energy = None
        if "LCLS/photon_energy_eV" in fh:
            energy = np.asarray(fh["LCLS/photon_energy_eV"][()], np.float64).reshape(-1)
        elif "entry_1/instrument_1/source_1/energy" in fh:
            energy = np.asarray(fh["entry_1/instrument_1/source_1/energy"][()], np.float64).reshape(-1) / EV_TO_J
        elif "photon_energy_eV" in dset.attrs:
            energy = np.asarray(dset.attrs["photon_energy_eV"], np.float64).reshape(-1)
        return dset, energy
    raise UsageError(f"argument frames: expected a .npy, an HDF5/CXI file or a 'simulate' directory, got {path}")


def _cmd_infer(args: argparse.Namespace) -> int:
    import numpy as np

    src = _existing(args.frames, "frames")
    _existing(args.geometry, "--geometry")
    if args.mask is not None and ":" not in Path(args.mask).name:
        _existing(args.mask, "--mask")
    if args.photon_energy_ev is not None and not args.photon_energy_ev > 0:
        raise UsageError(f"argument --photon-energy-ev: must be > 0 eV, got {args.photon_energy_ev}")
    if args.batch_size < 1:
        raise UsageError(f"argument --batch-size: must be >= 1, got {args.batch_size}")
    assert src is not None
    frames, energies = _load_infer_input(src, args.data_path)
    shape = tuple(int(v) for v in frames.shape)
    if len(shape) == 2:
        frames = np.asarray(frames)[None]
        shape = (1,) + shape
    if len(shape) not in (3, 4) or shape[0] == 0:
        raise UsageError(f"argument frames: expected (F, P*H, W) slabs or (F, P, H, W), got shape {shape}")
    n_frames = shape[0]

    from .geometry import DetectorGeometry, read_geometry

    geometry = read_geometry(args.geometry) if args.geometry else None
    if args.photon_energy_ev is not None:
        energies = np.full(n_frames, float(args.photon_energy_ev))
    elif energies is None and geometry is not None and isinstance(geometry.photon_energy, float):
        energies = np.full(n_frames, geometry.photon_energy)
    if energies is None:
        raise UsageError(
            "argument --photon-energy-ev: required (the input carries no photon energy: no "
            "/LCLS/photon_energy_eV, truth.h5 or numeric photon_energy in --geometry)"
        )
    energies = np.asarray(energies, np.float64).reshape(-1)
    if energies.shape[0] == 1:
        energies = np.full(n_frames, energies[0])
    if energies.shape[0] != n_frames or not np.all(np.isfinite(energies) & (energies > 0)):
        raise UsageError(f"argument frames: {energies.shape[0]} photon energies for {n_frames} frames, or not > 0 eV")
    if len(shape) == 3 and args.panel_shape is None and geometry is None and shape[1] >= 2 * shape[2]:
        log.warning(
            "frames are %d x %d slabs (tall): without --panel-shape H,W (or --geometry) each is ONE panel; "
            "a multi-panel detector needs its panel shape", shape[1], shape[2],
        )

    from tqdm.auto import tqdm

    from .cxi import CxiWriter
    from .finder import PeakFinder
    from .frames import as_panel_stack

    finder = PeakFinder(
        weights=args.weights,
        model=args.model,
        backend=args.backend,
        device=args.device,
        panel_shape=args.panel_shape,
        batch_size=args.batch_size,
        centroid=args.centroid,
        geometry=args.geometry,
        mask=args.mask,
        mask_convention=args.mask_convention,
        mask_dataset=args.mask_dataset,
    )
    n_hits = 0
    first = as_panel_stack(np.asarray(frames[:1]), finder.panel_shape)
    n_panels, h, w = (int(v) for v in first.shape[1:])
    if geometry is None:
        geometry = DetectorGeometry.stacked(n_panels, (h, w))
    out_dir = Path(args.out)
    with CxiWriter(out_dir, file_prefix=args.prefix, frames_per_file=args.frames_per_file, geometry=geometry) as writer:
        bs = args.batch_size
        with tqdm(total=n_frames, desc="infer", unit="frame", disable=args.no_progress) as bar:
            for start in range(0, n_frames, bs):
                chunk = as_panel_stack(np.asarray(frames[start : start + bs]), finder.panel_shape)
                for i, table in enumerate(finder.find(chunk)):
                    if table.n >= args.min_peaks:
                        n_hits += 1
                        writer.add(
                            chunk[i],
                            table,
                            photon_energy_ev=float(energies[start + i]),
                            unique_id=start + i + 1,
                            timestamp_ns=0,
                        )
                bar.update(chunk.shape[0])
    # the .geom indexamajig needs next to the files: same panels, our CXI data/peak locations
    from .geometry import for_cxi

    geom_out = for_cxi(geometry, base_dir=Path(args.geometry).parent if args.geometry else None)
    from .geometry import write_geometry

    out_dir.mkdir(parents=True, exist_ok=True)
    geom_path = write_geometry(out_dir / f"{args.prefix}.geom", geom_out)
    print(json.dumps({"frames": n_frames, "hits": n_hits, "files": [str(p) for p in writer.files],
                      "geometry": str(geom_path)}))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .cxi import _expand_paths, read_cxi, summarize_cxi

    for f in args.files:
        _existing(f, "files")
    paths = _expand_paths([Path(p) for p in args.files])
    if not paths:
        raise UsageError(f"argument files: no .cxi files in {' '.join(args.files)}")
    summary = summarize_cxi(paths, min_peaks=args.min_peaks)
    rows = []
    for path in paths:
        c = read_cxi(path, load_data=False)
        n = [int(v) for v in c.n_peaks]
        hits = sum(1 for v in n if v >= args.min_peaks)
        e = c.photon_energy_ev
        rows.append({
            "file": str(path), "frames": len(n), "hits": hits, "peaks": int(sum(n)),
            "mean_peaks": (sum(n) / len(n)) if n else 0.0,
            "energy_ev": None if not len(e) else float(e[0]) if float(e.min()) == float(e.max())
            else f"{float(e.min()):.1f}-{float(e.max()):.1f}",
            "shape": "x".join(str(v) for v in c.data_shape[1:]),
        })
    summary["per_file"] = rows
    if args.png:
        from .plotting import plot_frame_peaks

        # --frame counts across all files, in the order listed
        index = args.frame
        for path, row in zip(paths, rows):
            if index < row["frames"]:
                break
            index -= row["frames"]
        else:
            raise UsageError(f"argument --frame: {args.frame} is past the last frame ({summary['n_frames'] - 1})")
        contents = read_cxi(path)
        plot_frame_peaks(contents.frame(index), contents.peaks[index], path=Path(args.png),
                         title=f"{path.name} frame {index}")
        summary["png"] = args.png
        summary["png_frame"] = {"file": str(path), "frame": index}
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    head = ("file", "frames", "hits", "peaks", "mean_peaks", "energy_ev", "shape")
    table = [head] + [tuple(
        (f"{r[k]:.1f}" if isinstance(r[k], float) else Path(r[k]).name if k == "file" else str(r[k])) for k in head
    ) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    for t in table:
        print("  ".join(v.ljust(wd) for v, wd in zip(t, widths)))
    print(f"total: {summary['n_files']} file(s), {summary['n_frames']} frames, {summary['n_hits']} hits "
          f"(nPeaks >= {args.min_peaks}, hit rate {summary['hit_rate']:.3f}), {summary['n_peaks_total']} peaks")
    if args.png:
        print(f"png: {args.png} ({summary['png_frame']['file']} frame {summary['png_frame']['frame']})")
    return 0


def _cmd_geometry(args: argparse.Namespace) -> int:
    from .geometry import DetectorGeometry, from_preset, write_geometry

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"argument --out: {out} exists (use --force to overwrite)")
    if args.pixel_size_um is not None and not args.pixel_size_um > 0:
        raise UsageError(f"argument --pixel-size-um: must be > 0, got {args.pixel_size_um}")
    if args.clen_m is not None and not args.clen_m > 0:
        raise UsageError(f"argument --distance-m: must be > 0, got {args.clen_m}")
    if args.photon_energy_ev is not None and not args.photon_energy_ev > 0:
        raise UsageError(f"argument --photon-energy-ev: must be > 0 eV, got {args.photon_energy_ev}")
    if args.detector:
        from .simulate import DETECTORS

        if args.detector not in DETECTORS:
            raise UsageError(f"argument --detector: unknown detector {args.detector!r} (known: {', '.join(sorted(DETECTORS))})")
        geom = from_preset(DETECTORS[args.detector], photon_energy_ev=args.photon_energy_ev)
        import dataclasses

        changes = {}
        if args.clen_m is not None:
            changes["clen"] = float(args.clen_m)
        if args.pixel_size_um is not None:
            changes["res"] = 1e6 / args.pixel_size_um
        geom = dataclasses.replace(geom, **changes) if changes else geom
        what = f"the {args.detector} layout ({geom.n_panels} panels)"
    else:
        if args.n_panels is None or args.panel_shape is None:
            raise UsageError("argument --n-panels/--panel-shape: both are required (or give --detector PRESET)")
        if args.n_panels < 1:
            raise UsageError(f"argument --n-panels: must be >= 1, got {args.n_panels}")
        kw = {}
        if args.pixel_size_um is not None:
            kw["res"] = 1e6 / args.pixel_size_um
        geom = DetectorGeometry.stacked(
            args.n_panels, args.panel_shape, clen_m=args.clen_m if args.clen_m is not None else 0.1,
            photon_energy_ev=args.photon_energy_ev, **kw,
        )
        what = f"{args.n_panels} panels of {args.panel_shape}"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_geometry(out, geom)
    print(f"wrote {out}: {what}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_main

    return int(bench_main(args) or 0)


def _cmd_monitor(args: argparse.Namespace) -> int:
    from .monitor.app import MonitorOptions, run_monitor
    from .monitor.pva_source import expand_channels

    if args.consumers < 1:
        raise UsageError(f"argument --consumers: must be >= 1, got {args.consumers}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"argument --port: must be 0..65535, got {args.port}")
    for name in ("window_min", "image_hz", "push_hz"):
        if not getattr(args, name) > 0:
            raise UsageError(f"argument --{name.replace('_', '-')}: must be > 0, got {getattr(args, name)}")
    _existing(args.geometry, "--geometry")
    outputs = expand_channels(args.channels, args.consumers)
    statuses = expand_channels(args.status, args.consumers)
    if not outputs:
        raise UsageError("argument --channels: no channel given")
    opts = MonitorOptions(
        output_channels=outputs, status_channels=statuses, host=args.host, port=args.port, geometry=args.geometry,
        window_s=60.0 * args.window_min, min_peaks=args.min_peaks, image_hz=args.image_hz, push_hz=args.push_hz,
        runtime_s=args.runtime,
    )

    def announce(url: str) -> None:
        print(f"peaknet-pva monitor: {url} ({len(outputs)} output, {len(statuses)} status channels)", flush=True)

    try:
        return run_monitor(opts, announce=announce)
    except ModuleNotFoundError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"argument --port: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="peaknet-pva", description=__doc__.splitlines()[0])
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
    s.add_argument("--monitor-port", type=int, default=8080,
                   help="live monitor page on 127.0.0.1 (another free port if taken; URL printed)")
    s.add_argument("--no-monitor", action="store_true", help="run without the monitor page")
    s.add_argument("--prefix", default="", help="prefix of every channel name (e.g. 'me:'), to run beside another demo")
    s.add_argument("--linger", type=float, default=0.0, help="seconds to keep the monitor up after the summary")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("train", help="train PeakNet on simulated frames; see 'train --help'", add_help=False)
    s.set_defaults(func=_cmd_train, passthrough=True)

    s = sub.add_parser("evaluate", help="precision/recall/F1/RMSE of each backend on simulated frames")
    s.add_argument("--data", help="a simulated dataset directory (else one is simulated)")
    s.add_argument("--detector", default="single")
    s.add_argument("--n-frames", type=int, default=20)
    s.add_argument("--seed", type=int, default=1000)
    s.add_argument("--backends", default=None,
                   help="comma list: peaknet (default centroid), peaknet:mask, peaknet:intensity, peaknet:signal, peakfinder8 "
                        "(default: peaknet,peaknet:mask,peakfinder8; with --matrix: peaknet,peakfinder8)")
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

    s = sub.add_parser("infer", help="find peaks in a stack of frames and write CXI files + a CrystFEL .geom")
    s.add_argument("frames", help=".npy of (F, P*H, W) slabs or (F, P, H, W), a 'simulate' output directory, "
                                  "or an HDF5/CXI file (--data-path)")
    s.add_argument("--data-path", default="/entry_1/data_1/data", help="frames dataset in an HDF5/CXI input")
    s.add_argument("--out", default="out/cxi")
    s.add_argument("--prefix", default="peaknet")
    s.add_argument("--weights", default="default")
    s.add_argument("--model", default=None)
    s.add_argument("--backend", default="peaknet")
    s.add_argument("--device", default="auto")
    s.add_argument("--panel-shape", type=_panel_shape, default=None, help="H,W of one panel")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--centroid", default="auto", help="auto (signal with our weights, mask with published ones), mask, intensity or signal")
    s.add_argument("--min-peaks", type=int, default=10)
    s.add_argument("--frames-per-file", type=int, default=100)
    s.add_argument("--photon-energy-ev", type=float, default=None,
                   help="photon energy (eV); required unless the input carries it (/LCLS/photon_energy_eV, "
                        "a simulate truth.h5) or --geometry has a numeric photon_energy")
    s.add_argument("--geometry", default=None, help="CrystFEL .geom of the detector (tiles, radius map, bad regions)")
    s.add_argument("--mask", default=None, help="bad-pixel mask: .npy or HDF5 (FILE.h5:/dataset)")
    s.add_argument("--mask-convention", default="om", choices=("om", "nonzero_bad", "crystfel"),
                   help="om: nonzero = good (OM/Cheetah); nonzero_bad: pyFAI/NeXus; crystfel: mask_good/mask_bad bits")
    s.add_argument("--mask-dataset", default=None, help="dataset of --mask in an HDF5 file")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_infer)

    s = sub.add_parser("inspect", help="summary of CXI files or directories: frames, peaks, hit rate, photon energy")
    s.add_argument("files", nargs="+", help=".cxi files and/or directories holding them")
    s.add_argument("--min-peaks", type=int, default=10)
    s.add_argument("--png", help="write a PNG of one frame with its peaks")
    s.add_argument("--frame", type=int, default=0, help="frame for --png, counted across all files")
    s.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("geometry", help="write a CrystFEL .geom for a stacked panel layout (or a preset's layout)")
    s.add_argument("--n-panels", type=int, default=None)
    s.add_argument("--panel-shape", type=_panel_shape, default=None, help="H,W")
    s.add_argument("--detector", default=None, help="a simulator preset: its physical layout and beam centre")
    s.add_argument("--pixel-size-um", type=float, default=None, help="pixel size in um (default 75; res = 1/size)")
    s.add_argument("--distance-m", "--clen-m", dest="clen_m", type=float, default=None,
                   help="detector distance clen in m (default 0.1)")
    s.add_argument("--photon-energy-ev", type=float, default=None,
                   help="a fixed photon energy (default: per frame from /LCLS/photon_energy_eV)")
    s.add_argument("--out", required=True)
    s.add_argument("--force", action="store_true", help="overwrite an existing --out")
    s.set_defaults(func=_cmd_geometry)

    s = sub.add_parser("monitor", help="live web page: hit rate, peakogram, powder pattern, latest hit (docs/MONITOR.md)")
    s.add_argument("--channels", default="peaknet:*:output",
                   help="output channels: a pattern ('*' = consumer ids 1..--consumers) or a comma list")
    s.add_argument("--status", default="peaknet:*:status", help="status channels, the same way ('' = none)")
    s.add_argument("--consumers", type=int, default=8,
                   help="ids that '*' expands to (PVA has no wildcard search; ids that never appear are not shown)")
    s.add_argument("--port", type=int, default=8080, help="HTTP port (0 = any free port; the URL is printed)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    s.add_argument("--geometry", default=None, help="CrystFEL .geom to assemble panels (default: panels in a grid)")
    s.add_argument("--window-min", type=float, default=5.0, help="minutes of rate history shown")
    s.add_argument("--min-peaks", type=int, default=10, help="hit threshold until a consumer's status says its own")
    s.add_argument("--image-hz", type=float, default=2.0, help="most images decoded per second (peaks: every frame)")
    s.add_argument("--push-hz", type=float, default=4.0, help="page updates per second")
    s.add_argument("--runtime", type=float, default=0.0, help="stop after this many seconds (0 = until Ctrl-C)")
    s.set_defaults(func=_cmd_monitor)

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
        from .errors import CheckpointError, ConfigError, FrameError

        try:
            return func(argparse.Namespace(), argv[1:])
        except (ConfigError, FrameError, CheckpointError, FileNotFoundError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"peaknet-pva {argv[0]}: error: {msg}", file=sys.stderr)
            return USAGE_ERROR
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from .errors import CheckpointError, ConfigError, FrameError

    try:
        return int(args.func(args) or 0)
    except (UsageError, ConfigError, FrameError, CheckpointError, FileNotFoundError) as exc:
        if args.verbose:
            log.exception("%s failed", args.command)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"peaknet-pva {args.command}: error: {msg}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
