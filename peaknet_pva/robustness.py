"""Robustness matrix: frames made independently of the training simulator, scored per matrix cell.

The shipped PeakNet weights were trained on frames from ``peaknet_pva.simulate``. This module is
the independent yardstick: its frame generator was written apart from the simulator and the
training code (different spot profile, coordinate convention, noise order, background shapes and
"detectable" rule), so a good score here means generalisation, not memory.

Public helpers (all deterministic by ``seed``)::

    Cell(background, *, variant="base", bg_shape="ring", noise="poisson", hot_pixels=False,
         gain="g1", size="small", density="sparse", geometry="1x512x512")
    cell_frames(cell, n_frames, seed) -> (frames (F, P, H, W) ndarray, list[RobustTruth])
    noise_only_frames(background, *, hot_pixels, n_frames, shape=(1, 512, 512), seed=0,
                      noise="poisson+read", gain="g1", bg_shape="ring") -> ndarray (F, P, H, W)
    false_peaks_per_mpix(tables, frames_shape) -> float
    radius_map(cell_or_geometry) -> ndarray (P, H, W)       # pixels from the beam centre
    default_spec(*, quick=False, seed=1000, frames_per_cell=None) -> MatrixSpec
    tune_peakfinder8(cells, *, seed, n_frames=1, grid=None, noise_cells=()) -> (params dict, report)
    run_matrix(spec=None, *, finders=("peaknet", "peakfinder8"), weights="default",
               device="cpu", out_dir=None, progress=True, batch_size=4) -> dict
    write_outputs(result, out_dir) -> dict[str, Path]   # matrix.json, matrix.md, matrix.png

**Generator conventions.**

* Internally every coordinate is continuous with the *pixel-corner* convention: pixel ``i`` covers
  ``[i, i + 1)``, its centre is ``i + 0.5``. Truth is converted at the end to the project's
  convention (panel-local, 0-based, pixel centre at the integer): ``y = u_y - 0.5``.
* Geometry ``"PxHxW"``: ``P`` panels of ``H x W`` laid out on a grid (``ceil(sqrt(P))`` columns,
  8-pixel gaps); the beam centre sits near the middle of the layout, offset by (+1.3, -2.1) px so
  that it is not on a pixel boundary. :func:`radius_map` gives each pixel centre's distance to it.
* Spot profile: a pseudo-Voigt-like mixture ``(1-eta) Gaussian + eta Moffat(beta=3)`` with a shared
  FWHM and a shared (possibly rotated, anisotropic) covariance, ``eta`` uniform in [0.1, 0.4] per
  spot, integrated over each pixel by 5x5 supersampling, normalised analytically (flux beyond the
  stamp of radius ``ceil(5 sigma_major) + 1`` is lost, < 1 %).
* Sizes: ``small`` sigma 0.7 px (isotropic, +-15 % per spot), ``large`` sigma 2.0 px,
  ``aniso`` sigma 2.0 x 0.8 px at a random angle.
* Densities (per 512 x 512 pixels, scaled by panel area): ``sparse`` 30, ``dense`` 500, ``none`` 0.
  Positions uniform over the panel.
* Spot brightness: each spot draws a target aperture SNR log-uniform in [1.5, 60]; its photon
  count is solved from that SNR for its own aperture and local background, so every cell has about
  the same share of detectable spots whatever its background.
* Background (photons/pixel): ``flat`` constant, or ``ring``: flat floor + smooth radial decay +
  a Gaussian "water" ring (radius 0.42 x the layout's largest radius, sigma 9 px), scaled so the mean
  over all pixels is exactly the requested level.
* Noise composition: expected photons (background + spots) -> Poisson -> x gain -> + pedestal ->
  + Gaussian read noise (``poisson+read``: sigma 2 photons, in ADU = 2 x gain) -> clip to
  [lo, full scale] -> hot pixels overwrite -> cast (rounded for integer dtypes).
* Gains: ``g1`` 1 ADU/photon, no pedestal, float32, full scale 65535; ``g30p`` 30 ADU/photon,
  pedestal 1000 ADU, uint16 (clipped to [0, 65535]); ``kev`` 9.5 keV/photon calibrated float32,
  no pedestal (values can be negative), full scale 95000.
* Hot pixels: 40 per 512 x 512 pixels, single isolated pixels at the gain's full scale, at least
  6 px from every spot centre and 3 px from each other. They are not spots: finding one is a
  false peak. No bad-pixel mask is given to any finder (these are "new" hot pixels).

**Detectable rule.** A spot counts (``RobustTruth.detectable``) when all hold:
(1) its aperture SNR ``S / sqrt(S + B + n sigma_read^2) >= 6``, with ``S`` the spot's expected
photons and ``B`` the expected background photons summed over the ``n`` pixels whose centres lie
within ``r = max(1.5, 1.6 sigma_major)`` px of the true centre (noise-free, photon units);
(2) its centre is at least 2 px from the outermost pixel centres of its panel;
(3) no brighter spot's centre is within 2.5 px on the same panel.
Undetectable spots stay in the truth: ``peaknet_pva.evaluate`` counts a found peak matched to one
neither as a true nor a false positive.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .frames import PeakTable

log = logging.getLogger(__name__)

__all__ = [
    "BACKGROUND_LEVELS",
    "Cell",
    "MatrixSpec",
    "RobustTruth",
    "cell_frames",
    "default_spec",
    "false_peaks_per_mpix",
    "matrix_markdown",
    "noise_only_frames",
    "plot_matrix",
    "radius_map",
    "render_spots",
    "run_matrix",
    "tune_peakfinder8",
    "write_outputs",
]

GENERATOR_VERSION = "robustness-v1"
#: Background levels of the matrix, photons per pixel.
BACKGROUND_LEVELS: tuple[float, ...] = (0.0, 1.0, 10.0, 50.0, 300.0)
BG_SHAPES = ("flat", "ring")
NOISES = ("poisson", "poisson+read")
READ_NOISE_PHOTONS = 2.0
#: name -> (ADU per photon, pedestal ADU, dtype, low clip or None, full scale)
GAINS: dict[str, tuple[float, float, str, float | None, float]] = {
    "g1": (1.0, 0.0, "float32", None, 65535.0),
    "g30p": (30.0, 1000.0, "uint16", 0.0, 65535.0),
    "kev": (9.5, 0.0, "float32", None, 95000.0),
}
#: name -> (sigma_major, sigma_minor or None for isotropic, per-spot relative jitter)
SIZES: dict[str, tuple[float, float | None, float]] = {
    "small": (0.7, None, 0.15),
    "large": (2.0, None, 0.15),
    "aniso": (2.0, 0.8, 0.10),
}
#: spots per 512x512 pixels
DENSITIES: dict[str, int] = {"none": 0, "sparse": 30, "dense": 500}
HOT_PER_512SQ = 40
SNR_RANGE = (1.5, 60.0)
DETECTABLE_SNR = 6.0
EDGE_MARGIN_PX = 2.0
CLOSE_PAIR_PX = 2.5
MOFFAT_BETA = 3.0
SUPERSAMPLE = 5
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_MOFFAT_ALPHA = _FWHM_PER_SIGMA / (2.0 * math.sqrt(2.0 ** (1.0 / MOFFAT_BETA) - 1.0))


# ------------------------------------------------------------------------------------------ cells
@dataclass(frozen=True)
class Cell:
    """One cell of the robustness matrix (see the module docstring for the axis values)."""

    background: float
    variant: str = "base"
    bg_shape: str = "ring"
    noise: str = "poisson"
    hot_pixels: bool = False
    gain: str = "g1"
    size: str = "small"
    density: str = "sparse"
    geometry: str = "1x512x512"

    def __post_init__(self) -> None:
        object.__setattr__(self, "background", float(self.background))
        if not (self.background >= 0 and math.isfinite(self.background)):
            raise ValueError(f"background must be >= 0 photons/pixel, got {self.background!r}")
        for name, allowed in (("bg_shape", BG_SHAPES), ("noise", NOISES), ("gain", tuple(GAINS)),
                              ("size", tuple(SIZES)), ("density", tuple(DENSITIES))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        _parse_geometry(self.geometry)

    @property
    def name(self) -> str:
        return f"{self.variant}@{self.background:g}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return _parse_geometry(self.geometry)

    def key(self) -> str:
        """Canonical text of the axes (not the label): the same axes give the same frames."""
        return (f"{self.background:g}|{self.bg_shape}|{self.noise}|{int(self.hot_pixels)}|{self.gain}|"
                f"{self.size}|{self.density}|{self.geometry}")

    def axes(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("variant")
        return d


def _parse_geometry(text: str) -> tuple[int, int, int]:
    try:
        p, h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"geometry must be 'PxHxW' (e.g. 1x512x512), got {text!r}") from None
    if min(p, h, w) < 1 or h < 16 or w < 16:
        raise ValueError(f"geometry {text!r}: need P >= 1 and panels of at least 16x16")
    return p, h, w


def _geometry_of(obj: Cell | str | tuple[int, int, int]) -> tuple[int, int, int]:
    if isinstance(obj, Cell):
        return obj.shape
    if isinstance(obj, str):
        return _parse_geometry(obj)
    p, h, w = (int(v) for v in obj)
    return _parse_geometry(f"{p}x{h}x{w}")


def _layout(shape: tuple[int, int, int]) -> tuple[np.ndarray, tuple[float, float]]:
    """Panel origins in lab pixels (corner convention) and the beam centre (corner convention)."""
    p, h, w = shape
    gap = 8
    ncols = math.ceil(math.sqrt(p))
    nrows = math.ceil(p / ncols)
    origins = np.array([[(i // ncols) * (h + gap), (i % ncols) * (w + gap)] for i in range(p)], np.float64)
    height = nrows * h + (nrows - 1) * gap
    width = ncols * w + (ncols - 1) * gap
    return origins, (height / 2.0 + 1.3, width / 2.0 - 2.1)


def radius_map(geometry: Cell | str | tuple[int, int, int]) -> np.ndarray:
    """Distance (pixels) of every pixel centre from the beam centre, ``(P, H, W)`` float32."""
    shape = _geometry_of(geometry)
    p, h, w = shape
    origins, (by, bx) = _layout(shape)
    uy = np.arange(h, dtype=np.float64) + 0.5  # pixel centres, corner convention
    ux = np.arange(w, dtype=np.float64) + 0.5
    out = np.empty(shape, np.float32)
    for i in range(p):
        dy = origins[i, 0] + uy[:, None] - by
        dx = origins[i, 1] + ux[None, :] - bx
        out[i] = np.hypot(dy, dx)
    return out


def _background_map(cell_bg: float, bg_shape: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Expected background photons per pixel, mean exactly ``cell_bg`` over all pixels."""
    if cell_bg == 0:
        return np.zeros(shape, np.float64)
    if bg_shape == "flat":
        return np.full(shape, cell_bg, np.float64)
    r = radius_map(shape).astype(np.float64)
    rmax = float(r.max())
    ring_r, ring_w = 0.42 * rmax, 9.0
    profile = 0.45 + 0.9 * np.exp(-r / (0.35 * rmax)) + 1.1 * np.exp(-0.5 * ((r - ring_r) / ring_w) ** 2)
    return profile * (cell_bg / profile.mean())


# ------------------------------------------------------------------------------------------ truth
@dataclass
class RobustTruth:
    """True spots of one frame. ``panel``, ``y``, ``x`` (project convention: pixel centre at the
    integer), ``detectable`` (the module's rule), ``snr`` (aperture SNR), ``photons`` (total spot
    photons), ``sigma_major``/``sigma_minor`` (px); ``hot`` ``(n, 3)`` int panel, y, x of the hot
    pixels (not spots)."""

    panel: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    detectable: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    snr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    photons: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sigma_major: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sigma_minor: np.ndarray = field(default_factory=lambda: np.zeros(0))
    hot: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))

    @property
    def n(self) -> int:
        return int(np.asarray(self.panel).shape[0])

    @property
    def n_detectable(self) -> int:
        return int(np.asarray(self.detectable).sum())


# ------------------------------------------------------------------------------------- rendering
def _inverse_cov(s_major: np.ndarray, s_minor: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, ...]:
    c, s = np.cos(theta), np.sin(theta)
    a, b = 1.0 / s_major**2, 1.0 / s_minor**2
    # Sigma^-1 = R diag(a, b) R^T, axes (y, x)
    return c * c * a + s * s * b, c * s * (a - b), s * s * a + c * c * b


def render_spots(
    shape_hw: tuple[int, int],
    uy: np.ndarray,
    ux: np.ndarray,
    photons: np.ndarray,
    s_major: np.ndarray,
    s_minor: np.ndarray,
    theta: np.ndarray,
    eta: np.ndarray,
    *,
    supersample: int = SUPERSAMPLE,
) -> np.ndarray:
    """Noise-free expected photons of spots on one ``(H, W)`` panel.

    Centres ``uy``, ``ux`` use the *corner* convention (pixel ``i`` spans ``[i, i+1)``). Profile:
    ``(1-eta)`` Gaussian + ``eta`` Moffat(beta=3), shared FWHM and covariance (``s_major`` along
    angle ``theta`` from the y axis, ``s_minor`` across), each pixel integrated by
    ``supersample²`` sub-samples.
    """
    h, w = shape_hw
    out = np.zeros(h * w, np.float64)
    n = len(uy)
    if n == 0:
        return out.reshape(h, w)
    uy, ux, photons = (np.asarray(v, np.float64) for v in (uy, ux, photons))
    s_major, s_minor, theta, eta = (np.asarray(v, np.float64) for v in (s_major, s_minor, theta, eta))
    radius = np.ceil(5.0 * s_major).astype(np.int64) + 1
    sub = (np.arange(supersample) + 0.5) / supersample
    a00, a01, a11 = _inverse_cov(s_major, s_minor, theta)
    det_sqrt = s_major * s_minor
    g_norm = 1.0 / (2.0 * math.pi * det_sqrt)
    m_norm = (MOFFAT_BETA - 1.0) / (math.pi * _MOFFAT_ALPHA**2 * det_sqrt)
    for r in np.unique(radius):
        sel_all = np.flatnonzero(radius == r)
        k = 2 * int(r) + 1
        offs = np.arange(k) - int(r)
        for start in range(0, sel_all.size, 48):
            sel = sel_all[start : start + 48]
            py = np.floor(uy[sel]).astype(np.int64)[:, None] + offs[None, :]  # (n, K) pixel rows
            px = np.floor(ux[sel]).astype(np.int64)[:, None] + offs[None, :]
            dy = py[:, :, None] + sub[None, None, :] - uy[sel, None, None]  # (n, K, s)
            dx = px[:, :, None] + sub[None, None, :] - ux[sel, None, None]
            dy5 = dy[:, :, :, None, None]
            dx5 = dx[:, None, None, :, :]
            q = (a00[sel, None, None, None, None] * dy5 * dy5
                 + 2.0 * a01[sel, None, None, None, None] * dy5 * dx5
                 + a11[sel, None, None, None, None] * dx5 * dx5)  # (n, K, s, K, s)
            e = eta[sel, None, None, None, None]
            prof = (1.0 - e) * g_norm[sel, None, None, None, None] * np.exp(-0.5 * q)
            prof += e * m_norm[sel, None, None, None, None] * (1.0 + q / _MOFFAT_ALPHA**2) ** (-MOFFAT_BETA)
            pix = prof.mean(axis=(2, 4)) * photons[sel, None, None]  # (n, K, K) photons per pixel
            ok = ((py >= 0) & (py < h))[:, :, None] & ((px >= 0) & (px < w))[:, None, :]
            lin = py[:, :, None] * w + px[:, None, :]
            out += np.bincount(lin[ok], weights=pix[ok], minlength=h * w)
    return out.reshape(h, w)


def _aperture(uy: float, ux: float, s_major: float, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    r = max(1.5, 1.6 * s_major)
    ri = int(math.ceil(r)) + 1
    ys = np.arange(int(math.floor(uy)) - ri, int(math.floor(uy)) + ri + 1)
    xs = np.arange(int(math.floor(ux)) - ri, int(math.floor(ux)) + ri + 1)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    inside = ((yy + 0.5 - uy) ** 2 + (xx + 0.5 - ux) ** 2 <= r * r) & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    return yy[inside], xx[inside]


def _photons_for_snr(snr: np.ndarray, frac: np.ndarray, bg_ap: np.ndarray, var_ap: np.ndarray) -> np.ndarray:
    """Total photons so that S_ap = frac * total gives S_ap / sqrt(S_ap + bg_ap + var_ap) = snr."""
    t2 = snr * snr
    s_ap = 0.5 * (t2 + np.sqrt(t2 * t2 + 4.0 * t2 * (bg_ap + var_ap)))
    return s_ap / np.maximum(frac, 1e-3)


def _frame_rng(seed: int, cell: Cell, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(cell.key().encode()),
                                                         int(index)]))


def _one_frame(cell: Cell, rng: np.random.Generator) -> tuple[np.ndarray, RobustTruth]:
    p, h, w = cell.shape
    bg = _background_map(cell.background, cell.bg_shape, cell.shape)
    read_var = READ_NOISE_PHOTONS**2 if cell.noise == "poisson+read" else 0.0
    area_scale = h * w / (512.0 * 512.0)
    n_per_panel = DENSITIES[cell.density]
    s_maj0, s_min0, jitter = SIZES[cell.size]
    expected = bg.copy()
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("panel", "uy", "ux", "snr", "photons", "smaj", "smin", "det")}
    hot_rows: list[np.ndarray] = []
    for pi in range(p):
        n = int(rng.poisson(n_per_panel * area_scale)) if n_per_panel else 0
        uy = rng.uniform(0.0, h, n)
        ux = rng.uniform(0.0, w, n)
        smaj = s_maj0 * rng.uniform(1.0 - jitter, 1.0 + jitter, n)
        if s_min0 is None:
            smin = smaj.copy()
        else:
            smin = s_min0 * rng.uniform(1.0 - jitter, 1.0 + jitter, n)
        theta = rng.uniform(0.0, math.pi, n)
        eta = rng.uniform(0.1, 0.4, n)
        target = np.exp(rng.uniform(math.log(SNR_RANGE[0]), math.log(SNR_RANGE[1]), n))
        # aperture flux fraction (unit-flux render of each spot alone) and aperture background
        frac = np.empty(n)
        bg_ap = np.empty(n)
        n_ap = np.empty(n)
        apertures = []
        for j in range(n):
            ay, ax = _aperture(uy[j], ux[j], smaj[j], h, w)
            apertures.append((ay, ax))
            bg_ap[j] = bg[pi, ay, ax].sum()
            n_ap[j] = ay.size
        unit = np.ones(n)
        # Render each spot at unit flux once to get its aperture fraction exactly (cheap: small n,
        # or done per spot group); use a local stamp render to stay O(n * stamp).
        for j in range(n):
            ay, ax = apertures[j]
            if ay.size == 0:
                frac[j] = 0.0
                continue
            y0, x0 = int(ay.min()), int(ax.min())
            sh = (int(ay.max()) - y0 + 1, int(ax.max()) - x0 + 1)
            stamp = render_spots(sh, uy[j : j + 1] - y0, ux[j : j + 1] - x0, unit[:1], smaj[j : j + 1],
                                 smin[j : j + 1], theta[j : j + 1], eta[j : j + 1])
            frac[j] = stamp[ay - y0, ax - x0].sum()
        photons = _photons_for_snr(target, frac, bg_ap, n_ap * read_var)
        s_ap = frac * photons
        snr = np.where(n_ap > 0, s_ap / np.sqrt(np.maximum(s_ap + bg_ap + n_ap * read_var, 1e-12)), 0.0)
        expected[pi] += render_spots((h, w), uy, ux, photons, smaj, smin, theta, eta)
        det = snr >= DETECTABLE_SNR
        edge = np.minimum.reduce([uy, h - uy, ux, w - ux]) if n else np.zeros(0)
        det &= edge >= EDGE_MARGIN_PX + 0.5
        if n > 1:
            from scipy.spatial import cKDTree

            pairs = cKDTree(np.stack([uy, ux], 1)).query_pairs(CLOSE_PAIR_PX, output_type="ndarray")
            if len(pairs):
                a, b = pairs[:, 0], pairs[:, 1]
                fainter = np.where(photons[a] < photons[b], a, b)
                det[fainter] = False
        for k, v in (("panel", np.full(n, pi)), ("uy", uy), ("ux", ux), ("snr", snr), ("photons", photons),
                     ("smaj", smaj), ("smin", smin), ("det", det)):
            cols[k].append(v)
        if cell.hot_pixels:
            hot_rows.append(_place_hot(rng, pi, h, w, uy, ux, max(1, round(HOT_PER_512SQ * area_scale))))

    counts = rng.poisson(expected).astype(np.float64)
    gain, pedestal, dtype, lo, full = GAINS[cell.gain]
    adu = counts * gain + pedestal
    if read_var:
        adu += rng.normal(0.0, READ_NOISE_PHOTONS * gain, size=adu.shape)
    adu = np.clip(adu, -np.inf if lo is None else lo, full)
    hot = np.concatenate(hot_rows, 0) if hot_rows else np.zeros((0, 3), np.int64)
    if hot.size:
        adu[hot[:, 0], hot[:, 1], hot[:, 2]] = full
    if np.issubdtype(np.dtype(dtype), np.integer):
        adu = np.rint(adu)
    frame = adu.astype(dtype)
    cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()}
    truth = RobustTruth(
        panel=cat["panel"].astype(np.int64),
        y=cat["uy"] - 0.5,  # corner convention -> pixel centre at the integer
        x=cat["ux"] - 0.5,
        detectable=cat["det"].astype(bool),
        snr=cat["snr"],
        photons=cat["photons"],
        sigma_major=cat["smaj"],
        sigma_minor=cat["smin"],
        hot=hot,
    )
    return frame, truth


def _place_hot(rng: np.random.Generator, panel: int, h: int, w: int, uy: np.ndarray, ux: np.ndarray,
               n_hot: int) -> np.ndarray:
    from scipy.spatial import cKDTree

    tree = cKDTree(np.stack([uy, ux], 1)) if len(uy) else None
    chosen: list[tuple[int, int]] = []
    for _ in range(50):
        cand = np.stack([rng.integers(0, h, 4 * n_hot), rng.integers(0, w, 4 * n_hot)], 1)
        centres = cand + 0.5
        ok = np.ones(len(cand), bool)
        if tree is not None:
            d, _ = tree.query(centres)
            ok &= d >= 6.0
        for (cy, cx), good in zip(cand, ok):
            if good and all((cy - a) ** 2 + (cx - b) ** 2 >= 9 for a, b in chosen):
                chosen.append((int(cy), int(cx)))
                if len(chosen) == n_hot:
                    break
        if len(chosen) == n_hot:
            break
    arr = np.array(chosen, np.int64).reshape(-1, 2)
    return np.concatenate([np.full((len(arr), 1), panel, np.int64), arr], 1)


def cell_frames(cell: Cell, n_frames: int, seed: int) -> tuple[np.ndarray, list[RobustTruth]]:
    """``n_frames`` frames of ``cell`` as ``(F, P, H, W)`` and their truths.

    Frame ``i`` depends only on ``(seed, cell axes, i)``: the first ``k`` frames of a longer run
    are the same frames.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    frames = []
    truths = []
    for i in range(int(n_frames)):
        f, t = _one_frame(cell, _frame_rng(seed, cell, i))
        frames.append(f)
        truths.append(t)
    return np.stack(frames, 0), truths


def noise_only_cell(background: float, *, hot_pixels: bool, shape: Sequence[int] = (1, 512, 512),
                    noise: str = "poisson+read", gain: str = "g1", bg_shape: str = "ring") -> Cell:
    """The :class:`Cell` of spot-free frames (``density="none"``)."""
    p, h, w = (int(v) for v in shape)
    return Cell(background, variant="noise+hot" if hot_pixels else "noise", bg_shape=bg_shape, noise=noise,
                hot_pixels=hot_pixels, gain=gain, density="none", geometry=f"{p}x{h}x{w}")


def noise_only_frames(
    background: float,
    *,
    hot_pixels: bool,
    n_frames: int,
    shape: Sequence[int] = (1, 512, 512),
    seed: int = 0,
    noise: str = "poisson+read",
    gain: str = "g1",
    bg_shape: str = "ring",
) -> np.ndarray:
    """Spot-free frames ``(F, P, H, W)``: background (mean ``background`` photons/pixel) + noise
    (+ hot pixels at full scale if asked). Every peak found in them is a false peak."""
    cell = noise_only_cell(background, hot_pixels=hot_pixels, shape=shape, noise=noise, gain=gain,
                           bg_shape=bg_shape)
    return cell_frames(cell, n_frames, seed)[0]


def false_peaks_per_mpix(tables: Sequence[PeakTable], frames_shape: Sequence[int]) -> float:
    """Found peaks per million pixels; ``frames_shape`` is ``(F, P, H, W)`` (or ``(F, H, W)``)."""
    shape = tuple(int(v) for v in frames_shape)
    if len(shape) < 3:
        raise ValueError(f"frames_shape must be (F, P, H, W) or (F, H, W), got {frames_shape!r}")
    if len(tables) != shape[0]:
        raise ValueError(f"{len(tables)} tables for {shape[0]} frames")
    mpix = float(np.prod(shape)) / 1e6
    return float(sum(len(np.asarray(t.panel)) for t in tables) / mpix)


# ------------------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class MatrixSpec:
    """Which cells, how many frames, which seeds. ``tune_seed`` must differ from ``seed``."""

    cells: tuple[Cell, ...]
    noise_only: tuple[Cell, ...]
    frames_per_cell: int = 4
    noise_frames: int = 4
    seed: int = 1000
    tune_seed: int | None = None
    tune_frames_per_cell: int = 1
    tune_grid: dict[str, tuple] | None = field(default=None, hash=False)

    def resolved_tune_seed(self) -> int:
        ts = self.seed + 7919 if self.tune_seed is None else int(self.tune_seed)
        if ts == self.seed:
            raise ValueError("tune_seed must differ from seed (peakfinder8 is tuned on separate frames)")
        return ts


#: One-factor-at-a-time variants, each applied at every background level: label -> Cell fields.
OFAT_VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "read": {"noise": "poisson+read"},
    "hot": {"hot_pixels": True},
    "g30p": {"gain": "g30p"},
    "kev": {"gain": "kev"},
    "large": {"size": "large"},
    "aniso": {"size": "aniso"},
    "dense": {"density": "dense"},
}
#: Two-or-more-factor cells: label -> (levels, Cell fields).
EXTRA_VARIANTS: dict[str, tuple[tuple[float, ...], dict[str, Any]]] = {
    "dense+large": ((10.0, 50.0), {"density": "dense", "size": "large"}),
    "flat-bg": ((10.0, 300.0), {"bg_shape": "flat"}),
    "quad": ((10.0, 50.0), {"geometry": "4x256x256"}),
    "kev+read+hot": ((10.0, 50.0), {"gain": "kev", "noise": "poisson+read", "hot_pixels": True}),
    "realistic": ((10.0, 50.0), {"noise": "poisson+read", "hot_pixels": True, "gain": "g30p",
                                 "size": "aniso", "density": "dense"}),
}


def default_spec(*, quick: bool = False, seed: int = 1000, frames_per_cell: int | None = None,
                 tune_seed: int | None = None) -> MatrixSpec:
    """The matrix: base cell (ring background, Poisson, no hot pixels, gain 1, sigma 0.7, sparse,
    one 512² panel) at each background level, each one-factor variant of :data:`OFAT_VARIANTS` at
    every level, and the multi-factor cells of :data:`EXTRA_VARIANTS`; noise-only frames
    (Poisson + read noise, gain 1, ring) at every level with and without hot pixels.
    ``quick``: base/hot/g30p/dense at levels 0, 10, 300 and 1 frame each."""
    cells: list[Cell] = []
    if quick:
        levels = (0.0, 10.0, 300.0)
        for label in ("base", "hot", "g30p", "dense"):
            cells += [Cell(lv, variant=label, **OFAT_VARIANTS[label]) for lv in levels]
        noise = tuple(noise_only_cell(lv, hot_pixels=h) for lv in levels for h in (False, True))
        n = 1 if frames_per_cell is None else frames_per_cell
        return MatrixSpec(tuple(cells), noise, frames_per_cell=n, noise_frames=n, seed=seed, tune_seed=tune_seed)
    for label, fields_ in OFAT_VARIANTS.items():
        cells += [Cell(lv, variant=label, **fields_) for lv in BACKGROUND_LEVELS]
    for label, (levels, fields_) in EXTRA_VARIANTS.items():
        cells += [Cell(lv, variant=label, **fields_) for lv in levels]
    noise = tuple(noise_only_cell(lv, hot_pixels=h) for lv in BACKGROUND_LEVELS for h in (False, True))
    n = 4 if frames_per_cell is None else frames_per_cell
    return MatrixSpec(tuple(cells), noise, frames_per_cell=n, noise_frames=n, seed=seed, tune_seed=tune_seed)


# -------------------------------------------------------------------------------------- finders
#: peakfinder8 tuning grid. ``adc_photons`` is converted to frame units by the cell's gain.
DEFAULT_TUNE_GRID: dict[str, tuple] = {
    "min_snr": (3.5, 4.5, 5.5, 7.0, 9.0),
    "adc_photons": (0.5, 2.0, 4.0),
    "min_pix_count": (1, 2, 3),
}
#: peakfinder8 fields held fixed during tuning and evaluation (windows large enough for sigma-2
#: spots; no cap in practice, so ``min_pix_count`` can be tuned by filtering on ``npix``).
PF8_FIXED: dict[str, Any] = {"window_radius": 5, "max_pix_count": 121, "local_max_radius": 1,
                             "max_num_peaks": 20000, "max_candidates": 20000}


def _pf8(params: dict[str, Any], cell: Cell, device: str) -> Any:
    from .peakfinder8 import Peakfinder8, Peakfinder8Params

    fields_ = {k: v for k, v in params.items() if k != "adc_photons"}
    fields_["adc_threshold"] = float(params.get("adc_photons", 0.0)) * GAINS[cell.gain][0]
    return Peakfinder8(Peakfinder8Params(**fields_), radius=radius_map(cell), device=device)


def _run_pf8(params: dict[str, Any], cell: Cell, frames: np.ndarray, device: str) -> list[PeakTable]:
    finder = _pf8(params, cell, device)
    out: list[PeakTable] = []
    for start in range(0, len(frames), 8):
        out.extend(finder.find_peaks(frames[start : start + 8]))
    return out


def _min_npix(tables: Sequence[PeakTable], k: int) -> list[PeakTable]:
    out = []
    for t in tables:
        m = t.npix >= k
        out.append(PeakTable(panel=t.panel[m], y=t.y[m], x=t.x[m], intensity=t.intensity[m], npix=t.npix[m],
                             n_overflow=t.n_overflow, centroid=t.centroid))
    return out


def _noise_score(fp_per_mpix: float) -> float:
    return 1.0 / (1.0 + fp_per_mpix / 10.0)


def tune_peakfinder8(
    cells: Sequence[Cell],
    *,
    seed: int,
    n_frames: int = 1,
    grid: dict[str, tuple] | None = None,
    noise_cells: Sequence[Cell] = (),
    device: str = "cpu",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Best peakfinder8 parameters for a group of cells (one background level), on frames of
    ``seed`` (never the reported ones). Full grid over ``min_snr`` x ``adc_photons`` x
    ``min_pix_count`` (the last by filtering one ``min_pix_count=1`` run on ``npix``: identical
    peaks, as the pixel-count test is independent of the others). Score = mean over the cells of
    F1, each noise-only cell scoring ``1 / (1 + false_per_Mpx / 10)``; ties go to the first grid
    point. Returns the chosen parameters (``Peakfinder8Params`` fields + ``adc_photons``) and every
    grid point's score."""
    from .evaluate import evaluate

    grid = dict(DEFAULT_TUNE_GRID if grid is None else grid)
    unknown = set(grid) - {"min_snr", "adc_photons", "min_pix_count"}
    if unknown:
        raise ValueError(f"tune grid: unknown fields {sorted(unknown)} (min_snr, adc_photons, min_pix_count)")
    snrs = tuple(grid.get("min_snr", (6.0,)))
    adcs = tuple(grid.get("adc_photons", (0.0,)))
    pixs = tuple(sorted(int(v) for v in grid.get("min_pix_count", (2,))))
    data = [(c, *cell_frames(c, n_frames, seed)) for c in cells]
    noise = [(c, cell_frames(c, n_frames, seed)[0]) for c in noise_cells]
    best: tuple[float, dict[str, Any]] | None = None
    report = []
    for snr in snrs:
        for adc in adcs:
            base = {**PF8_FIXED, "min_snr": float(snr), "adc_photons": float(adc), "min_pix_count": 1}
            runs = [(_run_pf8(base, c, f, device), t) for c, f, t in data]
            noise_runs = [(_run_pf8(base, c, f, device), f.shape) for c, f in noise]
            for k in pixs:
                scores = [evaluate(_min_npix(found, k), t).f1 for found, t in runs]
                scores += [_noise_score(false_peaks_per_mpix(_min_npix(found, k), shape)) for found, shape in noise_runs]
                score = float(np.mean(scores)) if scores else 0.0
                params = {**base, "min_pix_count": k}
                report.append({"params": params, "score": score})
                if best is None or score > best[0] + 1e-12:
                    best = (score, params)
    assert best is not None
    return best[1], report


# ----------------------------------------------------------------------------------- run_matrix
def _metrics_row(found: Sequence[PeakTable], truths: Sequence[RobustTruth], seconds: float) -> dict[str, Any]:
    from .evaluate import evaluate

    m = evaluate(found, truths).as_dict()
    m["seconds_per_frame"] = seconds / max(len(found), 1)
    return m


def run_matrix(
    spec: MatrixSpec | None = None,
    *,
    finders: Sequence[str] = ("peaknet", "peakfinder8"),
    weights: str = "default",
    device: str = "cpu",
    out_dir: str | Path | None = None,
    progress: bool = True,
    batch_size: int = 4,
    threads: int | None = None,
) -> dict[str, Any]:
    """Generate every cell of ``spec`` (default :func:`default_spec`) on ``spec.seed`` and score
    each finder: ``peaknet`` (its default centroid), ``peaknet:mask`` etc., ``peakfinder8`` (tuned per
    background level on ``spec.resolved_tune_seed()``, radius map from the generator's beam centre,
    no bad-pixel mask). Returns the JSON-ready result; with ``out_dir`` also writes
    ``matrix.json``, ``matrix.md`` and ``matrix.png`` there (:func:`write_outputs`). ``threads``:
    torch CPU threads for the run (restored afterwards; None = leave as is)."""
    import torch

    if threads is None:
        return _run_matrix(spec, finders, weights, device, out_dir, progress, batch_size)
    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        return _run_matrix(spec, finders, weights, device, out_dir, progress, batch_size)
    finally:
        torch.set_num_threads(old)


def _run_matrix(spec: MatrixSpec | None, finders: Sequence[str], weights: str, device: str,
                out_dir: str | Path | None, progress: bool, batch_size: int) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    spec = spec or default_spec()
    finders = [f.strip() for f in finders if f.strip()]
    for f in finders:
        if f not in ("peakfinder8", "peaknet", "peaknet:mask", "peaknet:intensity", "peaknet:signal"):
            raise ValueError(f"unknown finder {f!r} (peaknet, peaknet:mask|intensity|signal, peakfinder8)")
    t_start = time.perf_counter()
    tune_seed = spec.resolved_tune_seed()
    levels = sorted({c.background for c in spec.cells} | {c.background for c in spec.noise_only})
    result: dict[str, Any] = {
        "meta": {
            "generator": GENERATOR_VERSION,
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "seed": spec.seed,
            "tune_seed": tune_seed,
            "frames_per_cell": spec.frames_per_cell,
            "noise_frames": spec.noise_frames,
            "tune_frames_per_cell": spec.tune_frames_per_cell,
            "finders": finders,
            "weights": weights if any(f.startswith("peaknet") for f in finders) else None,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "max_dist_px": 1.5,
            "detectable_rule": (f"aperture SNR >= {DETECTABLE_SNR:g} (r = max(1.5, 1.6 sigma_major) px, photon "
                                f"units), centre >= {EDGE_MARGIN_PX:g} px from panel edge pixel centres, no brighter "
                                f"spot within {CLOSE_PAIR_PX:g} px"),
        },
        "tuned_peakfinder8": {},
        "cells": [],
        "noise_only": [],
    }
    # ---- tune peakfinder8 per background level on the tuning seed ----
    tuned: dict[float, dict[str, Any]] = {}
    if "peakfinder8" in finders:
        t0 = time.perf_counter()
        for lv in tqdm(levels, desc="tune peakfinder8", disable=not progress):
            cells_lv = [c for c in spec.cells if c.background == lv]
            noise_lv = [c for c in spec.noise_only if c.background == lv]
            params, report = tune_peakfinder8(cells_lv, seed=tune_seed, n_frames=spec.tune_frames_per_cell,
                                              grid=spec.tune_grid, noise_cells=noise_lv, device=device)
            tuned[lv] = params
            score = max(r["score"] for r in report)
            result["tuned_peakfinder8"][f"{lv:g}"] = {**params, "tuning_score": score}
            log.info("peakfinder8 tuned for background %g: %s", lv, params)
        result["meta"]["tuning_seconds"] = time.perf_counter() - t0
    # ---- PeakNet ----
    nets: dict[str, Any] = {}
    for f in finders:
        if f.startswith("peaknet"):
            from .finder import PeakFinder

            centroid = f.split(":", 1)[1] if ":" in f else "auto"
            try:
                nets[f] = PeakFinder(weights=weights, device=device, batch_size=batch_size, centroid=centroid)
            except Exception as exc:  # report, keep the other finders
                log.error("cannot build %s: %s", f, exc)
                nets[f] = exc

    def run_finder(name: str, cell: Cell, frames: np.ndarray) -> tuple[list[PeakTable], float]:
        t0 = time.perf_counter()
        if name == "peakfinder8":
            found = _run_pf8(tuned[cell.background], cell, frames, device)
        else:
            net = nets[name]
            if isinstance(net, Exception):
                raise net
            found = net.find(frames)
        return found, time.perf_counter() - t0

    warmed: set[tuple] = set()
    items = [("cell", c) for c in spec.cells] + [("noise", c) for c in spec.noise_only]
    for kind, cell in tqdm(items, desc="robustness matrix", disable=not progress):
        n = spec.frames_per_cell if kind == "cell" else spec.noise_frames
        t0 = time.perf_counter()
        frames, truths = cell_frames(cell, n, spec.seed)
        gen_s = time.perf_counter() - t0
        row: dict[str, Any] = {"name": cell.name, "variant": cell.variant, "axes": cell.axes(), "n_frames": n,
                               "generate_seconds": gen_s, "results": {}}
        if kind == "noise":
            row["mpix"] = float(np.prod(frames.shape)) / 1e6
        for name in finders:
            try:
                key = (name, frames.shape[1:], str(frames.dtype))
                if name in nets and key not in warmed and not isinstance(nets[name], Exception):
                    nets[name].warmup(frames.shape[1:], frames.dtype)
                    warmed.add(key)
                found, secs = run_finder(name, cell, frames)
                if kind == "cell":
                    row["results"][name] = _metrics_row(found, truths, secs)
                else:
                    row["results"][name] = {"n_found": int(sum(t.n for t in found)),
                                            "false_per_mpix": false_peaks_per_mpix(found, frames.shape),
                                            "seconds_per_frame": secs / n}
            except Exception as exc:
                row["results"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        result["cells" if kind == "cell" else "noise_only"].append(row)
    result["meta"]["runtime_seconds"] = time.perf_counter() - t_start
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


# ------------------------------------------------------------------------------------- outputs
_FINDER_LABEL = {"peaknet": "PeakNet", "peaknet:mask": "PeakNet (mask)", "peaknet:intensity": "PeakNet (int.)",
                 "peaknet:signal": "PeakNet (signal)", "peakfinder8": "pf8 (tuned)"}


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.{nd}f}"
    return str(v)


def matrix_markdown(result: dict[str, Any]) -> str:
    """Markdown tables: per cell F1 / precision / recall / RMSE / n_found of each finder side by
    side; per noise-only level false peaks per Mpx; the tuned peakfinder8 parameters."""
    finders = result["meta"]["finders"]
    lines = []
    head = ["cell", "bg", "noise", "hot", "gain", "size", "density", "geometry", "n_truth"]
    for f in finders:
        lab = _FINDER_LABEL.get(f, f)
        head += [f"{lab} F1", f"{lab} P", f"{lab} R", f"{lab} RMSE", f"{lab} found"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + " --- |" * len(head))
    for row in result["cells"]:
        a = row["axes"]
        first = next((r for r in row["results"].values() if "n_truth" in r), {})
        cells = [row["name"], f"{a['background']:g}", a["noise"], "yes" if a["hot_pixels"] else "no", a["gain"],
                 a["size"], a["density"], a["geometry"], _fmt(first.get("n_truth"))]
        for f in finders:
            r = row["results"].get(f, {})
            if "error" in r:
                cells += ["error"] + ["–"] * 4
            else:
                cells += [_fmt(r.get("f1")), _fmt(r.get("precision")), _fmt(r.get("recall")),
                          _fmt(r.get("rmse_px"), 2), _fmt(r.get("n_found"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    head = ["noise-only", "bg", "hot", "Mpx"] + [f"{_FINDER_LABEL.get(f, f)} false/Mpx" for f in finders]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + " --- |" * len(head))
    for row in result["noise_only"]:
        a = row["axes"]
        cells = [row["name"], f"{a['background']:g}", "yes" if a["hot_pixels"] else "no", _fmt(row["mpix"], 2)]
        for f in finders:
            r = row["results"].get(f, {})
            cells.append("error" if "error" in r else _fmt(r.get("false_per_mpix"), 1))
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("tuned_peakfinder8"):
        lines.append("")
        lines.append("| bg | pf8 min_snr | min_pix_count | adc_threshold (photons × gain) |")
        lines.append("| --- | --- | --- | --- |")
        for lv, p in result["tuned_peakfinder8"].items():
            lines.append(f"| {lv} | {p.get('min_snr')} | {p.get('min_pix_count')} | {p.get('adc_photons')} |")
    return "\n".join(lines) + "\n"


def plot_matrix(result: dict[str, Any], path: str | Path) -> Path:
    """ONE figure: per finder a heat map of F1 (rows = variant, columns = background level), and
    a heat map of false peaks per Mpx on the noise-only frames (rows = level x hot pixels,
    columns = finder, colour log10(1 + false/Mpx))."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    finders = result["meta"]["finders"]
    variants: list[str] = []
    for row in result["cells"]:
        if row["variant"] not in variants:
            variants.append(row["variant"])
    levels = sorted({row["axes"]["background"] for row in result["cells"]})
    grids = {f: np.full((len(variants), len(levels)), np.nan) for f in finders}
    for row in result["cells"]:
        i, j = variants.index(row["variant"]), levels.index(row["axes"]["background"])
        for f in finders:
            v = row["results"].get(f, {}).get("f1")
            if v is not None:
                grids[f][i, j] = v
    noise_rows = result["noise_only"]
    ngrid = np.full((len(noise_rows), len(finders)), np.nan)
    for i, row in enumerate(noise_rows):
        for j, f in enumerate(finders):
            v = row["results"].get(f, {}).get("false_per_mpix")
            if v is not None:
                ngrid[i, j] = v

    ncol = len(finders) + 1
    fig = Figure(figsize=(3.2 * len(finders) + 3.0, max(3.5, 0.32 * max(len(variants), len(noise_rows)) + 1.6)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    widths = [len(levels)] * len(finders) + [max(1.6, 0.9 * len(finders))]
    axes = fig.subplots(1, ncol, gridspec_kw={"width_ratios": widths})
    axes = np.atleast_1d(axes)
    im = None
    for k, f in enumerate(finders):
        ax = axes[k]
        g = grids[f]
        im = ax.imshow(np.ma.masked_invalid(g), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                if not math.isnan(g[i, j]):
                    ax.text(j, i, f"{g[i, j]:.2f}", ha="center", va="center", fontsize=6.5)
        ax.set_xticks(range(len(levels)), [f"{lv:g}" for lv in levels], fontsize=7)
        ax.set_yticks(range(len(variants)), variants if k == 0 else [""] * len(variants), fontsize=7)
        ax.set_xlabel("background (photons/px)", fontsize=7)
        ax.set_title(f"F1: {_FINDER_LABEL.get(f, f)}", fontsize=8)
    ax = axes[-1]
    shown = np.log10(1.0 + ngrid)
    ax.imshow(np.ma.masked_invalid(shown), cmap="magma_r", vmin=0.0, vmax=max(3.5, float(np.nanmax(shown))
              if np.isfinite(shown).any() else 3.5), aspect="auto")
    for i in range(ngrid.shape[0]):
        for j in range(ngrid.shape[1]):
            if not math.isnan(ngrid[i, j]):
                v = ngrid[i, j]
                ax.text(j, i, f"{v:.0f}" if v >= 10 else f"{v:.1f}", ha="center", va="center", fontsize=6.5,
                        color="white" if shown[i, j] > 2.0 else "black")
    ax.set_xticks(range(len(finders)), [_FINDER_LABEL.get(f, f) for f in finders], fontsize=6.5, rotation=20)
    ax.yaxis.tick_right()
    ax.set_yticks(range(len(noise_rows)),
                  [f"bg {r['axes']['background']:g}{' +hot' if r['axes']['hot_pixels'] else ''}" for r in noise_rows],
                  fontsize=7)
    ax.set_title("noise only: false peaks/Mpx", fontsize=8)
    if im is not None:
        cb = fig.colorbar(im, ax=list(axes[: len(finders)]), location="bottom", shrink=0.6, aspect=40, pad=0.02)
        cb.ax.tick_params(labelsize=6)
    meta = result["meta"]
    fig.suptitle(f"Robustness matrix ({meta['generator']}, seed {meta['seed']}, {meta['frames_per_cell']} frames/cell,"
                 f" weights {meta.get('weights')})", fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    return out


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``matrix.json``, ``matrix.md`` and ``matrix.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "matrix.json", "md": out / "matrix.md", "png": out / "matrix.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    paths["md"].write_text(matrix_markdown(result))
    plot_matrix(result, paths["png"])
    return paths


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        f = float(v)
        return None if math.isnan(f) else f
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def matrix_main(args: Any) -> int:
    """``peaknet-pva evaluate --matrix``: run the matrix, write DIR/matrix.{json,md,png}, print a
    short summary. Returns 1 if any finder reported an error."""
    spec = default_spec(quick=bool(getattr(args, "quick", False)), seed=int(getattr(args, "seed", 1000)),
                        frames_per_cell=getattr(args, "frames_per_cell", None),
                        tune_seed=getattr(args, "tune_seed", None))
    backends = getattr(args, "backends", None) or "peaknet,peakfinder8"
    device = getattr(args, "device", "auto")
    if device in (None, "", "auto"):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(getattr(args, "out", None) or "out/matrix")
    threads = getattr(args, "threads", None)
    result = run_matrix(spec, finders=[b for b in backends.split(",") if b.strip()],
                        weights=getattr(args, "weights", "default"), device=device, out_dir=out,
                        threads=None if threads is None else int(threads))
    errors = [(r["name"], f) for r in result["cells"] + result["noise_only"]
              for f, m in r["results"].items() if "error" in m]
    summary = {"out": str(out), "cells": len(result["cells"]), "noise_only": len(result["noise_only"]),
               "runtime_seconds": round(result["meta"]["runtime_seconds"], 1), "errors": errors[:5]}
    for f in result["meta"]["finders"]:
        f1 = [r["results"][f]["f1"] for r in result["cells"] if "f1" in r["results"].get(f, {})]
        fp = [r["results"][f]["false_per_mpix"] for r in result["noise_only"]
              if "false_per_mpix" in r["results"].get(f, {})]
        summary[f] = {"median_f1": float(np.median(f1)) if f1 else None,
                      "max_false_per_mpix": float(np.max(fp)) if fp else None}
    print(json.dumps(summary, indent=2))
    return 1 if errors else 0
