"""``CxiFileProcessor``: writes PeakNet hits from the processors' output channels to CXI files.

::

    pvapy-hpc-consumer -dc -nc 2 -sqs 1000 -ic 'peaknet:*:output' \\
        -sc 'cxi:*:status' -cc 'cxi:*:control' \\
        --processor-class peaknet_pva.CxiFileProcessor \\
        --processor-args '{"output_dir": "/data/run42", "min_peaks": 10}'

pvapy's ``*`` in ``-ic`` is the consumer id, not a wildcard: writer k reads ``peaknet:k:output``,
so run the writer set with the same ``-nc`` as the PeakNet set (or fan in with
``pvapy-hpc-collector``).

``process`` (pvAccess's receive thread) decodes the output structure (``codec.decode_output``:
peaks + metadata + the forwarded image, copied), applies the hit filter and queues the frame; a
writer thread hands frames to :class:`peaknet_pva.cxi.CxiWriter` (chunks of ``frames_per_file``,
``.cxi.inprogress`` → fsync → rename, never overwriting), closes a partial chunk after
``idle_close_s`` without frames, and writes a matching CrystFEL geometry file once per output
directory. ``stop()`` drains the queue and closes the last chunk.

Only frames that carry their image can be written: run the PeakNet processors with
``forward_images`` = ``hits`` (default) or ``all``. A hit without an image is counted in
``nNoImage`` (and logged once), never written as zeros.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pvaccess as pva
from pvapy.hpc.userDataProcessor import UserDataProcessor

from ..cxi import CxiWriter
from ..errors import ConfigError, FrameError
from ..frames import PeakTable
from ..geometry import DetectorGeometry, for_cxi, format_geometry, read_geometry, write_geometry
from .codec import OutputMeta, decode_output
from .lifecycle import install_stop_handlers
from .args import PVAPY_KEYS, _as_float, _as_int, parse_processor_args

_STOP = object()


@dataclass(frozen=True)
class CxiProcessorParams:
    """The ``--processor-args`` of ``CxiFileProcessor``, parsed and validated once."""

    output_dir: str | None = None
    file_prefix: str = "peaknet"
    frames_per_file: int = 100
    min_peaks: int = 10
    max_peaks: int = 2048
    idle_close_s: float = 10.0
    geometry: str | None = None
    photon_energy_ev: float | None = None
    queue_size: int = 1000
    compression: str | None = None
    retry_chunks: int = 2
    retry_interval_s: float = 5.0

    RUNTIME_KEYS = ("min_peaks",)

    def __post_init__(self) -> None:
        fix = object.__setattr__
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ConfigError("output_dir is required (a directory for the .cxi files)")
        if not isinstance(self.file_prefix, str) or not self.file_prefix or "/" in self.file_prefix:
            raise ConfigError(f"file_prefix must be a plain name, got {self.file_prefix!r}")
        fix(self, "frames_per_file", _as_int("frames_per_file", self.frames_per_file, 1))
        fix(self, "min_peaks", _as_int("min_peaks", self.min_peaks, 0))
        fix(self, "max_peaks", _as_int("max_peaks", self.max_peaks, 1))
        fix(self, "idle_close_s", _as_float("idle_close_s", self.idle_close_s, 0.0, 86_400.0))
        if self.geometry is not None and (not isinstance(self.geometry, str) or not self.geometry):
            raise ConfigError(f"geometry must be a CrystFEL .geom path or null, got {self.geometry!r}")
        if self.photon_energy_ev is not None:
            fix(self, "photon_energy_ev", _as_float("photon_energy_ev", self.photon_energy_ev, 0.0))
            if self.photon_energy_ev <= 0:
                raise ConfigError(f"photon_energy_ev must be > 0 eV, got {self.photon_energy_ev!r}")
        fix(self, "queue_size", _as_int("queue_size", self.queue_size, 1))
        fix(self, "retry_chunks", _as_int("retry_chunks", self.retry_chunks, 0, 1000))
        fix(self, "retry_interval_s", _as_float("retry_interval_s", self.retry_interval_s, 0.0, 86_400.0))
        if self.compression not in (None, "gzip"):
            raise ConfigError(f"compression must be null or 'gzip', got {self.compression!r}")

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> CxiProcessorParams:
        return parse_processor_args(cls, config, "CxiFileProcessor")


@dataclass
class _Hit:
    image: np.ndarray  # (P, H, W)
    peaks: PeakTable
    meta: OutputMeta


class CxiFileProcessor(UserDataProcessor):
    """Hit filter + CXI writer for the output of ``PeakNetImageProcessor`` (see module doc).

    Stats (``userStats``): nReceived, nWritten, nSkipped (below ``min_peaks``, or no photon
    energy), nFiles, nNoImage, nDropped (queue full), nBadFrames (not our output structure),
    nWriteErrors (failed disk writes, retries included), nFramesLost (hits that will never be
    written: chunks dropped after ``retry_chunks``, still pending at stop, or refused by the
    writer), nPending (frames of chunks waiting for a retry), nBuffered (frames in the open
    chunk), nQueued. Every hit queued ends up in nWritten + nFramesLost (+ nPending + nBuffered +
    nQueued while running).
    """

    STOP_TIMEOUT_S = 300.0

    def __init__(self, configDict: dict[str, Any] | None = None) -> None:
        UserDataProcessor.__init__(self, configDict or {})
        config = dict(configDict or {})
        self.params = CxiProcessorParams.from_config(config)
        self._processor_id = int(config.get("processorId", 1) or 1)
        p = self.params
        self._geometry: DetectorGeometry | None = read_geometry(p.geometry) if p.geometry else None
        self.writer = CxiWriter(
            p.output_dir,
            file_prefix=p.file_prefix,
            consumer_id=self._processor_id,
            frames_per_file=p.frames_per_file,
            max_peaks=p.max_peaks,
            geometry=self._geometry,
            compression=p.compression,
            retry_chunks=p.retry_chunks,
            retry_interval_s=p.retry_interval_s,
        )
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=p.queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._geometry_written = False
        self._geometry_last_try = -math.inf
        self._warned: set[str] = set()
        self._reset_counters()
        # SIGTERM (and, in a forked consumer, a dead parent) stop this consumer like SIGINT does
        self._stop_handlers = install_stop_handlers(f"writer {self._processor_id}", self.logger)

    def _reset_counters(self) -> None:
        self.n_received = 0
        self.n_skipped = 0
        self.n_skipped_no_energy = 0  # written by the writer thread only
        self.n_no_image = 0
        self.n_dropped = 0
        self.n_bad_frames = 0
        self.n_write_errors = 0
        self.n_rejected = 0  # hits the writer refused (FrameError): not written, counted in nFramesLost
        self._written_offset = 0
        self._files_offset = 0
        self._lost_offset = 0
        self._write_errors_offset = 0

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.logger.warning(msg, *args)

    # -- pvapy interface ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer_main, name=f"cxi-writer-{self._processor_id}", daemon=True)
            self._thread.start()

    def process(self, pvObject: Any) -> None:
        self.n_received += 1
        try:
            peaks, meta = decode_output(pvObject)
        except Exception as exc:  # FrameError, or not even an NtNdArray
            self.n_bad_frames += 1
            self._warn_once("bad", "writer %s: update is not a peaknet output object: %s", self._processor_id, exc)
            return None
        params = self.params
        if meta.n_peaks < params.min_peaks:
            self.n_skipped += 1
            return None
        if meta.image is None:
            self.n_no_image += 1
            self._warn_once(
                "noimage",
                "writer %s: hit uniqueId=%d arrived without its image; run the PeakNet processors with "
                "forward_images 'hits' or 'all' (counted in nNoImage, logged once)",
                self._processor_id,
                meta.unique_id,
            )
            return None
        try:
            self._queue.put_nowait(_Hit(meta.image, peaks, meta))
        except queue.Full:
            self.n_dropped += 1
            self._warn_once("full", "writer %s: queue full, dropping frames (counted in nDropped)", self._processor_id)
        return None

    def configure(self, configDict: Any) -> None:
        if not isinstance(configDict, dict):
            self.logger.error("writer %s: configure needs a JSON object, got %r", self._processor_id, configDict)
            return
        changes = {k: v for k, v in configDict.items() if k not in PVAPY_KEYS}
        if not changes:
            return
        bad = sorted(set(changes) - set(CxiProcessorParams.RUNTIME_KEYS))
        try:
            if bad:
                raise ConfigError(f"cannot change {', '.join(bad)} at run time; changeable: min_peaks")
            self.params = dataclasses.replace(self.params, **changes)
        except (ConfigError, TypeError) as exc:
            self.logger.error("writer %s: configure %s rejected, keeping the old values: %s", self._processor_id, changes, exc)
            return
        self.logger.warning("writer %s: configured %s", self._processor_id, changes)

    def stop(self) -> None:
        """Write everything queued, close the open chunk."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(self.STOP_TIMEOUT_S)
            if self._thread.is_alive():
                self.logger.error("writer %s: did not drain within %.0f s", self._processor_id, self.STOP_TIMEOUT_S)
                return
        else:
            self._drain_queue()
        with self._lock:
            try:
                self.writer.close()
            except Exception as exc:
                self.n_write_errors += 1
                self.logger.error("writer %s: closing the last chunk failed: %s", self._processor_id, exc)
        if self._stop_handlers is not None:
            self._stop_handlers.close()
        stats = self.getStats()
        self.logger.warning(
            "writer %s: stopped%s: %d received, %d written in %d files, %d frames lost, %d write errors",
            self._processor_id,
            f" ({self._stop_handlers.reason})" if self._stop_handlers and self._stop_handlers.reason else "",
            stats["nReceived"], stats["nWritten"], stats["nFiles"], stats["nFramesLost"], stats["nWriteErrors"],
        )

    def resetStats(self) -> None:
        with self._lock:
            self._reset_counters()
            self._written_offset = int(self.writer.n_frames_written)
            self._files_offset = int(self.writer.n_files_written)
            self._lost_offset = int(self.writer.n_frames_lost)
            self._write_errors_offset = int(self.writer.n_write_errors)

    def getStats(self) -> dict[str, Any]:
        w = self.writer
        return {
            "nReceived": int(self.n_received),
            "nWritten": int(w.n_frames_written - self._written_offset),
            "nSkipped": int(self.n_skipped + self.n_skipped_no_energy),
            "nFiles": int(w.n_files_written - self._files_offset),
            "nNoImage": int(self.n_no_image),
            "nDropped": int(self.n_dropped),
            "nBadFrames": int(self.n_bad_frames),
            "nWriteErrors": int(self.n_write_errors + w.n_write_errors - self._write_errors_offset),
            "nFramesLost": int(self.n_rejected + w.n_frames_lost - self._lost_offset),
            "nPending": int(w.n_frames_pending),
            "nBuffered": int(w.n_frames_buffered),
            "nQueued": int(self._queue.qsize()),
            "minPeaks": int(self.params.min_peaks),
        }

    def getStatsPvaTypes(self) -> dict[str, Any]:
        return {
            "nReceived": pva.UINT,
            "nWritten": pva.UINT,
            "nSkipped": pva.UINT,
            "nFiles": pva.UINT,
            "nNoImage": pva.UINT,
            "nDropped": pva.UINT,
            "nBadFrames": pva.UINT,
            "nWriteErrors": pva.UINT,
            "nFramesLost": pva.UINT,
            "nPending": pva.UINT,
            "nBuffered": pva.UINT,
            "nQueued": pva.UINT,
            "minPeaks": pva.UINT,
        }

    # -- writer thread ------------------------------------------------------------------------

    def _writer_main(self) -> None:
        last_add = time.monotonic()
        while True:
            idle = self.params.idle_close_s
            try:
                item = self._queue.get(timeout=min(max(idle, 0.05), 0.5))
            except queue.Empty:
                if self.writer.n_frames_buffered and time.monotonic() - last_add >= idle:
                    self._flush()
                self._retry()
                continue
            if item is _STOP:
                break
            self._write(item)
            last_add = time.monotonic()

    def _drain_queue(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._write(item)

    def _retry(self) -> None:
        """Chunks a failed disk write kept in memory: try again (the writer rate-limits)."""
        with self._lock:
            try:
                self.writer.retry_pending()
            except Exception as exc:  # never kill the writer thread
                self.n_write_errors += 1
                self.logger.error("writer %s: retrying a chunk failed: %s", self._processor_id, exc)

    def _flush(self) -> None:
        with self._lock:
            try:
                self.writer.flush()
            except Exception as exc:
                self.n_write_errors += 1
                self.logger.error("writer %s: writing a chunk failed: %s", self._processor_id, exc)

    def _write(self, hit: _Hit) -> None:
        meta = hit.meta
        energy = meta.photon_energy_ev
        if not (math.isfinite(energy) and energy > 0):
            energy = self.params.photon_energy_ev
            if energy is None:
                self.n_skipped_no_energy += 1
                self._warn_once(
                    "energy",
                    "writer %s: frame uniqueId=%d has no photon energy and photon_energy_ev is not set: "
                    "not written (counted in nSkipped, logged once)",
                    self._processor_id,
                    meta.unique_id,
                )
                return
        with self._lock:
            try:
                self._write_geometry_once(hit.image.shape)
                self.writer.add(
                    hit.image,
                    hit.peaks,
                    photon_energy_ev=energy,
                    unique_id=max(int(meta.unique_id), 0),
                    timestamp_ns=max(int(meta.timestamp_ns), 0),
                )
            except FrameError as exc:  # this frame does not fit the writer (geometry, shape): refused
                self.n_write_errors += 1
                self.n_rejected += 1
                self.logger.error("writer %s: frame uniqueId=%d not written (counted in nFramesLost): %s",
                                  self._processor_id, meta.unique_id, exc)
            except Exception as exc:  # a chunk could not be built: its frames are in the writer's n_frames_lost
                self.n_write_errors += 1
                self.logger.error("writer %s: frame uniqueId=%d: writing a chunk failed: %s", self._processor_id, meta.unique_id, exc)

    def _write_geometry_once(self, frame_shape: tuple[int, ...]) -> None:
        """Write ``<output_dir>/<file_prefix>.geom`` if no such file exists yet (never replaced).

        A failed write (disk full) is tried again, at most once per ``retry_interval_s``.
        """
        if self._geometry_written:
            return
        now = time.monotonic()
        if now - self._geometry_last_try < self.params.retry_interval_s:
            return
        self._geometry_last_try = now
        p, h, w = (int(v) for v in frame_shape)
        if self._geometry is not None:  # the user's panels, pointed at our CXI layout
            geometry = for_cxi(self._geometry, base_dir=Path(str(self.params.geometry)).parent)
        else:
            geometry = DetectorGeometry.stacked(p, (h, w))
        final = Path(self.params.output_dir) / f"{self.params.file_prefix}.geom"
        text = format_geometry(geometry)
        if final.exists():
            self._geometry_written = True
            try:
                if final.read_text() != text:
                    self.logger.warning("writer %s: %s exists and differs from this run's layout; kept as is", self._processor_id, final)
            except OSError:
                pass
            return
        try:
            write_geometry(final, geometry, overwrite=False)
            self._geometry_written = True
            self.logger.info("writer %s: wrote CrystFEL geometry %s", self._processor_id, final)
        except FileExistsError:
            self._geometry_written = True  # another writer of this set got there first
        except OSError as exc:
            self.logger.error("writer %s: cannot write geometry %s (tried again in %.0f s): %s", self._processor_id,
                              final, self.params.retry_interval_s, exc)
