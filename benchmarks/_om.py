"""OM's C++ peakfinder8 (``ondamonitor`` 23.8.3, optional extra ``bench``) on our frames and params.

Not part of the library: ``benchmarks/bench_peakfinder8.py`` times our peakfinder8 against it and
``tests/test_peakfinder8.py`` compares peaks when it is installed. OM's Python modules need NumPy 1
(``numpy.float_``), so the compiled extension ``om.algorithms._crystallography`` is loaded directly
from its file, without importing the ``om`` package.

Layout: our ``(P, H, W)`` frames are OM's stacked slab ``(P*H, W)`` of ``nasics_y = P`` ASICs of
``asic_ny = H`` rows, ``asic_nx = W`` columns; OM's ``ss`` (slow scan) is ``panel*H + y`` and its
``fs`` is ``x``, pixel centre at the integer like ours.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from peaknet_pva.frames import PeakTable
from peaknet_pva.peakfinder8 import Peakfinder8Params

_EXT: ModuleType | None = None


def load_om() -> ModuleType | None:
    """The extension module with ``peakfinder_8``, or None when ``ondamonitor`` is not installed."""
    global _EXT
    if _EXT is not None:
        return _EXT
    spec = importlib.util.find_spec("om")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for path in sorted(Path(root, "algorithms").glob("_crystallography*.so")):
            ext_spec = importlib.util.spec_from_file_location("om.algorithms._crystallography", path)
            if ext_spec is None or ext_spec.loader is None:
                continue
            mod = importlib.util.module_from_spec(ext_spec)
            ext_spec.loader.exec_module(mod)
            sys.modules.setdefault("om.algorithms._crystallography", mod)
            _EXT = mod
            return mod
    return None


def om_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("ondamonitor")
    except Exception:
        return None


class OmPeakfinder8:
    """OM's peakfinder8 on ``(P, H, W)`` frames with our parameters, radius map and good-pixel mask.

    Mapping: ``adc_threshold``, ``min_snr`` (OM ``minimum_snr``), ``min/max_pix_count``,
    ``window_radius`` (OM ``local_bg_radius``), ``max_num_peaks``, ``min/max_radius`` (OM
    ``min_res``/``max_res``, applied to the mask as OM does). OM has no other knobs: it always does
    5 rounds of 3-sigma clipping on integer radius bins.
    """

    def __init__(self, params: Peakfinder8Params, radius: np.ndarray, mask: np.ndarray | None = None) -> None:
        ext = load_om()
        if ext is None:
            raise RuntimeError("ondamonitor is not installed (pip install -e '.[bench]')")
        self._fn: Any = ext.peakfinder_8
        radius = np.asarray(radius, np.float32)
        if radius.ndim == 2:
            radius = radius[None]
        self.p, self.h, self.w = radius.shape
        self.params = params
        self.radius = np.array(radius.reshape(self.p * self.h, self.w), order="C")  # writable copies
        good = np.ones(radius.shape, bool) if mask is None else np.asarray(mask, bool).reshape(radius.shape)
        good = good & (radius >= params.min_radius) & (radius <= min(params.max_radius, 1e9))
        self.mask = np.array(good.reshape(self.p * self.h, self.w), dtype=np.int8, order="C")
        self._dummy = np.zeros(1, np.int32)  # OM's "fast mode" pixel lists (unused, must be non-empty)

    def slab(self, frame: np.ndarray) -> np.ndarray:
        """``frame`` as the writable, contiguous float32 ``(P*H, W)`` slab OM's extension takes."""
        data = np.asarray(frame).reshape(self.p * self.h, self.w)
        if data.dtype != np.float32 or not data.flags.c_contiguous or not data.flags.writeable:
            data = np.array(data, dtype=np.float32, order="C")
        return data

    def raw(self, frame: np.ndarray) -> tuple[list[float], ...]:
        """OM's own output for one frame (a ``slab`` is used as is, so that a benchmark can time the
        C++ call alone): lists (fs, ss, intensity, sigma, npix, max pixel, snr)."""
        data = self.slab(frame)
        prm = self.params
        return self._fn(
            prm.max_num_peaks, data, self.mask, self.radius, 0, self._dummy, self._dummy, 0,
            self.w, self.h, 1, self.p, float(prm.adc_threshold), float(prm.min_snr),
            int(prm.min_pix_count), int(prm.max_pix_count), int(prm.window_radius),
        )

    def find_peaks(self, frames: np.ndarray) -> list[PeakTable]:
        """One :class:`PeakTable` per frame of ``frames`` ``(B, P, H, W)`` (or one ``(P, H, W)``)."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        out = []
        for frame in frames:
            r = self.raw(frame)
            fs, ss = np.asarray(r[0], np.float64), np.asarray(r[1], np.float64)
            panel = np.clip(np.floor((ss + 0.5) / self.h), 0, self.p - 1)
            out.append(PeakTable(
                panel=panel.astype(np.uint16), y=ss - panel * self.h, x=fs,
                intensity=np.asarray(r[2], np.float64), npix=np.asarray(r[4], np.float64).astype(np.uint32),
                centroid="intensity",
            ))
        return out
