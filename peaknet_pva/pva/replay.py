"""A small PVA server that streams detector frames as NtNdArray, with per-frame photon energy.

``pvapy-ad-sim-server -if frames.npy`` replays frames too, but it cannot attach per-frame
attributes; this server sets the ``PhotonEnergy`` NTAttribute (eV) of every frame from the
simulator's ``truth.h5`` (or a constant), numbers frames ``uniqueId = 1, 2, ...`` and can mix bad
frames into the stream (for tests). ::

    peaknet-pva replay sim/data -c pvapy:image --fps 100 --n-frames 1000
    python -m peaknet_pva.pva.replay frames.npy -c pvapy:image --photon-energy-ev 9500
    peaknet-pva replay sim/data -c pvapy:image --codec bslz4

With ``--codec`` every frame is sent compressed exactly as areaDetector's NDPluginCodec (ADCore)
publishes it through NDPluginPva: ``value.ubyteValue`` = the compressed bytes, ``codec.name`` =
the codec (``lz4``, ``bslz4``, ``blosc``, ``zlib``, ``lz4hdf5``), ``codec.parameters`` = a PVInt
holding the pvData scalar type of the uncompressed pixels, ``compressedSize`` = the payload's
length, ``uncompressedSize`` = pixels x itemsize, dimensions unchanged (see
``compression.compress`` for each payload format). ``--hdf5-framed`` sends lz4/bslz4 as the HDF5
filter chunk with its 12-byte header instead (as Eiger files hold it and
``pvapy-ad-sim-server -hcm`` sends it). The libraries come with the ``codecs`` extra.

Sources: a ``.npy`` stack of slabs ``(F, P*H, W)`` (or ``(F, P, H, W)``), or a simulated dataset
(its folder or its ``truth.h5``, see ``peaknet_pva.simulate.save_dataset``).

In Python (tests, benchmarks)::

    with ReplayServer("test:image") as srv:
        srv.publish(frame, photon_energy_ev=9500.0)   # returns the uniqueId
        srv.publish_bad("nan")
        srv.stream(frames, fps=100, energies=energies)

    with ReplayServer("test:image", codec="bslz4") as srv:   # ADCore-style compressed frames
        srv.publish(frame)
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pvaccess as pva

from ..errors import ConfigError, FrameError
from ..loopback import apply_loopback_env
from . import compression
from .codec import DEFAULT_PHOTON_ENERGY_ATTRIBUTE, compress_ntndarray, encode_ntndarray

log = logging.getLogger(__name__)

#: Kinds of bad frame ``publish_bad`` can send (DESIGN 2.1: each must be counted, not crash).
BAD_KINDS = ("1d", "empty", "rows", "nan", "inf", "int64")

#: ``--codec`` choices: ``none`` (uncompressed) and the lossless codecs of ADCore's NDPluginCodec.
REPLAY_CODECS = ("none", "lz4", "bslz4", "blosc", "zlib", "lz4hdf5")
#: Codecs ``--hdf5-framed`` applies to (the others have one payload format only).
HDF5_FRAMED_CODECS = ("lz4", "bslz4")


def check_replay_codec(codec: str | None, *, hdf5_framed: bool = False) -> str:
    """Normalise ``codec`` (``None``/``""``/``"none"`` -> ``""``) and check it can be encoded here.

    Raises ConfigError (one line) for an unknown codec, ``hdf5_framed`` with a codec it does not
    apply to, or a codec whose package is missing, naming the package and the ``codecs`` extra.
    """
    name = (codec or "").strip().lower()
    if name in ("", "none"):
        if hdf5_framed:
            raise ConfigError("--hdf5-framed needs --codec lz4 or bslz4")
        return ""
    if name not in REPLAY_CODECS:
        raise ConfigError(f"unknown codec {codec!r}; choose from {', '.join(REPLAY_CODECS)}")
    if hdf5_framed and name not in HDF5_FRAMED_CODECS:
        raise ConfigError(f"--hdf5-framed applies to lz4 and bslz4, not {name}")
    missing = compression.missing_modules(name)
    if missing:
        raise ConfigError(
            f"--codec {name} needs the Python package{'s' if len(missing) > 1 else ''} {', '.join(missing)}, "
            f"which {'are' if len(missing) > 1 else 'is'} not installed ({compression.EXTRA_HINT})"
        )
    return name


@dataclass
class ReplaySource:
    """Frames to replay, ``(F, P, H, W)`` (or ``(F, rows, cols)`` slabs), with optional energies."""

    frames: np.ndarray
    photon_energy_ev: np.ndarray | None = None

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])


def load_source(path: str | Path, *, panel_shape: tuple[int, int] | None = None, mmap: bool = True) -> ReplaySource:
    """Load a ``.npy`` stack or a simulated dataset (folder or ``truth.h5``).

    ``.npy`` slabs ``(F, P*H, W)`` are split into ``(F, P, H, W)`` when ``panel_shape`` is given.
    """
    path = Path(path)
    if path.is_dir() or path.suffix == ".h5":
        from ..simulate import load_dataset

        ds = load_dataset(path, mmap=mmap)
        return ReplaySource(ds.frames, np.asarray(ds.photon_energy_ev, np.float64))
    if path.suffix == ".npy":
        frames = np.load(path, mmap_mode="r" if mmap else None)
        if frames.ndim == 2:
            frames = frames[None]
        if frames.ndim == 3 and panel_shape is not None:
            h, w = panel_shape
            if frames.shape[2] != w or frames.shape[1] % h:
                raise ConfigError(f"{path}: frames of shape {frames.shape[1:]} are not stacks of {panel_shape} panels")
            frames = frames.reshape(frames.shape[0], frames.shape[1] // h, h, w)
        if frames.ndim not in (3, 4):
            raise ConfigError(f"{path}: need (F, P*H, W) or (F, P, H, W) frames, got shape {frames.shape}")
        return ReplaySource(frames)
    raise ConfigError(f"replay source must be a .npy file, a simulated dataset folder or its truth.h5: {path}")


def bad_frame(kind: str, like: np.ndarray | None = None) -> np.ndarray:
    """A frame that ``decode_ntndarray`` must reject, of kind ``BAD_KINDS``.

    ``like`` (a good frame, ``(P, H, W)`` or ``(rows, cols)``) sets the size where it matters.
    """
    if like is None:
        like = np.zeros((64, 64), np.float32)
    slab = np.asarray(like)
    if slab.ndim == 3:
        slab = slab.reshape(-1, slab.shape[-1])
    if kind == "1d":
        return np.ascontiguousarray(slab).reshape(-1)
    if kind == "empty":
        return np.zeros((0, slab.shape[1]), slab.dtype)
    if kind == "rows":  # rows not a multiple of the panel height
        return np.ascontiguousarray(slab[:-1]) if slab.shape[0] > 1 else np.zeros((3, slab.shape[1]), slab.dtype)
    if kind == "nan":
        out = slab.astype(np.float32, copy=True)
        out.flat[out.size // 2] = np.nan
        return out
    if kind == "inf":
        out = slab.astype(np.float32, copy=True)
        out.flat[0] = np.inf
        return out
    if kind == "int64":
        return slab.astype(np.int64)
    raise ConfigError(f"unknown bad frame kind {kind!r}; kinds: {', '.join(BAD_KINDS)}")


def wait_for_channels(
    names: Sequence[str], timeout_s: float = 60.0, poll_s: float = 0.5, *, connected: bool = False
) -> None:
    """Block until every channel in ``names`` answers a get; raise TimeoutError after ``timeout_s``.

    With ``connected``, the channels are pvapy-hpc-consumer status channels and each must also
    report ``receiverStats.nReceived >= 1``: its input monitor is connected (it got the initial
    value). Status channels update every report period: run the consumers with ``-rp 1``.
    """
    deadline = time.monotonic() + timeout_s
    for name in names:
        ch = pva.Channel(name)
        ch.setTimeout(min(2.0, max(timeout_s, 0.1)))
        while True:
            try:
                value = ch.get("field()")
                if not connected or int(value.toDict().get("receiverStats", {}).get("nReceived", 0)) >= 1:
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"channel {name} did not come up within {timeout_s:.0f} s")
            time.sleep(poll_s)


class ReplayServer:
    """Hosts one NtNdArray channel and publishes frames on it (uniqueId 1, 2, ...).

    The record starts as an empty NtNdArray, so a monitor that connects before the first frame
    gets an empty initial update (which ``pvapy-hpc-consumer`` skips by default, ``-siu 1``).

    ``codec`` (``lz4``, ``bslz4``, ``blosc``, ``zlib``, ``lz4hdf5``; ``None``/``"none"`` =
    uncompressed): every frame, bad ones included, is sent compressed as ADCore's NDPluginCodec
    publishes it (``codec.compress_ntndarray``); ``hdf5_framed``: lz4/bslz4 as HDF5 chunks.
    ``bytes_raw`` / ``bytes_sent`` count the pixel bytes before and after compression.
    Raises ConfigError when the codec's package is not installed.
    """

    def __init__(
        self,
        channel: str,
        *,
        energy_attribute: str = DEFAULT_PHOTON_ENERGY_ATTRIBUTE,
        three_d: bool = False,
        first_id: int = 1,
        codec: str | None = None,
        hdf5_framed: bool = False,
    ) -> None:
        self.codec = check_replay_codec(codec, hdf5_framed=hdf5_framed)
        self.hdf5_framed = bool(hdf5_framed)
        apply_loopback_env()
        self.channel = channel
        self.energy_attribute = energy_attribute
        self.three_d = three_d
        self.next_id = int(first_id)
        self.n_published = 0
        self.n_bad_published = 0
        self.bytes_raw = 0
        self.bytes_sent = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.server = pva.PvaServer()
        self.server.addRecord(channel, pva.NtNdArray(), None)
        self._started = False
        self._last_like: np.ndarray | None = None

    def start(self) -> ReplayServer:
        if not self._started:
            self.server.start()
            self._started = True
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._started:
            self._started = False
            try:
                self.server.stop()
            except Exception:
                pass

    def request_stop(self) -> None:
        """Make a running ``stream`` return after its current frame."""
        self._stop.set()

    def __enter__(self) -> ReplayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _encode(self, frame: np.ndarray, **kwargs: Any) -> Any:
        """The NtNdArray for ``frame``: uncompressed, or compressed with ``self.codec``.

        Frames of a dtype with no pvData scalar type (bool) or without pixels go uncompressed,
        as ADCore cannot compress them either."""
        frame = np.asarray(frame)
        nt = encode_ntndarray(frame, **kwargs)
        raw = int(frame.nbytes)
        sent = raw
        if self.codec and frame.size and frame.dtype != np.bool_:
            compress_ntndarray(nt, frame, self.codec, hdf5_framed=self.hdf5_framed)
            sent = int(nt["compressedSize"])
        self.bytes_raw += raw
        self.bytes_sent += sent
        return nt

    @property
    def compression_ratio(self) -> float:
        """Pixel bytes before / after compression so far (1.0 uncompressed or before any frame)."""
        return self.bytes_raw / self.bytes_sent if self.bytes_sent else 1.0

    def publish(
        self,
        frame: np.ndarray,
        *,
        photon_energy_ev: float | None = None,
        attributes: dict[str, Any] | None = None,
        timestamp_ns: int | None = None,
    ) -> int:
        """Publish one frame (``(P, H, W)`` or 2-D); return its uniqueId."""
        attrs = dict(attributes or {})
        if photon_energy_ev is not None:
            attrs[self.energy_attribute] = float(photon_energy_ev)
        with self._lock:
            uid = self.next_id
            nt = self._encode(frame, unique_id=uid, timestamp_ns=timestamp_ns, attributes=attrs, three_d=self.three_d)
            self.server.update(self.channel, nt)
            self.next_id += 1
            self.n_published += 1
        self._last_like = frame
        return uid

    def publish_prepared(self, nt: Any, *, timestamp_ns: int | None = None) -> int:
        """Publish an NtNdArray built beforehand (``codec.encode_ntndarray``), after setting its
        uniqueId and time stamps; return the uniqueId. Cheaper than ``publish`` for big frames."""
        from .codec import _ns_to_ts

        ts = _ns_to_ts(time.time_ns() if timestamp_ns is None else timestamp_ns)
        with self._lock:
            uid = self.next_id
            nt["uniqueId"] = uid
            nt["timeStamp"] = ts
            nt["dataTimeStamp"] = ts
            self.server.update(self.channel, nt)
            self.next_id += 1
            self.n_published += 1
        return uid

    def publish_bad(self, kind: str, *, like: np.ndarray | None = None) -> int:
        """Publish a bad frame of ``kind`` (see ``BAD_KINDS``); return its uniqueId."""
        frame = bad_frame(kind, self._last_like if like is None else like)
        with self._lock:
            uid = self.next_id
            nt = self._encode(frame, unique_id=uid, three_d=False)
            if kind == "empty":
                nt["dimension"] = []
            self.server.update(self.channel, nt)
            self.next_id += 1
            self.n_published += 1
            self.n_bad_published += 1
        return uid

    def stream(
        self,
        frames: np.ndarray,
        *,
        fps: float = 10.0,
        energies: np.ndarray | None = None,
        photon_energy_ev: float | None = None,
        n_frames: int | None = None,
        runtime_s: float | None = None,
        loop: bool = False,
        bad_every: int = 0,
        report_period_s: float = 0.0,
    ) -> int:
        """Publish ``frames`` at ``fps`` (0 = as fast as possible); return how many were sent.

        Stops after ``n_frames`` (default: one pass, or forever with ``loop``), ``runtime_s``, or
        ``request_stop()``. ``energies[i]`` (eV) goes with frame ``i``, else ``photon_energy_ev``.
        With ``bad_every = k > 0`` every k-th update is a bad frame (cycling through BAD_KINDS);
        bad frames count towards ``n_frames``.
        """
        n_src = int(frames.shape[0])
        if n_src == 0:
            raise ConfigError("no frames to replay")
        total = n_frames if n_frames is not None else (None if loop else n_src)
        dt = 1.0 / fps if fps and fps > 0 else 0.0
        t0 = time.monotonic()
        t_report = t0
        sent = 0
        src_i = 0
        n_bad = 0
        while not self._stop.is_set():
            if total is not None and sent >= total:
                break
            if runtime_s is not None and time.monotonic() - t0 >= runtime_s:
                break
            if bad_every > 0 and (sent + 1) % bad_every == 0:
                self.publish_bad(BAD_KINDS[n_bad % len(BAD_KINDS)], like=frames[0])
                n_bad += 1
            else:
                i = src_i % n_src
                if not loop and src_i >= n_src and n_frames is None:
                    break
                energy = float(energies[i]) if energies is not None else photon_energy_ev
                self.publish(np.asarray(frames[i]), photon_energy_ev=energy)
                src_i += 1
            sent += 1
            now = time.monotonic()
            if report_period_s > 0 and now - t_report >= report_period_s:
                t_report = now
                log.info("replay %s: %d frames in %.1f s (%.1f fps)", self.channel, sent, now - t0, sent / max(now - t0, 1e-9))
            if dt:
                delay = t0 + sent * dt - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
        return sent


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peaknet-pva replay",
        description="Stream frames (.npy or a simulated dataset) as NtNdArray with a per-frame "
        "PhotonEnergy attribute over PVA. Frames get uniqueId 1, 2, ... With --codec they are sent "
        "compressed as areaDetector's NDPluginCodec sends them.",
        epilog="Compressed frames (--codec) are what an areaDetector IOC with an NDCodec plugin in front "
        "of NDPluginPva publishes: value.ubyteValue = the compressed bytes, codec.name = the codec, "
        "codec.parameters = the pvData scalar type of the uncompressed pixels, compressedSize and "
        "uncompressedSize in bytes. lz4 = one LZ4 block; bslz4 = bitshuffle+LZ4 (bshuf_compress_lz4, "
        "default block size); blosc = one c-blosc frame (blosclz, byte shuffle, typesize = pixel size); "
        "zlib = one zlib stream; lz4hdf5 = the HDF5 LZ4 filter chunk. lz4, bslz4 and blosc need the "
        'codecs extra: pip install "peaknet-pva[codecs]".',
    )
    p.add_argument("source", help=".npy stack (F, P*H, W) | simulated dataset folder | its truth.h5")
    p.add_argument("-c", "--channel", default="pvapy:image", help="PVA channel name (default: pvapy:image)")
    p.add_argument("--fps", type=float, default=10.0, help="frames per second; 0 = as fast as possible (default 10)")
    p.add_argument("-n", "--n-frames", type=int, default=None, help="frames to send (default: one pass over the source)")
    p.add_argument("--loop", action="store_true", help="repeat the source until --n-frames / --runtime / Ctrl-C")
    p.add_argument("-rt", "--runtime", type=float, default=None, help="stop after this many seconds of streaming")
    p.add_argument("--start-delay", type=float, default=0.0, help="seconds to wait after the server is up (default 0)")
    p.add_argument("--wait-for", action="append", default=[], metavar="CHANNEL",
                   help="wait until CHANNEL answers (e.g. a consumer's status channel) before streaming; repeatable")
    p.add_argument("--wait-connected", action="append", default=[], metavar="STATUS_CHANNEL",
                   help="wait until this pvapy-hpc-consumer status channel reports its input monitor "
                   "connected (receiverStats.nReceived >= 1; run consumers with -rp 1); repeatable")
    p.add_argument("--wait-timeout", type=float, default=120.0, help="seconds to wait for --wait-for channels (default 120)")
    p.add_argument("--linger", type=float, default=1.0, help="seconds to keep serving after the last frame (default 1)")
    p.add_argument("--photon-energy-ev", type=float, default=None,
                   help="constant photon energy (eV) for sources without per-frame energies")
    p.add_argument("--energy-attribute", default=DEFAULT_PHOTON_ENERGY_ATTRIBUTE,
                   help=f"NtNdArray attribute name for the photon energy (default {DEFAULT_PHOTON_ENERGY_ATTRIBUTE})")
    p.add_argument("--panel-shape", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="split .npy slabs into panels (only matters with --three-d)")
    p.add_argument("--three-d", action="store_true", help="send (P, H, W) 3-D arrays instead of (P*H, W) slabs")
    p.add_argument("--codec", default="none", choices=REPLAY_CODECS, metavar="{" + ",".join(REPLAY_CODECS) + "}",
                   help="send every frame compressed with this codec, as ADCore's NDPluginCodec does "
                   "(default none = uncompressed); lz4/bslz4/blosc need the codecs extra")
    p.add_argument("--hdf5-framed", action="store_true",
                   help="with --codec lz4/bslz4: send the HDF5 filter chunk (12-byte big-endian header: "
                   "total bytes, block bytes) as Eiger files hold it and pvapy-ad-sim-server -hcm sends it")
    p.add_argument("--bad-every", type=int, default=0, help="make every k-th update a bad frame (testing)")
    p.add_argument("--report-period", type=float, default=5.0, help="seconds between progress lines (0 = none)")
    return p


def replay_main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``peaknet-pva replay ...``); returns the exit status."""
    args = _build_parser().parse_args(list(argv) if argv is not None else None)
    try:  # before anything starts: a missing codec package is one line and exit 2, not a traceback
        codec = check_replay_codec(args.codec, hdf5_framed=args.hdf5_framed)
    except ConfigError as exc:
        print(f"peaknet-pva replay: error: {exc}", file=sys.stderr, flush=True)
        return 2
    apply_loopback_env()
    source = load_source(args.source, panel_shape=tuple(args.panel_shape) if args.panel_shape else None)
    frames = source.frames
    if args.three_d and frames.ndim == 3:
        frames = frames[:, None]
    server = ReplayServer(args.channel, energy_attribute=args.energy_attribute, three_d=args.three_d,
                          codec=codec, hdf5_framed=args.hdf5_framed)
    codec_note = f", codec {codec}{' (HDF5-framed)' if args.hdf5_framed else ''}" if codec else ""

    def _on_signal(signum: int, _frame: Any) -> None:
        server.request_stop()

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        print(f"replay: serving {args.channel} ({source.n_frames} source frames of {frames.shape[1:]} "
              f"{frames.dtype}, {'per-frame' if source.photon_energy_ev is not None else 'constant'} photon energy"
              f"{codec_note})", flush=True)
        if args.wait_for:
            wait_for_channels(args.wait_for, args.wait_timeout)
        if args.wait_connected:
            wait_for_channels(args.wait_connected, args.wait_timeout, connected=True)
            print(f"replay: {len(args.wait_connected)} consumer(s) connected", flush=True)
        if args.start_delay > 0:
            server._stop.wait(args.start_delay)
        t0 = time.monotonic()
        sent = server.stream(
            frames,
            fps=args.fps,
            energies=source.photon_energy_ev,
            photon_energy_ev=args.photon_energy_ev,
            n_frames=args.n_frames,
            runtime_s=args.runtime,
            loop=args.loop,
            bad_every=args.bad_every,
            report_period_s=args.report_period,
        )
        elapsed = time.monotonic() - t0
        ratio = f", {codec} {server.compression_ratio:.2f}x smaller" if codec else ""
        print(f"replay: sent {sent} frames (last uniqueId {server.next_id - 1}) in {elapsed:.2f} s{ratio}", flush=True)
        if args.linger > 0:
            time.sleep(args.linger)
    finally:
        server.stop()
        for s, h in old.items():
            signal.signal(s, h)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        sys.exit(replay_main())
    except (ConfigError, FrameError, FileNotFoundError) as _exc:  # one line, as ``peaknet-pva replay``
        _msg = str(_exc).splitlines()[0] if str(_exc) else type(_exc).__name__
        print(f"peaknet-pva replay: error: {_msg}", file=sys.stderr)
        sys.exit(2)
