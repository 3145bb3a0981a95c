"""An assembled detector image for viewers (c2dataviewer, any areaDetector client).

The stacked slab ``(P*H, W)`` of a multi-panel detector is a tall strip (e.g. 384 x 5632) in which
nobody can judge a pattern. :class:`Assembler` puts every slab pixel where the CrystFEL geometry
says it is (lab x to the right, lab y up, beam at the lab origin) and bins the result down so its
longer side is at most ``max_px``. Binning keeps the brightest pixel of each bin (a max, not a
mean), so a Bragg peak of one or two pixels stays visible. Without a geometry the panels are
tiled in a near-square grid instead (no physical meaning, but a 16-panel frame fits a screen).

The index tables are built once; each frame then costs one gather and one ``maximum.reduceat``.
Peaks stay panel-local in the peak table: this is a picture, not a coordinate system.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from .geometry import DetectorGeometry, lab_xy

log = logging.getLogger(__name__)

__all__ = ["Assembler"]


class Assembler:
    """Maps ``(P, H, W)`` frames (or their ``(P*H, W)`` slab) to a binned lab-frame image.

    Args:
        frame_shape: ``(P, H, W)`` of the frames it will get.
        geometry: a CrystFEL geometry whose slab is ``(P*H, W)``; None = panels in a grid.
        max_px: the longer side of the output image is at most this (pixels, >= 16).
    """

    def __init__(self, frame_shape: tuple[int, int, int], geometry: DetectorGeometry | None = None,
                 max_px: int = 1024) -> None:
        p, h, w = (int(v) for v in frame_shape)
        if max_px < 16:
            raise ValueError(f"max_px must be >= 16, got {max_px}")
        self.frame_shape = (p, h, w)
        self.max_px = int(max_px)
        if geometry is not None:
            if geometry.slab_shape != (p * h, w):
                raise ValueError(f"geometry slab {geometry.slab_shape} is not the frames' {(p * h, w)} slab")
            x, y = lab_xy(geometry)
            col_f = x
            row_f = -y  # lab +y up: image row 0 at the top
        else:
            cols = math.ceil(math.sqrt(p * h / w)) if p > 1 else 1  # a grid of panels, about square
            cols = max(1, min(cols, p))
            gap = max(2, min(h, w) // 32)
            idx = np.arange(p)
            rr, cc = np.mgrid[0:h, 0:w]
            row_f = ((idx // cols) * (h + gap))[:, None, None] + rr[None] + 0.5
            col_f = ((idx % cols) * (w + gap))[:, None, None] + cc[None] + 0.5
            row_f = row_f.reshape(p * h, w).astype(np.float64)
            col_f = col_f.reshape(p * h, w).astype(np.float64)
        valid = np.isfinite(col_f) & np.isfinite(row_f)
        if not valid.any():
            raise ValueError("the geometry places no pixel")
        c0, c1 = float(col_f[valid].min()), float(col_f[valid].max())
        r0, r1 = float(row_f[valid].min()), float(row_f[valid].max())
        extent = max(c1 - c0, r1 - r0) + 1.0
        self.binning = max(1, math.ceil(extent / max_px))
        b = self.binning
        col = np.floor((col_f[valid] - c0) / b).astype(np.int64)
        row = np.floor((row_f[valid] - r0) / b).astype(np.int64)
        self.shape = (int(row.max()) + 1, int(col.max()) + 1)
        dest = row * self.shape[1] + col
        src = np.flatnonzero(valid.reshape(-1))
        order = np.argsort(dest, kind="stable")
        dest = dest[order]
        self._src = src[order]
        starts = np.flatnonzero(np.r_[True, dest[1:] != dest[:-1]])
        self._starts = starts
        self._dest = dest[starts]
        log.info("assembled view %s x %s (binning %d) for frames %s", self.shape[0], self.shape[1], b, self.frame_shape)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """The assembled, binned image of ``frame`` (its dtype; 0 where no pixel lands)."""
        flat = np.asarray(frame).reshape(-1)
        if flat.size != self.frame_shape[0] * self.frame_shape[1] * self.frame_shape[2]:
            raise ValueError(f"frame of {flat.size} pixels is not of shape {self.frame_shape}")
        out = np.zeros(self.shape[0] * self.shape[1], dtype=flat.dtype)
        out[self._dest] = np.maximum.reduceat(flat[self._src], self._starts)
        return out.reshape(self.shape)
