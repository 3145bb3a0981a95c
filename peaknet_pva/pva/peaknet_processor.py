"""``PeakNetImageProcessor``: PeakNet peak finding inside ``pvapy-hpc-consumer``.

::

    pvapy-hpc-consumer -dc -nc 2 -du 4 -sqs 100 -ic pvapy:image \\
        -oc 'peaknet:*:output' -sc 'peaknet:*:status' -cc 'peaknet:*:control' \\
        --processor-class peaknet_pva.PeakNetImageProcessor \\
        --processor-args '{"panel_shape": [352, 384], "min_peaks": 10}'

Lifecycle (DESIGN 1; pvapy 5.6.0): ``__init__(configDict)`` parses the arguments once, builds the
``PeakFinder`` and warms it up (the input monitor connects only after it returns); ``start()``
starts the engine thread; ``process(pvObject)`` runs on pvAccess's receive thread and only decodes
the frame (a copy: the PvObject is reused by pvapy) into a bounded ring; the engine thread batches
frames (``batch_size`` or ``batch_timeout_ms``), runs them through ``finder.pipeline`` and
publishes one output object (``codec.build_output``) per frame, in arrival order; ``stop()``
drains the ring and the pipeline, publishes everything, then releases the model.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import pvaccess as pva
from pvapy.hpc.adImageProcessor import AdImageProcessor

from ..errors import ConfigError, FrameError
from ..frames import PanelLayout, PeakTable
from .args import PVAPY_KEYS, _as_bool, _as_choice, _as_float, _as_int, _as_panel_shape, parse_processor_args
from .lifecycle import create_output_channel, install_stop_handlers
from .codec import (
    DEFAULT_PHOTON_ENERGY_ATTRIBUTE,
    DecodedFrame,
    build_output,
    decode_ntndarray,
    placeholder_output,
)

#: all: every frame published with its image; hits: only hits published (with their image), non-hits
#: counted in nNotPublished; hits_empty: every frame published, non-hits as an empty value with their
#: peaks; none: every frame published without its image (a peak stream).
FORWARD_IMAGES = ("all", "hits", "hits_empty", "none")
OUTPUT_IMAGES = ("slab", "assembled")
MASK_CONVENTIONS = ("om", "nonzero_bad", "crystfel")  # geometry.MASK_CONVENTIONS
CENTROIDS = ("auto", "mask", "intensity", "signal")
BACKENDS = ("peaknet", "peakfinder8")
DTYPES = ("auto", "bf16", "fp16", "fp32")


def _declared_pixels(pv_object: Any) -> int | None:
    """Pixels an NtNdArray declares in its ``dimension`` field (None if it cannot be read):
    checked against ``max_frame_mpix`` before anything is decoded or decompressed."""
    try:
        dims = pv_object["dimension"]
        n = 1
        for d in dims:
            n *= max(int(d["size"]), 0)
        return n if dims else None
    except Exception:
        return None


@dataclass(frozen=True)
class PeakNetProcessorParams:
    """The ``--processor-args`` of ``PeakNetImageProcessor``, parsed and validated once.

    See docs/PROCESSORS.md for each key. ``RUNTIME_KEYS`` may be changed with ``configure``.
    """

    weights: str = "default"
    model: str | None = None
    backend: str = "peaknet"
    device: str = "auto"
    batch_size: int = 8
    batch_timeout_ms: float = 50.0
    num_buffers: int = 3
    dtype: str = "auto"
    compile: bool = False
    panel_shape: tuple[int, int] | None = None
    centroid: str = "auto"
    min_peaks: int = 10
    max_peaks: int = 2048
    forward_images: str = "hits"
    output_image: str = "slab"
    assembled_max_px: int = 1024
    photon_energy_attribute: str = DEFAULT_PHOTON_ENERGY_ATTRIBUTE
    photon_energy_ev: float | None = None
    ring_size: int = 256
    max_frame_mpix: float = 40.0
    max_inflight_mb: float = 2048.0
    per_event_norm: bool = False
    norm: str = "auto"
    isolated_ratio: float | None = None
    split: bool | None = None
    peakfinder8: str | dict[str, Any] | None = None
    geometry: str | None = None
    mask: str | None = None
    mask_convention: str = "om"
    mask_dataset: str | None = None

    RUNTIME_KEYS = ("min_peaks", "forward_images", "centroid", "batch_timeout_ms")

    def __post_init__(self) -> None:
        fix = object.__setattr__
        if not isinstance(self.weights, str) or not self.weights:
            raise ConfigError(f"weights must be 'default', 'random' or a checkpoint path, got {self.weights!r}")
        if self.model is not None and not isinstance(self.model, str):
            raise ConfigError(f"model must be a preset name or a config path, got {self.model!r}")
        fix(self, "backend", _as_choice("backend", self.backend, BACKENDS))
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda:N', got {self.device!r}")
        fix(self, "batch_size", _as_int("batch_size", self.batch_size, 1, 65536))
        fix(self, "batch_timeout_ms", _as_float("batch_timeout_ms", self.batch_timeout_ms, 0.0, 3_600_000.0))
        fix(self, "num_buffers", _as_int("num_buffers", self.num_buffers, 1, 64))
        fix(self, "dtype", _as_choice("dtype", self.dtype, DTYPES))
        fix(self, "compile", _as_bool("compile", self.compile))
        fix(self, "panel_shape", _as_panel_shape("panel_shape", self.panel_shape))
        fix(self, "centroid", _as_choice("centroid", self.centroid, CENTROIDS))
        fix(self, "min_peaks", _as_int("min_peaks", self.min_peaks, 0))
        fix(self, "max_peaks", _as_int("max_peaks", self.max_peaks, 1))
        fix(self, "forward_images", _as_choice("forward_images", self.forward_images, FORWARD_IMAGES))
        fix(self, "output_image", _as_choice("output_image", self.output_image, OUTPUT_IMAGES))
        fix(self, "assembled_max_px", _as_int("assembled_max_px", self.assembled_max_px, 16, 65536))
        if not isinstance(self.photon_energy_attribute, str) or not self.photon_energy_attribute:
            raise ConfigError(f"photon_energy_attribute must be a name, got {self.photon_energy_attribute!r}")
        if self.photon_energy_ev is not None:
            fix(self, "photon_energy_ev", _as_float("photon_energy_ev", self.photon_energy_ev, 0.0))
        fix(self, "ring_size", _as_int("ring_size", self.ring_size, 1, 1_000_000))
        fix(self, "max_frame_mpix", _as_float("max_frame_mpix", self.max_frame_mpix, 0.001, 100_000.0))
        fix(self, "max_inflight_mb", _as_float("max_inflight_mb", self.max_inflight_mb, 0.001, 16_000_000.0))
        fix(self, "per_event_norm", _as_bool("per_event_norm", self.per_event_norm))
        fix(self, "norm", _as_choice("norm", self.norm, ("auto", "instance", "robust", "local")))
        if self.isolated_ratio is not None:
            fix(self, "isolated_ratio", _as_float("isolated_ratio", self.isolated_ratio, 0.0, 0.999))
        if self.split is not None:
            fix(self, "split", _as_bool("split", self.split))
        if self.peakfinder8 is not None and not isinstance(self.peakfinder8, (str, dict)):
            raise ConfigError(f"peakfinder8 must be a detector preset name or a dict, got {self.peakfinder8!r}")
        for key in ("geometry", "mask", "mask_dataset"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{key} must be a file path (string) or null, got {value!r}")
        fix(self, "mask_convention", _as_choice("mask_convention", self.mask_convention, MASK_CONVENTIONS))

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> PeakNetProcessorParams:
        """Build from a pvapy configDict: pvapy's own keys are ignored, unknown keys rejected."""
        return parse_processor_args(cls, config, "PeakNetImageProcessor")

    def with_changes(self, changes: dict[str, Any]) -> PeakNetProcessorParams:
        """A copy with run-time changes (``RUNTIME_KEYS`` only), validated."""
        bad = sorted(set(changes) - set(self.RUNTIME_KEYS))
        if bad:
            raise ConfigError(
                f"cannot change {', '.join(bad)} at run time; changeable: {', '.join(self.RUNTIME_KEYS)}"
            )
        return dataclasses.replace(self, **changes)


class IdGapCounter:
    """Counts uniqueIds missing from the sequence one consumer should see.

    pvapy's data distributor hands each of N consumers ``K`` consecutive updates in turn, so
    consumer k sees blocks of K ids every ``T = N*K`` ids (pvapy passes ``objectIdOffset =
    (N-1)*K + 1`` and ``nSequentialUpdates = K``). Ids in ``(last, new)`` that fall on this
    consumer's blocks (phase set by the first id seen) were missed. An id off the pattern re-bases
    the pattern at that id (a re-balanced distributor).

    Only upstream loss is counted: every update that arrived counts as seen, bad frames included
    (the caller passes their id too), and an id that arrives late (out of order) is taken back out
    of ``missed`` (``reordered`` counts it). An id far behind the newest one
    (more than ``RESTART_WINDOW`` periods) is a restarted source: the pattern starts again there.
    """

    #: Remember at most this many missing ids (to take them back when they arrive late).
    MAX_REMEMBERED = 4096
    #: An id this many periods behind the newest is a source restart, not a late update.
    RESTART_WINDOW = 64

    def __init__(self, n_sequential: int = 1, id_offset: int = 1) -> None:
        self.k = max(1, int(n_sequential))
        self.period = max(1, int(id_offset)) + self.k - 1
        self.base: int | None = None
        self.last: int | None = None
        self.missed = 0
        self.reordered = 0
        self._missing: set[int] = set()
        self._missing_order: deque[int] = deque()

    def _mine_before(self, x: int) -> int:
        assert self.base is not None
        q, r = divmod(x - self.base, self.period)
        return q * self.k + min(r, self.k)

    def _remember(self, lo: int, hi: int, gap: int) -> None:
        """Remember this consumer's ids in ``[lo, hi)`` as missing (if there are not too many)."""
        if gap > self.MAX_REMEMBERED or self.base is None:
            return
        for x in range(lo, hi):
            if (x - self.base) % self.period < self.k:
                self._missing.add(x)
                self._missing_order.append(x)
        while len(self._missing_order) > self.MAX_REMEMBERED:
            self._missing.discard(self._missing_order.popleft())

    def update(self, uid: int) -> int:
        """Record ``uid``; return how many of this consumer's ids were skipped before it."""
        if self.last is not None and uid <= self.last:
            if uid in self._missing:  # late, not lost
                self._missing.discard(uid)
                self.missed = max(self.missed - 1, 0)
                self.reordered += 1
                return 0
            if self.last - uid <= self.RESTART_WINDOW * self.period:
                self.reordered += 1  # a duplicate, or late and never counted: not a loss either
                return 0
        if self.last is None or uid <= self.last:  # first id, or the source restarted
            self.base = uid
            self.last = uid
            self._missing.clear()
            self._missing_order.clear()
            return 0
        gap = self._mine_before(uid) - self._mine_before(self.last + 1)
        if gap > 0:
            self._remember(self.last + 1, uid, gap)
        if (uid - self.base) % self.period >= self.k:
            self.base = uid
        self.last = uid
        if gap > 0:
            self.missed += gap
        return max(gap, 0)

    def reset(self) -> None:
        self.base = None
        self.last = None
        self.missed = 0
        self.reordered = 0
        self._missing.clear()
        self._missing_order.clear()


@dataclass
class _Item:
    frame: DecodedFrame
    t_in: float  # time.monotonic() when process() received it

    @property
    def nbytes(self) -> int:
        return int(self.frame.pixels.nbytes)

    @property
    def key(self) -> tuple[tuple[int, ...], np.dtype]:
        return (self.frame.pixels.shape, self.frame.pixels.dtype)


class _Stats:
    """Counters behind getStats(); written by two threads, read by a third (ints only)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n_frames_in = 0
        self.n_processed = 0
        self.n_dropped = 0
        self.n_bad_frames = 0
        self.n_batches = 0
        self.n_peaks = 0
        self.n_hits = 0
        self.n_images_forwarded = 0
        self.n_not_published = 0
        self.n_peak_overflow = 0
        self.n_publish_errors = 0
        self.n_engine_errors = 0
        self.batch_latency_s = 0.0
        self.frame_latency_s = 0.0
        self.t_first_in: float | None = None
        self.t_last_out: float | None = None


class PeakNetImageProcessor(AdImageProcessor):
    """Finds Bragg peaks in every NtNdArray frame and publishes frame + peak table.

    ``configDict`` holds the ``--processor-args`` (see ``PeakNetProcessorParams`` and
    docs/PROCESSORS.md) plus pvapy's own keys. Output structure: ``codec.output_type()``.
    Stats (status channel ``userStats``): see ``getStatsPvaTypes``.
    """

    #: Seconds between two log lines about bad frames (the first one is always logged).
    BAD_FRAME_LOG_PERIOD_S = 10.0
    #: How long ``stop()`` waits for the engine thread to drain.
    STOP_TIMEOUT_S = 300.0

    def __init__(self, configDict: dict[str, Any] | None = None) -> None:
        AdImageProcessor.__init__(self, configDict or {})
        config = dict(configDict or {})
        self.params = PeakNetProcessorParams.from_config(config)
        self._processor_id = int(config.get("processorId", 1) or 1)
        self._layout = PanelLayout(self.params.panel_shape)
        self._frame_shape: tuple[int, ...] | None = None

        # Created before anything can call process() (it may run before start() returns).
        self._cond = threading.Condition()
        self._ring: deque[_Item] = deque()
        self._inflight_bytes = 0  # pixel bytes of frames admitted and not yet published or lost
        self._stopping = False
        self._engine: threading.Thread | None = None
        self._engine_error: BaseException | None = None
        self._engine_err_last_log = 0.0
        self._pending: dict[int, _Item] = {}  # taken off the ring, not yet published (engine thread only)
        self._stats = _Stats()
        self._stats_lock = threading.Lock()
        self._ids = IdGapCounter(config.get("nSequentialUpdates", 1), config.get("objectIdOffset", 1))
        self._bad_last_log = 0.0
        self._bad_since_log = 0
        self._drop_last_log = 0.0
        self._drops_since_log = 0
        self._warned_no_energy = False
        self._warmed_up = False
        # SIGTERM (and, in a forked consumer, a dead parent) stop this consumer like SIGINT does
        self._stop_handlers = install_stop_handlers(f"processor {self._processor_id}", self.logger)

        self.device_name = self._resolve_device(self.params.device)
        from ..finder import PeakFinder  # torch: imported in the consumer process only

        p = self.params
        self.finder = PeakFinder(
            p.weights,
            model=p.model,
            backend=p.backend,
            device=self.device_name,
            panel_shape=p.panel_shape,
            batch_size=p.batch_size,
            num_buffers=p.num_buffers,
            dtype=p.dtype,
            compile=p.compile,
            centroid=p.centroid,
            max_peaks=p.max_peaks,
            per_event_norm=p.per_event_norm,
            norm=p.norm,
            isolated_ratio=p.isolated_ratio,
            split=p.split,
            peakfinder8=p.peakfinder8,
            geometry=p.geometry,
            mask=p.mask,
            mask_convention=p.mask_convention,
            mask_dataset=p.mask_dataset,
        )
        self.pipeline = self.finder.pipeline
        self._geometry = getattr(self.finder, "geometry", None)  # for output_image: assembled
        self._assembler: Any = None
        # a geometry fixes the tiles (and the whole frame shape): decode frames with them
        self._frame_shape = getattr(self.finder, "frame_shape", None)
        self._layout = PanelLayout(getattr(self.finder, "panel_shape", None) or p.panel_shape)
        warm_shape = self._frame_shape or (None if self._layout.panel_shape is None else (1,) + self._layout.panel_shape)
        if warm_shape is not None:
            t0 = time.perf_counter()
            self.finder.warmup(warm_shape, np.float32)
            self._warmed_up = True
            self.logger.info(
                "processor %s: PeakFinder on %s warmed up in %.2f s", self._processor_id, self.device_name,
                time.perf_counter() - t0,
            )

    # -- helpers ------------------------------------------------------------------------------

    def _resolve_device(self, device: str) -> str:
        if device != "auto":
            return device
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return f"cuda:{(self._processor_id - 1) % torch.cuda.device_count()}"
        return "cpu"

    def _log_bad_frame(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._bad_since_log += 1
        if self._bad_last_log == 0.0 or now - self._bad_last_log >= self.BAD_FRAME_LOG_PERIOD_S:
            self.logger.warning(
                "processor %s: dropped %d bad frame(s); latest: %s", self._processor_id, self._bad_since_log, exc
            )
            self._bad_last_log = now
            self._bad_since_log = 0

    def _log_drop(self, unique_id: int, why: str) -> None:
        now = time.monotonic()
        self._drops_since_log += 1
        if self._drop_last_log == 0.0 or now - self._drop_last_log >= self.BAD_FRAME_LOG_PERIOD_S:
            self.logger.warning(
                "processor %s: dropped %d frame(s) (%s, ring_size=%d); latest uniqueId=%d",
                self._processor_id, self._drops_since_log, why, self.params.ring_size, unique_id,
            )
            self._drop_last_log = now
            self._drops_since_log = 0

    # -- pvapy interface ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (pvapy calls this before the input monitor starts)."""
        if self._engine is not None:
            return
        try:  # clients (writers, c2dv) can connect before the first frame
            create_output_channel(self, placeholder_output())  # a valid 1 x 1 image until the first frame
        except Exception as exc:
            self.logger.warning("processor %s: output channel not created at start (pvapy will at the first frame): %s",
                                self._processor_id, exc)
        self._engine = threading.Thread(target=self._engine_main, name=f"peaknet-engine-{self._processor_id}", daemon=True)
        self._engine.start()

    def process(self, pvObject: Any) -> None:
        """Decode one frame into the ring and return (runs on pvAccess's receive thread)."""
        t_in = time.monotonic()
        st = self._stats
        st.n_frames_in += 1
        if st.t_first_in is None:
            st.t_first_in = t_in
        params = self.params
        max_px = params.max_frame_mpix * 1e6
        try:
            declared = _declared_pixels(pvObject)
            if declared is not None and declared > max_px:
                raise FrameError(
                    f"frame of {declared / 1e6:.3g} Mpx is larger than max_frame_mpix={params.max_frame_mpix:g}: "
                    "not decoded (raise max_frame_mpix if this detector is that large)"
                )
            frame = decode_ntndarray(pvObject, self._layout, photon_energy_attribute=params.photon_energy_attribute)
            if frame.pixels.size > max_px:
                raise FrameError(
                    f"frame of {frame.pixels.size / 1e6:.3g} Mpx is larger than max_frame_mpix={params.max_frame_mpix:g}"
                )
            if self._frame_shape is not None and frame.pixels.shape != self._frame_shape:
                raise FrameError(
                    f"frame of panels {frame.pixels.shape} does not fit the geometry/mask {self._frame_shape} (P, H, W)"
                )
        except FrameError as exc:
            st.n_bad_frames += 1
            self._note_id_of_bad(pvObject)
            self._log_bad_frame(exc)
            return None
        except Exception as exc:  # not an NtNdArray at all
            st.n_bad_frames += 1
            self._note_id_of_bad(pvObject)
            self._log_bad_frame(FrameError(f"cannot decode update: {exc!r}"))
            return None
        self._ids.update(frame.unique_id)
        item = _Item(frame, t_in)
        nbytes = item.nbytes
        with self._cond:
            full = len(self._ring) >= params.ring_size
            over = self._inflight_bytes + nbytes > params.max_inflight_mb * 1e6 and self._inflight_bytes > 0
            dead = self._engine_error is not None
            if not (self._stopping or full or over or dead):
                self._ring.append(item)
                self._inflight_bytes += nbytes
                self._cond.notify()
                return None
            st.n_dropped += 1
        if dead:
            why = "engine thread is dead"
        elif full:
            why = "ring full"
        elif over:
            why = f"over max_inflight_mb={params.max_inflight_mb:g} of frames in flight"
        else:
            why = "stopping"
        self._log_drop(frame.unique_id, why)
        return None

    def _note_id_of_bad(self, pvObject: Any) -> None:
        """A bad frame still arrived: record its uniqueId (if it has one) so it is not 'missed'."""
        try:
            uid = int(pvObject["uniqueId"])
        except Exception:
            return
        self._ids.update(uid)

    def _release_items(self, items: list[_Item]) -> None:
        """Frames that left the engine (published or lost): free their share of the byte budget."""
        freed = sum(item.nbytes for item in items)
        with self._cond:
            self._inflight_bytes = max(self._inflight_bytes - freed, 0)

    def stop(self) -> None:
        """Finish and publish every queued frame, then release the model."""
        if self.pipeline is None:  # already stopped
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        engine = self._engine
        if engine is not None:
            engine.join(self.STOP_TIMEOUT_S)
            if engine.is_alive():
                self.logger.error("processor %s: engine did not drain within %.0f s", self._processor_id, self.STOP_TIMEOUT_S)
                return
        else:
            self._drain_without_engine()
        self._release()
        if self._stop_handlers is not None:
            self._stop_handlers.close()
        st = self._stats
        self.logger.warning(
            "processor %s: stopped%s: %d frames in, %d processed, %d dropped, %d bad, %d engine errors",
            self._processor_id, f" ({self._stop_handlers.reason})" if self._stop_handlers and self._stop_handlers.reason else "",
            st.n_frames_in, st.n_processed, st.n_dropped, st.n_bad_frames, st.n_engine_errors,
        )

    def configure(self, configDict: Any) -> None:
        """Change ``min_peaks``, ``forward_images``, ``centroid`` or ``batch_timeout_ms``.

        Keys pvapy handles itself are ignored; an invalid value is logged and the old one kept.
        """
        if not isinstance(configDict, dict):
            self.logger.error("processor %s: configure needs a JSON object, got %r", self._processor_id, configDict)
            return
        changes = {k: v for k, v in configDict.items() if k not in PVAPY_KEYS}
        if not changes:
            return
        try:
            new = self.params.with_changes(changes)
        except (ConfigError, TypeError) as exc:
            self.logger.error("processor %s: configure %s rejected, keeping the old values: %s", self._processor_id, changes, exc)
            return
        self.params = new
        self.logger.warning("processor %s: configured %s", self._processor_id, changes)

    def getOutputPvObjectType(self, pvObject: Any) -> Any:
        return placeholder_output()

    def resetStats(self) -> None:
        with self._stats_lock:
            self._stats.reset()
            self._ids.reset()

    def getStats(self) -> dict[str, Any]:
        with self._stats_lock:
            st = self._stats
            n = st.n_processed
            elapsed = 0.0
            if st.t_first_in is not None and st.t_last_out is not None:
                elapsed = max(st.t_last_out - st.t_first_in, 0.0)
            return {
                "nFramesIn": int(st.n_frames_in),
                "nProcessed": int(n),
                "nDropped": int(st.n_dropped),
                "nBadFrames": int(st.n_bad_frames),
                "nMissedIds": int(self._ids.missed),
                "nReorderedIds": int(self._ids.reordered),
                "nBatches": int(st.n_batches),
                "nPeaks": int(st.n_peaks),
                "nHits": int(st.n_hits),
                "nImagesForwarded": int(st.n_images_forwarded),
                "nNotPublished": int(st.n_not_published),
                "nPeakOverflow": int(st.n_peak_overflow),
                "nPublishErrors": int(st.n_publish_errors),
                "nEngineErrors": int(st.n_engine_errors),
                "ringFill": int(len(self._ring)),
                "inflightMB": float(self._inflight_bytes / 1e6),
                "engineAlive": int(self._engine is not None and self._engine.is_alive()),
                "hitRate": float(st.n_hits / n) if n else 0.0,
                "meanBatchLatencyMs": float(1e3 * st.batch_latency_s / st.n_batches) if st.n_batches else 0.0,
                "meanFrameLatencyMs": float(1e3 * st.frame_latency_s / n) if n else 0.0,
                "framesPerSecond": float(n / elapsed) if elapsed > 0 else 0.0,
                "minPeaks": int(self.params.min_peaks),
                "device": str(self.device_name),
            }

    def getStatsPvaTypes(self) -> dict[str, Any]:
        return {
            "nFramesIn": pva.UINT,
            "nProcessed": pva.UINT,
            "nDropped": pva.UINT,
            "nBadFrames": pva.UINT,
            "nMissedIds": pva.UINT,
            "nReorderedIds": pva.UINT,
            "nBatches": pva.UINT,
            "nPeaks": pva.ULONG,
            "nHits": pva.UINT,
            "nImagesForwarded": pva.UINT,
            "nNotPublished": pva.UINT,
            "nPeakOverflow": pva.UINT,
            "nPublishErrors": pva.UINT,
            "nEngineErrors": pva.UINT,
            "ringFill": pva.UINT,
            "inflightMB": pva.DOUBLE,
            "engineAlive": pva.UINT,
            "hitRate": pva.DOUBLE,
            "meanBatchLatencyMs": pva.DOUBLE,
            "meanFrameLatencyMs": pva.DOUBLE,
            "framesPerSecond": pva.DOUBLE,
            "minPeaks": pva.UINT,
            "device": pva.STRING,
        }

    # -- engine thread ------------------------------------------------------------------------

    def _engine_main(self) -> None:
        """Batches until stopped. Any exception costs the frames it hit (counted in nDropped and
        nEngineErrors) and the thread goes on; a repeating fault backs off instead of spinning."""
        failures = 0
        while True:
            try:
                if not self._engine_step():
                    break
                failures = 0
            except Exception as exc:
                failures += 1
                self._engine_failed(exc, failures)
                with self._cond:
                    stopping = self._stopping
                if stopping and failures >= 3:  # stop() must not wait forever on a fault that repeats
                    self._drop_ring("engine failing while stopping")
                    break
                time.sleep(min(0.05 * failures, 1.0))
            except BaseException as exc:  # not an Exception: the thread cannot go on
                self._engine_died(exc)
                return
        try:
            self._publish_results(self.pipeline.drain())
        except Exception as exc:
            self._engine_failed(exc, 1)

    def _engine_step(self) -> bool:
        """One batch (or an idle drain); False once stopping and nothing is left."""
        batch = self._next_batch()
        if batch:
            self._run_batch(batch)
            return True
        # Nothing new within the batch timeout: finish what is in flight.
        if self.pipeline.in_flight:
            self._publish_results(self.pipeline.drain())
        with self._cond:
            if self._stopping and not self._ring:
                return False
            if not self._ring and not self._pending and not self.pipeline.in_flight:
                self._inflight_bytes = 0  # idle: nothing is in flight, whatever the accounting says
        return True

    def _engine_failed(self, exc: BaseException, failures: int) -> None:
        """Count an engine exception and the frames it cost (taken off the ring, not published)."""
        lost = list(self._pending.values())
        self._pending.clear()
        inflight = getattr(self.pipeline, "_inflight", None)
        if inflight is not None:  # their results can no longer be trusted: counted lost below
            inflight.clear()
        self._release_items(lost)
        with self._stats_lock:
            self._stats.n_engine_errors += 1
            self._stats.n_dropped += len(lost)
            n_errors = self._stats.n_engine_errors
        now = time.monotonic()
        if failures == 1 or now - self._engine_err_last_log >= self.BAD_FRAME_LOG_PERIOD_S:
            self._engine_err_last_log = now
            self.logger.error(
                "processor %s: engine error #%d (%s): %d frame(s) lost, counted in nDropped; the engine keeps running",
                self._processor_id, n_errors, exc, len(lost), exc_info=exc,
            )

    def _engine_died(self, exc: BaseException) -> None:
        """The engine thread cannot continue: say so loudly, count every frame, stop the consumer."""
        self._engine_error = exc
        lost = list(self._pending.values())
        self._pending.clear()
        with self._stats_lock:
            self._stats.n_engine_errors += 1
            self._stats.n_dropped += len(lost)
        self._drop_ring("engine thread died")
        self.logger.critical(
            "processor %s: engine thread died (%r): %d frame(s) lost; further frames are dropped (nDropped); "
            "stopping this consumer", self._processor_id, exc, len(lost), exc_info=exc,
        )
        if self._stop_handlers is not None:
            self._stop_handlers.request_stop("engine thread died")

    def _drop_ring(self, why: str) -> None:
        with self._cond:
            n = len(self._ring)
            self._ring.clear()
            self._inflight_bytes = 0
        if n:
            with self._stats_lock:
                self._stats.n_dropped += n
            self.logger.error("processor %s: %d queued frame(s) dropped (%s), counted in nDropped", self._processor_id, n, why)

    def _next_batch(self) -> list[_Item]:
        """Up to batch_size consecutive frames of one shape/dtype; [] if none arrived in time."""
        params = self.params
        timeout = params.batch_timeout_ms / 1e3
        with self._cond:
            if not self._ring and not self._stopping:
                # Idle: wake up after the timeout if batches are in flight (to drain them).
                self._cond.wait(max(timeout, 1e-3) if self.pipeline.in_flight else 0.5)
            if not self._ring:
                return []
            first = self._ring.popleft()
            self._pending[id(first)] = first
            batch = [first]
            deadline = first.t_in + timeout
            while len(batch) < params.batch_size:
                if self._ring:
                    if self._ring[0].key != first.key:
                        break
                    item = self._ring.popleft()
                    self._pending[id(item)] = item
                    batch.append(item)
                    continue
                if self._stopping:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        return batch

    def _sync_backend(self) -> None:
        """Apply a run-time ``centroid`` change to the backend (between batches)."""
        backend = self.pipeline.backend
        centroid = self.params.centroid
        if getattr(backend, "centroid", centroid) != centroid and dataclasses.is_dataclass(backend):
            self.pipeline.backend = dataclasses.replace(backend, centroid=centroid)

    def _run_batch(self, batch: list[_Item]) -> None:
        self._sync_backend()
        if not self._warmed_up:
            self._warmed_up = True
            t0 = time.perf_counter()
            self.finder.warmup(batch[0].frame.pixels.shape, batch[0].frame.pixels.dtype)
            self.logger.info("processor %s: warmed up at first frame in %.2f s", self._processor_id, time.perf_counter() - t0)
        stack = np.stack([item.frame.pixels for item in batch])
        try:
            results = self.pipeline.submit(stack, tag=batch)
        except FrameError as exc:
            with self._stats_lock:
                self._stats.n_bad_frames += len(batch)
            for item in batch:
                self._pending.pop(id(item), None)
            self._release_items(batch)
            self._log_bad_frame(exc)
            return
        self._publish_results(results)

    def _publish_results(self, results: list[Any]) -> None:
        for res in results:
            items: list[_Item] = res.tag
            with self._stats_lock:
                self._stats.n_batches += 1
                self._stats.batch_latency_s += float(res.latency_s)
            for item, peaks in zip(items, res.peaks):
                self._publish(item, peaks)
                self._pending.pop(id(item), None)
                self._release_items([item])

    def _view(self, frame: DecodedFrame) -> tuple[np.ndarray | None, int]:
        """The assembled image of ``frame`` (output_image: assembled), or (None, 1) if it cannot be."""
        from ..assemble import Assembler

        shape = frame.pixels.shape
        asm = self._assembler
        if asm is None or asm.frame_shape != shape or asm.max_px != self.params.assembled_max_px:
            try:
                geometry = self._geometry
                if geometry is not None and geometry.slab_shape != (shape[0] * shape[1], shape[2]):
                    geometry = None
                asm = Assembler(shape, geometry, self.params.assembled_max_px)
            except ValueError as exc:
                self.logger.error("processor %s: cannot assemble frames %s, sending the slab: %s", self._processor_id, shape, exc)
                return None, 1
            self._assembler = asm
        return asm(frame.pixels), asm.binning

    def _publish(self, item: _Item, peaks: PeakTable) -> None:
        params = self.params
        n = peaks.n
        hit = n >= params.min_peaks
        mode = params.forward_images
        fwd = mode == "all" or (mode in ("hits", "hits_empty") and hit)
        if not (fwd or mode in ("hits_empty", "none")):
            # forward_images: hits: a non-hit is not published (an empty NTNDArray is an error to
            # image viewers); counted, and its peaks are in the stats
            now = time.monotonic()
            with self._stats_lock:
                st = self._stats
                st.n_processed += 1
                st.n_peaks += n
                st.n_not_published += 1
                st.n_peak_overflow += int(peaks.n_overflow)
                st.frame_latency_s += now - item.t_in
                st.t_last_out = now
            return
        energy = item.frame.photon_energy_ev
        if energy is None:
            energy = params.photon_energy_ev
            if energy is None and not self._warned_no_energy:
                self._warned_no_energy = True
                self.logger.warning(
                    "processor %s: frames carry no %r attribute and photon_energy_ev is not set; "
                    "publishing photonEnergy = NaN",
                    self._processor_id,
                    params.photon_energy_attribute,
                )
        view, binning = (None, 1)
        if fwd and params.output_image == "assembled":
            view, binning = self._view(item.frame)
        out = build_output(
            item.frame, peaks, include_image=fwd, photon_energy_ev=energy,
            photon_energy_attribute=params.photon_energy_attribute, view=view, view_binning=binning,
        )
        try:
            self.updateOutputChannel(out)
        except Exception as exc:  # pragma: no cover - pvapy already catches
            self._stats.n_publish_errors += 1
            self.logger.error("processor %s: publish failed: %s", self._processor_id, exc)
        now = time.monotonic()
        with self._stats_lock:
            st = self._stats
            st.n_processed += 1
            st.n_peaks += n
            st.n_hits += int(hit)
            st.n_images_forwarded += int(fwd)
            st.n_peak_overflow += int(peaks.n_overflow)
            st.frame_latency_s += now - item.t_in
            st.t_last_out = now

    def _drain_without_engine(self) -> None:
        """stop() without start(): process what is queued on this thread."""
        while True:
            with self._cond:
                if not self._ring:
                    break
            batch = self._next_batch()
            if batch:
                self._run_batch(batch)
        self._publish_results(self.pipeline.drain())

    def _release(self) -> None:
        finder = getattr(self, "finder", None)
        self.finder = None
        self.pipeline = None
        del finder
        if self.device_name.startswith("cuda"):
            try:
                import torch

                torch.cuda.empty_cache()
            except Exception:  # pragma: no cover
                pass
