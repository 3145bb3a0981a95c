"""How many published frames per second the monitor's aggregation takes, and what a page
snapshot costs: the per-frame work of ``peaknet-pva monitor`` without PVA (peaks only; images are
sampled at ``image_hz`` and not part of the per-frame path).

    .venv/bin/python benchmarks/bench_monitor.py [--peaks 100] [--frames 20000]

Prints frames/s into ``MonitorState.add_peaks`` for 4 consumers of 16x352x384 frames with
``--peaks`` peaks each, and the median time of a snapshot (what the page gets 4x a second).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from peaknet_pva.monitor.state import HitImage, MonitorConfig, MonitorState, PeakUpdate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peaks", type=int, default=100)
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--consumers", type=int, default=4)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    channels = [f"peaknet:{k}:output" for k in range(1, args.consumers + 1)]
    state = MonitorState(MonitorConfig(), channels=channels)
    n = args.peaks
    updates = [
        PeakUpdate(channel=channels[i % len(channels)], unique_id=i + 1, n_peaks=n,
                   panel=rng.integers(0, 16, n).astype(np.uint16), y=rng.uniform(0, 352, n).astype(np.float32),
                   x=rng.uniform(0, 384, n).astype(np.float32), intensity=rng.uniform(10, 1e4, n).astype(np.float32),
                   photon_energy_ev=9500.0, panel_shape=(352, 384))
        for i in range(min(args.frames, 2000))
    ]
    state.set_hit(HitImage(channel=channels[0], unique_id=1, pixels=rng.poisson(5, (16, 352, 384)).astype(np.float32),
                           panel=updates[0].panel, y=updates[0].y, x=updates[0].x, intensity=updates[0].intensity,
                           photon_energy_ev=9500.0))
    t0 = time.perf_counter()
    for i in range(args.frames):
        state.add_peaks(updates[i % len(updates)])
    rate = args.frames / (time.perf_counter() - t0)
    snaps = []
    for version in range(7):
        for i in range(250):  # new peaks since the last push: pictures are re-rendered
            state.add_peaks(updates[i % len(updates)])
        t1 = time.perf_counter()
        state.snapshot(hit_version=version - 1)  # the page asks for the picture when it changed
        snaps.append(time.perf_counter() - t1)
    print(f"add_peaks: {rate:,.0f} frames/s ({args.peaks} peaks/frame, {args.consumers} consumers, 1 thread)")
    print(f"snapshot after new peaks (powder + peakogram re-rendered): median {1e3 * statistics.median(snaps):.1f} ms "
          f"over {len(snaps)}; at 4 pushes/s that is {0.4 * statistics.median(snaps) * 1e3:.1f} % of one core")


if __name__ == "__main__":
    main()
