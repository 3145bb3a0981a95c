"""The whole system on loopback, for a newcomer: ``peaknet-pva demo`` / ``make demo``.

simulate frames → replay server → ``pvapy-hpc-consumer -nc N`` PeakNetImageProcessor (shipped
weights) → ``pvapy-hpc-consumer -nc N`` CxiFileProcessor → CXI files; a monitor on the output
channels collects every published peak table. Then everything is stopped with SIGINT (inference
first, so it drains into the writers) and a summary is returned: frames sent / processed /
dropped, peaks per frame, hit rate, frames/s per consumer, CXI files, accuracy against the
simulator's ground truth, and a PNG of one frame with its peaks.

Every process is ours, started with the loopback EPICS environment and stopped by PID.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .loopback import apply_loopback_env, loopback_env

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 120.0


@dataclass
class DemoSummary:
    """What the demo measured. ``ok`` = every frame sent was processed and nothing was lost."""

    ok: bool = False
    run_dir: str = ""
    detector: str = ""
    frames_sent: int = 0
    frames_published: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0
    bad_frames: int = 0
    missed_ids: int = 0
    peaks_per_frame: float = 0.0
    hit_rate: float = 0.0
    min_peaks: int = 0
    frames_per_s_per_consumer: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cxi_files: list[str] = field(default_factory=list)
    cxi_frames: int = 0
    accuracy: dict[str, Any] = field(default_factory=dict)
    png: str = ""
    channels: dict[str, str] = field(default_factory=dict)
    monitor_url: str = ""
    monitor_frames: int = 0

    def as_text(self) -> str:
        acc = self.accuracy
        lines = [
            f"peaknet-pva demo: {'OK' if self.ok else 'PROBLEMS (see logs in ' + self.run_dir + ')'}",
            f"  detector            {self.detector}",
            f"  frames sent         {self.frames_sent}",
            f"  frames published    {self.frames_published}",
            f"  frames processed    {self.frames_processed}  (dropped {self.frames_dropped}, bad {self.bad_frames}, "
            f"missed ids {self.missed_ids})",
            f"  peaks per frame     {self.peaks_per_frame:.1f}",
            f"  hit rate            {self.hit_rate:.2f}  (nPeaks >= {self.min_peaks})",
            "  frames/s/consumer   " + ", ".join(f"{v:.2f}" for v in self.frames_per_s_per_consumer),
            f"  wall time           {self.wall_s:.1f} s",
            f"  CXI files           {len(self.cxi_files)} ({self.cxi_frames} hit frames)",
        ]
        lines += [f"    {p}" for p in self.cxi_files]
        if acc:
            num = {k: float("nan") if acc.get(k) is None else float(acc[k]) for k in ("f1", "precision", "recall", "rmse_px")}
            lines.append(
                f"  accuracy vs truth   F1 {num['f1']:.3f}  precision {num['precision']:.3f}  "
                f"recall {num['recall']:.3f}  centroid RMSE {num['rmse_px']:.2f} px"
            )
        if self.png:
            lines.append(f"  picture             {self.png}")
        if self.monitor_url:
            lines.append(f"  live monitor page   {self.monitor_url}  (ran during the demo; saw {self.monitor_frames} frames)")
        lines.append(f"  watch live with     c2dv --app image --pv {self.channels.get('output', '')}")
        return "\n".join(lines)


def _channels_in_use(names: list[str], timeout_s: float = 1.0) -> list[str]:
    """The names among ``names`` that some server already answers for."""
    from .pva import procs

    busy = []
    for name in names:
        try:
            procs.get_channel(name, timeout_s)
        except Exception:  # pvaccess raises its own types on timeout: not served
            continue
        busy.append(name)
    return busy


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _monitor_frames(url: str) -> int:
    """Frames the monitor page has counted, over all consumers (0 if it does not answer)."""
    from .monitor import read_snapshot

    try:
        return int(sum(c.get("frames", 0) for c in read_snapshot(url).get("consumers", [])))
    except (OSError, ValueError) as exc:
        log.warning("monitor snapshot not read: %s", exc)
        return 0


def _user_stats(names: list[str]) -> list[dict[str, Any]]:
    from .pva import procs

    out = []
    for name in names:
        try:
            out.append(procs.read_status(name, timeout_s=3.0).get("userStats", {}))
        except Exception as exc:  # a consumer that died is reported, not fatal for the summary
            log.warning("no status from %s: %s", name, exc)
            out.append({})
    return out


def run_demo(
    out_dir: Path = Path("out/demo"),
    *,
    duration_s: float = 30.0,
    fps: float = 4.0,
    n_consumers: int = 2,
    detector: str = "single",
    weights: str = "default",
    channel_prefix: str = "",
    seed: int = 7,
    monitor_port: int | None = 8080,
    linger_s: float = 0.0,
) -> DemoSummary:
    """Run the demo; returns its summary (also written to ``<run_dir>/summary.json``).

    ``monitor_port``: the live monitor page runs alongside on 127.0.0.1 (8080, or any free port
    when that one is taken; None = no monitor); its URL is logged as soon as it is up, nothing is
    opened. ``linger_s`` keeps the monitor serving that long after the summary is measured.
    """
    apply_loopback_env()
    from .evaluate import evaluate
    from .plotting import plot_frame_peaks
    from .pva import procs
    from .simulate import get_detector, save_dataset, simulate_dataset

    t_start = time.monotonic()
    run_dir = Path(out_dir) / time.strftime("run-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    det = get_detector(detector)
    n_frames = max(1, int(round(duration_s * fps)))
    log.info("simulating %d %s frames into %s", n_frames, detector, run_dir / "sim")
    ds = simulate_dataset(n_frames, detector=det, seed=seed, progress=False)
    data_dir = save_dataset(ds, run_dir / "sim")

    pre = channel_prefix
    ch = {
        "image": f"{pre}pvapy:image",
        "output": f"{pre}peaknet:1:output",
        "pk_out": f"{pre}peaknet:*:output",
        "pk_status": f"{pre}peaknet:*:status",
        "pk_control": f"{pre}peaknet:*:control",
        "wr_status": f"{pre}cxi:*:status",
        "wr_control": f"{pre}cxi:*:control",
    }
    busy = _channels_in_use([ch["image"], ch["pk_status"].replace("*", "1"), ch["wr_status"].replace("*", "1")])
    if busy:
        # Two demos on the same names would trade frames silently; refuse instead.
        raise ConfigError(f"channel(s) already served on this network: {', '.join(busy)}; another demo or "
                          "pipeline is running: stop it or pick another --prefix")
    min_peaks = 10
    pk_args = {
        "weights": weights,
        "device": "auto",
        "panel_shape": list(det.panel_shape),
        "batch_size": 4,
        "batch_timeout_ms": 100,
        "min_peaks": min_peaks,
        "forward_images": "hits_empty",  # every frame published: the summary scores all of them
        "ring_size": 256,
    }
    wr_args = {"output_dir": str(run_dir / "cxi"), "frames_per_file": 50, "min_peaks": min_peaks, "idle_close_s": 10}
    env = loopback_env()
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // n_consumers)))
    summary = DemoSummary(run_dir=str(run_dir), detector=detector, frames_sent=n_frames, min_peaks=min_peaks,
                          channels={"image": ch["image"], "output": ch["output"]})
    started: list[Any] = []
    try:
        # The source first: a consumer counts as connected once it has the source's initial value.
        # The replay server holds the stream until every consumer of both sets is connected.
        n_ids = range(1, n_consumers + 1)
        pk_status = [ch["pk_status"].replace("*", str(i)) for i in n_ids]
        wr_status = [ch["wr_status"].replace("*", str(i)) for i in n_ids]
        replay = procs.start_replay(
            data_dir, ch["image"], fps=fps, n_frames=n_frames, wait_connected=pk_status + wr_status,
            extra=["--report-period", "0", "--wait-timeout", str(2 * START_TIMEOUT_S)],
            log_path=run_dir / "replay.log", env=env,
        )
        started.append(replay)
        if monitor_port is not None:
            try:
                mon_proc, summary.monitor_url = procs.start_monitor(
                    ch["pk_out"], status=ch["pk_status"], n_consumers=n_consumers,
                    port=monitor_port if _port_free(monitor_port) else 0, min_peaks=min_peaks,
                    log_path=run_dir / "monitor.log", env=env)
                started.append(mon_proc)
                log.info("live monitor page: %s (open it in a browser)", summary.monitor_url)
            except (RuntimeError, OSError) as exc:  # the demo goes on without its page, and says so
                log.warning("monitor page not started: %s", str(exc).splitlines()[0])
        pk = procs.start_consumer(
            "peaknet_pva.PeakNetImageProcessor", ch["image"], output_channel=ch["pk_out"],
            status_channel=ch["pk_status"], control_channel=ch["pk_control"], n_consumers=n_consumers,
            distributor_updates=4, server_queue_size=1000, processor_args=pk_args, report_period_s=1.0,
            log_path=run_dir / "peaknet-consumers.log", env=env, name="peaknet",
        )
        started.append(pk)
        log.info("waiting for %d inference consumers to load the model and connect", n_consumers)
        procs.wait_for_status(pk.status_channels, timeout_s=START_TIMEOUT_S, proc=pk, min_received=1)
        with procs.OutputMonitor(pk.output_channels) as mon:
            mon.wait_connected(60)
            wr = procs.start_consumer(
                "peaknet_pva.CxiFileProcessor", ch["pk_out"], status_channel=ch["wr_status"],
                control_channel=ch["wr_control"], n_consumers=n_consumers, server_queue_size=1000,
                processor_args=wr_args, report_period_s=1.0, log_path=run_dir / "cxi-consumers.log", env=env,
                name="cxi",
            )
            started.append(wr)
            log.info("waiting for %d CXI writer consumers to connect", n_consumers)
            procs.wait_for_status(wr.status_channels, timeout_s=START_TIMEOUT_S, proc=wr, min_received=1)
            log.info("streaming %d frames at %.1f Hz on %s", n_frames, fps, ch["image"])
            t0 = time.monotonic()
            replay.popen.wait(timeout=duration_s * 4 + 120)
            missing = mon.wait_for(range(1, n_frames + 1), timeout_s=max(60.0, duration_s * 2))
            wall = time.monotonic() - t0
            if missing:
                log.warning("%d frames not published in time", len(missing))
            time.sleep(1.5)  # the status channels refresh once per report period (1 s): read a fresh one
            pk_stats = _user_stats(pk.status_channels)
            published = mon.snapshot()
            if summary.monitor_url:
                summary.monitor_frames = _monitor_frames(summary.monitor_url)
            if linger_s > 0 and summary.monitor_url:
                log.info("keeping the monitor page up for %.0f s: %s", linger_s, summary.monitor_url)
                time.sleep(linger_s)
        log.info("stopping inference consumers (SIGINT: they drain), then writers")
        pk.stop(timeout_s=STOP_TIMEOUT_S)
        time.sleep(1.0)
        wr.stop(timeout_s=STOP_TIMEOUT_S)
    finally:
        for proc in reversed(started):
            if proc.poll() is None:
                proc.stop(timeout_s=STOP_TIMEOUT_S)

    summary.wall_s = time.monotonic() - t_start
    summary.frames_published = len(published)
    summary.frames_processed = int(sum(s.get("nProcessed", 0) for s in pk_stats))
    summary.frames_dropped = int(sum(s.get("nDropped", 0) for s in pk_stats))
    summary.bad_frames = int(sum(s.get("nBadFrames", 0) for s in pk_stats))
    summary.missed_ids = int(sum(s.get("nMissedIds", 0) for s in pk_stats))
    summary.frames_per_s_per_consumer = [float(s.get("nProcessed", 0)) / max(wall, 1e-9) for s in pk_stats]
    tables = {uid: entries[0][1] for uid, entries in published.items()}
    if tables:
        counts = [t.n for t in tables.values()]
        summary.peaks_per_frame = float(sum(counts)) / len(counts)
        summary.hit_rate = sum(c >= min_peaks for c in counts) / len(counts)
        uids = sorted(tables)
        metrics = evaluate([tables[u] for u in uids], [ds.truths[u - 1] for u in uids])
        summary.accuracy = metrics.as_dict()
        hits = [u for u in uids if tables[u].n >= min_peaks] or uids
        median = sorted(tables[u].n for u in hits)[len(hits) // 2]
        best = min(hits, key=lambda u: abs(tables[u].n - median))  # a typical hit, not the densest
        png = plot_frame_peaks(ds.frames[best - 1], tables[best], ds.truths[best - 1], path=run_dir / "frame.png",
                               title=f"uniqueId {best}: {tables[best].n} peaks (red) vs truth (circles)")
        summary.png = str(png)
    cxi = sorted((run_dir / "cxi").glob("*.cxi"))
    summary.cxi_files = [str(p) for p in cxi]
    if cxi:
        from .cxi import summarize_cxi

        summary.cxi_frames = int(summarize_cxi(cxi, min_peaks=min_peaks).get("n_frames", 0))
    summary.ok = (
        summary.frames_published == n_frames
        and summary.frames_processed == n_frames
        and summary.frames_dropped == 0
        and summary.bad_frames == 0
    )
    (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2, default=str))
    return summary
