"""The seed's per-panel peak loop (seed 000), kept as the reference, and a seeded blob-mask maker.

Not part of the library: ``benchmarks/bench_peaks.py`` times ``peaknet_pva.peaks.find_peaks``
against these loops and ``tests/test_peaks*.py`` check that both give the same peaks, so the
reference lives in one place. Shapes: masks ``(B*P, H, W)`` or ``(B*P, 1, H, W)``, 0/1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage


def seed_find_peaks(seg_maps: Any, n_panels: int) -> list[list[list[float]]]:
    """Seed 000's CPU postprocess: per panel ``label`` (3x3 ones) + ``center_of_mass`` (float labels).

    Returns ``B`` lists of ``[p, y, x]`` (panel-local, pixel centre at the integer).
    """
    seg_maps = _as_numpy(seg_maps)
    n, h, w = seg_maps.shape[0], seg_maps.shape[-2], seg_maps.shape[-1]
    seg_maps = seg_maps.reshape(n, h, w)
    peak_positions: list[list[list[float]]] = [[] for _ in range(n // n_panels)]
    structure = np.ones((3, 3), dtype=np.float32)
    for idx, seg_map in enumerate(seg_maps):
        seg_map_np = seg_map.astype(np.float32)
        labeled_map, num_peaks = ndimage.label(seg_map_np, structure)
        peak_coords = ndimage.center_of_mass(
            seg_map_np, labeled_map.astype(np.float32), np.arange(1, num_peaks + 1)
        )
        if len(peak_coords) > 0:
            b, p = divmod(idx, n_panels)
            peak_positions[b].extend([p] + list(peak) for peak in peak_coords if len(peak) > 0)
    return peak_positions


def seed_find_peaks_intensity(
    seg_maps: Any, images: Any, n_panels: int
) -> tuple[list[list[list[float]]], list[list[float]]]:
    """The seed's loop extended the obvious way to intensity: per panel ``label``, then
    ``center_of_mass(image)`` and ``sum_labels(image)`` with float labels.

    The baseline for ``centroid="intensity"`` (the seed itself only had the mask centroid). Images are
    ``(B*P, H, W)`` with the masks' shape (no padding). Returns (``[p, y, x]`` lists, intensity lists)
    per frame.
    """
    seg_maps = _as_numpy(seg_maps)
    images = _as_numpy(images)
    n, h, w = seg_maps.shape[0], seg_maps.shape[-2], seg_maps.shape[-1]
    seg_maps = seg_maps.reshape(n, h, w)
    peak_positions: list[list[list[float]]] = [[] for _ in range(n // n_panels)]
    intensities: list[list[float]] = [[] for _ in range(n // n_panels)]
    structure = np.ones((3, 3), dtype=np.float32)
    for idx, seg_map in enumerate(seg_maps):
        seg_map_np = seg_map.astype(np.float32)
        image = images[idx].astype(np.float32)
        labeled_map, num_peaks = ndimage.label(seg_map_np, structure)
        labels_f = labeled_map.astype(np.float32)
        index = np.arange(1, num_peaks + 1)
        peak_coords = ndimage.center_of_mass(image, labels_f, index)
        sums = ndimage.sum_labels(image, labels_f, index)
        if len(peak_coords) > 0:
            b, p = divmod(idx, n_panels)
            peak_positions[b].extend([p] + list(peak) for peak in peak_coords)
            intensities[b].extend(float(s) for s in sums)
    return peak_positions, intensities


def seed_find_peaks_cupy(seg_maps: Any, n_panels: int) -> list[list[list[float]]]:
    """Seed 000's GPU postprocess: the same loop with ``cupyx.scipy.ndimage`` (needs CuPy + CUDA).

    ``seg_maps`` is a CuPy array or a CUDA torch tensor; the caller synchronises torch first, as the
    seed did.
    """
    import cupy as cp
    from cupyx.scipy import ndimage as cndimage

    seg_maps = cp.asarray(seg_maps)
    n, h, w = seg_maps.shape[0], seg_maps.shape[-2], seg_maps.shape[-1]
    seg_maps = seg_maps.reshape(n, h, w)
    peak_positions: list[list[list[float]]] = [[] for _ in range(n // n_panels)]
    structure = cp.ones((3, 3), dtype=cp.float32)
    for idx, seg_map in enumerate(seg_maps):
        seg_map_cp = cp.asarray(seg_map, dtype=cp.float32)
        labeled_map, num_peaks = cndimage.label(seg_map_cp, structure)
        peak_coords = cndimage.center_of_mass(
            seg_map_cp, cp.asarray(labeled_map, dtype=cp.float32), cp.arange(1, num_peaks + 1)
        )
        if len(peak_coords) > 0:
            b, p = divmod(idx, n_panels)
            peak_positions[b].extend([p] + peak.tolist() for peak in peak_coords if len(peak) > 0)
    return peak_positions


def blob_masks(
    n: int,
    shape: tuple[int, int],
    n_blobs: int,
    *,
    seed: int,
    radius: tuple[float, float] = (0.8, 3.0),
    margin: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Random disc-shaped blobs (some overlap and merge, some touch the edges) and matching images.

    Returns ``(masks, images)``: uint8 ``(n, H, W)`` 0/1 and float32 ``(n, H, W)`` raw values (a
    Gaussian bump per blob on a noisy background, all positive). Blob centres lie in
    ``[-margin, size + margin)`` so discs are clipped by every panel edge. Deterministic in ``seed``.
    """
    h, w = shape
    rng = np.random.default_rng(seed)
    r_max = int(np.ceil(radius[1]))
    oy, ox = np.mgrid[-r_max : r_max + 1, -r_max : r_max + 1]
    k = np.repeat(np.arange(n), n_blobs)
    cy = rng.integers(-margin, h + margin, k.size)
    cx = rng.integers(-margin, w + margin, k.size)
    r = rng.uniform(radius[0], radius[1], k.size)
    inside = (oy[None] ** 2 + ox[None] ** 2) <= (r[:, None, None] ** 2)
    ys = cy[:, None, None] + oy[None]
    xs = cx[:, None, None] + ox[None]
    ok = inside & (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    kk = np.broadcast_to(k[:, None, None], ok.shape)
    masks = np.zeros((n, h, w), np.uint8)
    masks[kk[ok], ys[ok], xs[ok]] = 1

    images = rng.gamma(2.0, 5.0, size=(n, h, w)).astype(np.float32)
    amp = rng.uniform(50.0, 500.0, k.size)
    sigma2 = 2.0 * np.maximum(r, 1.0)[:, None, None] ** 2
    bump = amp[:, None, None] * np.exp(-(oy[None] ** 2 + ox[None] ** 2) / sigma2)
    np.add.at(images, (kk[ok], ys[ok], xs[ok]), bump[ok].astype(np.float32))
    return masks, images


def _as_numpy(a: Any) -> np.ndarray:
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().numpy()
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)
