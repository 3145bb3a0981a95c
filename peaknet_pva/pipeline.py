"""N-way buffered inference: frames in, one PeakTable per frame out, in submission order.

On CUDA each batch moves through three streams: host→device copy of the raw frames from a pinned
slot (``h2d``), normalisation + network + mask (``compute``), and peak extraction (``post``), with
per-slot events between them. ``submit`` enqueues batch *k* and then finishes batch *k−N+1*, whose
work has had N−1 batches' time to complete, so the only host waits are on old work. Pinned host
slots and device input buffers are allocated once per frame shape and reused forever.

On the CPU the same API runs each batch at once (N is ignored); overlap with frame decoding comes
from the caller's threads (the PVA processor decodes on pvAccess's thread, computes on its own).

No PVA here: ``Pipeline`` is used by ``PeakFinder`` (files, notebooks), the PVA processor and the
benchmarks alike.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .errors import ConfigError, FrameError
from .frames import PeakTable, check_dtype
from .peaks import find_peaks
from .preprocess import preprocess, signal_units

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Backend(Protocol):
    """What the pipeline runs: device work that may be queued (``compute``) and extraction.

    ``compute`` is called on the compute stream with raw frames ``(B, P, H, W)`` on the device and
    returns any device-resident state without synchronising. ``extract`` is called on the post
    stream, later, with that state and the same frames, and returns one PeakTable per frame.
    """

    def compute(self, frames: torch.Tensor) -> Any: ...

    def extract(self, state: Any, frames: torch.Tensor) -> list[PeakTable]: ...


#: Isolated-pixel veto defaults: the neighbours' share of the excess below which a pixel is hot,
#: and the least excess (robust noise units) it must have. A Bragg spot of sigma >= 0.4 px puts
#: >= 9 % of its peak pixel's excess into a side neighbour even when centred on a pixel (0.23 at
#: 0.5 px); a hot pixel on a background puts ~0 % (its neighbours are noise).
ISOLATED_RATIO = 0.05
ISOLATED_MIN_Z = 30.0


def isolated_pixels(x: torch.Tensor, ratio: float = ISOLATED_RATIO, min_z: float = ISOLATED_MIN_Z) -> torch.Tensor:
    """Hot pixels of robust-normalised panels ``x`` (``(N, H, W)``, ``asinh`` of noise units):
    excess ``z > min_z`` while each of the 8 neighbours (outside the panel: none) has ``< ratio * z``.

    Pure tensor ops on the panels' device, no host sync. Returns a bool ``(N, H, W)`` map.
    """
    z = torch.sinh(x)
    zp = torch.nn.functional.pad(z, (1, 1, 1, 1), value=float("-inf"))
    h, w = int(z.shape[-2]), int(z.shape[-1])
    nb = None
    for dy in range(3):
        for dx in range(3):
            if dy == 1 and dx == 1:
                continue
            view = zp[:, dy : dy + h, dx : dx + w]
            nb = view.clone() if nb is None else torch.maximum(nb, view)
    return (z > min_z) & (nb < ratio * z)


@dataclass(frozen=True)
class PeakNetBackend:
    """PeakNet segmentation → binary masks → batched connected-component peaks.

    Mask = argmax over the two classes == 1, written as ``logit1 > logit0`` (ties go to
    background, as argmax does). The input normalisation is the one the weights were trained with
    (``model.config.norm``) unless ``norm`` overrides it. ``bad_pixels`` (True = bad, ``(P, H, W)``
    or broadcastable to the batch) are left out of the normalisation, zeroed at the model input and
    can never be part of a peak.
    """

    model: torch.nn.Module
    amp_dtype: torch.dtype = torch.float32
    #: "mask", "intensity", "signal" (weighted by the squared background-subtracted signal in
    #: noise units, read off the normalised input) or "auto": "signal" with the robust or local
    #: norm (our weights), "mask" with the instance norm (published checkpoints, as the seed).
    centroid: str = "auto"
    max_peaks: int = 2048
    per_event_norm: bool = False
    norm: str | None = None
    bad_pixels: torch.Tensor | None = None
    #: isolated-pixel veto (``isolated_pixels``): a pixel whose 8 neighbours all hold less than
    #: this fraction of its excess is a hot pixel, not a Bragg peak. None = auto: 0.05 with the
    #: robust or local norm (our weights), off with the instance norm (published checkpoints, unchanged).
    isolated_ratio: float | None = None
    #: split components holding separate signal maxima (``find_peaks(split=True)``): touching
    #: spots of a dense lattice, merged by the segmentation, become one peak each. None = auto:
    #: on with the robust or local norm (our weights), off with the instance norm (published).
    split: bool | None = None

    @property
    def split_mode(self) -> bool:
        """Whether merged components are split at their maxima (``split`` with None resolved)."""
        if self.split is None:
            return self.input_norm in ("robust", "local")
        return bool(self.split)

    @property
    def veto_ratio(self) -> float:
        """The isolated-pixel ratio in use (0 = off; only the robust and local norms give noise units)."""
        if self.input_norm not in ("robust", "local"):
            return 0.0
        return ISOLATED_RATIO if self.isolated_ratio is None else float(self.isolated_ratio)

    @property
    def centroid_mode(self) -> str:
        """The centroid in use (``centroid`` with "auto" resolved)."""
        if self.centroid != "auto":
            return self.centroid
        return "signal" if self.input_norm in ("robust", "local") else "mask"

    @property
    def input_norm(self) -> str:
        """The normalisation in use: ``norm`` or the checkpoint's ``config.norm`` (else instance)."""
        if self.norm is not None:
            return self.norm
        inner = getattr(self.model, "_orig_mod", self.model)
        return getattr(getattr(inner, "config", None), "norm", "instance")

    def _bad(self, frames: torch.Tensor) -> torch.Tensor | None:
        if self.bad_pixels is None:
            return None
        bad = self.bad_pixels
        if bad.device != frames.device:
            # Once, not per batch: no host-to-device copy of the mask in the GPU loop.
            bad = bad.to(frames.device)
            object.__setattr__(self, "bad_pixels", bad)
        return bad

    def compute(self, frames: torch.Tensor) -> torch.Tensor:
        bad = self._bad(frames)
        x, (h, w) = preprocess(frames, per_event=self.per_event_norm, norm=self.input_norm, mask=bad)
        hot = None
        if self.veto_ratio > 0:
            hot = isolated_pixels(x[:, 0, :h, :w], self.veto_ratio)
            x[:, 0, :h, :w].masked_fill_(hot, 0.0)  # as a declared bad pixel looks in training
        use_amp = self.amp_dtype != torch.float32
        ctx = torch.autocast(frames.device.type, dtype=self.amp_dtype) if use_amp else nullcontext()
        with torch.inference_mode(), ctx:
            logits = self.model(x)
        mask = (logits[:, 1] > logits[:, 0]).to(torch.uint8)
        weights = None
        if self.centroid_mode == "signal" or self.split_mode:
            # Noise units above the local background, squared: the spot's core steers the centroid,
            # not its noisy wings, the pedestal or the background under it.
            weights = signal_units(x[:, 0, :h, :w], self.input_norm).clamp_(min=0.0).square_()
        # Padding holds no data: a pixel there is never part of a peak (else a component at the
        # right or bottom edge could put its centroid outside the frame).
        mask[:, h:, :] = 0
        mask[:, :, w:] = 0
        if hot is not None:
            mask[:, :h, :w].masked_fill_(hot, 0)
        if bad is not None:
            b, p = frames.shape[:2]
            good = (~torch.broadcast_to(bad, frames.shape)).reshape(b * p, h, w).to(torch.uint8)
            mask[:, :h, :w].mul_(good)
        return mask, weights

    def extract(self, state: tuple[torch.Tensor, torch.Tensor | None], frames: torch.Tensor) -> list[PeakTable]:
        mask, weights = state
        b, p, h, w = frames.shape
        return find_peaks(
            mask,
            frames.reshape(b * p, h, w),
            n_panels=p,
            valid_shape=(h, w),
            centroid=self.centroid_mode,
            max_peaks=self.max_peaks,
            weights=weights,
            split=self.split_mode,
        )

@dataclass(frozen=True)
class FunctionBackend:
    """A backend that does all its work at extraction time (e.g. peakfinder8)."""

    fn: Callable[[torch.Tensor], list[PeakTable]]

    def compute(self, frames: torch.Tensor) -> None:
        return None

    def extract(self, state: None, frames: torch.Tensor) -> list[PeakTable]:
        return self.fn(frames)


@dataclass
class BatchResult:
    """One submitted batch, finished: its caller's tag, one PeakTable per frame, and the time from
    ``submit`` to the tables being on the host (seconds)."""

    tag: Any
    peaks: list[PeakTable]
    latency_s: float


@dataclass
class _Slot:
    host: torch.Tensor  # pinned (batch_size, P, H, W), raw dtype
    dev: torch.Tensor  # device (batch_size, P, H, W), raw dtype
    h2d_done: Any
    compute_done: Any


@dataclass
class _InFlight:
    slot: _Slot
    n: int
    tag: Any
    t0: float
    state: Any = None
    extra: list[Any] = field(default_factory=list)


class Pipeline:
    """Batches of frames ``(B, P, H, W)`` in, ``BatchResult`` out, in order.

    Args:
        backend: what to run (``PeakNetBackend`` or ``FunctionBackend``).
        device: a torch device; CUDA enables the buffered path.
        batch_size: the largest batch ``submit`` accepts (buffers are sized for it).
        num_buffers: N, batches in flight on CUDA (1 = sequential).

    One thread drives a Pipeline. Example::

        pipe = Pipeline(PeakNetBackend(model), device=torch.device("cuda"), batch_size=8)
        for batch in batches:
            for res in pipe.submit(batch):
                use(res.peaks)
        for res in pipe.drain():
            use(res.peaks)
    """

    def __init__(
        self,
        backend: Backend,
        *,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
        num_buffers: int = 3,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if num_buffers < 1:
            raise ConfigError(f"num_buffers must be >= 1, got {num_buffers}")
        self.backend = backend
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.num_buffers = int(num_buffers)
        self.cuda = self.device.type == "cuda"
        self._slots: list[_Slot] = []
        self._slot_key: tuple[tuple[int, ...], np.dtype] | None = None
        self._next_slot = 0
        self._inflight: deque[_InFlight] = deque()
        self._streams: tuple[Any, Any, Any] | None = None

    # -- public ------------------------------------------------------------------------------

    def submit(self, frames: np.ndarray, tag: Any = None) -> list[BatchResult]:
        """Queue one batch; return the batches that finished (oldest first, maybe none)."""
        frames = self._check(frames)
        t0 = time.perf_counter()
        if not self.cuda:
            if not frames.flags.writeable:  # e.g. memory-mapped files: torch wants writable memory
                frames = frames.copy()
            dev = torch.from_numpy(np.ascontiguousarray(frames))
            if self.device.type != "cpu":
                dev = dev.to(self.device)
            state = self.backend.compute(dev)
            peaks = self.backend.extract(state, dev)
            return [BatchResult(tag, peaks, time.perf_counter() - t0)]

        done: list[BatchResult] = []
        if self._slot_key is not None and (tuple(frames.shape[1:]), frames.dtype) != self._slot_key:
            done.extend(self.drain())  # new shape/dtype: finish the old batches on the old buffers
        self._enqueue_cuda(frames, tag, t0)
        while len(self._inflight) >= self.num_buffers:
            done.append(self._finish(self._inflight.popleft()))
        return done

    def drain(self) -> list[BatchResult]:
        """Finish every batch still in flight, oldest first."""
        done = []
        while self._inflight:
            done.append(self._finish(self._inflight.popleft()))
        return done

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # -- internals ---------------------------------------------------------------------------

    def _check(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        check_dtype(frames.dtype)
        if frames.ndim != 4 or frames.size == 0:
            raise FrameError(f"a batch must be a non-empty (B, P, H, W) array, got shape {frames.shape}")
        if frames.shape[0] > self.batch_size:
            raise FrameError(f"batch of {frames.shape[0]} frames exceeds batch_size={self.batch_size}")
        return frames

    def _ensure_cuda(self, frames: np.ndarray) -> None:
        if self._streams is None:
            with torch.cuda.device(self.device):
                self._streams = (torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream())
        key = (tuple(frames.shape[1:]), frames.dtype)
        if key == self._slot_key:
            return
        assert not self._inflight, "drain before reallocating"
        if self._slot_key is not None:
            log.info("frame shape/dtype changed %s -> %s: reallocating buffers", self._slot_key, key)
        tdtype = torch.from_numpy(frames[:0]).dtype
        shape = (self.batch_size,) + tuple(frames.shape[1:])
        self._slots = [
            _Slot(
                host=torch.empty(shape, dtype=tdtype).pin_memory(),
                dev=torch.empty(shape, dtype=tdtype, device=self.device),
                h2d_done=torch.cuda.Event(),
                compute_done=torch.cuda.Event(),
            )
            for _ in range(self.num_buffers)
        ]
        self._slot_key = key
        self._next_slot = 0

    def _enqueue_cuda(self, frames: np.ndarray, tag: Any, t0: float) -> None:
        self._ensure_cuda(frames)
        assert self._streams is not None
        h2d, compute, _ = self._streams
        slot = self._slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % self.num_buffers
        n = frames.shape[0]
        # This slot's previous batch was finished (host synced on its post work), so it is free.
        slot.host[:n].numpy()[...] = frames
        with torch.cuda.stream(h2d):
            slot.dev[:n].copy_(slot.host[:n], non_blocking=True)
            slot.h2d_done.record(h2d)
        with torch.cuda.stream(compute):
            compute.wait_event(slot.h2d_done)
            state = self.backend.compute(slot.dev[:n])
            slot.compute_done.record(compute)
        self._inflight.append(_InFlight(slot=slot, n=n, tag=tag, t0=t0, state=state))

    def _finish(self, job: _InFlight) -> BatchResult:
        assert self._streams is not None
        post = self._streams[2]
        with torch.cuda.stream(post):
            post.wait_event(job.slot.compute_done)
            if isinstance(job.state, torch.Tensor):
                job.state.record_stream(post)
            # find_peaks runs CuPy on torch's current stream (this one), so ordering carries over.
            peaks = self.backend.extract(job.state, job.slot.dev[: job.n])
        job.state = None
        return BatchResult(job.tag, peaks, time.perf_counter() - job.t0)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → the first CUDA device if there is one, else CPU; anything else as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available on this machine")
    return dev


def resolve_amp_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` → bf16 on CUDA, fp32 on CPU (CPU autocast is slower than fp32 for convs)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]
