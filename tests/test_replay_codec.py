"""``peaknet-pva replay --codec``: frames sent compressed exactly as areaDetector's NDPluginCodec
(ADCore) publishes them, read back over PVA on loopback (issue 11, item 3).

Every replay is the real process (``procs.start_replay``) on a unique channel name, bounded
(``--runtime``) and stopped by PID (SIGINT). The frames are read back with a pvaccess monitor and
checked field by field against what ADCore's NTNDArrayConverter sets for a compressed NDArray
(``value.ubyteValue``, ``codec.name``, ``codec.parameters`` = PVInt(pvData scalar type of the
uncompressed pixels), ``compressedSize``, ``uncompressedSize``), decoded bit-exact by our
``decode_ntndarray`` and, where the library has a one-call decoder, by the library ADCore calls.
One end-to-end test streams ``--codec bslz4`` into a real PeakNet consumer.
"""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pva_helpers import (  # noqa: I001
    PEAKNET_CLASS,
    PEAKNET_CPU_ARGS,
    START_TIMEOUT_S,
    ReadyGate,
    consumer_set,
    planted_frames,
    tiny_dataset,
    unique_tag,
    user_stats,
    wait_until,
)

import pvaccess as pva  # noqa: E402

from peaknet_pva.errors import ConfigError  # noqa: E402
from peaknet_pva.frames import PanelLayout, PeakTable  # noqa: E402
from peaknet_pva.loopback import loopback_env  # noqa: E402
from peaknet_pva.pva import codec as ntcodec  # noqa: E402
from peaknet_pva.pva import compression, procs  # noqa: E402
from peaknet_pva.pva.replay import REPLAY_CODECS, ReplayServer, replay_main  # noqa: E402

pytestmark = [pytest.mark.pva, pytest.mark.timeout(180)]

H = W = 64
P = 2
N_SRC = 6  # source frames per replay (looped)
REPO = Path(__file__).resolve().parents[1]
CODECS = [c for c in REPLAY_CODECS if c != "none"]


@dataclass(frozen=True)
class Case:
    codec: str
    source: str  # "uint16" / "float32": planted spots on Poisson counts (compressible);
    #              "sim": the simulator's float32 frames with per-frame energies (noise: plain
    #              lz4 may not shrink them, and ADCore then sends the larger payload as it is)
    hdf5_framed: bool = False
    three_d: bool = False

    @property
    def id(self) -> str:
        return "-".join([self.codec, self.source] + (["hdf5"] if self.hdf5_framed else []) + (["3d"] if self.three_d else []))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("uint16" if self.source == "uint16" else "float32")


CASES = [Case(c, d) for c in CODECS for d in ("uint16", "float32")] + [
    Case("bslz4", "uint16", hdf5_framed=True),
    Case("lz4", "float32", hdf5_framed=True),
    Case("bslz4", "uint16", three_d=True),
    Case("lz4", "sim"),
    Case("bslz4", "sim"),
]


def _installed(name: str) -> bool:
    return not compression.missing_modules(name)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One looping replay process per case, all started at once (a process start is most of the
    cost), each on its own channel; yields ``{case.id: (channel, frames, energies, proc)}``."""
    from peaknet_pva.simulate import load_dataset

    tmp = tmp_path_factory.mktemp("replay_codec")
    sim_dir = tiny_dataset(tmp / "sim", n_frames=N_SRC, seed=5)  # float32, per-frame energies
    ds = load_dataset(sim_dir)
    sources = {"sim": (sim_dir, np.asarray(ds.frames), np.asarray(ds.photon_energy_ev, np.float64))}
    for dtype in ("uint16", "float32"):
        frames = planted_frames(N_SRC, n_panels=P, seed=8, dtype=dtype)  # (F, P, H, W)
        np.save(tmp / f"{dtype}.npy", frames)
        sources[dtype] = (tmp / f"{dtype}.npy", frames, None)
    tag = unique_tag("rc")
    started: dict[str, Any] = {}
    try:
        for case in CASES:
            if not _installed(case.codec):
                continue
            src, frames, energies = sources[case.source]
            channel = f"{tag}:{case.id}:image"
            proc = procs.start_replay(
                src, channel, fps=25, runtime_s=90, codec=case.codec, hdf5_framed=case.hdf5_framed,
                three_d=case.three_d, photon_energy_ev=None if energies is not None else 9100.0,
                extra=["--loop", "--linger", "0", "--report-period", "0",
                       *(["--panel-shape", str(H), str(W)] if case.three_d else [])],
                log_path=tmp / f"{case.id}.log", name=f"replay-{case.id}",
            )
            started[case.id] = (channel, frames, energies, proc)
        yield started
    finally:
        for _, _, _, proc in started.values():
            proc.stop(10)


def _collect(channel: str, n_src: int, proc: procs.ManagedProcess, timeout_s: float = 60.0) -> dict[int, dict[str, Any]]:
    """Monitor ``channel`` until every source frame (``(uid - 1) % n_src``) arrived once; return
    ``{source index: what the update held}`` (decoded inside the callback: pvapy reuses it)."""
    procs.wait_for_status([channel], timeout_s=timeout_s, proc=proc)  # the channel answers a get
    got: dict[int, dict[str, Any]] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def cb(pv: Any) -> None:
        try:
            uid = int(pv["uniqueId"])
            if uid == 0:
                return  # the record's initial (never published) value
            payload = np.array(pv["value"][0][pv.getSelectedUnionFieldName()], copy=True)
            params = pv["codec"]["parameters"]
            item = {
                "uid": uid,
                "field": pv.getSelectedUnionFieldName(),
                "codec": str(pv["codec"]["name"]),
                "param_value": params[0].get("value"),
                "param_type": params[1].get("value"),
                "compressedSize": int(pv["compressedSize"]),
                "uncompressedSize": int(pv["uncompressedSize"]),
                "dims": [int(d["size"]) for d in pv["dimension"]],
                "payload": payload,
                "decoded": ntcodec.decode_ntndarray(pv, PanelLayout((H, W))),
            }
        except Exception as exc:  # noqa: BLE001 - reported by the test
            with lock:
                errors.append(repr(exc))
            return
        with lock:
            got.setdefault((uid - 1) % n_src, item)

    ch = pva.Channel(channel)
    ch.monitor(cb, "field()")
    try:
        wait_until(lambda: len(got) >= n_src or bool(errors), timeout_s, what=f"{n_src} frames on {channel}")
    finally:
        ch.stopMonitor()
    assert not errors, errors[:3]
    return got


def _reference_decode(case: Case, payload: np.ndarray, nbytes: int, dtype: np.dtype) -> np.ndarray | None:
    """Decode with the library call ADCore's NDPluginCodec uses (None where there is no one-call
    decoder for the format: lz4hdf5 and HDF5-framed lz4 are checked by our decoder only)."""
    raw = payload.tobytes()
    n = nbytes // dtype.itemsize
    if case.codec == "zlib":
        return np.frombuffer(zlib.decompress(raw), dtype)  # uncompress()
    if case.codec == "blosc":
        import blosc

        return np.frombuffer(blosc.decompress(raw), dtype)  # blosc_decompress_ctx
    if case.codec == "lz4" and not case.hdf5_framed:
        import lz4.block

        return np.frombuffer(lz4.block.decompress(raw, uncompressed_size=nbytes), dtype)  # LZ4_decompress_fast
    if case.codec == "bslz4":
        import bitshuffle

        if case.hdf5_framed:  # bitshuffle's HDF5 filter: 8-byte total, 4-byte block bytes, stream
            total, block_bytes = struct.unpack(">QI", raw[:12])
            assert total == nbytes
            return np.asarray(bitshuffle.decompress_lz4(payload[12:], (n,), dtype, block_bytes // dtype.itemsize))
        return np.asarray(bitshuffle.decompress_lz4(payload, (n,), dtype, 0))  # bshuf_decompress_lz4, block 0
    return None


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_replay_codec_frames_are_adcore_faithful_and_bit_exact(case: Case, servers: dict[str, Any]) -> None:
    if not _installed(case.codec):
        pytest.skip(f"{case.codec}: {compression.missing_modules(case.codec)} not installed")
    channel, frames, energies, proc = servers[case.id]
    got = _collect(channel, N_SRC, proc)
    dtype = case.dtype
    scalar = {np.dtype("uint16"): pva.USHORT, np.dtype("float32"): pva.FLOAT}[dtype]
    for i in range(N_SRC):
        item = got[i]
        src = np.ascontiguousarray(frames[i])
        assert src.dtype == dtype and src.shape == (P, H, W)
        # the fields exactly as ADCore's NTNDArrayConverter sets them for a compressed NDArray
        assert item["field"] == "ubyteValue"
        assert item["codec"] == case.codec
        assert item["param_value"] == int(scalar) and item["param_type"] == pva.INT
        assert item["uncompressedSize"] == src.nbytes
        assert item["compressedSize"] == item["payload"].size
        if case.source != "sim":  # compressible data: the payload is smaller
            assert item["compressedSize"] < item["uncompressedSize"], (item["compressedSize"], src.nbytes)
        assert item["dims"] == ([W, H, P] if case.three_d else [W, P * H])  # fastest axis first, unchanged
        framed = case.hdf5_framed or case.codec == "lz4hdf5"
        assert (item["payload"][:8].tobytes() == src.nbytes.to_bytes(8, "big")) is framed
        if case.codec == "blosc":  # c-blosc 1 header: typesize = bytes per pixel, nbytes, cbytes
            version, _, _, typesize, nbytes, _, cbytes = struct.unpack_from("<BBBBIII", item["payload"].tobytes())
            assert version in (1, 2) and typesize == dtype.itemsize
            assert nbytes == src.nbytes and cbytes == item["payload"].size
        # our decoder: the original pixels, bit for bit
        frame = item["decoded"]
        assert frame.pixels.dtype == dtype and frame.pixels.shape == (P, H, W)
        assert frame.pixels.tobytes() == src.tobytes()
        expect_ev = float(energies[i]) if energies is not None else 9100.0
        assert frame.photon_energy_ev == pytest.approx(expect_ev)
        # and the library ADCore decompresses with
        ref = _reference_decode(case, item["payload"], src.nbytes, dtype)
        if ref is not None:
            assert ref.tobytes() == src.tobytes()


# -- a missing compression library: one line, exit 2, before anything starts -------------------


_BLOCK_IMPORT = "import sys\nfor m in {mods!r}: sys.modules[m] = None\n"


@pytest.mark.parametrize(
    ("name", "hidden", "package"),
    [("bslz4", ["bitshuffle"], "bitshuffle"), ("blosc", ["blosc"], "blosc"), ("lz4", ["lz4", "lz4.block"], "lz4")],
)
def test_missing_codec_package_is_one_line_and_exit_2(name: str, hidden: list[str], package: str, tmp_path: Path) -> None:
    """``python -m peaknet_pva.pva.replay --codec X`` (what procs.start_replay runs) without X's
    package: exit 2 and one stderr line naming the package and the extra, no traceback."""
    code = _BLOCK_IMPORT.format(mods=hidden) + (
        "import runpy\n"
        f"sys.argv = ['replay', {str(tmp_path / 'frames.npy')!r}, '-c', 'never:served', '--codec', {name!r}]\n"
        "runpy.run_module('peaknet_pva.pva.replay', run_name='__main__', alter_sys=True)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=loopback_env(), cwd=REPO)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"peaknet-pva replay: error: --codec {name} needs")
    assert package in lines[0] and 'pip install "peaknet-pva[codecs]"' in lines[0]
    assert "replay: serving" not in r.stdout


def test_missing_codec_package_through_the_cli_and_the_api(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``peaknet-pva replay --codec`` and ``ReplayServer(codec=...)`` refuse a codec whose package
    is missing (checked before the source is read or a server exists); zlib needs nothing."""
    from peaknet_pva.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda m, *a: None if m.startswith(("lz4", "blosc", "bitshuffle")) else real(m, *a))
    for name in ("lz4", "bslz4", "blosc", "lz4hdf5"):
        assert main(["replay", "no-such-source.npy", "--codec", name]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not installed" in err[0] and "[codecs]" in err[0], err
        with pytest.raises(ConfigError, match=r"not installed \(pip install"):
            ReplayServer("never:served", codec=name)
    assert replay_main(["no-such-source.npy", "--codec", "zlib", "--hdf5-framed"]) == 2
    assert "--hdf5-framed applies to lz4 and bslz4" in capsys.readouterr().err


class _Capture:
    """Stands in for the PvaServer: keeps what ``update`` was given."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def update(self, channel: str, nt: Any) -> None:
        self.sent.append(nt.copy())

    def stop(self) -> None:
        pass


@pytest.mark.skipif(not _installed("bslz4"), reason="bslz4 needs lz4 and bitshuffle (codecs extra)")
def test_bad_frames_are_compressed_too_and_still_rejected() -> None:
    """With a codec, bad frames go compressed as ADCore would send them (the empty one cannot be)
    and each is still a FrameError for the decoder; the good frame round-trips; bytes counted."""
    from peaknet_pva.errors import FrameError
    from peaknet_pva.pva.replay import BAD_KINDS

    srv = ReplayServer(f"{unique_tag('rcb')}:image", codec="bslz4")
    srv.stop()  # nothing is served: updates are captured
    srv.server = cap = _Capture()
    good = planted_frames(1, seed=4, dtype="uint16")[0]
    srv.publish(good, photon_energy_ev=9000.0)
    for kind in BAD_KINDS:
        srv.publish_bad(kind, like=good)
    first, *bad = cap.sent
    assert first["codec"]["name"] == "bslz4"
    np.testing.assert_array_equal(ntcodec.decode_ntndarray(first, PanelLayout((H, W))).pixels, good)
    for kind, nt in zip(BAD_KINDS, bad):
        assert str(nt["codec"]["name"]) == ("" if kind == "empty" else "bslz4"), kind
        with pytest.raises(FrameError):
            ntcodec.decode_ntndarray(nt, PanelLayout((H, W)))
    assert srv.bytes_sent < srv.bytes_raw and srv.compression_ratio > 1.0


def test_start_replay_passes_the_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(procs, "_spawn", lambda name, cmd, *a: seen.append(list(cmd)))
    procs.start_replay("src.npy", "x:image", codec="bslz4", hdf5_framed=True)
    procs.start_replay("src.npy", "x:image", codec="none")
    procs.start_replay("src.npy", "x:image")
    assert seen[0][-3:] == ["--codec", "bslz4", "--hdf5-framed"]
    assert "--codec" not in seen[1] and "--codec" not in seen[2]


# -- end to end: replay --codec bslz4 into a real PeakNet consumer ------------------------------


PVAPY_KEYS = {
    "processorId": 1, "inputChannel": "x", "inputMode": "pva", "inputArgs": None, "outputChannel": "y",
    "outputMode": "pvas", "outputArgs": None, "objectIdField": "uniqueId", "skipInitialUpdates": 1,
    "objectIdOffset": 1, "nSequentialUpdates": 1, "fieldRequest": "",
}


def _peaks_equal(a: PeakTable, b: PeakTable) -> None:
    assert a.n == b.n
    np.testing.assert_array_equal(a.panel, b.panel)
    np.testing.assert_allclose(a.y, b.y, atol=1e-4)
    np.testing.assert_allclose(a.x, b.x, atol=1e-4)
    np.testing.assert_allclose(a.intensity, b.intensity, rtol=1e-5)
    np.testing.assert_array_equal(a.npix, b.npix)


@pytest.mark.skipif(not _installed("bslz4"), reason="bslz4 needs lz4 and bitshuffle (codecs extra)")
def test_bslz4_replay_into_peaknet_consumer(tmp_path: Path) -> None:
    """16 simulated float32 frames sent bslz4-compressed by the replay process into one PeakNet
    consumer (shipped weights): every frame processed, none bad, images bit-exact, and the peaks
    those the same finder gives for the uncompressed frames in-process."""
    from peaknet_pva.pva.peaknet_processor import PeakNetImageProcessor
    from peaknet_pva.simulate import load_dataset

    n = 16
    data_dir = tiny_dataset(tmp_path / "data", n_frames=n, seed=12)
    ds = load_dataset(data_dir)
    tag = unique_tag("rcz")
    image = f"{tag}:image"
    gate = ReadyGate(f"{tag}:ready")  # opened once this test's output monitor is connected
    args = {k: v for k, v in PEAKNET_CPU_ARGS.items() if k not in ("model", "photon_energy_ev")}
    args["weights"] = "default"  # deterministic weights: the in-process finder below is the same model
    replay = procs.start_replay(
        data_dir, image, fps=40, codec="bslz4", wait_for=[gate.name],
        extra=["--wait-timeout", str(2 * START_TIMEOUT_S), "--report-period", "0", "--linger", "0.5"],
        log_path=tmp_path / "replay.log",
    )
    try:
        with consumer_set(PEAKNET_CLASS, image, tag, tmp_path, role="pk", processor_args=args) as pk:
            with procs.OutputMonitor(pk.output_channels) as mon:
                mon.wait_connected(30)
                gate.open()
                assert replay.popen.wait(120) == 0, replay.log_text()
                missing = mon.wait_for(range(1, n + 1), timeout_s=60)
                assert not missing, f"never published: {sorted(missing)}"
                wait_until(lambda: user_stats(pk)[0].get("nProcessed", 0) >= n, 20, what=f"nProcessed == {n}")
                stats = user_stats(pk, fresh_after=time.time())[0]
                published = mon.snapshot()
            assert pk.poll() is None
    finally:
        replay.stop(10)
        gate.close()
    assert "codec bslz4" in replay.log_text() and "smaller" in replay.log_text()
    assert stats["nProcessed"] == n and stats["nBadFrames"] == 0
    assert stats["nDropped"] == 0 and stats["nMissedIds"] == 0
    assert sorted(published) == list(range(1, n + 1)) and all(len(v) == 1 for v in published.values())

    proc = PeakNetImageProcessor(dict(PVAPY_KEYS, **args))
    try:
        expected = proc.finder.find(np.asarray(ds.frames[:n]))
    finally:
        proc.stop()
    assert sum(e.n for e in expected) > 0  # a comparison of something
    for uid, [(_, peaks, meta)] in published.items():
        np.testing.assert_array_equal(meta.image, ds.frames[uid - 1])  # decoded bit-exact in the consumer
        assert meta.photon_energy_ev == pytest.approx(float(ds.photon_energy_ev[uid - 1]))
        _peaks_equal(peaks, expected[uid - 1])

