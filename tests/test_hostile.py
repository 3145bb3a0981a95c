"""Hostile conditions (issue 10 items 2-7): a full disk, engine faults, SIGTERM, start-up order,
misleading counters, oversized frames. Each test asserts the consumer survives, the right
counter moved, and the stats add up (received = published + dropped + bad; hits = written +
lost). Real ``pvapy-hpc-consumer`` processes where the issue is about real processes (loopback,
unique channel names, bounded, stopped by PID); the rest in-process.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pva_helpers import (  # noqa: I001
    CXI_CLASS,
    PEAKNET_CLASS,
    PEAKNET_CPU_ARGS,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    FakePublisher,
    consumer_set,
    planted_frames,
    unique_tag,
    user_stats,
    wait_until,
)

import pvaccess as pva  # noqa: E402

from peaknet_pva import cxi as cxi_mod  # noqa: E402
from peaknet_pva.cxi import CxiWriter, read_cxi  # noqa: E402
from peaknet_pva.frames import PanelLayout, PeakTable  # noqa: E402
from peaknet_pva.pva import codec, procs  # noqa: E402
from peaknet_pva.pva import cxi_processor as cxi_proc_mod  # noqa: E402
from peaknet_pva.pva.cxi_processor import CxiFileProcessor  # noqa: E402
from peaknet_pva.pva.peaknet_processor import IdGapCounter, PeakNetImageProcessor  # noqa: E402
from peaknet_pva.pva.replay import ReplayServer, bad_frame  # noqa: E402

pytestmark = [pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[1]
PVAPY_KEYS = {
    "processorId": 1, "inputChannel": "x", "inputMode": "pva", "inputArgs": None, "outputChannel": "y",
    "outputMode": "pvas", "outputArgs": None, "objectIdField": "uniqueId", "skipInitialUpdates": 1,
    "objectIdOffset": 1, "nSequentialUpdates": 1, "fieldRequest": "",
}
SMALL = {"model": "peaknet-atto-s", "weights": "random", "device": "cpu", "panel_shape": [64, 64],
         "min_peaks": 0, "forward_images": "all", "photon_energy_ev": 9000.0}
PEAKS = PeakTable(panel=[0, 1], y=[1.0, 2.0], x=[3.0, 4.0], intensity=[1.0, 2.0], npix=[1, 2])


def _make(args: dict) -> tuple[PeakNetImageProcessor, FakePublisher]:
    config = dict(PVAPY_KEYS)
    config.update(args)
    proc = PeakNetImageProcessor(config)
    pub = FakePublisher()
    proc.outputChannel = "test:output"
    proc.dataPublisher = pub
    return proc, pub


def _encode(frames: np.ndarray, first_id: int = 1) -> list:
    return [codec.encode_ntndarray(f, unique_id=first_id + i, attributes={"PhotonEnergy": 9500.0})
            for i, f in enumerate(frames)]


def _ids(pub: FakePublisher) -> list[int]:
    return [codec.decode_output(o)[1].unique_id for o in pub.objects]


def _adds_up(stats: dict) -> None:
    """Every frame that reached process() is accounted for, once."""
    assert stats["nFramesIn"] == stats["nProcessed"] + stats["nDropped"] + stats["nBadFrames"] + stats["ringFill"], stats


# -- item 3: the engine thread survives any exception -------------------------------------------


class _FailOnce:
    """A backend wrapper whose ``compute`` raises on its first call (then behaves)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.calls = 0

    def compute(self, frames):  # noqa: ANN001, ANN201
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("injected backend fault")
        return self.inner.compute(frames)

    def extract(self, state, frames):  # noqa: ANN001, ANN201
        return self.inner.extract(state, frames)


def test_engine_survives_a_backend_exception_and_counts_it() -> None:
    proc, pub = _make(dict(SMALL, batch_size=4, batch_timeout_ms=20))
    proc.pipeline.backend = _FailOnce(proc.pipeline.backend)
    for obj in _encode(planted_frames(4, seed=1)):  # queued first: one full batch, the fault takes it
        proc.process(obj)
    proc.start()
    wait_until(lambda: proc.getStats()["nEngineErrors"] == 1, 30, what="the engine error")
    for obj in _encode(planted_frames(8, seed=2), first_id=5):
        proc.process(obj)
    wait_until(lambda: len(pub.objects) == 8, 60, what="8 outputs after the fault")
    stats = proc.getStats()
    assert stats["engineAlive"] == 1 and proc._engine.is_alive()
    assert stats["nEngineErrors"] == 1 and stats["nDropped"] == 4 and stats["nProcessed"] == 8
    assert _ids(pub) == list(range(5, 13))
    _adds_up(stats)
    proc.stop()


def test_an_engine_that_cannot_go_on_is_loud_and_counts_every_frame() -> None:
    """A non-Exception escaping the engine (here SystemExit from the backend) ends the thread: it
    says so (critical log, engineAlive 0) and every later frame is counted dropped, never silent."""

    class _Exit(_FailOnce):
        def compute(self, frames):  # noqa: ANN001, ANN201
            raise SystemExit("injected")

    proc, pub = _make(dict(SMALL, batch_size=2, batch_timeout_ms=20))
    proc.pipeline.backend = _Exit(proc.pipeline.backend)
    for obj in _encode(planted_frames(2, seed=12)):
        proc.process(obj)
    proc.start()
    wait_until(lambda: proc.getStats()["engineAlive"] == 0, 30, what="the engine to end")
    for obj in _encode(planted_frames(3, seed=13), first_id=3):
        proc.process(obj)
    stats = proc.getStats()
    assert stats["nEngineErrors"] == 1 and stats["nDropped"] == 5 and stats["nProcessed"] == 0
    _adds_up(stats)
    assert pub.objects == []
    proc.stop()  # returns at once: nothing left to drain
    assert proc.finder is None


def test_engine_survives_a_fault_outside_the_batch_and_recovers() -> None:
    """The historic killer: a timeout no threading wait accepts (batch_timeout_ms = 1e16, now refused
    by configure) raised in the batching code itself, outside the per-batch try, and the thread died
    for good while nDropped grew. Forced in here past the validation."""
    proc, pub = _make(dict(SMALL, batch_size=4, batch_timeout_ms=20))
    proc.start()
    object.__setattr__(proc.params, "batch_timeout_ms", 1e16)
    time.sleep(0.7)  # the engine reads the timeout when it starts waiting for a batch (idle wait: 0.5 s)
    for obj in _encode(planted_frames(3, seed=3)):
        proc.process(obj)
    wait_until(lambda: proc.getStats()["nDropped"] == 3, 30, what="3 frames lost to engine errors")
    assert proc.getStats()["nEngineErrors"] >= 1 and proc._engine.is_alive()
    object.__setattr__(proc.params, "batch_timeout_ms", 20.0)
    time.sleep(0.7)  # let the engine's current wait (still with the bad timeout) end
    for obj in _encode(planted_frames(6, seed=4), first_id=4):
        proc.process(obj)
    wait_until(lambda: len(pub.objects) == 6, 60, what="6 outputs after recovery")
    stats = proc.getStats()
    assert stats["engineAlive"] == 1 and stats["nProcessed"] == 6 and stats["nDropped"] == 3
    assert stats["nMissedIds"] == 0  # lost here, not upstream
    _adds_up(stats)
    proc.stop()
    assert not proc._engine.is_alive()


# -- item 6: counters that name the right cause -------------------------------------------------


def test_id_gaps_out_of_order_and_duplicates_are_not_losses() -> None:
    c = IdGapCounter(1, 1)
    for uid in (1, 2, 4, 3, 5, 6, 6, 8):
        c.update(uid)
    assert (c.missed, c.reordered) == (1, 2)  # only 7 is missing; 3 came late, 6 twice
    c.update(7)
    assert (c.missed, c.reordered) == (0, 3)
    for uid in (1000, 1001, 1, 2, 4):  # far behind: a restarted source, the pattern starts again
        c.update(uid)
    assert c.missed == 991 + 1  # 9..999 missed before 1000, then 3 after the restart


def test_id_gaps_with_the_distributor_pattern_and_reordering() -> None:
    c = IdGapCounter(4, 5)  # 2 consumers x 4 updates: this one sees 1-4, 9-12, 17-20
    for uid in (1, 2, 4, 3, 9, 11, 10, 12, 17):
        c.update(uid)
    assert (c.missed, c.reordered) == (0, 2)


def test_bad_frames_are_not_counted_as_missed_ids() -> None:
    proc, pub = _make(dict(SMALL, batch_size=4, batch_timeout_ms=20))
    proc.start()
    frames = planted_frames(10, seed=5)
    for i, obj in enumerate(_encode(frames)):
        if i in (2, 5, 6):
            obj = codec.encode_ntndarray(bad_frame("nan", frames[i]), unique_id=i + 1)
        proc.process(obj)
    wait_until(lambda: len(pub.objects) == 7, 60, what="7 outputs")
    stats = proc.getStats()
    assert stats["nBadFrames"] == 3 and stats["nMissedIds"] == 0 and stats["nProcessed"] == 7
    _adds_up(stats)
    proc.stop()


# -- item 7: frame size and bytes in flight -----------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_oversized_frames_are_bad_frames_with_a_clear_log() -> None:
    proc, pub = _make(dict(SMALL, max_frame_mpix=0.01))  # 10 000 px; 2x64x64 = 8192 px fits
    records = _Records()
    proc.logger.addHandler(records)  # pvapy's logger need not propagate to the root
    proc.logger.setLevel(logging.WARNING)  # as with pvapy-hpc-consumer -ll warning
    proc.start()
    big = np.zeros((2, 96, 64), np.float32)  # 12 288 px
    proc.process(codec.encode_ntndarray(big, unique_id=1))
    for obj in _encode(planted_frames(2, seed=6), first_id=2):
        proc.process(obj)
    wait_until(lambda: len(pub.objects) == 2, 60, what="2 outputs")
    stats = proc.getStats()
    assert stats["nBadFrames"] == 1 and stats["nProcessed"] == 2 and stats["nMissedIds"] == 0
    assert any("0.0123 Mpx is larger than max_frame_mpix=0.01" in m for m in records.messages), records.messages
    proc.stop()
    proc.logger.removeHandler(records)


def test_byte_budget_drops_and_counts_frames_over_it() -> None:
    frame_bytes = 2 * 64 * 64 * 4
    proc, pub = _make(dict(SMALL, max_inflight_mb=3.5 * frame_bytes / 1e6, ring_size=100))
    for obj in _encode(planted_frames(6, seed=7)):  # engine not started: 3 fit in the budget
        proc.process(obj)
    stats = proc.getStats()
    assert stats["ringFill"] == 3 and stats["nDropped"] == 3
    assert stats["inflightMB"] == pytest.approx(3 * frame_bytes / 1e6)
    proc.start()
    proc.stop()
    assert _ids(pub) == [1, 2, 3]
    assert proc.getStats()["inflightMB"] == 0.0


# -- item 2: a full disk is a counted error, never a crash --------------------------------------

_FSIZE_WRAP = textwrap.dedent(
    """
    import os, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, as ENOSPC would be
    limit = int(os.environ["PEAKNET_TEST_FSIZE"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
    """
)


def test_writer_library_survives_a_full_disk_in_a_real_process(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes every chunk write fail with EFBIG in a subprocess (no root, no tmpfs):
    before the fix libhdf5 crashed the process (SIGSEGV) after the first failure."""
    script = textwrap.dedent(
        f"""
        import json, resource, sys
        import numpy as np
        from peaknet_pva.cxi import CxiWriter
        from peaknet_pva.frames import PeakTable
        pk = PeakTable(panel=[0], y=[1.0], x=[2.0], intensity=[3.0], npix=[1])
        w = CxiWriter(sys.argv[1], frames_per_file=4, retry_chunks=2, retry_interval_s=0)
        errors = 0
        for i in range(12):  # 3 chunks, none fits under the limit: the oldest is dropped
            w.add(np.ones((2, 64, 64), np.float32), pk, photon_energy_ev=9000.0, unique_id=i + 1, timestamp_ns=i)
        mid = w.stats()
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        for i in range(12, 14):
            w.add(np.ones((2, 64, 64), np.float32), pk, photon_energy_ev=9000.0, unique_id=i + 1, timestamp_ns=i)
        w.close()
        print(json.dumps({{"mid": mid, "end": w.stats()}}))
        """
    )
    env = dict(os.environ, PEAKNET_TEST_FSIZE="60000", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _FSIZE_WRAP, "-c", script, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["mid"]["n_frames_written"] == 0 and res["mid"]["n_frames_pending"] == 8
    assert res["mid"]["n_frames_lost"] == 4 and res["mid"]["n_write_errors"] >= 3
    end = res["end"]
    assert end["n_frames_written"] == 10 and end["n_frames_lost"] == 4 and end["n_frames_pending"] == 0
    assert end["n_frames_written"] + end["n_frames_lost"] == 14
    uids = sorted(int(u) for p in tmp_path.glob("*.cxi") for u in read_cxi(p).unique_id)
    assert uids == list(range(5, 15))
    assert not list(tmp_path.glob("*.inprogress"))


def _add(w: CxiWriter, n: int, first: int = 1) -> None:
    for i in range(n):
        w.add(np.ones((2, 8, 8), np.float32), PEAKS, photon_energy_ev=9000.0, unique_id=first + i, timestamp_ns=i)


def test_enospc_keeps_the_chunk_for_a_retry_then_writes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = CxiWriter(tmp_path, frames_per_file=3, retry_chunks=1, retry_interval_s=0)
    real_write = os.write
    full = {"on": True}

    def write(fd: int, data: object) -> int:
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(cxi_mod.os, "write", write)
    _add(w, 3)
    assert (w.n_frames_written, w.n_frames_pending, w.n_frames_lost, w.n_write_errors) == (0, 3, 0, 1)
    assert not list(tmp_path.glob("*.cxi*"))  # nothing half-written left behind
    _add(w, 3, first=4)  # a second failed chunk: over retry_chunks=1, the oldest is lost
    assert (w.n_frames_pending, w.n_frames_lost) == (3, 3)
    full["on"] = False
    assert w.retry_pending() == 3
    _add(w, 2, first=7)
    w.close()
    assert w.n_frames_written == 5 and w.n_frames_lost == 3 and w.n_frames_pending == 0
    uids = sorted(int(u) for p in w.files for u in read_cxi(p).unique_id)
    assert uids == [4, 5, 6, 7, 8]


def test_close_with_the_disk_still_full_counts_the_frames_and_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = CxiWriter(tmp_path, frames_per_file=10)
    _add(w, 4)
    monkeypatch.setattr(cxi_mod.os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError, match="4 frames could not be written"):
        w.close()
    assert w.n_frames_lost == 4 and w.n_frames_written == 0 and w.closed


def test_writer_processor_retries_geometry_and_counts_lost_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The .geom whose first write failed is written later; a chunk the disk never takes is in
    nFramesLost (frames, not chunks), and nWritten + nFramesLost = the hits."""
    out = tmp_path / "cxi"
    proc = CxiFileProcessor(dict(PVAPY_KEYS, output_dir=str(out), frames_per_file=2, min_peaks=0, idle_close_s=60,
                                 retry_chunks=0, retry_interval_s=0))
    real_geom = cxi_proc_mod.write_geometry
    calls = {"n": 0}

    def geom_fails_once(*args: object, **kwargs: object) -> Path:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_geom(*args, **kwargs)

    monkeypatch.setattr(cxi_proc_mod, "write_geometry", geom_fails_once)
    real_write = os.write
    full = {"on": True}
    monkeypatch.setattr(cxi_mod.os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
                        if full["on"] else real_write(fd, data))
    frames = planted_frames(5, seed=8)

    def out_obj(i: int) -> object:
        nt = codec.encode_ntndarray(frames[i], unique_id=i + 1, attributes={"PhotonEnergy": 9000.0})
        return codec.build_output(codec.decode_ntndarray(nt, PanelLayout((64, 64))), PEAKS, include_image=True)

    proc.start()
    for i in range(2):  # chunk 1: the disk is full, retry_chunks=0 -> lost at once
        proc.process(out_obj(i))
    wait_until(lambda: proc.getStats()["nFramesLost"] == 2, 20, what="2 frames lost")
    full["on"] = False
    for i in range(2, 5):
        proc.process(out_obj(i))
    proc.stop()
    stats = proc.getStats()
    assert (out / "peaknet.geom").exists() and calls["n"] == 2
    assert stats["nWritten"] == 3 and stats["nFramesLost"] == 2 and stats["nWriteErrors"] >= 1
    assert stats["nWritten"] + stats["nFramesLost"] == stats["nReceived"] == 5


@pytest.mark.pva
def test_real_writer_consumer_survives_a_full_disk_and_catches_up(tmp_path: Path) -> None:
    """A real CxiFileProcessor consumer under RLIMIT_FSIZE (every chunk write fails with EFBIG,
    small files still fit): alive, errors counted, frames kept; once the limit is lifted (prlimit
    from here) the retries write every frame: 0 lost."""
    tag = unique_tag("full")
    out_dir = tmp_path / "cxi"
    src = f"{tag}:src:1:output"
    server = pva.PvaServer()
    server.addRecord(src, codec.output_type(), None)
    server.start()
    args = {"output_dir": str(out_dir), "frames_per_file": 5, "min_peaks": 0, "idle_close_s": 120,
            "retry_chunks": 4, "retry_interval_s": 0.5}
    frames = planted_frames(15, seed=9)
    try:
        with consumer_set(CXI_CLASS, f"{tag}:src:*:output", tag, tmp_path, role="wr", processor_args=args,
                          output=False, server_queue_size=1000, wrap=["-c", _FSIZE_WRAP],
                          env=dict(os.environ, PEAKNET_TEST_FSIZE="300000")) as wr:
            for i in range(15):
                nt = codec.encode_ntndarray(frames[i], unique_id=i + 1, attributes={"PhotonEnergy": 9000.0})
                server.update(src, codec.build_output(codec.decode_ntndarray(nt, PanelLayout((64, 64))), PEAKS,
                                                      include_image=True))
                time.sleep(0.01)
            wait_until(lambda: user_stats(wr, fresh_after=time.time())[0]["nPending"] == 15, 30,
                       what="3 failed chunks pending")
            st = user_stats(wr, fresh_after=time.time())[0]
            assert wr.poll() is None and st["nWriteErrors"] >= 3 and st["nWritten"] == 0 and st["nFramesLost"] == 0
            assert (out_dir / "peaknet.geom").exists()  # small files still fit
            resource.prlimit(wr.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            wait_until(lambda: user_stats(wr, fresh_after=time.time())[0]["nWritten"] == 15, 30, what="retries")
            assert wr.stop(timeout_s=STOP_TIMEOUT_S) == 0, wr.log_text()[-3000:]
    finally:
        server.stop()
    uids = sorted(int(u) for p in out_dir.glob("*.cxi") for u in read_cxi(p).unique_id)
    assert uids == list(range(1, 16))
    assert not list(out_dir.glob("*.inprogress"))
    assert "Segmentation" not in wr.log_text()


# -- items 4 + 5: start-up order and SIGTERM, real processes ------------------------------------


@pytest.mark.pva
def test_writer_first_then_consumer_then_source_and_sigterm_loses_nothing(tmp_path: Path) -> None:
    """The documented order (writer, PeakNet consumer, then the frame source): the output channel
    exists before the first frame, so the writer is connected before any frame and every hit reaches
    CXI. Then frames queued in the ring (a one-minute batch timeout) and the writer's open chunk
    survive SIGTERM to both -nc 1 consumers: all published, all written, the chunk closed."""
    tag = unique_tag("term")
    image = f"{tag}:image"
    out_dir = tmp_path / "cxi"
    wr_args = {"output_dir": str(out_dir), "frames_per_file": 100, "min_peaks": 0, "idle_close_s": 600}
    pk_args = dict(PEAKNET_CPU_ARGS, batch_size=64, ring_size=64)
    wr = procs.start_consumer(CXI_CLASS, f"{tag}:pk:*:output", status_channel=f"{tag}:wr:*:status",
                              control_channel=f"{tag}:wr:*:control", processor_args=wr_args, server_queue_size=1000,
                              log_path=tmp_path / "wr.log", name="wr", report_period_s=1.0)
    pk = procs.start_consumer(PEAKNET_CLASS, image, output_channel=f"{tag}:pk:*:output",
                              status_channel=f"{tag}:pk:*:status", control_channel=f"{tag}:pk:*:control",
                              processor_args=pk_args, server_queue_size=200, log_path=tmp_path / "pk.log", name="pk",
                              report_period_s=1.0)
    try:
        procs.wait_for_status(pk.status_channels, timeout_s=START_TIMEOUT_S, proc=pk)
        procs.wait_for_status(wr.status_channels, timeout_s=START_TIMEOUT_S, proc=wr)
        # No frame source yet: the writer must already see the output channel (its initial value).
        procs.wait_for_status(wr.status_channels, timeout_s=30, proc=wr, min_received=1)
        frames = planted_frames(30, seed=10)
        with ReplayServer(image) as srv:
            procs.wait_for_status(pk.status_channels, timeout_s=30, proc=pk, min_received=1)
            first = [srv.publish(f, photon_energy_ev=9000.0) for f in frames[:10]]
            wait_until(lambda: user_stats(wr, fresh_after=time.time())[0]["nReceived"] == 10, 60,
                       what="the first 10 hits at the writer")
            # A valid 67 Mpx slab (uint8, 8192 x 8192) used to OOM-kill the consumer: now refused
            # from its declared size (max_frame_mpix 40) before it is decoded.
            srv.publish(np.zeros((8192, 8192), np.uint8), photon_energy_ev=9000.0)
            wait_until(lambda: user_stats(pk, fresh_after=time.time())[0]["nBadFrames"] == 1, 30,
                       what="the 67 Mpx frame counted bad")
            assert pk.poll() is None and "67.1 Mpx is larger than max_frame_mpix=40" in pk.log_text()
            procs.send_control(pk.control_channels[0], "configure", {"batch_timeout_ms": 60_000})
            time.sleep(1.5)
            queued = [srv.publish(f, photon_energy_ev=9000.0) for f in frames[10:]]
            wait_until(lambda: user_stats(pk, fresh_after=time.time())[0]["nFramesIn"] == 31, 20,
                       what="20 frames queued")
            st = user_stats(pk, fresh_after=time.time())[0]
            assert st["nProcessed"] == 10  # the other 20 wait for the (one-minute) batch timeout
            assert st["nMissedIds"] == 0 and st["nDropped"] == 0
            t0 = time.monotonic()
            pk.send_signal(signal.SIGTERM)
            pk.popen.wait(STOP_TIMEOUT_S)
            drain_s = time.monotonic() - t0
            assert pk.poll() == 0, pk.log_text()[-3000:]
            wait_until(lambda: user_stats(wr, fresh_after=time.time())[0]["nReceived"] == 30, 30,
                       what="the 20 drained hits at the writer")
            assert user_stats(wr)[0]["nBuffered"] == 30
            wr.send_signal(signal.SIGTERM)
            wr.popen.wait(STOP_TIMEOUT_S)
            assert wr.poll() == 0, wr.log_text()[-3000:]
    finally:
        pk.stop(timeout_s=STOP_TIMEOUT_S)
        wr.stop(timeout_s=STOP_TIMEOUT_S)
    assert "SIGTERM" in pk.log_text() and drain_s < STOP_TIMEOUT_S
    files = sorted(out_dir.glob("*.cxi"))
    uids = [int(u) for p in files for u in read_cxi(p).unique_id]
    assert sorted(uids) == first + queued  # every hit exactly once, none lost at start-up or at SIGTERM
    assert not list(out_dir.glob("*.inprogress"))


@pytest.mark.pva
def test_sigterm_to_a_forked_parent_drains_its_children(tmp_path: Path) -> None:
    """-nc 2: SIGTERM kills pvapy's parent (nothing of ours runs there); each forked consumer
    notices its parent is gone, drains, closes its chunk and exits: no orphans, nothing lost."""
    tag = unique_tag("orph")
    out_dir = tmp_path / "cxi"
    server = pva.PvaServer()
    srcs = [f"{tag}:src:{k}:output" for k in (1, 2)]
    for src in srcs:
        server.addRecord(src, codec.output_type(), None)
    server.start()
    args = {"output_dir": str(out_dir), "frames_per_file": 100, "min_peaks": 0, "idle_close_s": 600}
    frames = planted_frames(7, seed=11)
    try:
        with consumer_set(CXI_CLASS, f"{tag}:src:*:output", tag, tmp_path, role="wr", n_consumers=2,
                          processor_args=args, output=False, server_queue_size=1000) as wr:
            uid = 0
            for src in srcs:
                for f in frames:
                    uid += 1
                    nt = codec.encode_ntndarray(f, unique_id=uid, attributes={"PhotonEnergy": 9000.0})
                    server.update(src, codec.build_output(codec.decode_ntndarray(nt, PanelLayout((64, 64))), PEAKS,
                                                          include_image=True))
                    time.sleep(0.01)
            wait_until(lambda: [s["nBuffered"] for s in user_stats(wr, fresh_after=time.time())] == [7, 7], 30,
                       what="7 buffered in each child")
            kids = wr.children()
            assert len(kids) >= 2
            wr.send_signal(signal.SIGTERM)
            wr.popen.wait(10)
            assert wr.poll() == -signal.SIGTERM  # pvapy's parent cannot handle it
            wait_until(lambda: not [p for p in kids if procs._alive(p)], 30, what="the children to drain and exit")
    finally:
        server.stop()
    uids = sorted(int(u) for p in out_dir.glob("*.cxi") for u in read_cxi(p).unique_id)
    assert uids == list(range(1, 15))
    assert not list(out_dir.glob("*.inprogress"))
    assert "parent process" in wr.log_text()


@pytest.mark.pva
def test_sigterm_to_a_forked_peaknet_parent_publishes_every_queued_frame(tmp_path: Path) -> None:
    """-nc 2 PeakNet: 16 frames wait in the two rings (a one-minute batch timeout); SIGTERM to the
    parent kills it, and each child, seeing its parent gone, drains and publishes its frames."""
    tag = unique_tag("pkorph")
    image = f"{tag}:image"
    args = dict(PEAKNET_CPU_ARGS, batch_size=64, batch_timeout_ms=60_000, ring_size=64)
    frames = planted_frames(16, seed=14)
    with ReplayServer(image) as srv:
        with consumer_set(PEAKNET_CLASS, image, tag, tmp_path, role="pk", n_consumers=2, distributor_updates=2,
                          processor_args=args) as pk:
            with procs.OutputMonitor(pk.output_channels) as mon:
                mon.wait_connected(30)
                ids = [srv.publish(f, photon_energy_ev=7000.0) for f in frames]
                wait_until(lambda: sum(s["nFramesIn"] for s in user_stats(pk, fresh_after=time.time())) == len(ids),
                           20, what="frames in the rings")
                assert mon.n_updates == 0  # nothing ran yet
                kids = pk.children()
                pk.send_signal(signal.SIGTERM)
                pk.popen.wait(10)
                assert pk.poll() == -signal.SIGTERM
                missing = mon.wait_for(ids, timeout_s=STOP_TIMEOUT_S)
                wait_until(lambda: not [p for p in kids if procs._alive(p)], 30, what="the children to exit")
    assert not missing, f"lost on SIGTERM: {sorted(missing)}"
    assert sorted(mon.snapshot()) == ids and all(len(v) == 1 for v in mon.snapshot().values())
    assert pk.log_text().count("stopped (parent process") == 2
