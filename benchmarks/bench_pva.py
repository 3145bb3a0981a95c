"""PVA throughput: PeakNetImageProcessor vs pvapy's pass-through processor, same source and frames.

For each frame size, an in-process replay server streams pre-encoded NtNdArray frames at a fixed
rate for a fixed time into one ``pvapy-hpc-consumer`` (``-nc 1 -sqs 1000``), first with pvapy's
``AdImageProcessor`` (publishes every input unchanged), then with ``PeakNetImageProcessor``
(``peaknet-atto-s``, every frame a hit, every image forwarded, so both publish the same bytes).
A monitor on the output channel counts what comes out. Prints one JSON line per case::

    {"bench": "pva", "case": "512x512-float32", "processor": "peaknet", "source_fps": 200, "sent": 2000,
     "published": ..., "missed": ..., "out_fps": ..., "ring_dropped": ..., "ratio_vs_passthrough": ...}

``missed`` = sent − published (anything lost anywhere: server queue, ring, shutdown).
``ring_dropped`` = frames the PeakNet processor dropped because its ring was full (the engine could
not keep up); ``out_fps`` = published / (last output arrival − first frame sent).

    python benchmarks/bench_pva.py                       # both sizes, ~2 min on 2 CPU cores
    python benchmarks/bench_pva.py --case 512 --duration 5 --device cuda:0
    python benchmarks/bench_pva.py --device cuda:0 --consumers 4 --batch-size 16   # 4 consumers, 1 GPU

Loopback only (``peaknet_pva.loopback``); every process stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peaknet_pva.loopback import apply_loopback_env  # noqa: E402

apply_loopback_env()
os.environ.setdefault("OMP_NUM_THREADS", "1")

from peaknet_pva.pva import codec, procs  # noqa: E402
from peaknet_pva.pva.replay import ReplayServer  # noqa: E402

PASSTHROUGH = "pvapy.hpc.adImageProcessor.AdImageProcessor"
PEAKNET = "peaknet_pva.pva.PeakNetImageProcessor"

#: name -> (frames (P, H, W), panel_shape, source fps)
CASES: dict[str, tuple[tuple[int, int, int], tuple[int, int], float]] = {
    "512": ((1, 512, 512), (512, 512), 200.0),
    "epix": ((16, 352, 384), (352, 384), 20.0),
}


def _weights() -> str:
    try:
        from peaknet_pva.finder import default_weights_path

        return "default" if default_weights_path().exists() else "random"
    except Exception:
        return "random"


def run_case(
    processor: str,
    frame_shape: tuple[int, int, int],
    panel_shape: tuple[int, int],
    fps: float,
    duration_s: float,
    workdir: Path,
    *,
    device: str = "cpu",
    model: str = "peaknet-atto-s",
    consumers: int = 1,
    batch_size: int = 4,
) -> dict[str, Any]:
    tag = f"bench{os.getpid()}{int(time.time() * 1000) % 1_000_000}"
    image = f"{tag}:image"
    p, h, w = frame_shape
    rng = np.random.default_rng(0)
    distinct = [
        codec.encode_ntndarray(
            (rng.poisson(3.0, size=frame_shape)).astype(np.float32),
            unique_id=0,
            attributes={"PhotonEnergy": 9500.0},
        )
        for _ in range(4)
    ]
    is_peaknet = processor == "peaknet"
    args = None
    if is_peaknet:
        args = {
            "model": model,
            "weights": _weights(),
            "device": device,
            "panel_shape": list(panel_shape),
            "batch_size": batch_size,
            "batch_timeout_ms": 20,
            "min_peaks": 0,
            "forward_images": "all",
            "ring_size": 8,
        }
    with ReplayServer(image) as srv:
        proc = procs.start_consumer(
            PEAKNET if is_peaknet else PASSTHROUGH,
            image,
            output_channel=f"{tag}:*:output",
            status_channel=f"{tag}:*:status",
            n_consumers=consumers,
            distributor_updates=1 if consumers > 1 else None,  # round-robin, one update each
            server_queue_size=1000,
            processor_args=args,
            report_period_s=1.0,
            log_level="error",
            log_path=workdir / f"{tag}-{processor}.log",
        )
        try:
            procs.wait_for_status(proc.status_channels, timeout_s=300, proc=proc, min_received=1)
            with procs.OutputMonitor(proc.output_channels, decode=False, queue_size=1000) as mon:
                mon.wait_connected(30)
                t0 = time.monotonic()
                sent = 0
                dt = 1.0 / fps
                while time.monotonic() - t0 < duration_s:
                    srv.publish_prepared(distinct[sent % len(distinct)])
                    sent += 1
                    delay = t0 + sent * dt - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                t_sent = time.monotonic() - t0
                # Let the consumer finish what it still can, bounded.
                last, still = -1, time.monotonic()
                while time.monotonic() - still < 2.0 and time.monotonic() - t0 < duration_s + 15:
                    if mon.n_updates != last:
                        last, still = mon.n_updates, time.monotonic()
                    time.sleep(0.2)
                statuses = [procs.read_status(ch) for ch in proc.status_channels]
                published = len(mon.updates)
                span = (mon.t_last - t0) if mon.t_last is not None else 0.0
        finally:
            # Not a drain test: a CPU PeakNet would need minutes for a full ring of big frames.
            proc.stop(timeout_s=20)
    users = [st.get("userStats", {}) or {} for st in statuses]
    recvs = [st.get("receiverStats", {}) or {} for st in statuses]
    latencies = [float(u.get("meanBatchLatencyMs", 0.0)) for u in users if u.get("meanBatchLatencyMs") is not None]
    return {
        "bench": "pva",
        "case": f"{p}x{h}x{w}-float32" if p > 1 else f"{h}x{w}-float32",
        "processor": f"peaknet ({model}, {device})" if is_peaknet else "passthrough (pvapy AdImageProcessor)",
        "consumers": consumers,
        "source_fps": fps,
        "duration_s": round(t_sent, 2),
        "sent": sent,
        "published": published,
        "missed": sent - published,
        "out_fps": round(published / span, 2) if span > 0 else 0.0,
        "ring_dropped": sum(int(u.get("nDropped", 0)) for u in users),
        "n_overruns": sum(int(r.get("nOverruns", 0)) for r in recvs),
        "mean_batch_latency_ms": round(sum(latencies) / len(latencies), 1) if is_peaknet and latencies else None,
        "omp_threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), action="append", help="frame size case (default: all)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of streaming per case (default 10)")
    ap.add_argument("--device", default="cpu", help="PeakNet device (default cpu)")
    ap.add_argument("--model", default="peaknet-atto-s")
    ap.add_argument("--fps", type=float, default=None, help="override the source rate of every case")
    ap.add_argument("--consumers", type=int, default=1,
                    help="consumer processes (pvapy -nc, frames distributed round-robin with -du 1), both processors")
    ap.add_argument("--batch-size", type=int, default=4, help="PeakNet processor batch size")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-pva-") as tmp:
        for name in args.case or list(CASES):
            frame_shape, panel_shape, fps = CASES[name]
            fps = args.fps or fps
            base = run_case("passthrough", frame_shape, panel_shape, fps, args.duration, Path(tmp),
                            consumers=args.consumers)
            print(json.dumps(base), flush=True)
            res = run_case("peaknet", frame_shape, panel_shape, fps, args.duration, Path(tmp),
                           device=args.device, model=args.model, consumers=args.consumers,
                           batch_size=args.batch_size)
            res["ratio_vs_passthrough"] = round(res["out_fps"] / base["out_fps"], 4) if base["out_fps"] else None
            print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
