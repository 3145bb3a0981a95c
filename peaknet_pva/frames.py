"""Frames, panel layouts and peak tables: the plain data that crosses every stage boundary.

Nothing here knows about PVA, torch or files. Axes are always ``panel, y (slow scan), x (fast
scan)``; coordinates are panel-local, 0-based, with the pixel centre at the integer (CXI/Cheetah
convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import FrameError

#: Pixel dtypes a frame may arrive in (DESIGN 2.1).
SUPPORTED_DTYPES: tuple[np.dtype, ...] = tuple(
    np.dtype(t)
    for t in ("int8", "uint8", "int16", "uint16", "int32", "uint32", "float32", "float64")
)


@dataclass(frozen=True)
class PanelLayout:
    """How a detector frame splits into ``n_panels`` panels of ``panel_shape = (H, W)``.

    Multi-panel frames travel as the stacked 2-D slab ``(P*H, W)`` (Cheetah/CrystFEL) or as 3-D
    ``(P, H, W)``. ``panel_shape=None`` means "one panel, whatever the frame's shape".
    """

    panel_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.panel_shape is not None:
            shape = tuple(int(v) for v in self.panel_shape)
            if len(shape) != 2 or min(shape) <= 0:
                raise FrameError(f"panel_shape must be [H, W] with H, W > 0, got {self.panel_shape!r}")
            object.__setattr__(self, "panel_shape", shape)

    def split(self, frame: np.ndarray) -> np.ndarray:
        """Return ``frame`` as a ``(P, H, W)`` view (no copy); raise FrameError if it does not fit."""
        frame = np.asarray(frame)
        check_dtype(frame.dtype)
        if frame.size == 0:
            raise FrameError(f"empty frame of shape {frame.shape}")
        if frame.ndim == 3:
            if self.panel_shape is not None and tuple(frame.shape[1:]) != self.panel_shape:
                raise FrameError(
                    f"3-D frame of shape {frame.shape} does not have panels of {self.panel_shape}"
                )
            return frame
        if frame.ndim != 2:
            raise FrameError(f"a frame must be 2-D (P*H, W) or 3-D (P, H, W), got shape {frame.shape}")
        if self.panel_shape is None:
            return frame[None]
        h, w = self.panel_shape
        rows, cols = frame.shape
        if cols != w or rows % h != 0:
            raise FrameError(
                f"frame of shape {frame.shape} is not a stack of panels of shape {self.panel_shape}"
            )
        return frame.reshape(rows // h, h, w)


def check_dtype(dtype: np.dtype) -> np.dtype:
    """Return ``dtype`` if it is a supported pixel type, else raise FrameError."""
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(d.name for d in SUPPORTED_DTYPES)
        raise FrameError(f"unsupported pixel dtype {dtype.name}; supported: {names}")
    return dtype


def as_panel_stack(frames: np.ndarray, panel_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Turn a batch of frames into ``(F, P, H, W)``.

    ``frames`` is ``(F, P*H, W)`` slabs (split by ``panel_shape``; ``None`` = one panel each),
    ``(F, P, H, W)``, or a single 2-D frame ``(H, W)``.
    """
    frames = np.asarray(frames)
    check_dtype(frames.dtype)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim == 4:
        if panel_shape is not None and tuple(frames.shape[2:]) != tuple(panel_shape):
            raise FrameError(f"frames of shape {frames.shape} do not have panels of {panel_shape}")
        return frames
    if frames.ndim != 3:
        raise FrameError(f"frames must be (F, P*H, W) or (F, P, H, W), got shape {frames.shape}")
    layout = PanelLayout(panel_shape)
    if frames.shape[0] == 0:
        raise FrameError("no frames given")
    first = layout.split(frames[0])
    return frames.reshape((frames.shape[0],) + first.shape)


@dataclass
class PeakTable:
    """The peaks of one frame, one entry per 8-connected component of the peak mask.

    Arrays all have length ``n``: ``panel`` (uint16), ``y``/``x`` panel-local centroid in pixels
    (float32, pixel centre at the integer), ``intensity`` (float32, sum of raw pixel values over the
    component), ``npix`` (uint32, pixels in the component). ``n_overflow`` counts peaks dropped by the
    ``max_peaks`` cap (the strongest were kept). ``centroid`` says how y/x were computed
    (``"mask"`` or ``"intensity"``).
    """

    panel: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))
    y: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    x: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    intensity: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    npix: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    n_overflow: int = 0
    centroid: str = "mask"

    def __post_init__(self) -> None:
        self.panel = np.ascontiguousarray(self.panel, dtype=np.uint16)
        self.y = np.ascontiguousarray(self.y, dtype=np.float32)
        self.x = np.ascontiguousarray(self.x, dtype=np.float32)
        self.intensity = np.ascontiguousarray(self.intensity, dtype=np.float32)
        self.npix = np.ascontiguousarray(self.npix, dtype=np.uint32)
        n = self.panel.shape[0]
        for name in ("y", "x", "intensity", "npix"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"PeakTable.{name} has shape {getattr(self, name).shape}, expected ({n},)")

    @property
    def n(self) -> int:
        """Number of peaks."""
        return int(self.panel.shape[0])

    def __len__(self) -> int:
        return self.n

    def as_list(self) -> list[list[float]]:
        """The seed's format: ``[[panel, y, x], ...]``."""
        return [[int(p), float(y), float(x)] for p, y, x in zip(self.panel, self.y, self.x)]

    @classmethod
    def empty(cls, centroid: str = "mask") -> PeakTable:
        return cls(centroid=centroid)
