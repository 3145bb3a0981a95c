"""PNG overlays of found and true peaks on a detector frame (matplotlib Agg canvas; pyplot is never imported).

Multi-panel frames are drawn as a grid of panels (``ncols ≈ sqrt(P)`` for square-ish panels,
fewer for wide ones), each panel in its own axes labelled with its index, so panel-local peak
coordinates land where they belong. The image is log-scaled (``log10(1 + max(v - p1, 0))`` with
``p1`` the 1st percentile) with a shared colour range; truth spots are open circles (detectable:
solid cyan, undetectable: thin dashed orange), found peaks red crosses, on a grey-scale image.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FrameError
from .frames import PeakTable

__all__ = ["plot_frame_peaks"]


def _grid(n_panels: int, panel_shape: tuple[int, int]) -> tuple[int, int]:
    h, w = panel_shape
    aspect = w / h
    ncols = max(1, round(math.sqrt(n_panels / aspect)))
    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    return nrows, ncols


def plot_frame_peaks(
    frame: np.ndarray,
    found: PeakTable | None,
    truth: Any | None = None,
    *,
    path: str | os.PathLike[str],
    title: str | None = None,
    dpi: int = 110,
    panel_width_in: float | None = None,
) -> Path:
    """Write a PNG of ``frame`` with ``found`` peaks (crosses) and ``truth`` spots (circles).

    Args:
        frame: ``(P, H, W)`` or ``(H, W)``, any real dtype.
        found: peaks to mark (panel-local, pixel centre at integer), or None.
        truth: anything with ``panel``, ``y``, ``x`` arrays (a :class:`PeakTable` or a
            simulator ``TruthTable``; a ``detectable`` array, if present, styles the circles).
        path: output PNG path (parent folders are created).
        title: figure title.
        dpi: resolution; ``panel_width_in``: width of one panel in inches (default: fits ~12 in).

    Returns the written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = np.asarray(frame)
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3 or img.size == 0:
        raise FrameError(f"plot_frame_peaks wants a (P, H, W) or (H, W) frame, got shape {np.shape(frame)}")
    p, h, w = img.shape
    data = img.astype(np.float32)
    finite = np.isfinite(data)
    lo = float(np.percentile(data[finite], 1)) if finite.any() else 0.0
    shown = np.log10(1.0 + np.clip(np.nan_to_num(data - lo, nan=0.0), 0.0, None))
    vmax = float(np.percentile(shown, 99.9)) if shown.size else 1.0
    vmax = max(vmax, 1e-3)

    nrows, ncols = _grid(p, (h, w))
    if panel_width_in is None:
        panel_width_in = min(12.0 / ncols, 8.0)
    panel_height_in = panel_width_in * h / w
    fig = Figure(figsize=(panel_width_in * ncols + 0.6, panel_height_in * nrows + (0.6 if title else 0.2)))
    FigureCanvasAgg(fig)  # Agg canvas, no pyplot state: safe in any thread or process
    axes = fig.subplots(nrows, ncols, squeeze=False)
    marker_scale = max(0.6, min(2.0, panel_width_in * 72 / w * 6))

    def rows_of(table: Any, panel_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        sel = np.asarray(table.panel) == panel_index
        det = getattr(table, "detectable", None)
        return np.asarray(table.y)[sel], np.asarray(table.x)[sel], None if det is None else np.asarray(det)[sel]

    for idx in range(nrows * ncols):
        ax = axes[idx // ncols][idx % ncols]
        if idx >= p:
            ax.axis("off")
            continue
        ax.imshow(shown[idx], cmap="gray", vmin=0.0, vmax=vmax, origin="upper", interpolation="nearest")
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        if p > 1:
            ax.text(4, 4, str(idx), color="white", fontsize=7, va="top", ha="left")
        if truth is not None and len(truth.panel):
            ty, tx, tdet = rows_of(truth, idx)
            if tdet is None:
                tdet = np.ones(ty.shape, bool)
            ax.scatter(tx[tdet], ty[tdet], s=60 * marker_scale, facecolors="none", edgecolors="cyan", linewidths=0.8)
            if (~tdet).any():
                ax.scatter(
                    tx[~tdet], ty[~tdet], s=40 * marker_scale, facecolors="none", edgecolors="orange",
                    linewidths=0.5, linestyles="--",
                )
        if found is not None and len(found.panel):
            fy, fx, _ = rows_of(found, idx)
            ax.scatter(fx, fy, s=30 * marker_scale, marker="x", c="red", linewidths=0.8)
    n_found = 0 if found is None else len(found.panel)
    legend = f"found (x): {n_found}"
    if truth is not None:
        det = getattr(truth, "detectable", None)
        n_true = len(truth.panel) if det is None else int(np.sum(det))
        legend += f"   truth (o): {n_true}" + ("" if det is None else f" detectable of {len(truth.panel)}")
    fig.suptitle((title + "\n" if title else "") + legend, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93 if title else 0.95, wspace=0.03, hspace=0.03)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out
