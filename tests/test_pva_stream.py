"""Real processes on loopback: replay server → pvapy-hpc-consumer (PeakNetImageProcessor) →
pvapy-hpc-consumer (CxiFileProcessor) → CXI files. Small frames (2×64×64), a small random-weight
model on the CPU, tens to ~120 frames, unique channel names per test, every process bounded and
stopped by PID (SIGINT; SIGKILL only where the test is about it)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pva_helpers import (  # noqa: I001
    CXI_CLASS,
    PEAKNET_CLASS,
    PEAKNET_CPU_ARGS,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    consumer_set,
    planted_frames,
    tiny_dataset,
    unique_tag,
    user_stats,
    wait_until,
)

import pvaccess as pva  # noqa: E402

from peaknet_pva.cxi import read_cxi  # noqa: E402
from peaknet_pva.frames import PanelLayout, PeakTable  # noqa: E402
from peaknet_pva.pva import codec, procs  # noqa: E402
from peaknet_pva.pva.replay import BAD_KINDS, ReplayServer  # noqa: E402

pytestmark = [pytest.mark.pva, pytest.mark.timeout(300)]

H = W = 64
EV_TO_J = 1.602176634e-19


def _peaks_equal(a: PeakTable, b: PeakTable) -> None:
    assert a.n == b.n
    np.testing.assert_array_equal(a.panel, b.panel)
    np.testing.assert_allclose(a.y, b.y, atol=1e-4)
    np.testing.assert_allclose(a.x, b.x, atol=1e-4)
    np.testing.assert_allclose(a.intensity, b.intensity, rtol=1e-6)
    np.testing.assert_array_equal(a.npix, b.npix)


def test_replay_peaknet_cxi_end_to_end(tmp_path: Path) -> None:
    """120 simulated frames through 2 PeakNet consumers (distributor, 4 updates each) and 2 CXI
    writers: every uniqueId processed exactly once, the files hold exactly the published peaks,
    photon energies and ids, in the CXI layout of DESIGN 2.4."""
    from peaknet_pva.simulate import load_dataset

    n_frames = 120
    data_dir = tiny_dataset(tmp_path / "data", n_frames=n_frames, seed=11)
    ds = load_dataset(data_dir)
    out_dir = tmp_path / "cxi"
    tag = unique_tag("e2e")
    image = f"{tag}:image"
    pk_status = [f"{tag}:pk:{i}:status" for i in (1, 2)]
    wr_status = [f"{tag}:wr:{i}:status" for i in (1, 2)]
    args = dict(PEAKNET_CPU_ARGS)
    args.pop("photon_energy_ev")  # must come from the frames
    replay = procs.start_replay(
        data_dir, image, fps=40, wait_connected=pk_status + wr_status,
        extra=["--wait-timeout", str(2 * START_TIMEOUT_S), "--report-period", "0"],
        log_path=tmp_path / "replay.log",
    )
    try:
        with consumer_set(PEAKNET_CLASS, image, tag, tmp_path, role="pk", n_consumers=2,
                          distributor_updates=4, processor_args=args) as pk:
            with procs.OutputMonitor(pk.output_channels) as mon:
                mon.wait_connected(30)
                writer_args = {"output_dir": str(out_dir), "frames_per_file": 16, "min_peaks": 0, "idle_close_s": 60}
                with consumer_set(CXI_CLASS, f"{tag}:pk:*:output", tag, tmp_path, role="wr", n_consumers=2,
                                  processor_args=writer_args, output=False, server_queue_size=1000) as wr:
                    assert replay.popen.wait(120) == 0, replay.log_text()
                    missing = mon.wait_for(range(1, n_frames + 1), timeout_s=120)
                    assert not missing, f"never published: {sorted(missing)[:20]}"
                    wait_until(lambda: sum(s.get("nReceived", 0) for s in user_stats(wr)) >= n_frames, 60,
                               what="writers received every frame")
                pk_stats = user_stats(pk)
            published = mon.snapshot()
    finally:
        replay.stop(10)

    # Exactly once across the consumers, and nothing else.
    assert sorted(published) == list(range(1, n_frames + 1))
    assert all(len(v) == 1 for v in published.values()), {k: len(v) for k, v in published.items() if len(v) != 1}
    assert sum(s["nProcessed"] for s in pk_stats) == n_frames
    assert sum(s["nDropped"] + s["nBadFrames"] + s["nMissedIds"] for s in pk_stats) == 0
    # The distributor pattern: consumer k got blocks of 4 consecutive ids.
    by_channel: dict[str, list[int]] = {}
    for uid, [(ch, _, _)] in published.items():
        by_channel.setdefault(ch, []).append(uid)
    assert len(by_channel) == 2 and all(len(v) == n_frames // 2 for v in by_channel.values())

    # CXI files: every frame, the published peaks, energies and ids.
    files = sorted(out_dir.glob("*.cxi"))
    assert not list(out_dir.glob("*.inprogress"))
    assert {f.name.split("-")[1] for f in files} == {"c1", "c2"}
    seen: dict[int, tuple[PeakTable, float, int]] = {}
    for f in files:
        c = read_cxi(f)
        for i, uid in enumerate(c.unique_id.tolist()):
            assert uid not in seen
            seen[uid] = (c.peaks[i], float(c.photon_energy_ev[i]), int(c.timestamp_ns[i]))
            np.testing.assert_array_equal(c.data[i], ds.frames[uid - 1].reshape(2 * H, W))
        _check_cxi_layout(f)
    assert sorted(seen) == list(range(1, n_frames + 1))
    for uid, [(_, peaks, meta)] in published.items():
        file_peaks, energy, ts = seen[uid]
        _peaks_equal(file_peaks, peaks)
        assert energy == pytest.approx(ds.photon_energy_ev[uid - 1]) == pytest.approx(meta.photon_energy_ev)
        assert ts == meta.timestamp_ns > 0
    geom = (out_dir / "peaknet.geom").read_text()
    for line in ("dim0 = %", "dim1 = ss", "dim2 = fs", "peak_list = /entry_1/result_1", "peak_list_type = cxi"):
        assert line in geom


def _check_cxi_layout(path: Path) -> None:
    """DESIGN 2.4, field by field."""
    with h5py.File(path, "r") as fh:
        data = fh["entry_1/data_1/data"]
        n = data.shape[0]
        assert data.shape[1:] == (2 * H, W) and data.dtype == np.float32 and data.chunks == (1, 2 * H, W)
        res = fh["entry_1/result_1"]
        assert res["nPeaks"].dtype == np.int32 and res["nPeaks"].shape == (n,)
        for name in ("peakXPosRaw", "peakYPosRaw", "peakTotalIntensity", "peakNPixels", "peakSegPosRaw"):
            assert res[name].dtype == np.float32 and res[name].shape == (n, 2048), name
        n_peaks = res["nPeaks"][()]
        ys, xs, seg = res["peakYPosRaw"][()], res["peakXPosRaw"][()], res["peakSegPosRaw"][()]
        for i in range(n):
            k = int(n_peaks[i])
            assert not ys[i, k:].any() and not xs[i, k:].any()  # zero-padded
            # Slab y = p*H + y, clamped so the peak stays on its panel in CrystFEL's eyes.
            lo = seg[i, :k] * H - 0.5
            assert ((ys[i, :k] >= lo) & (ys[i, :k] < lo + H)).all()
            assert ((xs[i, :k] >= -0.5) & (xs[i, :k] < W - 0.5)).all()
        ev = fh["LCLS/photon_energy_eV"][()]
        assert ev.shape == (n,) and (ev > 0).all()
        np.testing.assert_allclose(fh["entry_1/instrument_1/source_1/energy"][()], ev * EV_TO_J, rtol=1e-12)
        assert fh["entry_1/pva/uniqueId"].dtype == np.uint64 and fh["entry_1/pva/timestamp_ns"].dtype == np.uint64


def test_bad_frames_are_counted_and_good_frames_processed(tmp_path: Path) -> None:
    """1-D, empty, wrong rows, NaN, Inf and int64 frames between good 3-D frames (float32 and
    uint16): each bad one is counted in nBadFrames and not published; the consumer keeps going."""
    tag = unique_tag("bad")
    image = f"{tag}:image"
    good = planted_frames(30, seed=21)
    with ReplayServer(image, three_d=True) as srv:
        with consumer_set(PEAKNET_CLASS, image, tag, tmp_path, role="pk", processor_args=PEAKNET_CPU_ARGS) as pk:
            with procs.OutputMonitor(pk.output_channels) as mon:
                mon.wait_connected(30)
                good_ids, bad_ids = [], []
                for i, frame in enumerate(good):
                    frame = frame if i % 3 else np.clip(frame, 0, 60000).astype(np.uint16)
                    good_ids.append(srv.publish(frame, photon_energy_ev=8000.0 + i))
                    if i % 2 == 0 and len(bad_ids) < 2 * len(BAD_KINDS):
                        bad_ids.append(srv.publish_bad(BAD_KINDS[len(bad_ids) % len(BAD_KINDS)], like=good[0]))
                    time.sleep(0.02)
                assert not mon.wait_for(good_ids, timeout_s=60)
                t = time.time()
                wait_until(lambda: user_stats(pk, fresh_after=t)[0]["nBadFrames"] == len(bad_ids), 15,
                           what=f"nBadFrames == {len(bad_ids)}")
                # Still running: more good frames go through.
                more = [srv.publish(f, photon_energy_ev=9000.0) for f in planted_frames(5, seed=22)]
                assert not mon.wait_for(more, timeout_s=30)
                stats = user_stats(pk, fresh_after=time.time())[0]
                published = mon.snapshot()
            assert pk.poll() is None
    assert not set(bad_ids) & set(published)
    assert sorted(published) == sorted(good_ids + more)
    assert stats["nBadFrames"] == len(bad_ids) == 12
    assert stats["nProcessed"] == len(good_ids) + len(more) and stats["nDropped"] == 0
    # 3-D (P, H, W) frames came out as the 2-D slab with panelShape, dtype preserved.
    _, meta = published[good_ids[0]][0][1:]
    assert meta.panel_shape == (H, W) and meta.image.shape == (2, H, W) and meta.image.dtype == np.uint16
    np.testing.assert_array_equal(meta.image, np.clip(good[0], 0, 60000).astype(np.uint16))
    assert published[good_ids[1]][0][2].photon_energy_ev == 8001.0


def test_configure_through_control_channel(tmp_path: Path) -> None:
    """configure {"min_peaks": 0} via the control channel turns later frames into hits (their
    images are forwarded under forward_images=hits_empty); an invalid value keeps the old one."""
    tag = unique_tag("cfg")
    image = f"{tag}:image"
    args = dict(PEAKNET_CPU_ARGS, min_peaks=1_000_000, forward_images="hits_empty")
    frames = planted_frames(10, seed=31)
    with ReplayServer(image) as srv:
        with consumer_set(PEAKNET_CLASS, image, tag, tmp_path, role="pk", processor_args=args) as pk:
            with procs.OutputMonitor(pk.output_channels) as mon:
                mon.wait_connected(30)
                before = [srv.publish(f) for f in frames[:5]]
                assert not mon.wait_for(before, timeout_s=60)
                control = pk.control_channels[0]
                procs.send_control(control, "configure", {"min_peaks": 0})
                wait_until(lambda: user_stats(pk, fresh_after=time.time())[0]["minPeaks"] == 0, 20, what="minPeaks 0")
                procs.send_control(control, "configure", {"min_peaks": "many"})  # rejected, logged
                procs.send_control(control, "configure", {"batch_size": 1})  # not a run-time key
                t = time.time()
                after = [srv.publish(f) for f in frames[5:]]
                assert not mon.wait_for(after, timeout_s=60)
                assert user_stats(pk, fresh_after=t)[0]["minPeaks"] == 0
                published = mon.snapshot()
    assert all(published[u][0][2].image is None for u in before)
    assert all(published[u][0][2].image is not None for u in after)
    log = pk.log_text()
    assert "rejected" in log and "min_peaks" in log


def test_sigint_drains_queued_frames(tmp_path: Path) -> None:
    """Frames received before SIGINT are all published: with a batch timeout of a minute and a big
    batch they all wait in the ring until the (forked, -nc 2) consumers are told to stop."""
    tag = unique_tag("drain")
    image = f"{tag}:image"
    args = dict(PEAKNET_CPU_ARGS, batch_size=64, batch_timeout_ms=60_000, ring_size=64)
    frames = planted_frames(24, seed=41)
    with ReplayServer(image) as srv:
        with consumer_set(PEAKNET_CLASS, image, tag, tmp_path, role="pk", n_consumers=2, distributor_updates=2,
                          processor_args=args) as pk:
            with procs.OutputMonitor(pk.output_channels) as mon:
                mon.wait_connected(30)
                ids = [srv.publish(f, photon_energy_ev=7000.0) for f in frames]
                wait_until(lambda: sum(s["nFramesIn"] for s in user_stats(pk, fresh_after=time.time())) == len(ids),
                           20, what="frames in the rings")
                assert mon.n_updates == 0  # nothing ran yet
                rc = pk.stop(timeout_s=STOP_TIMEOUT_S)
                assert rc == 0, pk.log_text()[-2000:]
                missing = mon.wait_for(ids, timeout_s=10)
    assert not missing, f"lost on shutdown: {sorted(missing)}"
    assert not [pid for pid in pk._children_seen if procs._alive(pid)]  # the forked consumers exited too


def _serve_outputs(server: pva.PvaServer, channel: str, first_id: int, n: int) -> list[int]:
    frames = planted_frames(n, seed=first_id)
    ids = []
    for i in range(n):
        uid = first_id + i
        nt = codec.encode_ntndarray(frames[i], unique_id=uid, attributes={"PhotonEnergy": 9000.0 + uid})
        f = codec.decode_ntndarray(nt, PanelLayout((H, W)))
        peaks = PeakTable(panel=[0, 1, 1], y=[1.0, 2.0, 63.4], x=[3.0, 4.0, 0.2], intensity=[1, 2, 3], npix=[1, 2, 3])
        server.update(channel, codec.build_output(f, peaks, include_image=True))
        ids.append(uid)
        time.sleep(0.01)
    return ids


def _digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_writer_sigkill_leaves_valid_files_and_restart_continues(tmp_path: Path) -> None:
    """SIGKILL a CxiFileProcessor consumer (-nc 1: no fork) mid-run: every closed .cxi opens with
    consistent arrays; a restart on the same directory continues the chunk numbers and never
    overwrites a file."""
    tag = unique_tag("kill")
    out_dir = tmp_path / "cxi"
    src = f"{tag}:src:1:output"
    server = pva.PvaServer()
    server.addRecord(src, codec.output_type(), None)
    server.start()
    writer_args = {"output_dir": str(out_dir), "frames_per_file": 5, "min_peaks": 0, "idle_close_s": 120}
    try:
        with consumer_set(CXI_CLASS, f"{tag}:src:*:output", tag, tmp_path, role="wr", processor_args=writer_args,
                          output=False, server_queue_size=1000) as wr:
            _serve_outputs(server, src, 1, 23)
            wait_until(lambda: len(list(out_dir.glob("*.cxi"))) == 4, 30, what="4 closed files")
            wait_until(lambda: user_stats(wr, fresh_after=time.time())[0]["nBuffered"] == 3, 15, what="3 buffered")
            wr.kill()  # SIGKILL by PID; the 3 buffered frames are lost, by design
            assert wr.poll() == -9
        first = sorted(out_dir.glob("*.cxi"))
        assert [p.name for p in first] == [f"peaknet-c1-{i:05d}.cxi" for i in range(4)]
        for p in first:
            with h5py.File(p, "r") as fh:
                n = fh["entry_1/data_1/data"].shape[0]
                assert n == 5 and fh["entry_1/result_1/nPeaks"].shape == (n,)
                assert (fh["entry_1/result_1/nPeaks"][()] == 3).all()
                assert fh["entry_1/result_1/peakXPosRaw"].shape == (n, 2048)
                assert fh["entry_1/pva/uniqueId"].shape == (n,)
        before = _digest(first)

        with consumer_set(CXI_CLASS, f"{tag}:src:*:output", tag, tmp_path, role="wr2", processor_args=writer_args,
                          output=False, server_queue_size=1000) as wr2:
            _serve_outputs(server, src, 24, 7)
            wait_until(lambda: user_stats(wr2, fresh_after=time.time())[0]["nReceived"] == 7, 20, what="7 received")
            assert wr2.stop(timeout_s=STOP_TIMEOUT_S) == 0
    finally:
        server.stop()
    files = sorted(out_dir.glob("*.cxi"))
    assert [p.name for p in files] == [f"peaknet-c1-{i:05d}.cxi" for i in range(6)]
    assert _digest(first) == before
    assert read_cxi(files[4]).unique_id.tolist() == [24, 25, 26, 27, 28]
    assert read_cxi(files[5]).unique_id.tolist() == [29, 30]
    assert not list(out_dir.glob("*.inprogress"))


def test_ad_sim_server_source(tmp_path: Path) -> None:
    """pvapy-ad-sim-server replaying a (F, P*H, W) .npy works as a source; the photon energy then
    comes from the processor's photon_energy_ev."""
    tag = unique_tag("sim")
    image = f"{tag}:image"
    npy = tmp_path / "frames.npy"
    np.save(npy, planted_frames(8, seed=51).reshape(8, 2 * H, W))
    sim = procs.start_ad_sim_server(image, input_file=npy, fps=20, runtime_s=600, start_delay_s=5.0,
                                      log_path=tmp_path / "sim.log")  # stopped below
    try:
        procs.wait_for_status([image], timeout_s=30, proc=sim)  # the image channel answers
        with consumer_set(PEAKNET_CLASS, image, tag, tmp_path, role="pk", processor_args=PEAKNET_CPU_ARGS) as pk:
            with procs.OutputMonitor(pk.output_channels) as mon:
                wait_until(lambda: mon.n_updates >= 10, 60, what="10 outputs")
                published = mon.snapshot()
    finally:
        sim.stop(10)
    metas = [m for v in published.values() for (_, _, m) in v]
    assert all(m.panel_shape == (H, W) and m.image.shape == (2, H, W) for m in metas)
    assert all(m.photon_energy_ev == PEAKNET_CPU_ARGS["photon_energy_ev"] for m in metas)
