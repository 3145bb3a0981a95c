"""Segmentation masks -> peaks: one peak per 8-connected component, batched over all panels.

The seed (000) looped over panels, labelling each and calling ``center_of_mass`` with float labels.
Here a whole batch is labelled in ONE call: the ``(B*P, H', W')`` mask stack with a 3x3x3 structure
that is ones only in its middle plane, so components are 8-connected within a panel and panels never
connect. Labels come out in raster order over the stack, i.e. ordered by panel and then by each
component's first pixel, exactly the seed's per-panel order. Everything after labelling runs on the
foreground pixels only (masks are a few % dense): their flat indices give panel/y/x, and per-label
centroids, intensity sums and pixel counts are scatter-adds (``np.bincount`` /
``cupyx.scatter_add``) with integer labels. The same code runs on numpy (SciPy backend) and CuPy
(device backend); the CuPy path ends with one small device->host copy of a ``(6, n_labels)`` table.

Coordinates are panel-local, 0-based, pixel centre at the integer (DESIGN 2.2). CuPy is optional and
imported only when a device backend is used.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .errors import ConfigError, FrameError
from .frames import PeakTable

__all__ = ["find_peaks", "CENTROIDS", "BACKENDS"]

logger = logging.getLogger(__name__)

#: Centroid definitions a PeakTable may report.
CENTROIDS: tuple[str, ...] = ("mask", "intensity", "signal")
#: Backends accepted by :func:`find_peaks`.
BACKENDS: tuple[str, ...] = ("auto", "scipy", "cupy")

#: 8-connectivity inside each plane of a (N, H, W) stack, nothing across planes.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True

_logged_cuda_fallback = False


@dataclass
class _Components:
    """Per-component results of one batch, on the host, in label order (panel-major)."""

    panel: np.ndarray  # int64 (n,), index into the B*P stack
    y: np.ndarray  # float64 (n,)
    x: np.ndarray  # float64 (n,)
    intensity: np.ndarray  # float64 (n,)
    npix: np.ndarray  # int64 (n,)

    @classmethod
    def empty(cls) -> _Components:
        z = np.zeros(0, np.float64)
        return cls(np.zeros(0, np.int64), z, z, z, np.zeros(0, np.int64))


def find_peaks(
    masks: Any,
    images: Any = None,
    *,
    n_panels: int,
    valid_shape: tuple[int, int] | None = None,
    centroid: str = "mask",
    max_peaks: int = 2048,
    backend: str = "auto",
    weights: Any = None,
    split: bool = False,
) -> list[PeakTable]:
    """Turn a batch of peak masks into one PeakTable per frame.

    Args:
        masks: ``(B*P, H', W')`` (or ``(B*P, 1, H', W')``) 0/1 map, bool or integer: numpy, torch
            (CPU/CUDA) or CuPy. Nonzero = peak pixel. Usually the model's argmax on padded panels.
        images: raw pixel values ``(B*P, H, W)`` (or ``(B, P, H, W)``), ``H <= H'``, ``W <= W'``, the
            unpadded frames, any real dtype, same kinds of array as ``masks``. ``None``: intensity =
            npix and the centroid is the mask centroid (the table then says ``"mask"``).
        n_panels: panels per frame ``P``; ``B = len(masks) // P``.
        valid_shape: ``(H, W)`` of real pixels inside the padded masks; default the images' ``(H, W)``,
            else the mask shape (no padding).
        centroid: ``"mask"`` = unweighted mean of the component's pixel coordinates (the seed),
            ``"intensity"`` = raw-intensity-weighted mean over its valid pixels (falls back to the
            mask centroid for a component whose weight sum is <= 0), ``"signal"`` = weighted by
            ``weights`` (required; e.g. the squared background-subtracted signal the PeakNet backend
            computes), mask centroid where a component's weights sum to <= 0.
        max_peaks: keep at most this many peaks per frame, the strongest by intensity, in their
            original order; ``PeakTable.n_overflow`` counts the rest.
        backend: ``"scipy"`` (host), ``"cupy"`` (device), ``"auto"`` (cupy when masks are on a CUDA
            device and CuPy imports, else scipy; a CUDA tensor without CuPy is copied to the host).
        weights: ``(B*P, H, W)`` non-negative weights for ``centroid="signal"`` and ``split``
            (negatives count as 0), the same kind of array and shape as ``images``.
        split: a component holding two or more separate maxima of the (3x3-smoothed) ``weights``,
            each the largest within 2 px, at least ``SPLIT_MIN_WEIGHT`` and standing out from all
            pixels 2 px away (``SPLIT_RING_RATIO``: a streak is not cut up), becomes one peak per
            maximum: weighted centroid, raw intensity sum and pixel count over the component's
            pixels within 2 px of it. Touching spots of a dense lattice, which a segmentation
            merges, come out as separate peaks; a component with one maximum (or none that
            strong: faint spots) is reported whole, as without ``split``. Needs ``weights``.

    Returns:
        ``B`` PeakTables; peaks ordered by panel, then by the raster order of each component's first
        pixel. Components lying entirely in the padding are dropped; those straddling it are kept
        whole (centroid and npix over all their pixels, intensity over the valid ones).

    Example:
        >>> tables = find_peaks(masks, frames, n_panels=16, valid_shape=(352, 380))
        >>> tables[0].as_list()[:1]
        [[0, 12.5, 101.0]]
    """
    if centroid not in CENTROIDS:
        raise ConfigError(f"centroid must be one of {CENTROIDS}, got {centroid!r}")
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(max_peaks, bool) or not isinstance(max_peaks, (int, np.integer)) or max_peaks < 0:
        raise ConfigError(f"max_peaks must be an int >= 0, got {max_peaks!r}")
    if isinstance(n_panels, bool) or not isinstance(n_panels, (int, np.integer)) or n_panels < 1:
        raise ConfigError(f"n_panels must be an int >= 1, got {n_panels!r}")

    if centroid == "signal" and weights is None:
        raise ConfigError("centroid='signal' needs weights")
    if split and weights is None:
        raise ConfigError("split needs weights")
    if weights is not None and not (centroid == "signal" or split):
        raise ConfigError("weights are only used by centroid='signal' or split")
    if weights is not None and images is None:
        raise ConfigError("weights need images (the intensity column still comes from them)")

    use_cupy = _resolve_backend(backend, _array_kind(masks))
    args = (int(n_panels), valid_shape, centroid, int(max_peaks))
    if not use_cupy:
        conv = lambda a: None if a is None else _to_numpy(a)  # noqa: E731
        return _run(np, _to_numpy(masks), conv(images), *args, weights=conv(weights), split=bool(split))
    cp = _import_cupy()
    with _device_scope(cp, masks):
        m = _to_cupy(cp, masks, is_mask=True)
        im = None if images is None else _to_cupy(cp, images, is_mask=False)
        wt = None if weights is None else _to_cupy(cp, weights, is_mask=False)
        return _run(cp, m, im, *args, weights=wt, split=bool(split))


def _run(
    xp: Any,
    masks: Any,
    images: Any,
    n_panels: int,
    valid_shape: tuple[int, int] | None,
    centroid: str,
    max_peaks: int,
    weights: Any = None,
    split: bool = False,
) -> list[PeakTable]:
    """Check shapes, reduce the components on ``xp``'s side, split into per-frame tables."""
    masks = _check_masks(masks)
    n, hp, wp = (int(v) for v in masks.shape)
    if n % n_panels != 0:
        raise FrameError(f"{n} mask panels is not a whole number of frames of {n_panels} panels")
    if images is not None:
        images = _check_images(images, n)
    if weights is not None:
        weights = _check_images(weights, n)
        if tuple(weights.shape) != tuple(images.shape):
            raise FrameError(f"weights of shape {tuple(weights.shape)} do not match images {tuple(images.shape)}")
    vshape = _valid_shape(valid_shape, images, (hp, wp))
    eff_centroid = centroid if images is not None else "mask"
    if n == 0:
        return []
    comps = _components(xp, masks, images, vshape, eff_centroid, skip_empty=xp is np, weights=weights, split=split)
    return _split_frames(comps, n // n_panels, n_panels, max_peaks, eff_centroid)


# --------------------------------------------------------------------------------------------------
# The batched core, written once for numpy and CuPy (``xp``).


def _components(
    xp: Any,
    masks: Any,
    images: Any,
    valid_shape: tuple[int, int],
    centroid: str,
    *,
    skip_empty: bool,
    weights: Any = None,
    split: bool = False,
) -> _Components:
    """Label the ``(N, H', W')`` stack once and reduce every component by scatter-add.

    ``skip_empty`` labels only panels that have a foreground pixel (cheap on the host, where most
    panels of a non-hit are empty; on the device it would cost a sync and a gather).
    """
    n, hp, wp = (int(v) for v in masks.shape)
    fg = masks if masks.dtype == bool else masks != 0
    panel_ids = None
    if skip_empty:
        nonempty = fg.reshape(n, -1).any(axis=1)
        panel_ids = xp.flatnonzero(nonempty)
        if panel_ids.size == 0:
            return _Components.empty()
        if panel_ids.size == n:
            panel_ids = None
        else:
            fg = fg[panel_ids]

    labels, n_labels = _label(xp, fg)
    n_labels = int(n_labels)
    if n_labels == 0:
        return _Components.empty()

    flat = xp.flatnonzero(fg)  # foreground pixels only, ascending
    lab = labels.reshape(-1)[flat].astype(xp.int64) - 1  # 0-based component index
    hw = hp * wp
    k = flat // hw
    rem = flat - k * hw
    yy = rem // wp
    xx = rem - yy * wp
    panel = k if panel_ids is None else panel_ids[k]

    f64 = xp.float64
    npix = _scatter_sum(xp, lab, xp.ones(lab.shape, f64), n_labels)
    sum_y = _scatter_sum(xp, lab, yy.astype(f64), n_labels)
    sum_x = _scatter_sum(xp, lab, xx.astype(f64), n_labels)
    cy = sum_y / npix
    cx = sum_x / npix
    label_panel = xp.zeros(n_labels, xp.int64)
    label_panel[lab] = panel  # every pixel of a component is on the same panel

    vh, vw = valid_shape
    padded = vh < hp or vw < wp
    valid = (yy < vh) & (xx < vw) if padded else None
    if padded:
        keep = _scatter_sum(xp, lab, valid.astype(f64), n_labels) > 0
    else:
        keep = xp.ones(n_labels, dtype=bool)

    if images is None:
        intensity = npix
    else:
        # Gather without boolean compaction (which would sync on the device): clip the indices of
        # padding pixels into the image and zero their values.
        ih, iw = int(images.shape[1]), int(images.shape[2])

        def gather(a: Any) -> Any:
            if valid is None:
                return a[panel, yy, xx].astype(f64)
            return xp.where(valid, a[panel, xp.minimum(yy, ih - 1), xp.minimum(xx, iw - 1)].astype(f64), 0.0)

        vals = gather(images)
        intensity = _scatter_sum(xp, lab, vals, n_labels)
        wsum = intensity
        if centroid == "signal":
            vals = xp.maximum(gather(weights), 0.0)
            wsum = _scatter_sum(xp, lab, vals, n_labels)
        if centroid in ("intensity", "signal"):
            ok = wsum > 0
            denom = xp.where(ok, wsum, 1.0)
            wy = _scatter_sum(xp, lab, vals * yy, n_labels) / denom
            wx = _scatter_sum(xp, lab, vals * xx, n_labels) / denom
            cy = xp.where(ok, wy, cy)
            cx = xp.where(ok, wx, cx)

    # One host copy of a small (6, n_labels) table (no copy for numpy).
    table = xp.stack([label_panel.astype(f64), cy, cx, intensity, npix, keep.astype(f64)])
    if split:
        split_rows, n_mk = _maxima_rows(xp, fg, labels, n_labels, weights, images, panel_ids, valid_shape, flat)
        table = table[:, n_mk < 2]  # the split components are replaced by their maxima's rows
        order = xp.concatenate([xp.flatnonzero(n_mk < 2).astype(f64), split_rows[6]])
        sub = xp.concatenate([xp.full(table.shape[1], -1.0), split_rows[7]])
        table = xp.concatenate([table, split_rows[:6]], axis=1)
        table = table[:, xp.lexsort(xp.stack([sub, order]))]  # label order, maxima in raster order
    if xp is not np:
        table = xp.asnumpy(table)
    sel = table[5] > 0
    return _Components(
        panel=table[0, sel].astype(np.int64),
        y=table[1, sel],
        x=table[2, sel],
        intensity=table[3, sel],
        npix=table[4, sel].astype(np.int64),
    )


#: ``split``: least 3x3-mean weight of a maximum (squared noise units with the PeakNet backend's
#: weights: about 3 noise units over the 3x3 core, so faint spots are never split).
SPLIT_MIN_WEIGHT = 9.0
#: ``split``: a maximum must also stand out from everything 2 px away (the border of its 5x5
#: window): the largest weight there is below this share of its own. A spot falls off in every
#: direction; a streak's ridge or the flank of a wide spot does not, so neither is cut up.
SPLIT_RING_RATIO = 0.9
_SPLIT_MAX_R = 2  # a maximum is the largest within this many pixels (Chebyshev) ...
_SPLIT_RING_R = 2  # ... and SPLIT_RING_RATIO above everything at this distance
_SPLIT_R = 2  # its peak gathers the component's pixels this far from it


def _maxima_rows(
    xp: Any, fg: Any, labels: Any, n_labels: int, weights: Any, images: Any, panel_ids: Any,
    valid_shape: tuple[int, int], fg_flat: Any,
) -> tuple[Any, Any]:
    """Rows ``(8, M)`` [panel, y, x, intensity, npix, keep, label, flat index] of the maxima of
    components with two or more, and each component's count of maxima ``(n_labels,)``.

    Works on the foreground pixels only (``fg_flat``, a few % of the stack), by gathers: a
    full-stack filter would cost more than the labelling itself.
    """
    f32, f64 = xp.float32, xp.float64
    n, hp, wp = (int(v) for v in fg.shape)
    hw = hp * wp
    ih, iw = int(weights.shape[1]), int(weights.shape[2])
    vh, vw = valid_shape
    w = weights if panel_ids is None else weights[panel_ids]
    im = images if panel_ids is None else images[panel_ids]

    def window(flat: Any, r: int) -> tuple[Any, Any, Any, Any]:
        """(k, y, x) of each pixel's (2r+1)^2 window, and which of them lie on the panel."""
        k = flat // hw
        y = (flat - k * hw) // wp
        x = flat - k * hw - y * wp
        off = xp.arange(-r, r + 1)
        shape = (int(flat.shape[0]), 2 * r + 1, 2 * r + 1)
        yy = xp.broadcast_to(y[:, None, None] + off[None, :, None], shape)
        xx = xp.broadcast_to(x[:, None, None] + off[None, None, :], shape)
        on = (yy >= 0) & (yy < hp) & (xx >= 0) & (xx < wp)
        kk = xp.broadcast_to(k[:, None, None], shape)
        return kk, xp.clip(yy, 0, hp - 1), xp.clip(xx, 0, wp - 1), on

    def weight_at(kk: Any, yc: Any, xc: Any, on: Any) -> Any:
        inside = on & (yc < ih) & (xc < iw) & fg[kk, yc, xc]
        v = w[kk, xp.minimum(yc, ih - 1), xp.minimum(xc, iw - 1)].astype(f32)
        return xp.where(inside, xp.maximum(v, f32(0.0)), f32(0.0)), inside

    # 3x3 mean of the (non-negative, foreground-only) weights at each foreground pixel.
    kk, yc, xc, on = window(fg_flat, 1)
    smooth = weight_at(kk, yc, xc, on)[0].sum(axis=(1, 2)) / f32(9.0)
    keymap = xp.full((n, hp, wp), -1.0, f32)
    keymap.reshape(-1)[fg_flat] = smooth
    # Candidates: the largest within _SPLIT_MAX_R, strong enough, in the valid region.
    kk, yc, xc, on = window(fg_flat, _SPLIT_MAX_R)
    around = xp.where(on, keymap[kk, yc, xc], f32(-1.0))
    y0, x0 = yc[:, _SPLIT_MAX_R, _SPLIT_MAX_R], xc[:, _SPLIT_MAX_R, _SPLIT_MAX_R]
    cand = (smooth >= around.max(axis=(1, 2))) & (smooth >= SPLIT_MIN_WEIGHT)
    cand &= (y0 < vh) & (x0 < vw)
    mflat, c = fg_flat[cand], smooth[cand]
    # Each candidate must stand out from everything _SPLIT_RING_R away; ties (flat saturated tops:
    # equal neighbours) go to the first pixel in raster order.
    r = _SPLIT_RING_R
    kk, yc, xc, on = window(mflat, r)
    around = xp.where(on, keymap[kk, yc, xc], f32(-1.0))
    border = np.ones((2 * r + 1, 2 * r + 1), bool)
    border[1:-1, 1:-1] = False
    off = np.arange(-r, r + 1)
    before = (off[:, None] * (2 * r + 1) + off[None, :]) < 0  # earlier in raster order
    if xp is not np:
        border, before = xp.asarray(border), xp.asarray(before)
    stands_out = around[:, border].max(axis=1) < SPLIT_RING_RATIO * c
    tie_first = ~((around == c[:, None, None]) & before[None]).any(axis=(1, 2))
    mflat = mflat[stands_out & tie_first]
    mlab = labels.reshape(-1)[mflat].astype(xp.int64) - 1
    n_mk = _scatter_sum(xp, mlab, xp.ones(mlab.shape, f64), n_labels)  # maxima per component
    take = n_mk[mlab] >= 2
    mflat, mlab = mflat[take], mlab[take]
    # One peak per maximum: its component's pixels within _SPLIT_R.
    kk, yc, xc, on = window(mflat, _SPLIT_R)
    k = kk[:, 0, 0]
    off = xp.arange(-_SPLIT_R, _SPLIT_R + 1).astype(f64)
    yy = xp.broadcast_to(yc[:, _SPLIT_R, _SPLIT_R].astype(f64)[:, None, None] + off[None, :, None], yc.shape)
    xx = xp.broadcast_to(xc[:, _SPLIT_R, _SPLIT_R].astype(f64)[:, None, None] + off[None, None, :], xc.shape)
    same = on & (yc < vh) & (xc < vw) & (labels[kk, yc, xc] == (mlab + 1)[:, None, None])
    wv = xp.where(same, weight_at(kk, yc, xc, on)[0].astype(f64), 0.0)
    iv = xp.where(same, im[kk, xp.minimum(yc, ih - 1), xp.minimum(xc, iw - 1)].astype(f64), 0.0)
    sw = wv.sum(axis=(1, 2))
    ok = sw > 0
    cy = xp.where(ok, (wv * yy).sum(axis=(1, 2)) / xp.where(ok, sw, 1.0), yy[:, _SPLIT_R, _SPLIT_R])
    cx = xp.where(ok, (wv * xx).sum(axis=(1, 2)) / xp.where(ok, sw, 1.0), xx[:, _SPLIT_R, _SPLIT_R])
    panel = k if panel_ids is None else panel_ids[k]
    rows = xp.stack([
        panel.astype(f64), cy, cx, iv.sum(axis=(1, 2)), same.sum(axis=(1, 2)).astype(f64),
        xp.ones(mflat.shape, f64), mlab.astype(f64), mflat.astype(f64),
    ])
    return rows, n_mk


def _label(xp: Any, fg: Any) -> tuple[Any, int]:
    """One labelling call over the whole stack (int32 labels, 0 = background)."""
    if xp is np:
        return ndimage.label(fg, structure=_STRUCTURE)
    from cupyx.scipy import ndimage as cundimage

    return cundimage.label(fg, structure=_STRUCTURE)


def _scatter_sum(xp: Any, index: Any, weights: Any, n: int) -> Any:
    """float64 ``out[i] = sum(weights[index == i])`` for ``i < n``, without a host sync."""
    if xp is np:
        return np.bincount(index, weights=weights, minlength=n)
    import cupyx

    out = xp.zeros(n, xp.float64)
    cupyx.scatter_add(out, index, weights)  # cupy.bincount would sync twice (min/max checks)
    return out


def _split_frames(
    comps: _Components, n_frames: int, n_panels: int, max_peaks: int, centroid: str
) -> list[PeakTable]:
    """Cut the panel-ordered component list into frames and apply the ``max_peaks`` cap."""
    frame = comps.panel // n_panels
    counts = np.bincount(frame, minlength=n_frames)
    ends = np.cumsum(counts)
    starts = ends - counts
    panel = comps.panel - frame * n_panels
    tables: list[PeakTable] = []
    n_capped = 0
    for f in range(n_frames):
        s = slice(int(starts[f]), int(ends[f]))
        sel: slice | np.ndarray = s
        overflow = int(counts[f]) - max_peaks
        if overflow > 0:
            strongest = np.argsort(-comps.intensity[s], kind="stable")[:max_peaks]
            sel = starts[f] + np.sort(strongest)
            n_capped += 1
        tables.append(
            PeakTable(
                panel=panel[sel],
                y=comps.y[sel],
                x=comps.x[sel],
                intensity=comps.intensity[sel],
                npix=comps.npix[sel],
                n_overflow=max(overflow, 0),
                centroid=centroid,
            )
        )
    if n_capped:
        logger.debug("max_peaks=%d capped %d of %d frames", max_peaks, n_capped, n_frames)
    return tables


# --------------------------------------------------------------------------------------------------
# Inputs: array kinds, backend choice, conversions, checks.


def _array_kind(a: Any) -> str:
    """``"numpy"``, ``"torch_cpu"``, ``"torch_cuda"`` or ``"cupy"`` (anything else is array-like)."""
    mod = type(a).__module__
    if mod.startswith("torch"):
        return "torch_cuda" if a.is_cuda else "torch_cpu"
    if mod.startswith("cupy"):
        return "cupy"
    return "numpy"


@functools.lru_cache(maxsize=1)
def _import_cupy() -> Any | None:
    """CuPy with a usable CUDA device, or None. Never raises on a machine without either."""
    try:
        import cupy
        import cupyx  # noqa: F401
        import cupyx.scipy.ndimage  # noqa: F401

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # ImportError, or CUDA driver/runtime errors surfacing at import
        return None
    return cupy


def _resolve_backend(backend: str, kind: str) -> bool:
    """True to run on the device with CuPy."""
    global _logged_cuda_fallback
    if backend == "scipy":
        return False
    if backend == "cupy":
        if _import_cupy() is None:
            raise ConfigError("backend='cupy' needs CuPy and a CUDA device (pip install cupy-cuda12x)")
        return True
    if kind == "cupy":
        return True
    if kind == "torch_cuda":
        if _import_cupy() is not None:
            return True
        if not _logged_cuda_fallback:
            logger.warning(
                "masks are on a CUDA device but CuPy is unavailable: peaks run on the host (scipy)"
            )
            _logged_cuda_fallback = True
    return False


def _to_numpy(a: Any) -> np.ndarray:
    kind = _array_kind(a)
    if kind.startswith("torch"):
        return a.detach().cpu().numpy()
    if kind == "cupy":
        return a.get()
    return np.asarray(a)


def _to_cupy(cp: Any, a: Any, *, is_mask: bool) -> Any:
    """A CuPy view of ``a``: torch CUDA tensors via DLPack (no copy), host arrays copied over."""
    kind = _array_kind(a)
    if kind == "cupy":
        return a
    if kind != "torch_cuda":
        return cp.asarray(_to_numpy(a))
    import torch

    t = a.detach()
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)  # bool over DLPack is not supported by every CuPy/torch pair
    try:
        return cp.from_dlpack(t)
    except (TypeError, RuntimeError, BufferError, ValueError) as exc:
        # A dtype the two cannot exchange (e.g. uint16/uint32 on older versions): one device cast.
        logger.debug("DLPack refused %s (%s): casting on the device", t.dtype, exc)
        t = (t != 0).view(torch.uint8) if is_mask else t.to(torch.float64)
        return cp.from_dlpack(t)


@contextlib.contextmanager
def _device_scope(cp: Any, masks: Any) -> Iterator[None]:
    """Make the masks' device current; for torch tensors also run CuPy on torch's current stream.

    Sharing torch's stream orders the labelling after the kernels that wrote the masks (no
    ``torch.cuda.synchronize()``, unlike the seed) and keeps the pipeline's streams composable.
    CuPy arrays keep CuPy's current stream.
    """
    kind = _array_kind(masks)
    with contextlib.ExitStack() as stack:
        if kind == "torch_cuda":
            import torch

            stack.enter_context(cp.cuda.Device(masks.device.index))
            ptr = torch.cuda.current_stream(masks.device).cuda_stream
            stack.enter_context(cp.cuda.ExternalStream(ptr))
        elif kind == "cupy":
            stack.enter_context(cp.cuda.Device(masks.device.id))
        yield


def _check_masks(masks: Any) -> Any:
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise FrameError(f"masks must be (B*P, H, W) or (B*P, 1, H, W), got shape {tuple(masks.shape)}")
    if masks.dtype.kind not in "biu":
        raise FrameError(f"masks must be bool or integer 0/1 (argmax of the logits), got {masks.dtype}")
    if masks.shape[1] == 0 or masks.shape[2] == 0:
        raise FrameError(f"empty masks of shape {tuple(masks.shape)}")
    return masks


def _check_images(images: Any, n: int) -> Any:
    if images.ndim == 4:
        images = images.reshape((images.shape[0] * images.shape[1],) + tuple(images.shape[2:]))
    if images.ndim != 3 or int(images.shape[0]) != n:
        raise FrameError(f"images must be ({n}, H, W) to match the masks, got shape {tuple(images.shape)}")
    if images.dtype.kind not in "biuf":
        raise FrameError(f"images must have a real dtype, got {images.dtype}")
    return images


def _valid_shape(
    valid_shape: tuple[int, int] | None, images: Any, mask_hw: tuple[int, int]
) -> tuple[int, int]:
    hp, wp = mask_hw
    if valid_shape is None:
        vh, vw = (int(images.shape[1]), int(images.shape[2])) if images is not None else (hp, wp)
    else:
        try:
            vh, vw = (int(v) for v in valid_shape)
        except (TypeError, ValueError) as exc:
            raise FrameError(f"valid_shape must be (H, W), got {valid_shape!r}") from exc
    if not (0 < vh <= hp and 0 < vw <= wp):
        raise FrameError(f"valid_shape {(vh, vw)} must be positive and fit in the masks' {(hp, wp)}")
    if images is not None and (images.shape[1] < vh or images.shape[2] < vw):
        raise FrameError(f"images of shape {tuple(images.shape)} do not cover valid_shape {(vh, vw)}")
    return vh, vw
