"""CXI files that CrystFEL's ``indexamajig --peaks=cxi`` reads (DESIGN 2.4), and reading them back.

One file holds one chunk of up to ``frames_per_file`` frames of one shape::

    /entry_1/data_1/data                 (N, P*H, W) float32 or the input integer dtype, chunks (1, P*H, W)
    /entry_1/result_1/nPeaks             (N,) int32
    /entry_1/result_1/peakXPosRaw        (N, max_peaks) float32, fs in the slab (= panel-local x)
    /entry_1/result_1/peakYPosRaw        (N, max_peaks) float32, ss in the slab (= p*H + y)
    /entry_1/result_1/peakTotalIntensity (N, max_peaks) float32, sum of raw pixel values
    /entry_1/result_1/peakNPixels        (N, max_peaks) float32
    /entry_1/result_1/peakSegPosRaw      (N, max_peaks) float32, panel index (PeakNet convention)
    /entry_1/result_1/peakYPosPanel      (N, max_peaks) float32, panel-local y, unclamped
    /entry_1/result_1/peakXPosPanel      (N, max_peaks) float32, panel-local x, unclamped
    /entry_1/result_1/nPeaksOverflow     (N,) int32, peaks dropped by the max_peaks caps
    /LCLS/photon_energy_eV               (N,) float64, eV
    /entry_1/instrument_1/source_1/energy (N,) float64, J
    /entry_1/pva/uniqueId                (N,) uint64
    /entry_1/pva/timestamp_ns            (N,) uint64, ns since the EPICS/Unix epoch of the source
    /entry_1/experiment_identifier       (N,) str, "uniqueId=<id>"

Peak arrays are zero beyond ``nPeaks``. Coordinates have the pixel centre at the integer; slab
coordinates are clamped so CrystFEL (which adds 0.5) keeps each peak on its own panel
(:func:`peaknet_pva.geometry.panel_to_slab`). A chunk is built in memory (HDF5 core driver), then
written as ``<name>.cxi.inprogress`` with ``os.write``, fsynced, closed and only then renamed to
``<name>.cxi``: CrystFEL never sees an open file, and a crash leaves every ``.cxi`` complete. A disk
write that fails (ENOSPC, EFBIG, EIO) is an ordinary counted error: the chunk stays in memory for a
retry (``retry_chunks`` chunks at most, then the oldest is dropped and counted in ``n_frames_lost``).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import statistics
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .errors import ConfigError, FrameError, PeakNetPvaError
from .frames import PeakTable, check_dtype
from .geometry import DetectorGeometry, tiles_to_slab

log = logging.getLogger(__name__)

__all__ = ["CxiContents", "CxiWriter", "EV_TO_J", "read_cxi", "summarize_cxi", "update_file_list"]

#: Joules per electronvolt (exact, SI 2019).
EV_TO_J: float = 1.602176634e-19

#: Version tag Cheetah writes at ``/cxi_version``.
CXI_VERSION = 150

DATA = "entry_1/data_1/data"
RESULT = "entry_1/result_1"
PHOTON_ENERGY_EV = "LCLS/photon_energy_eV"
SOURCE_ENERGY_J = "entry_1/instrument_1/source_1/energy"
UNIQUE_ID = "entry_1/pva/uniqueId"
TIMESTAMP_NS = "entry_1/pva/timestamp_ns"
EXPERIMENT_ID = "entry_1/experiment_identifier"

# Per-peak float32 (N, max_peaks) datasets in /entry_1/result_1, in the order written.
_PEAK_FIELDS = (
    "peakXPosRaw",
    "peakYPosRaw",
    "peakTotalIntensity",
    "peakNPixels",
    "peakSegPosRaw",
    "peakYPosPanel",
    "peakXPosPanel",
)
_UINT64_MAX = 2**64 - 1
# HDF5 >= 1.10 readers (CrystFEL builds) must open our files: cap the format version.
_LIBVER = ("earliest", "v110")


@dataclass
class _PendingChunk:
    """A closed chunk, built in memory, waiting for (or retrying) its disk write."""

    number: int
    n: int
    image: bytes
    first_uid: int
    last_uid: int


def _dir_fsync(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _closed_chunks(output_dir: Path, file_prefix: str) -> list[Path]:
    """Closed ``<prefix>-c<k>-<chunk>.cxi`` files in ``output_dir`` (any consumer), oldest first."""
    name_re = re.compile(re.escape(f"{file_prefix}-c") + r"\d+-\d+\.cxi")
    found: list[tuple[float, str, Path]] = []
    for entry in os.scandir(output_dir):
        if name_re.fullmatch(entry.name) and entry.is_file():
            try:
                mtime = entry.stat().st_mtime
            except OSError:  # removed meanwhile
                continue
            found.append((mtime, entry.name, Path(entry.path)))
    return [p for _, _, p in sorted(found)]


def update_file_list(output_dir: str | os.PathLike[str], file_prefix: str = "peaknet") -> Path:
    """Rewrite ``<output_dir>/<file_prefix>.lst``: one absolute path per closed ``.cxi`` chunk.

    This is the list ``indexamajig -i`` reads (with ``dim0 = %`` CrystFEL expands the frames of each
    file itself). Lines already in the list keep their order (new files are appended, so a reader
    can take the new tail), lines whose file is gone are dropped, and every closed chunk of the
    prefix in the directory is added, from every consumer (``-c1``, ``-c2``, ...), so a restart or a
    crash between closing a chunk and updating the list is healed by the next update. Never half
    written: the new list goes to a temporary file, is fsynced and ``os.replace``d over the old one,
    under an ``flock`` on ``.<prefix>.lst.lock`` so the writers of one directory never lose each
    other's lines. ``.cxi.inprogress`` files are never listed.
    """
    directory = Path(output_dir).absolute()
    final = directory / f"{file_prefix}.lst"
    lock_path = directory / f".{file_prefix}.lst.lock"
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock here: the rescan still converges at the next update
            pass
        closed = [str(p) for p in _closed_chunks(directory, file_prefix)]
        present = set(closed)
        try:
            old = [line.strip() for line in final.read_text().splitlines() if line.strip()]
        except (FileNotFoundError, UnicodeDecodeError):
            old = []
        kept = [line for line in dict.fromkeys(old) if line in present]
        listed = set(kept)
        lines = kept + [p for p in closed if p not in listed]
        tmp = directory / f".{file_prefix}.lst.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as fh:
                fh.write("".join(f"{line}\n" for line in lines))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        _dir_fsync(directory)
    finally:
        os.close(lock_fd)  # releases the lock
    return final


class CxiWriter:
    """Buffer frames + peaks and write them as chunked CXI files, ``frames_per_file`` per file.

    Files are ``<output_dir>/<file_prefix>-c<consumer_id>-<chunk:05d>.cxi``; chunk numbers start
    after the highest existing chunk (``.cxi`` or a stale ``.cxi.inprogress``) for that prefix and
    consumer, so nothing is ever overwritten. Frames in one file share shape and dtype: a frame
    that differs closes the current chunk first. ``geometry`` (default: :meth:`DetectorGeometry.stacked`
    for the frame's panels) maps panel-local peaks to slab coordinates; its slab must be the
    ``(P*H, W)`` slab the file stores. Its panels may be any rectangles of that slab (ASICs, one
    large module with gaps): peaks are then clamped to the geometry panel their pixel is on
    (:func:`peaknet_pva.geometry.tiles_to_slab`). ``compression``: ``None`` or ``"gzip"`` (built into
    every HDF5, unlike plugin filters CrystFEL may lack). With ``file_list`` (default) every closed
    chunk also refreshes ``<output_dir>/<file_prefix>.lst``, the list ``indexamajig -i`` takes
    (:func:`update_file_list`).

    Example::

        with CxiWriter(out, consumer_id=1, frames_per_file=100) as w:
            w.add(frame, peaks, photon_energy_ev=9500.0, unique_id=uid, timestamp_ns=ts)
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        file_prefix: str = "peaknet",
        consumer_id: int = 1,
        frames_per_file: int = 100,
        max_peaks: int = 2048,
        geometry: DetectorGeometry | None = None,
        compression: str | None = None,
        compression_level: int = 4,
        file_list: bool = True,
        retry_chunks: int = 2,
        retry_interval_s: float = 5.0,
    ) -> None:
        if not file_prefix or "/" in file_prefix or os.sep in file_prefix or file_prefix.startswith("."):
            raise ConfigError(f"file_prefix must be a plain file name part, got {file_prefix!r}")
        if int(consumer_id) != consumer_id or consumer_id < 0:
            raise ConfigError(f"consumer_id must be an integer >= 0, got {consumer_id!r}")
        if int(frames_per_file) != frames_per_file or frames_per_file < 1:
            raise ConfigError(f"frames_per_file must be an integer >= 1, got {frames_per_file!r}")
        if int(max_peaks) != max_peaks or max_peaks < 1:
            raise ConfigError(f"max_peaks must be an integer >= 1, got {max_peaks!r}")
        if compression not in (None, "gzip"):
            raise ConfigError(f"compression must be None or 'gzip' (no plugin filters), got {compression!r}")
        if int(retry_chunks) != retry_chunks or retry_chunks < 0:
            raise ConfigError(f"retry_chunks must be an integer >= 0, got {retry_chunks!r}")
        if not (math.isfinite(float(retry_interval_s)) and retry_interval_s >= 0):
            raise ConfigError(f"retry_interval_s must be a number >= 0, got {retry_interval_s!r}")
        if not 0 <= int(compression_level) <= 9:
            raise ConfigError(f"compression_level must be 0..9, got {compression_level!r}")
        self.output_dir = Path(output_dir)
        self.file_prefix = file_prefix
        self.consumer_id = int(consumer_id)
        self.frames_per_file = int(frames_per_file)
        self.max_peaks = int(max_peaks)
        self.geometry = geometry
        self.compression = compression
        self.compression_level = int(compression_level)
        #: ``<output_dir>/<file_prefix>.lst`` (updated after every closed chunk), or None.
        self.file_list: Path | None = self.output_dir / f"{file_prefix}.lst" if file_list else None

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._name_re = re.compile(
            re.escape(f"{file_prefix}-c{self.consumer_id}-") + r"(\d+)\.cxi(?:\.inprogress)?"
        )
        self._next_chunk = self._scan_next_chunk()
        if self.file_list is not None and self._next_chunk > 0:
            self._update_file_list()  # a restart: list what earlier runs closed

        #: Frames in closed ``.cxi`` files written by this writer.
        self.n_frames_written = 0
        #: Closed ``.cxi`` files written by this writer (== len(files)).
        self.n_files_written = 0
        #: Paths of the closed files, in order.
        self.files: list[Path] = []
        #: Peaks dropped here because a table had more than ``max_peaks``.
        self.n_peaks_truncated = 0
        #: Frames lost because writing their chunk failed (the error was raised to the caller).
        self.n_frames_lost = 0
        #: Failed disk writes (each failed attempt of a chunk, retries included).
        self.n_write_errors = 0
        self.retry_chunks = int(retry_chunks)
        self.retry_interval_s = float(retry_interval_s)
        self._pending: deque[_PendingChunk] = deque()
        self._last_retry = -math.inf
        self._closed = False

        # The chunk being filled (allocated for the first frame of a shape).
        self._key: tuple[tuple[int, int, int], np.dtype] | None = None
        self._n = 0
        self._data: np.ndarray | None = None
        self._peaks: dict[str, np.ndarray] = {}
        self._n_peaks = np.zeros(self.frames_per_file, np.int32)
        self._n_overflow = np.zeros(self.frames_per_file, np.int32)
        self._energy_ev = np.zeros(self.frames_per_file, np.float64)
        self._unique_id = np.zeros(self.frames_per_file, np.uint64)
        self._timestamp_ns = np.zeros(self.frames_per_file, np.uint64)
        self._centroids: set[str] = set()
        self._slab_geometry: DetectorGeometry | None = None

    # -- public API ------------------------------------------------------------------------

    @property
    def n_frames_buffered(self) -> int:
        """Frames waiting in the current (unwritten) chunk."""
        return self._n

    @property
    def next_chunk(self) -> int:
        """The chunk number the next file will get (at least)."""
        return self._next_chunk

    @property
    def closed(self) -> bool:
        return self._closed

    def add(
        self,
        frame: np.ndarray,
        peaks: PeakTable,
        *,
        photon_energy_ev: float,
        unique_id: int,
        timestamp_ns: int,
    ) -> Path | None:
        """Buffer one frame ``(P, H, W)`` (or ``(H, W)``: one panel) with its panel-local peaks.

        ``photon_energy_ev`` in eV (> 0), ``unique_id`` and ``timestamp_ns`` as unsigned 64-bit
        integers. Returns the path of a file this call closed (the chunk got full, or the frame's
        shape/dtype differs from the chunk's), else None; ``files`` lists every closed file.
        A bad frame raises FrameError and changes nothing.
        """
        if self._closed:
            raise PeakNetPvaError(f"CxiWriter for {self.output_dir} is closed")
        arr = np.asarray(frame)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise FrameError(f"a CXI frame must be (P, H, W) or (H, W), got shape {arr.shape}")
        if arr.size == 0:
            raise FrameError(f"empty frame of shape {arr.shape}")
        dtype = check_dtype(arr.dtype)
        if dtype.kind == "f":
            dtype = np.dtype(np.float32)
        n_panels, height, width = (int(v) for v in arr.shape)
        geometry = self._geometry_for(n_panels, height, width)
        if not isinstance(peaks, PeakTable):
            raise FrameError(f"peaks must be a PeakTable, got {type(peaks).__name__}")
        try:
            energy = float(photon_energy_ev)
        except (TypeError, ValueError):
            energy = math.nan
        if not (math.isfinite(energy) and energy > 0):
            raise FrameError(f"photon_energy_ev must be a positive number of eV, got {photon_energy_ev!r}")
        uid = self._as_uint64(unique_id, "unique_id")
        ts = self._as_uint64(timestamp_ns, "timestamp_ns")

        k = min(peaks.n, self.max_peaks)
        truncated = peaks.n - k
        ss, fs = tiles_to_slab(peaks.panel[:k], peaks.y[:k], peaks.x[:k], geometry, (height, width))

        closed: Path | None = None
        key = ((n_panels, height, width), dtype)
        if self._n and key != self._key:
            log.info("frame shape/dtype changed from %s to %s: closing the current chunk", self._key, key)
            try:
                closed = self._write_chunk()
            except Exception:  # that chunk is lost (counted, logged); this frame still goes in the next
                closed = None
        if self._n == 0 and key != self._key:
            self._allocate(key)

        i = self._n
        assert self._data is not None
        self._data[i] = arr.reshape(n_panels * height, width)
        rows = self._peaks
        for name in _PEAK_FIELDS:
            rows[name][i] = 0.0
        rows["peakXPosRaw"][i, :k] = fs
        rows["peakYPosRaw"][i, :k] = ss
        rows["peakTotalIntensity"][i, :k] = peaks.intensity[:k]
        rows["peakNPixels"][i, :k] = peaks.npix[:k]
        rows["peakSegPosRaw"][i, :k] = peaks.panel[:k]
        rows["peakYPosPanel"][i, :k] = peaks.y[:k]
        rows["peakXPosPanel"][i, :k] = peaks.x[:k]
        self._n_peaks[i] = k
        self._n_overflow[i] = min(int(peaks.n_overflow) + truncated, np.iinfo(np.int32).max)
        self._energy_ev[i] = energy
        self._unique_id[i] = uid
        self._timestamp_ns[i] = ts
        if peaks.n:
            self._centroids.add(peaks.centroid)
        self._n += 1
        if truncated:
            if self.n_peaks_truncated == 0:
                log.warning(
                    "frame uniqueId=%d has %d peaks, more than max_peaks=%d: keeping the first %d "
                    "(counted in n_peaks_truncated; logged once)", uid, peaks.n, self.max_peaks, k,
                )
            self.n_peaks_truncated += truncated

        if self._n >= self.frames_per_file:
            closed = self._write_chunk()
        return closed

    def flush(self) -> Path | None:
        """Write the partial chunk now (if any frames are buffered); return its path."""
        if self._closed:
            return None
        return self._write_chunk()

    def close(self) -> None:
        """Flush and stop accepting frames. Safe to call twice."""
        if self._closed:
            return
        lost_before = self.n_frames_lost
        try:
            self._write_chunk()
        finally:
            self.retry_pending(force=True)
            if self._pending:
                n = self.n_frames_pending
                self.n_frames_lost += n
                log.error("CxiWriter %s closed with %d frames in %d chunks its disk writes could not take: lost "
                          "(counted in n_frames_lost)", self.output_dir, n, len(self._pending))
                self._pending.clear()
            self._closed = True
            self._data = None
            self._peaks = {}
            log.info(
                "CxiWriter %s closed: %d frames in %d files", self.output_dir,
                self.n_frames_written, self.n_files_written,
            )
        if self.n_frames_lost > lost_before:
            raise OSError(errno.EIO, f"{self.n_frames_lost - lost_before} frames could not be written to {self.output_dir}")

    def stats(self) -> dict[str, int]:
        """Counters as plain ints (for pvapy status channels)."""
        return {
            "n_frames_written": int(self.n_frames_written),
            "n_files_written": int(self.n_files_written),
            "n_frames_buffered": int(self._n),
            "n_peaks_truncated": int(self.n_peaks_truncated),
            "n_frames_lost": int(self.n_frames_lost),
            "n_frames_pending": int(self.n_frames_pending),
            "n_write_errors": int(self.n_write_errors),
        }

    def __del__(self) -> None:
        try:
            if not self._closed and self._n:
                log.warning("CxiWriter %s dropped without close(): %d buffered frames not written",
                            self.output_dir, self._n)
        except Exception:
            pass

    def __enter__(self) -> CxiWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CxiWriter({str(self.output_dir)!r}, file_prefix={self.file_prefix!r}, "
            f"consumer_id={self.consumer_id}, frames_per_file={self.frames_per_file}, "
            f"files={self.n_files_written}, buffered={self._n})"
        )

    # -- internals -------------------------------------------------------------------------

    @staticmethod
    def _as_uint64(value: int, name: str) -> int:
        try:
            as_int = int(value)
        except (TypeError, ValueError) as exc:
            raise FrameError(f"{name} must be an integer, got {value!r}") from exc
        if as_int != value or not 0 <= as_int <= _UINT64_MAX:
            raise FrameError(f"{name} must be an integer in 0..2**64-1, got {value!r}")
        return as_int

    def _geometry_for(self, n_panels: int, height: int, width: int) -> DetectorGeometry:
        """The geometry used for slab coordinates of frames ``(n_panels, height, width)``."""
        if self.geometry is not None:
            if self.geometry.slab_shape != (n_panels * height, width):
                raise FrameError(
                    f"frame of shape {(n_panels, height, width)} (slab {n_panels * height} x {width}) does not "
                    f"match the geometry's {self.geometry.slab_shape[0]} x {self.geometry.slab_shape[1]} slab"
                )
            return self.geometry
        cached = self._slab_geometry
        if cached is None or cached.n_panels != n_panels or cached.panel_shape != (height, width):
            cached = DetectorGeometry.stacked(n_panels, (height, width))
            self._slab_geometry = cached
        return cached

    def _allocate(self, key: tuple[tuple[int, int, int], np.dtype]) -> None:
        (n_panels, height, width), dtype = key
        f = self.frames_per_file
        self._data = np.empty((f, n_panels * height, width), dtype=dtype)
        self._peaks = {name: np.zeros((f, self.max_peaks), np.float32) for name in _PEAK_FIELDS}
        self._key = key

    def _scan_next_chunk(self) -> int:
        highest = -1
        for entry in os.scandir(self.output_dir):
            m = self._name_re.fullmatch(entry.name)
            if m:
                highest = max(highest, int(m.group(1)))
        return highest + 1

    def _final_path(self, chunk: int) -> Path:
        return self.output_dir / f"{self.file_prefix}-c{self.consumer_id}-{chunk:05d}.cxi"

    def _reserve_number(self) -> int:
        """The next chunk number with neither ``.cxi`` nor ``.cxi.inprogress`` on disk (no file made)."""
        while True:
            chunk = self._next_chunk
            self._next_chunk += 1
            final = self._final_path(chunk)
            if not (final.exists() or final.with_name(final.name + ".inprogress").exists()):
                return chunk

    def _publish(self, tmp: Path, final: Path) -> Path:
        """Rename ``tmp`` to ``final`` without ever replacing an existing file."""
        while True:
            try:
                os.link(tmp, final)  # atomic, fails if final exists
            except FileExistsError:
                chunk = self._next_chunk
                self._next_chunk += 1
                final = self._final_path(chunk)
                continue
            except OSError:
                # No hard links on this file system: check, then rename.
                if final.exists():
                    final = self._final_path(self._next_chunk)
                    self._next_chunk += 1
                    continue
                os.rename(tmp, final)
                break
            os.unlink(tmp)
            break
        _dir_fsync(self.output_dir)
        return final

    def _write_chunk(self) -> Path | None:
        """Close the open chunk: build the file in memory, then write it to disk (see ``_store``).

        Returns the closed file, or None when nothing was buffered or the disk write failed (the
        chunk is then kept for a retry). A failure to build the file (not an I/O error: e.g. out
        of memory) loses the chunk: counted in ``n_frames_lost`` and raised.
        """
        n = self._n
        if n == 0:
            return None
        self.retry_pending()  # older chunks first (rate-limited)
        number = self._reserve_number()
        first_uid, last_uid = int(self._unique_id[0]), int(self._unique_id[n - 1])
        try:
            image = self._build_image(n, number)
        except BaseException:
            self.n_frames_lost += n
            log.exception("building chunk %d (%d frames, uniqueId %d..%d) failed; the frames are lost",
                          number, n, first_uid, last_uid)
            raise
        finally:
            self._n = 0
            self._centroids = set()
        return self._store(_PendingChunk(number, n, image, first_uid, last_uid))

    def _build_image(self, n: int, number: int) -> bytes:
        """The whole HDF5 file of the open chunk, built in memory (no disk I/O inside libhdf5).

        Writing through libhdf5 to a full disk leaves a half-closed file whose later clean-up
        crashes the process (SIGSEGV seen with h5py 3.16 / HDF5 2.0 after ENOSPC/EFBIG); bytes
        built here are written with plain ``os.write``, where a full disk is an ordinary OSError.
        """
        name = f"peaknet-mem-{os.getpid()}-{id(self)}-{number}.cxi"
        fh = h5py.File(name, "w", driver="core", backing_store=False, libver=_LIBVER)
        try:
            self._write_file(fh, n, number)
            fh.flush()
            image = fh.id.get_file_image()
        finally:
            fh.close()
        return bytes(image)

    def _store(self, chunk: _PendingChunk) -> Path | None:
        """Write ``chunk`` to disk; on an I/O error keep it for a retry (bounded) and return None."""
        try:
            final = self._write_image(chunk)
        except OSError as exc:
            self.n_write_errors += 1
            self._pending.append(chunk)
            log.error(
                "writing chunk %d (%d frames, uniqueId %d..%d) to %s failed: %s; kept in memory for a retry "
                "(%d frames pending)", chunk.number, chunk.n, chunk.first_uid, chunk.last_uid, self.output_dir,
                exc, self.n_frames_pending,
            )
            while len(self._pending) > self.retry_chunks:
                old = self._pending.popleft()
                self.n_frames_lost += old.n
                log.error(
                    "chunk %d (%d frames, uniqueId %d..%d) dropped: more than retry_chunks=%d chunks wait for "
                    "the disk (counted in n_frames_lost)", old.number, old.n, old.first_uid, old.last_uid,
                    self.retry_chunks,
                )
            return None
        self.n_frames_written += chunk.n
        self.n_files_written += 1
        self.files.append(final)
        log.info("wrote %s: %d frames", final, chunk.n)
        if self.file_list is not None:
            self._update_file_list()
        return final

    def _write_image(self, chunk: _PendingChunk) -> Path:
        """``<name>.cxi.inprogress`` (exclusive) ← the bytes, fsync, then link/rename to ``<name>.cxi``.

        Raises OSError (ENOSPC, EFBIG, EIO, ...) with no file left behind.
        """
        while True:
            final = self._final_path(chunk.number)
            tmp = final.with_name(final.name + ".inprogress")
            if final.exists():
                chunk.number = self._reserve_number()
                continue
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                chunk.number = self._reserve_number()
                continue
            break
        try:
            try:
                view = memoryview(chunk.image)
                while view:
                    written = os.write(fd, view)
                    if written <= 0:  # pragma: no cover
                        raise OSError(errno.EIO, "os.write wrote nothing")
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            return self._publish(tmp, final)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise

    @property
    def n_frames_pending(self) -> int:
        """Frames of chunks whose disk write failed, kept in memory for a retry."""
        return sum(c.n for c in self._pending)

    def retry_pending(self, force: bool = False) -> int:
        """Try again to write the chunks a failed disk write left in memory (at most once per
        ``retry_interval_s`` unless ``force``). Returns the frames written now."""
        if not self._pending:
            return 0
        now = time.monotonic()
        if not force and now - self._last_retry < self.retry_interval_s:
            return 0
        self._last_retry = now
        done = 0
        while self._pending:
            chunk = self._pending[0]
            try:
                final = self._write_image(chunk)
            except OSError as exc:
                self.n_write_errors += 1
                log.warning("retrying chunk %d (%d frames): %s; %d frames still pending", chunk.number, chunk.n,
                            exc, self.n_frames_pending)
                break
            self._pending.popleft()
            self.n_frames_written += chunk.n
            self.n_files_written += 1
            self.files.append(final)
            done += chunk.n
            log.warning("wrote %s on a retry: %d frames (uniqueId %d..%d)", final, chunk.n, chunk.first_uid,
                        chunk.last_uid)
            if self.file_list is not None:
                self._update_file_list()
        return done

    def _update_file_list(self) -> None:
        """Refresh the ``.lst``; a failure is logged, never raised (the chunk itself is safe)."""
        try:
            update_file_list(self.output_dir, self.file_prefix)
        except OSError as exc:
            log.error("cannot update the file list %s: %s", self.file_list, exc)

    def _write_file(self, fh: h5py.File, n: int, chunk: int) -> None:
        assert self._data is not None and self._key is not None
        (n_panels, height, width), _ = self._key
        geometry = self._geometry_for(n_panels, height, width)
        centroids = set(self._centroids)
        centroid = centroids.pop() if len(centroids) == 1 else ("mixed" if centroids else "none")

        fh.attrs["creator"] = "peaknet-pva"
        fh.attrs["consumer_id"] = self.consumer_id
        fh.attrs["chunk"] = chunk
        fh.create_dataset("cxi_version", data=np.int32(CXI_VERSION))

        comp = {}
        if self.compression == "gzip":
            comp = {"compression": "gzip", "compression_opts": self.compression_level}
        data = fh.create_dataset(
            DATA, data=self._data[:n], chunks=(1, n_panels * height, width), **comp
        )
        data.attrs["panel_shape"] = np.array([height, width], np.int64)
        data.attrs["n_panels"] = n_panels
        data.attrs["layout"] = "slab (P*H, W): panel p is rows p*H..p*H+H-1"

        result = fh.require_group(RESULT)
        result.create_dataset("nPeaks", data=self._n_peaks[:n])
        for name in _PEAK_FIELDS:
            result.create_dataset(name, data=self._peaks[name][:n])
        result.create_dataset("nPeaksOverflow", data=self._n_overflow[:n])
        result.attrs["centroid"] = centroid
        result.attrs["panel_shape"] = np.array([height, width], np.int64)
        result.attrs["n_panels"] = n_panels
        # peakSegPosRaw indexes the (P, H, W) tiles of the slab (the geometry's panels when stacked)
        result.attrs["panel_min_ss"] = np.arange(n_panels, dtype=np.int64) * height
        result.attrs["panel_min_fs"] = np.zeros(n_panels, np.int64)
        result.attrs["max_peaks"] = self.max_peaks
        result.attrs["coordinates"] = (
            "pixel centre at the integer; peakXPosRaw = fs, peakYPosRaw = ss in the slab, clamped to "
            "[min-0.5, max+0.5) of the peak's panel; peakSegPosRaw = panel; peak*PosPanel = panel-local"
        )

        energy = self._energy_ev[:n]
        fh.create_dataset(PHOTON_ENERGY_EV, data=energy)
        fh.create_dataset(SOURCE_ENERGY_J, data=energy * EV_TO_J)
        uid = self._unique_id[:n]
        fh.create_dataset(UNIQUE_ID, data=uid)
        fh.create_dataset(TIMESTAMP_NS, data=self._timestamp_ns[:n])
        fh.create_dataset(
            EXPERIMENT_ID,
            data=np.array([f"uniqueId={int(u)}" for u in uid], dtype=object),
            dtype=h5py.string_dtype(),
        )


# -- reading ----------------------------------------------------------------------------------


@dataclass
class CxiContents:
    """What one CXI file holds, with peaks back in panel-local coordinates.

    ``data`` is ``(N, P*H, W)`` (None when read with ``load_data=False``; :meth:`read_frames` and
    :meth:`frame` then read from the file).
    ``peaks[i]`` is frame i's :class:`PeakTable` (panel-local y/x, pixel centre at the integer).
    ``photon_energy_ev`` (eV) and ``photon_energy_j`` (J) are float64 ``(N,)``; ``unique_id`` and
    ``timestamp_ns`` are uint64 ``(N,)`` or None if the file lacks them (e.g. a Cheetah file).
    """

    path: Path
    data: np.ndarray | None
    data_shape: tuple[int, ...]
    data_dtype: np.dtype
    n_peaks: np.ndarray
    peaks: list[PeakTable]
    photon_energy_ev: np.ndarray
    photon_energy_j: np.ndarray
    unique_id: np.ndarray | None
    timestamp_ns: np.ndarray | None
    panel_shape: tuple[int, int] | None
    centroid: str | None
    max_peaks: int
    attrs: dict[str, object] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.n_peaks.shape[0])

    def read_frames(self, index: int | slice | np.ndarray = slice(None)) -> np.ndarray:
        """Read frames ``index`` of ``/entry_1/data_1/data`` from the file (slab layout)."""
        if self.data is not None:
            return self.data[index]
        with h5py.File(self.path, "r") as fh:
            return fh[DATA][index]

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` as ``(P, H, W)`` (one panel ``(1, rows, cols)`` if the file has no panel shape)."""
        frame = self.read_frames(i)
        if self.panel_shape is None:
            return frame[None]
        h, w = self.panel_shape
        return frame.reshape(-1, h, w)


def _attr_str(obj: h5py.HLObject, name: str) -> str | None:
    value = obj.attrs.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def read_cxi(
    path: str | os.PathLike[str],
    *,
    load_data: bool = True,
    geometry: DetectorGeometry | None = None,
) -> CxiContents:
    """Read a CXI file written by :class:`CxiWriter` (or a Cheetah-style one) back.

    Panel-local peaks come from ``peakSegPosRaw`` + ``peakYPosPanel``/``peakXPosPanel`` when
    present, else from ``peakSegPosRaw`` and the slab coordinates minus the panel offsets stored in
    the file, else (foreign files) from ``geometry`` via CrystFEL's panel rule, else as one panel.
    """
    path = Path(path)
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise PeakNetPvaError(f"cannot open CXI file {path}: {exc}") from exc
    with fh:
        if DATA not in fh or RESULT not in fh:
            raise PeakNetPvaError(f"{path} is not a CXI file of ours: needs /{DATA} and /{RESULT}")
        dset = fh[DATA]
        result = fh[RESULT]
        n_peaks = np.asarray(result["nPeaks"][()], dtype=np.int64).reshape(-1)
        n_frames = n_peaks.shape[0]
        if dset.shape[0] != n_frames:
            raise PeakNetPvaError(f"{path}: {dset.shape[0]} frames of data but {n_frames} nPeaks")
        cols = {
            name: np.asarray(result[name][()], dtype=np.float32)
            for name in _PEAK_FIELDS
            if name in result
        }
        for need in ("peakXPosRaw", "peakYPosRaw"):
            if need not in cols:
                raise PeakNetPvaError(f"{path}: /{RESULT}/{need} missing")
        width = cols["peakXPosRaw"].shape[1]
        n_peaks = np.clip(n_peaks, 0, width)
        overflow = (
            np.asarray(result["nPeaksOverflow"][()], dtype=np.int64)
            if "nPeaksOverflow" in result else np.zeros(n_frames, np.int64)
        )
        panel_shape = None
        if "panel_shape" in result.attrs:
            panel_shape = tuple(int(v) for v in result.attrs["panel_shape"])
        min_ss = np.asarray(result.attrs["panel_min_ss"], np.float64) if "panel_min_ss" in result.attrs else None
        min_fs = np.asarray(result.attrs["panel_min_fs"], np.float64) if "panel_min_fs" in result.attrs else None
        centroid = _attr_str(result, "centroid")
        max_peaks = int(result.attrs.get("max_peaks", width))

        if PHOTON_ENERGY_EV in fh:
            energy_ev = np.asarray(fh[PHOTON_ENERGY_EV][()], np.float64).reshape(-1)
        elif SOURCE_ENERGY_J in fh:
            energy_ev = np.asarray(fh[SOURCE_ENERGY_J][()], np.float64).reshape(-1) / EV_TO_J
        else:
            energy_ev = np.full(n_frames, np.nan)
        if energy_ev.shape[0] == 1 and n_frames != 1:
            energy_ev = np.full(n_frames, energy_ev[0])
        energy_j = (
            np.asarray(fh[SOURCE_ENERGY_J][()], np.float64).reshape(-1)
            if SOURCE_ENERGY_J in fh and fh[SOURCE_ENERGY_J].shape == (n_frames,)
            else energy_ev * EV_TO_J
        )
        unique_id = np.asarray(fh[UNIQUE_ID][()], np.uint64) if UNIQUE_ID in fh else None
        timestamp = np.asarray(fh[TIMESTAMP_NS][()], np.uint64) if TIMESTAMP_NS in fh else None
        data = dset[()] if load_data else None
        data_shape = tuple(int(v) for v in dset.shape)
        data_dtype = dset.dtype
        attrs = {k: v for k, v in fh.attrs.items()}

    peaks: list[PeakTable] = []
    if "peakTotalIntensity" not in cols:
        cols["peakTotalIntensity"] = np.zeros_like(cols["peakXPosRaw"])
    if "peakNPixels" not in cols:
        cols["peakNPixels"] = np.zeros_like(cols["peakXPosRaw"])
    for i in range(n_frames):
        k = int(n_peaks[i])
        ss = cols["peakYPosRaw"][i, :k]
        fs = cols["peakXPosRaw"][i, :k]
        if "peakSegPosRaw" in cols:
            panel = np.rint(cols["peakSegPosRaw"][i, :k]).astype(np.int64)
            if "peakYPosPanel" in cols and "peakXPosPanel" in cols:
                y, x = cols["peakYPosPanel"][i, :k], cols["peakXPosPanel"][i, :k]
            elif min_ss is not None and min_fs is not None:
                y, x = ss - min_ss[panel], fs - min_fs[panel]
            elif panel_shape is not None:
                y, x = ss - panel * panel_shape[0], fs
            else:
                y, x = ss, fs
        elif geometry is not None:
            panel, y, x = geometry.slab_to_panel(ss, fs)
        else:
            panel, y, x = np.zeros(k, np.int64), ss, fs
        peaks.append(
            PeakTable(
                panel=panel,
                y=y,
                x=x,
                intensity=cols["peakTotalIntensity"][i, :k],
                npix=np.rint(cols["peakNPixels"][i, :k]),
                n_overflow=int(overflow[i]) if i < overflow.shape[0] else 0,
                centroid=centroid if centroid in ("mask", "intensity", "signal") else "mask",
            )
        )
    return CxiContents(
        path=path,
        data=data,
        data_shape=data_shape,
        data_dtype=data_dtype,
        n_peaks=n_peaks.astype(np.int32),
        peaks=peaks,
        photon_energy_ev=energy_ev,
        photon_energy_j=energy_j,
        unique_id=unique_id,
        timestamp_ns=timestamp,
        panel_shape=panel_shape,  # type: ignore[arg-type]
        centroid=centroid,
        max_peaks=max_peaks,
        attrs=attrs,
    )


def _expand_paths(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix == ".cxi" and q.is_file()))
        else:
            out.append(p)
    return out


def summarize_cxi(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    min_peaks: int = 10,
) -> dict[str, object]:
    """Summary of CXI files (directories expand to their ``*.cxi``) for ``peaknet-pva inspect``.

    Returns plain Python values: ``n_files``, ``n_frames``, ``n_peaks_total``, peaks per frame
    ``mean``/``median``/``max``, ``n_hits`` and ``hit_rate`` (frames with ``nPeaks >= min_peaks``),
    photon energy range in eV, uniqueId and timestamp ranges, data shapes/dtypes, centroids.
    Pixel data is not read.
    """
    files = _expand_paths(paths)
    counts: list[int] = []
    energies: list[np.ndarray] = []
    uids: list[np.ndarray] = []
    stamps: list[np.ndarray] = []
    shapes: set[tuple[int, ...]] = set()
    dtypes: set[str] = set()
    centroids: set[str] = set()
    n_overflow = 0
    for path in files:
        c = read_cxi(path, load_data=False)
        counts.extend(int(v) for v in c.n_peaks)
        energies.append(c.photon_energy_ev)
        if c.unique_id is not None:
            uids.append(c.unique_id)
        if c.timestamp_ns is not None:
            stamps.append(c.timestamp_ns)
        shapes.add(c.data_shape[1:])
        dtypes.add(str(c.data_dtype))
        if c.centroid:
            centroids.add(c.centroid)
        n_overflow += sum(t.n_overflow for t in c.peaks)

    def rng(arrays: list[np.ndarray], cast: type) -> list | None:
        vals = np.concatenate(arrays) if arrays else np.zeros(0)
        if cast is float:
            vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            return None
        return [cast(vals.min()), cast(vals.max())]

    n_frames = len(counts)
    n_hits = sum(1 for v in counts if v >= min_peaks)
    return {
        "files": [str(p) for p in files],
        "n_files": len(files),
        "n_frames": n_frames,
        "n_peaks_total": int(sum(counts)),
        "peaks_per_frame_mean": float(statistics.fmean(counts)) if counts else 0.0,
        "peaks_per_frame_median": float(statistics.median(counts)) if counts else 0.0,
        "peaks_per_frame_max": int(max(counts)) if counts else 0,
        "min_peaks": int(min_peaks),
        "n_hits": n_hits,
        "hit_rate": n_hits / n_frames if n_frames else 0.0,
        "n_peaks_overflow": int(n_overflow),
        "photon_energy_ev_range": rng(energies, float),
        "unique_id_range": rng(uids, int),
        "timestamp_ns_range": rng(stamps, int),
        "frame_shapes": sorted(list(s) for s in shapes),
        "dtypes": sorted(dtypes),
        "centroids": sorted(centroids),
    }
