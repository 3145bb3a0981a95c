"""Training panels drawn on the fly from a detector domain as wide as real beamlines.

The simulator (:mod:`peaknet_pva.simulate`) makes physically consistent still shots of three
detector presets, but a network trained only on them learns that detector: its backgrounds, its
hot pixels, its gain. This sampler draws every panel from broad, independent distributions so
that nothing but spot *shape against local noise* is a reliable cue:

- **panel**: any shape ``panel_min..panel_max`` per side; sometimes a dead panel (all 0);
- **background**: 0-300 photons/pixel (log-uniform, some exactly 0), flat, radial about a beam
  centre that may lie off the panel, elliptical (anisotropic), times a smooth random field;
  water rings of any strength and width, sharp ice rings;
- **spots**: counts from 0 to thousands per 512² panel, general 2-D Gaussians with sigma
  0.5-3 px, axis ratio up to 1.6 and sometimes streaks (ratio up to 5, any angle), sub-pixel
  centres, brightness drawn as a peak SNR from far below to far above the detection threshold;
- **detector response**: Poisson photons plus Gaussian read noise 0-3 photons, gain 0.1-100 ADU
  per photon or keV-calibrated floats, pedestal offsets, integer dtypes with saturation;
  hot / warm pixels or none; zeroed masked rectangles and panel-gap strips, declared in a mask
  (as a user's bad-pixel map) or not.

Labels: the pixels where a *detectable* spot's noiseless profile is at least ``label_fraction`` of
its peak pixel, never on a masked, hot or zeroed pixel. A spot is detectable when either its peak
pixel (the simulator's rule, ``peak / sqrt(background + read_noise² + 1)``) or its core region
(profile >= ``detect_fraction`` of the peak; ``S / sqrt(S + B + n·read_noise² + 1)``, photons
summed over the ``n`` core pixels: what an integrating finder sees, and what matters for wide
spots) reaches ``detect_snr``. Everything is a pure function of ``numpy.random.Generator``, so a
training step's batch depends only on ``(seed, step)``: runs are reproducible and resumable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .errors import ConfigError

__all__ = ["DomainParams", "Panel", "sample_panel"]


@dataclass(frozen=True)
class DomainParams:
    """Ranges of the training domain (saved with the run)."""

    panel_min: int = 64
    panel_max: int = 320
    dead_panel_prob: float = 0.02
    background: tuple[float, float] = (0.01, 300.0)  # photons/pixel, log-uniform
    zero_background_prob: float = 0.1
    radial_prob: float = 0.6
    smooth_random_prob: float = 0.5
    water_ring_prob: float = 0.4
    ice_ring_prob: float = 0.2
    blank_prob: float = 0.12
    spots_per_mpix: tuple[float, float] = (20.0, 12000.0)  # log-uniform; 12000 = 3000 per 512²
    sigma: tuple[float, float] = (0.5, 3.0)
    streak_prob: float = 0.15
    peak_snr: tuple[float, float] = (0.5, 3000.0)  # log-uniform
    read_noise: tuple[float, float] = (0.0, 3.0)  # photons
    no_read_noise_prob: float = 0.3
    gain: tuple[float, float] = (0.1, 100.0)  # ADU per photon, log-uniform
    float_prob: float = 0.4  # float frames (else integer dtype with saturation)
    kev_prob: float = 0.3  # of float frames: keV-calibrated (gain = photon energy in keV)
    pedestal_prob: float = 0.4
    hot_prob: float = 0.5
    #: share of float frames whose hot pixels sit far above the frame's own range (log-uniform up
    #: to 1e7 x gain: a new hot pixel at an ADC's full scale after calibration); 0 = the original
    #: sampler, batch for batch.
    hot_bright_prob: float = 0.0
    mask_prob: float = 0.35
    declare_mask_prob: float = 0.5
    detect_snr: float = 6.0
    label_fraction: float = 0.3
    # Region of the integrated-SNR detectability test, kept apart from the label footprint so
    # that smaller labels (fewer touching spots) do not also change which spots count.
    detect_fraction: float = 0.3

    def __post_init__(self) -> None:
        if not 8 <= self.panel_min <= self.panel_max:
            raise ConfigError(f"panel_min/max: need 8 <= min <= max, got {self.panel_min}, {self.panel_max}")
        for name in ("background", "spots_per_mpix", "sigma", "peak_snr", "gain"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ConfigError(f"{name}: need 0 < low <= high, got {(lo, hi)}")
        for name in ("label_fraction", "detect_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: need 0 < value < 1, got {getattr(self, name)}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Panel:
    """One drawn panel: raw frame values, labels, the declared mask and the spot truth."""

    image: np.ndarray  # (H, W) float32: the detector's values (ADU or keV), cast to float32
    dtype: str  # the dtype the detector would send
    label: np.ndarray  # (H, W) uint8
    mask: np.ndarray | None  # (H, W) bool, True = bad, when the "user" declares one
    y: np.ndarray  # (n,) spot centres, pixel centre at the integer
    x: np.ndarray
    snr: np.ndarray
    detectable: np.ndarray  # (n,) bool
    background: float  # photons/pixel level drawn


def _loguniform(rng: np.random.Generator, lo: float, hi: float, size: int | None = None) -> np.ndarray | float:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


def _background(rng: np.random.Generator, p: DomainParams, h: int, w: int, level: float) -> np.ndarray:
    """Expected photons/pixel: flat or radial (elliptical) about a beam centre, rings, smooth field."""
    if level <= 0:
        return np.zeros((h, w), np.float64)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    size = max(h, w)
    cy, cx = rng.uniform(-1.5 * size, 2.5 * size, 2)
    theta = rng.uniform(0, np.pi)
    stretch = rng.uniform(0.75, 1.33)  # anisotropic scatter (tilted detector, polarisation-like)
    u = (yy - cy) * math.cos(theta) + (xx - cx) * math.sin(theta)
    v = -(yy - cy) * math.sin(theta) + (xx - cx) * math.cos(theta)
    r = np.sqrt((u * stretch) ** 2 + (v / stretch) ** 2)
    shape = np.ones((h, w))
    if rng.random() < p.radial_prob:
        r0 = rng.uniform(0.2, 3.0) * size
        shape = shape * (1.0 + rng.uniform(0.5, 8.0) * r0**2 / (r**2 + r0**2))
    if rng.random() < p.water_ring_prob:
        ring_r = rng.uniform(r.min(), r.max() + 1.0)
        width = _loguniform(rng, 2.0, 0.3 * size)
        shape = shape + _loguniform(rng, 0.1, 10.0) * np.exp(-0.5 * ((r - ring_r) / width) ** 2)
    if rng.random() < p.ice_ring_prob:
        for _ in range(int(rng.integers(1, 4))):
            ring_r = rng.uniform(r.min(), r.max() + 1.0)
            width = rng.uniform(0.7, 2.5)
            shape = shape + _loguniform(rng, 0.2, 20.0) * np.exp(-0.5 * ((r - ring_r) / width) ** 2)
    if rng.random() < p.smooth_random_prob:
        coarse = rng.normal(0.0, rng.uniform(0.1, 0.5), (int(rng.integers(2, 7)), int(rng.integers(2, 7))))
        field = ndimage.zoom(coarse, (h / coarse.shape[0], w / coarse.shape[1]), order=3, mode="nearest")
        shape = shape * np.exp(field[:h, :w])
    return level * shape / np.median(shape)


def _spots(
    rng: np.random.Generator, p: DomainParams, h: int, w: int, bg: np.ndarray, read_noise: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Render spots (photons, noiseless). Returns image, y, x, peak photons, snr, flat window
    indices (n, K) and window values (n, K) for labelling."""
    empty = np.zeros(0)
    img = np.zeros((h, w))
    if rng.random() < p.blank_prob:
        return img, empty, empty, empty, empty, np.zeros((0, 1), np.int64), np.zeros((0, 1))
    n = int(rng.poisson(_loguniform(rng, *p.spots_per_mpix) * h * w / 1e6))
    if n == 0:
        return img, empty, empty, empty, empty, np.zeros((0, 1), np.int64), np.zeros((0, 1))
    y = rng.uniform(0, h - 1, n)
    x = rng.uniform(0, w - 1, n)
    # Per-panel typical width with per-spot scatter; anisotropic, sometimes streaked.
    s0 = _loguniform(rng, *p.sigma)
    s1 = np.clip(s0 * rng.uniform(0.85, 1.15, n), p.sigma[0], p.sigma[1])
    ratio = rng.uniform(1.0, 1.6, n)
    streak = rng.random(n) < p.streak_prob
    ratio[streak] = rng.uniform(2.0, 5.0, int(streak.sum()))
    s2 = np.minimum(s1 * ratio, 3.0 * p.sigma[1])
    ang = np.full(n, rng.uniform(0, np.pi)) + rng.normal(0, 0.3, n)  # streaks share a direction
    half = int(min(14, math.ceil(3.0 * float(s2.max())) + 1))
    off = np.arange(-half, half + 1)
    iy = np.floor(y).astype(np.int64)[:, None, None] + off[None, :, None]
    ix = np.floor(x).astype(np.int64)[:, None, None] + off[None, None, :]
    # 3x3 sub-pixel samples of the Gaussian, averaged: close to the pixel integral at sigma 0.5.
    sub = np.array([-1.0 / 3, 0.0, 1.0 / 3])
    prof = np.zeros((n, off.size, off.size))
    c, s = np.cos(ang)[:, None, None], np.sin(ang)[:, None, None]
    a1, a2 = (1.0 / s1**2)[:, None, None], (1.0 / s2**2)[:, None, None]
    for sy in sub:
        dy = iy + sy - y[:, None, None]
        for sx in sub:
            dx = ix + sx - x[:, None, None]
            u = dy * c + dx * s
            v = -dy * s + dx * c
            prof += np.exp(-0.5 * (u * u * a1 + v * v * a2))
    prof /= 9.0 * 2.0 * np.pi * (s1 * s2)[:, None, None]  # unit integrated intensity
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    flat = np.clip(iy, 0, h - 1) * w + np.clip(ix, 0, w - 1)
    peak_prof = prof.reshape(n, -1).max(axis=1)
    peak_at = flat.reshape(n, -1)[np.arange(n), prof.reshape(n, -1).argmax(axis=1)]
    noise = np.sqrt(bg.reshape(-1)[peak_at] + read_noise**2 + 1.0)
    snr = _loguniform(rng, *p.peak_snr, size=n)
    photons = snr * noise / peak_prof
    vals = prof * photons[:, None, None] * inside
    np.add.at(img.reshape(-1), flat[inside], vals[inside])
    # Integrated SNR over the spot's core (profile >= detect_fraction x peak).
    region = (prof >= p.detect_fraction * peak_prof[:, None, None]) & inside
    s_reg = (vals * region).reshape(n, -1).sum(1)
    b_reg = (bg.reshape(-1)[flat] * region).reshape(n, -1).sum(1)
    n_reg = region.reshape(n, -1).sum(1)
    snr_reg = s_reg / np.sqrt(s_reg + b_reg + n_reg * read_noise**2 + 1.0)
    return img, y, x, photons * peak_prof, np.maximum(snr, snr_reg), flat.reshape(n, -1), vals.reshape(n, -1)


def _bad_regions(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Zeroed rectangles and gap strips (True = zeroed)."""
    bad = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.random()
        if kind < 0.4:  # a gap strip: rows or columns
            width = int(rng.integers(1, 12))
            if rng.random() < 0.5:
                r0 = int(rng.integers(0, h))
                bad[r0 : r0 + width] = True
            else:
                c0 = int(rng.integers(0, w))
                bad[:, c0 : c0 + width] = True
        else:  # a rectangle (beam stop shadow, masked ASIC)
            hh, ww = int(rng.integers(4, max(5, h // 2))), int(rng.integers(4, max(5, w // 2)))
            r0, c0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            bad[r0 : r0 + hh, c0 : c0 + ww] = True
    return bad


def sample_panel(rng: np.random.Generator, params: DomainParams | None = None, shape: tuple[int, int] | None = None) -> Panel:
    """Draw one panel of the training domain (see the module docstring)."""
    p = params or DomainParams()
    if shape is None:
        h, w = (int(v) for v in rng.integers(p.panel_min, p.panel_max + 1, 2))
    else:
        h, w = (int(v) for v in shape)
    if rng.random() < p.dead_panel_prob:
        z = np.zeros(0)
        return Panel(np.zeros((h, w), np.float32), "uint16", np.zeros((h, w), np.uint8), None, z, z, z, z.astype(bool), 0.0)

    level = 0.0 if rng.random() < p.zero_background_prob else float(_loguniform(rng, *p.background))
    read_noise = 0.0 if rng.random() < p.no_read_noise_prob else float(rng.uniform(*p.read_noise))
    bg = _background(rng, p, h, w, level)
    spot_img, y, x, _peak, snr, win_idx, win_val = _spots(rng, p, h, w, bg, read_noise)
    photons = rng.poisson(bg + spot_img).astype(np.float64)
    if read_noise > 0:
        photons += rng.normal(0.0, read_noise, (h, w))

    # Detector response: gain, pedestal, dtype, saturation.
    is_float = rng.random() < p.float_prob
    if is_float and rng.random() < p.kev_prob:
        gain = float(rng.uniform(5.0, 20.0))  # keV per photon
    else:
        gain = float(_loguniform(rng, *p.gain))
    pedestal = float(rng.uniform(0, 2000) * (gain if gain < 1 else 1.0)) if rng.random() < p.pedestal_prob else 0.0
    values = photons * gain + pedestal
    if is_float:
        dtype = "float32"
        saturation = float(values.max() * rng.uniform(1.0, 3.0)) + gain * 1e4
    else:
        dtype = str(rng.choice(["uint16", "int32", "uint32"]))
        saturation = 65535.0 if dtype == "uint16" else float(2**31 - 1 if rng.random() < 0.5 else 10_000_000)
        values = np.clip(np.rint(values), 0, saturation)

    # Hot / warm pixels (non-peak), then zeroed masked regions.
    hot = np.zeros((h, w), bool)
    if rng.random() < p.hot_prob:
        k = int(rng.integers(1, max(2, int(60 * h * w / 262144) + 2)))
        idx = rng.integers(0, h * w, k)
        hot.reshape(-1)[idx] = True
        warm = rng.random(k) < 0.4
        full = saturation
        if is_float and p.hot_bright_prob > 0 and rng.random() < p.hot_bright_prob:
            full = float(_loguniform(rng, saturation, max(saturation, 1e7 * gain)))
        values.reshape(-1)[idx] = np.where(warm, pedestal + gain * _loguniform(rng, 20, 5000, k), full)
    bad = _bad_regions(rng, h, w) if rng.random() < p.mask_prob else np.zeros((h, w), bool)
    values[bad] = 0.0
    excluded = bad | hot

    # Labels: detectable spots whose brightest pixel is usable.
    label = np.zeros(h * w, np.uint8)
    detectable = np.zeros(y.shape[0], bool)
    if y.shape[0]:
        peak_at = win_idx[np.arange(y.shape[0]), win_val.argmax(axis=1)]
        detectable = (snr >= p.detect_snr) & ~excluded.reshape(-1)[peak_at]
        peak = win_val.max(axis=1)
        on = (win_val >= p.label_fraction * peak[:, None]) & (win_val > 0) & detectable[:, None]
        label[win_idx[on]] = 1
        label[excluded.reshape(-1)] = 0
    declared = bad | (hot & (rng.random() < 0.5)) if (bad.any() or hot.any()) and rng.random() < p.declare_mask_prob else None
    return Panel(
        image=values.astype(np.float32),
        dtype=dtype,
        label=label.reshape(h, w),
        mask=declared,
        y=y,
        x=x,
        snr=snr,
        detectable=detectable,
        background=level,
    )
