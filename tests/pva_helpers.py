"""Helpers for the PVA tests: unique channel names, small frames, starting/stopping consumer sets.

Everything runs on loopback (conftest applies it; subprocesses get ``loopback_env()`` through
``peaknet_pva.pva.procs``). Processes are stopped by PID (SIGINT, then SIGKILL after a bound).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pvaccess")
pytest.importorskip("pvapy.hpc.adImageProcessor")

from peaknet_pva.pva import procs  # noqa: E402

#: Small CPU PeakNet for tests: every frame a hit, every image forwarded.
PEAKNET_CPU_ARGS: dict[str, Any] = {
    "model": "peaknet-atto-s",
    "weights": "random",
    "device": "cpu",
    "panel_shape": [64, 64],
    "batch_size": 8,
    "batch_timeout_ms": 30,
    "min_peaks": 0,
    "forward_images": "all",
    "photon_energy_ev": 9000.0,
}

#: Bound on any consumer start (torch import + model build + warm-up on 2 shared cores).
START_TIMEOUT_S = 150.0
#: Bound on a consumer's drain after SIGINT.
STOP_TIMEOUT_S = 60.0

PEAKNET_CLASS = "peaknet_pva.PeakNetImageProcessor"
CXI_CLASS = "peaknet_pva.CxiFileProcessor"


def unique_tag(prefix: str = "t") -> str:
    """A channel-name prefix no other test (or engineer) uses."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def planted_frames(
    n: int, *, n_panels: int = 2, shape: tuple[int, int] = (64, 64), seed: int = 0, dtype: str = "float32"
) -> np.ndarray:
    """``(n, P, H, W)`` frames: noise plus a few bright 3×3 spots per panel."""
    rng = np.random.default_rng(seed)
    h, w = shape
    frames = rng.poisson(2.0, size=(n, n_panels, h, w)).astype(np.float32)
    for f in range(n):
        for p in range(n_panels):
            for _ in range(int(rng.integers(2, 6))):
                y, x = int(rng.integers(3, h - 3)), int(rng.integers(3, w - 3))
                frames[f, p, y - 1 : y + 2, x - 1 : x + 2] += float(rng.uniform(200, 2000))
    return frames.astype(dtype)


def tiny_dataset(out_dir: Path, n_frames: int = 120, seed: int = 1) -> Path:
    """A simulated dataset of ``n_frames`` 2×64×64 float32 frames (frames.npy + truth.h5)."""
    from peaknet_pva.simulate import DetectorPreset, save_dataset, simulate_dataset

    det = DetectorPreset(
        name="tiny2x64",
        panel_shape=(64, 64),
        panel_origins=((0.0, 0.0), (72.0, 0.0)),
        beam_center=(68.0, 32.0),
        pixel_size_m=75e-6,
        distance_m=0.03,
        dtype="float32",
        adu_per_photon=1.0,
        saturation_adu=30000.0,
    )
    ds = simulate_dataset(n_frames, detector=det, seed=seed, progress=False)
    return save_dataset(ds, out_dir)


@contextmanager
def consumer_set(
    processor_class: str,
    input_channel: str,
    tag: str,
    tmp_path: Path,
    *,
    role: str,
    n_consumers: int = 1,
    processor_args: dict[str, Any] | None = None,
    output: bool = True,
    wait_connected: bool = True,
    **kwargs: Any,
) -> Iterator[procs.ManagedProcess]:
    """Start a ``pvapy-hpc-consumer`` set with channels ``<tag>:<role>:<id>:{output,status,control}``,
    wait until every consumer's input monitor is connected, yield it, stop it (SIGINT, bounded)."""
    kwargs.setdefault("server_queue_size", 200)
    proc = procs.start_consumer(
        processor_class,
        input_channel,
        output_channel=f"{tag}:{role}:*:output" if output else None,
        status_channel=f"{tag}:{role}:*:status",
        control_channel=f"{tag}:{role}:*:control",
        n_consumers=n_consumers,
        processor_args=processor_args,
        report_period_s=1.0,
        log_level="warning",
        log_path=tmp_path / f"{role}.log",
        name=role,
        **kwargs,
    )
    try:
        procs.wait_for_status(
            proc.status_channels, timeout_s=START_TIMEOUT_S, proc=proc, min_received=1 if wait_connected else None
        )
        yield proc
    finally:
        proc.stop(timeout_s=STOP_TIMEOUT_S)


def user_stats(proc: procs.ManagedProcess, *, fresh_after: float | None = None, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """``userStats`` of every consumer of ``proc``; with ``fresh_after`` (a time.time()), wait
    until each status object is newer than that (status updates once per report period)."""
    out = []
    for name in proc.status_channels:
        deadline = time.monotonic() + timeout_s
        while True:
            status = procs.read_status(name)
            if fresh_after is None or float(status.get("objectTime", 0.0)) > fresh_after:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no fresh status on {name}")
            time.sleep(0.2)
        out.append(status.get("userStats", {}))
    return out


def wait_until(predicate: Any, timeout_s: float, poll_s: float = 0.2, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


class FakePublisher:
    """Stands in for pvapy's data publisher in in-process processor tests."""

    def __init__(self) -> None:
        self.objects: list[Any] = []

    def updateOutputChannel(self, pv: Any) -> None:  # noqa: N802 (pvapy's name)
        self.objects.append(pv.copy())


class ReadyGate:
    """A channel a replay started with ``wait_for=[gate.name]`` waits on: ``open()`` serves it, so
    the stream starts exactly when the test's own clients are connected. Stop with ``close()``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._server: Any = None

    def open(self) -> None:
        import pvaccess as pva

        self._server = pva.PvaServer()
        self._server.addRecord(self.name, pva.PvObject({"value": pva.INT}, {"value": 1}), None)

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
