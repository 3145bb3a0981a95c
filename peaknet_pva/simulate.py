"""Synthetic serial-crystallography still shots with exact ground-truth Bragg peaks.

Pure numpy, deterministic by seed. Each frame is a kinematic still:

1. **Crystal.** A random unit cell (``a, b, c`` log-uniform-ish in 30-120 Å; angles near 90°,
   monoclinic ``beta`` 90-120°, or hexagonal ``a = b, gamma = 120°``) in a uniformly random
   orientation. Reciprocal basis ``a*, b*, c*`` (no 2π: ``|g| = 1/d``).
2. **Ewald sphere.** Beam along lab ``+z``, ``k_in = (0, 0, 1/λ)`` with λ from the frame's photon
   energy (``λ[Å] = 12398.4198 / E[eV]``). A reflection ``g`` has excitation error
   ``ε = |k_in + g| - 1/λ`` and partiality ``exp(-ε² / 2w²)`` (``w`` lumps mosaicity and
   bandwidth, per frame). Only ``|ε| ≤ 3w`` and ``|g| ≤ 1/d_min`` are enumerated, by solving the
   Ewald condition for the third index on a grid of the other two (no full hkl box).
3. **Detector.** ``k_out = k_in + g`` is projected on a flat detector at ``distance_m``,
   perpendicular to the beam: lab pixel position ``beam_center + D·(k_x, k_y)/k_z / pixel_size``
   (lab ``x`` = panel fast scan, lab ``y`` = panel slow scan; panels are axis-aligned). The panel
   holding that point gets the spot; spots whose centre falls in a gap or off the detector are not
   rendered at all (so no unlabeled partial spot ever appears on a panel edge).
4. **Spots.** 2-D Gaussian profiles integrated exactly over each pixel (``erf`` differences),
   ``sigma`` 0.8-1.5 px (per frame, ±10 % per spot), sub-pixel centres, rendered only in a 15×15
   window around the centre. Integrated photons: log-uniform ``spot_photons`` × crystal scale ×
   partiality × Wilson factor ``exp(-B s²/2)``, so some are very weak and some saturate.
5. **Background and detector response.** Flat diffuse scatter + a water ring at
   ``s = 1/3.2 Å⁻¹`` (both × the flat-detector solid-angle factor ``cos³ 2θ``); Poisson noise on
   background + spots; per-panel gain (``adu_per_photon`` × ~N(1, 5 %)); Gaussian read noise;
   saturation clip; fixed hot (saturated) and dead (0) pixels; conversion to the detector's dtype.
   Some frames are blank (no crystal; ``blank_fraction``).

Ground truth (:class:`TruthTable`) per frame: panel, ``y``, ``x`` (panel-local pixels, pixel
centre at the integer), ``intensity`` (noiseless integrated spot signal on the panel, in the
frame's units, i.e. photons × panel gain, before saturation), ``sigma`` (px), ``snr`` and
``detectable``.

**Detectability rule.** ``snr = peak / sqrt(background + 1)`` where ``peak`` is the noiseless
spot signal of the spot's brightest pixel and ``background`` the expected background at that
pixel, both in photons (the ``+1`` floors the noise where the background is near zero, where a
couple of stray photons would otherwise be "significant"). A spot is ``detectable`` when
``snr >= SimulationParams.detect_snr`` (default 6) and its brightest pixel is not a bad pixel.
Evaluation (:mod:`peaknet_pva.evaluate`) counts recall over detectable spots only and does not
penalise finding an undetectable one.

**Training labels.** :func:`spot_label_mask` re-renders each spot from its truth row (centre,
sigma and intensity are stored in float64) with the same function that drew the frame, so labels
are exact without keeping a noiseless image per frame: a pixel is labelled when that spot's
noiseless value is ≥ ``fraction`` × the spot's own brightest pixel.

Example::

    ds = simulate_dataset(100, detector="epix10k2m", seed=1)
    save_dataset(ds, "out/sim1")        # out/sim1/frames.npy (F, P*H, W), out/sim1/truth.h5
    ds2 = load_dataset("out/sim1")
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np
from scipy.special import erf

from .errors import ConfigError, FrameError
from .frames import PanelLayout, PeakTable

__all__ = [
    "DETECTORS",
    "DetectorCalibration",
    "DetectorPreset",
    "SimulatedDataset",
    "SimulationParams",
    "TruthTable",
    "draw_calibration",
    "get_detector",
    "load_dataset",
    "photon_energy_to_wavelength",
    "save_dataset",
    "simulate_dataset",
    "simulate_frame",
    "spot_label_mask",
]

#: h·c in eV·Å: ``λ[Å] = HC_EV_ANGSTROM / E[eV]``.
HC_EV_ANGSTROM = 12398.419843320026

#: Half-size of the window each spot is rendered in (window = 2R+1 = 15 px; ≥ 4σ up to σ = 1.75).
_RENDER_RADIUS = 7

#: Water ring position (Å⁻¹, d = 3.2 Å) and width (Å⁻¹, Gaussian sigma).
_WATER_RING_S = 1.0 / 3.2
_WATER_RING_WIDTH = 0.025


def photon_energy_to_wavelength(energy_ev: float) -> float:
    """Wavelength in Å of a photon of ``energy_ev`` eV."""
    return HC_EV_ANGSTROM / float(energy_ev)


# --------------------------------------------------------------------------------------------
# Detector presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorPreset:
    """A flat detector perpendicular to the beam, made of identical axis-aligned panels.

    Frames are ``(n_panels, H, W)`` with ``panel_shape = (H, W)``; the transport slab is
    ``(n_panels*H, W)``. ``panel_origins[p] = (y, x)`` is the lab position, in pixels, of the
    *centre* of pixel ``(0, 0)`` of panel ``p`` (CrystFEL's ``corner_x/y`` is that minus 0.5);
    panel-local pixel ``(y, x)`` sits at lab ``origin + (y, x)``. Gaps between panels are gaps
    in lab space. ``beam_center = (y, x)`` is where the direct beam hits, in the same lab pixels.

    ``dtype`` is the frame's pixel type. ``adu_per_photon`` converts photons to frame units;
    ``kev_units=True`` means the frame is energy-calibrated (one photon = its energy in keV,
    as calibrated Jungfrau data are) and ``adu_per_photon`` is ignored. ``saturation_adu`` is the
    largest value a pixel can hold.
    """

    name: str
    panel_shape: tuple[int, int]
    panel_origins: tuple[tuple[float, float], ...]
    beam_center: tuple[float, float]
    pixel_size_m: float
    distance_m: float
    dtype: str = "float32"
    adu_per_photon: float = 1.0
    kev_units: bool = False
    saturation_adu: float = 65535.0

    @property
    def n_panels(self) -> int:
        return len(self.panel_origins)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """``(P, H, W)``."""
        return (self.n_panels,) + tuple(self.panel_shape)

    @property
    def slab_shape(self) -> tuple[int, int]:
        """``(P*H, W)``, the stacked 2-D transport layout."""
        h, w = self.panel_shape
        return (self.n_panels * h, w)

    @property
    def layout(self) -> PanelLayout:
        """The :class:`PanelLayout` that splits this detector's slab into panels."""
        return PanelLayout(self.panel_shape)

    def lab_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Lab ``(y, x)`` of every pixel centre, each ``(P, H, W)`` float32, in pixels."""
        geo = _pixel_geometry(self)
        return geo.lab_y, geo.lab_x

    def radius_map(self) -> np.ndarray:
        """Distance of every pixel centre from the beam centre, ``(P, H, W)`` float32, in pixels.

        This is the ``radius`` map :class:`peaknet_pva.peakfinder8.Peakfinder8` wants.
        """
        return _pixel_geometry(self).radius_px

    def gain(self, photon_energy_ev: float) -> float:
        """Frame units per photon at ``photon_energy_ev`` (before the per-panel gain jitter)."""
        return photon_energy_ev / 1000.0 if self.kev_units else self.adu_per_photon


def _grid_origins(
    n_rows: int, n_cols: int, panel_shape: tuple[int, int], gap: tuple[int, int], centre_gap: tuple[int, int]
) -> tuple[tuple[float, float], ...]:
    """Origins of an ``n_rows × n_cols`` grid of panels, row-major, with a wider central cross."""
    h, w = panel_shape
    origins = []
    for r in range(n_rows):
        y = r * (h + gap[0]) + (centre_gap[0] - gap[0] if r >= n_rows // 2 and n_rows > 1 else 0)
        for c in range(n_cols):
            x = c * (w + gap[1]) + (centre_gap[1] - gap[1] if c >= n_cols // 2 and n_cols > 1 else 0)
            origins.append((float(y), float(x)))
    return tuple(origins)


def _grid_centre(origins: tuple[tuple[float, float], ...], panel_shape: tuple[int, int]) -> tuple[float, float]:
    ys = [o[0] for o in origins]
    xs = [o[1] for o in origins]
    return (
        (min(ys) + max(ys) + panel_shape[0] - 1) / 2.0,
        (min(xs) + max(xs) + panel_shape[1] - 1) / 2.0,
    )


def _make_presets() -> dict[str, DetectorPreset]:
    presets = {}
    presets["single"] = DetectorPreset(
        name="single",
        panel_shape=(512, 512),
        panel_origins=((0.0, 0.0),),
        beam_center=(250.3, 262.7),
        pixel_size_m=75e-6,
        distance_m=0.05,
        dtype="float32",
        adu_per_photon=1.0,
        saturation_adu=30000.0,
    )
    # ePix10k2M: 16 modules of 352×384 in a 4×4 grid, 20 px gaps, 30 px central cross, raw ADU.
    epix_shape = (352, 384)
    epix_origins = _grid_origins(4, 4, epix_shape, gap=(20, 20), centre_gap=(30, 30))
    ey, ex = _grid_centre(epix_origins, epix_shape)
    presets["epix10k2m"] = DetectorPreset(
        name="epix10k2m",
        panel_shape=epix_shape,
        panel_origins=epix_origins,
        beam_center=(ey + 3.4, ex - 2.2),
        pixel_size_m=100e-6,
        distance_m=0.09,
        dtype="uint16",
        adu_per_photon=1.0,
        saturation_adu=16383.0,
    )
    # Jungfrau 4M: 8 modules of 512×1024, 4 rows × 2 columns, calibrated in keV (float32).
    jf_shape = (512, 1024)
    jf_origins = _grid_origins(4, 2, jf_shape, gap=(36, 12), centre_gap=(40, 16))
    jy, jx = _grid_centre(jf_origins, jf_shape)
    presets["jungfrau4m"] = DetectorPreset(
        name="jungfrau4m",
        panel_shape=jf_shape,
        panel_origins=jf_origins,
        beam_center=(jy - 1.7, jx + 2.6),
        pixel_size_m=75e-6,
        distance_m=0.12,
        dtype="float32",
        kev_units=True,
        saturation_adu=12000.0 * 12.0,
    )
    return presets


#: The detector presets, by name: ``single`` (1×512×512 float32), ``epix10k2m`` (16×352×384
#: uint16, 4×4 grid), ``jungfrau4m`` (8×512×1024 float32 in keV, 4×2 grid).
DETECTORS: dict[str, DetectorPreset] = _make_presets()


def get_detector(detector: str | DetectorPreset) -> DetectorPreset:
    """Return the preset named ``detector`` (or ``detector`` itself); ConfigError if unknown."""
    if isinstance(detector, DetectorPreset):
        return detector
    try:
        return DETECTORS[str(detector)]
    except KeyError:
        raise ConfigError(
            f"detector: unknown preset {detector!r}; known: {', '.join(sorted(DETECTORS))}"
        ) from None


@dataclass(frozen=True)
class _PixelGeometry:
    lab_y: np.ndarray  # (P, H, W) float32
    lab_x: np.ndarray
    radius_px: np.ndarray  # from the beam centre
    two_sin_theta: np.ndarray  # 2 sin θ: s = 2 sinθ/λ
    solid: np.ndarray  # cos³ 2θ


@lru_cache(maxsize=8)
def _pixel_geometry(det: DetectorPreset) -> _PixelGeometry:
    p, h, w = det.frame_shape
    origins = np.asarray(det.panel_origins, dtype=np.float64)
    yy = np.arange(h, dtype=np.float64)[None, :, None] + origins[:, 0, None, None]
    xx = np.arange(w, dtype=np.float64)[None, None, :] + origins[:, 1, None, None]
    lab_y = np.broadcast_to(yy, (p, h, w))
    lab_x = np.broadcast_to(xx, (p, h, w))
    dy = lab_y - det.beam_center[0]
    dx = lab_x - det.beam_center[1]
    r_px = np.hypot(dy, dx)
    r_m = r_px * det.pixel_size_m
    two_theta = np.arctan2(r_m, det.distance_m)
    out = _PixelGeometry(
        lab_y=np.ascontiguousarray(lab_y, dtype=np.float32),
        lab_x=np.ascontiguousarray(lab_x, dtype=np.float32),
        radius_px=r_px.astype(np.float32),
        two_sin_theta=(2.0 * np.sin(two_theta / 2.0)).astype(np.float32),
        solid=(np.cos(two_theta) ** 3).astype(np.float32),
    )
    for arr in (out.lab_y, out.lab_x, out.radius_px, out.two_sin_theta, out.solid):
        arr.setflags(write=False)
    return out


# --------------------------------------------------------------------------------------------
# Parameters, calibration, truth
# --------------------------------------------------------------------------------------------


def _check_range(name: str, value: tuple[float, float], lo: float = -math.inf, hi: float = math.inf) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a (min, max) pair, got {value!r}") from None
    if not (lo <= a <= b <= hi) or not (math.isfinite(a) and math.isfinite(b)):
        raise ConfigError(f"{name}: need {lo} <= min <= max <= {hi}, got {value!r}")
    return (a, b)


@dataclass(frozen=True)
class SimulationParams:
    """What the simulator draws per frame. Ranges are ``(min, max)``, sampled uniformly unless said.

    Attributes:
        photon_energy_ev: photon energy per frame, eV.
        blank_fraction: probability that a frame has no crystal (background only).
        cell_length_a: unit-cell edges, Å.
        d_min_a: crystal resolution limit, Å (no reflection beyond it).
        excitation_width: ``w`` of the partiality profile ``exp(-ε²/2w²)``, Å⁻¹.
        min_partiality: reflections with a smaller partiality are not rendered.
        spot_photons: full-reflection integrated photons, log-uniform per reflection.
        crystal_scale: per-frame brightness multiplier, log-uniform.
        wilson_b: per-frame B factor (Å²): intensity × ``exp(-B s²/2)``.
        spot_sigma_px: per-frame spot sigma (px), ±10 % per spot.
        background_photons: flat diffuse background per pixel (photons, × cos³2θ).
        water_ring_photons: water-ring peak height per pixel (photons).
        gain_jitter: relative std of the per-panel gain (fixed per dataset).
        read_noise_photons: Gaussian read noise std, in photons.
        bad_pixel_fraction: fraction of bad pixels (half hot, half dead; fixed per dataset).
        detect_snr: a spot is ``detectable`` when ``peak/sqrt(bg+1) >= detect_snr`` (photons).
    """

    photon_energy_ev: tuple[float, float] = (6000.0, 12000.0)
    blank_fraction: float = 0.1
    cell_length_a: tuple[float, float] = (30.0, 120.0)
    d_min_a: tuple[float, float] = (1.8, 3.5)
    excitation_width: tuple[float, float] = (3e-4, 1.2e-3)
    min_partiality: float = 0.05
    spot_photons: tuple[float, float] = (20.0, 3.0e5)
    crystal_scale: tuple[float, float] = (0.3, 3.0)
    wilson_b: tuple[float, float] = (5.0, 25.0)
    spot_sigma_px: tuple[float, float] = (0.8, 1.5)
    background_photons: tuple[float, float] = (0.5, 8.0)
    water_ring_photons: tuple[float, float] = (2.0, 30.0)
    gain_jitter: float = 0.05
    read_noise_photons: float = 0.1
    bad_pixel_fraction: float = 2e-4
    detect_snr: float = 6.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "photon_energy_ev", _check_range("photon_energy_ev", self.photon_energy_ev, 1000.0, 100000.0))
        set_(self, "cell_length_a", _check_range("cell_length_a", self.cell_length_a, 2.0, 1000.0))
        set_(self, "d_min_a", _check_range("d_min_a", self.d_min_a, 0.3, 100.0))
        set_(self, "excitation_width", _check_range("excitation_width", self.excitation_width, 1e-7, 0.1))
        set_(self, "spot_photons", _check_range("spot_photons", self.spot_photons, 1e-6))
        set_(self, "crystal_scale", _check_range("crystal_scale", self.crystal_scale, 1e-6))
        set_(self, "wilson_b", _check_range("wilson_b", self.wilson_b, 0.0, 1000.0))
        set_(self, "spot_sigma_px", _check_range("spot_sigma_px", self.spot_sigma_px, 0.3, _RENDER_RADIUS / 4.0 / 1.1))
        set_(self, "background_photons", _check_range("background_photons", self.background_photons, 0.0))
        set_(self, "water_ring_photons", _check_range("water_ring_photons", self.water_ring_photons, 0.0))
        for name, lo, hi in (
            ("blank_fraction", 0.0, 1.0),
            ("min_partiality", 0.0, 1.0),
            ("gain_jitter", 0.0, 0.5),
            ("read_noise_photons", 0.0, 100.0),
            ("bad_pixel_fraction", 0.0, 0.1),
            ("detect_snr", 0.0, 1e6),
        ):
            value = getattr(self, name)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: expected a number, got {value!r}") from None
            if not (lo <= value <= hi):
                raise ConfigError(f"{name}: must be in [{lo}, {hi}], got {value!r}")
            set_(self, name, value)

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class DetectorCalibration:
    """The fixed (per dataset) detector response: ``gain`` ``(P,)`` relative per-panel gain,
    ``hot`` and ``dead`` ``(P, H, W)`` bool pixel maps."""

    gain: np.ndarray
    hot: np.ndarray
    dead: np.ndarray

    @property
    def bad_pixels(self) -> np.ndarray:
        """``(P, H, W)`` bool, True for hot or dead pixels."""
        return self.hot | self.dead


def draw_calibration(
    rng: np.random.Generator, detector: str | DetectorPreset, params: SimulationParams | None = None
) -> DetectorCalibration:
    """Draw per-panel gains and hot/dead pixels for ``detector``."""
    det = get_detector(detector)
    params = params or SimulationParams()
    shape = det.frame_shape
    gain = np.clip(rng.normal(1.0, params.gain_jitter, size=shape[0]), 0.5, 1.5)
    u = rng.random(shape, dtype=np.float32)
    half = params.bad_pixel_fraction / 2.0
    hot = u < half
    dead = (u >= half) & (u < 2.0 * half)
    return DetectorCalibration(gain=gain, hot=hot, dead=dead)


@dataclass
class TruthTable:
    """Ground-truth spots of one frame (one row per rendered spot).

    ``panel`` uint16; ``y``/``x`` float64 panel-local centre (pixel centre at the integer);
    ``intensity`` float32, noiseless integrated signal on the panel in frame units; ``sigma``
    float64 Gaussian width (px); ``snr`` float32 (see the module docstring); ``detectable`` bool.
    ``photon_energy_ev`` is the frame's photon energy; ``blank`` whether the frame had no crystal.
    """

    panel: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))
    y: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    x: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    intensity: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    sigma: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    snr: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    detectable: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    photon_energy_ev: float = float("nan")
    blank: bool = False

    _DTYPES = {
        "panel": np.uint16,
        "y": np.float64,
        "x": np.float64,
        "intensity": np.float32,
        "sigma": np.float64,
        "snr": np.float32,
        "detectable": bool,
    }

    def __post_init__(self) -> None:
        for name, dtype in self._DTYPES.items():
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=dtype))
        n = self.panel.shape[0]
        for name in self._DTYPES:
            if getattr(self, name).shape != (n,):
                raise ValueError(f"TruthTable.{name} has shape {getattr(self, name).shape}, expected ({n},)")
        self.photon_energy_ev = float(self.photon_energy_ev)
        self.blank = bool(self.blank)

    @property
    def n(self) -> int:
        return int(self.panel.shape[0])

    def __len__(self) -> int:
        return self.n

    def subset(self, keep: np.ndarray) -> TruthTable:
        """The rows selected by ``keep`` (bool mask or indices)."""
        return TruthTable(
            **{name: getattr(self, name)[keep] for name in self._DTYPES},
            photon_energy_ev=self.photon_energy_ev,
            blank=self.blank,
        )

    def detectable_only(self) -> TruthTable:
        return self.subset(self.detectable)

    def as_peak_table(self, *, detectable_only: bool = True) -> PeakTable:
        """The (detectable) spots as a :class:`PeakTable` (``npix`` = 0, ``centroid="truth"``)."""
        t = self.detectable_only() if detectable_only else self
        return PeakTable(
            panel=t.panel, y=t.y, x=t.x, intensity=t.intensity, npix=np.zeros(t.n, np.uint32), centroid="truth"
        )


# --------------------------------------------------------------------------------------------
# Crystal and diffraction geometry
# --------------------------------------------------------------------------------------------


def _random_cell(rng: np.random.Generator, params: SimulationParams) -> np.ndarray:
    """Real-space basis, rows ``a, b, c`` (Å)."""
    lo, hi = params.cell_length_a
    a, b, c = np.exp(rng.uniform(math.log(lo), math.log(hi), size=3))
    kind = rng.choice(3, p=[0.5, 0.25, 0.25])
    jitter = rng.normal(0.0, 1.0, size=3)
    if kind == 0:  # near-orthorhombic
        al, be, ga = 90.0 + jitter
    elif kind == 1:  # monoclinic
        al, ga = 90.0 + jitter[:2]
        be = rng.uniform(92.0, 118.0)
    else:  # hexagonal-ish
        b = a
        al, be = 90.0 + jitter[:2]
        ga = 120.0 + jitter[2]
    al, be, ga = np.radians([al, be, ga])
    av = np.array([a, 0.0, 0.0])
    bv = np.array([b * math.cos(ga), b * math.sin(ga), 0.0])
    cx = c * math.cos(be)
    cy = c * (math.cos(al) - math.cos(be) * math.cos(ga)) / math.sin(ga)
    cz = math.sqrt(max(c * c - cx * cx - cy * cy, 1e-6))
    return np.array([av, bv, [cx, cy, cz]])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _reflections_near_ewald(
    recip: np.ndarray, wavelength: float, s_max: float, tol: float
) -> np.ndarray:
    """Integer hkl ``(N, 3)`` with ``|g| <= s_max`` and ``||k_in+g| - 1/λ| <= tol``.

    ``recip`` rows are the lab-frame reciprocal vectors. The index along the longest real axis
    (shortest reciprocal vector) is solved from the Ewald condition on a grid of the other two.
    """
    lengths = np.linalg.norm(recip, axis=1)
    inner = int(np.argmin(lengths))  # most indices along it: solve for it
    outer = [i for i in range(3) if i != inner]
    # |h_i| <= |g| |a_i| = s_max / (a*_i projected) ... bound via real-space length = 1/(recip dual)
    real = np.linalg.inv(recip).T  # rows: real-space vectors (g·a_i = h_i)
    hmax = [int(math.floor(s_max * np.linalg.norm(real[i]))) for i in range(3)]
    h0 = np.arange(-hmax[outer[0]], hmax[outer[0]] + 1)
    h1 = np.arange(-hmax[outer[1]], hmax[outer[1]] + 1)
    g0, g1 = np.meshgrid(h0, h1, indexing="ij")
    g0 = g0.ravel()
    g1 = g1.ravel()
    k = 1.0 / wavelength
    p0 = g0[:, None] * recip[outer[0]] + g1[:, None] * recip[outer[1]]
    p0[:, 2] += k  # k_in + G0
    u = recip[inner]
    qa = float(u @ u)
    qb = 2.0 * (p0 @ u)
    pp = np.einsum("ij,ij->i", p0, p0)

    def roots(r: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        disc = qb * qb - 4.0 * qa * (pp - r * r)
        ok = disc >= 0
        sq = np.sqrt(np.where(ok, disc, 0.0))
        return ok, (-qb - sq) / (2 * qa), (-qb + sq) / (2 * qa)

    ok_o, lo_o, hi_o = roots(k + tol)
    ok_i, lo_i, hi_i = roots(max(k - tol, 0.0))
    lmax = hmax[inner]
    # Segments of l: [lo_o, lo_i] and [hi_i, hi_o] if the inner sphere is hit, else [lo_o, hi_o].
    seg_lo = np.concatenate([lo_o, np.where(ok_i, hi_i, np.inf)])
    seg_hi = np.concatenate([np.where(ok_i, lo_i, hi_o), hi_o])
    seg_ok = np.concatenate([ok_o, ok_o & ok_i])
    base = np.concatenate([np.arange(g0.size)] * 2)
    l_start = np.ceil(np.clip(seg_lo, -lmax - 1, lmax + 1)).astype(np.int64)
    l_stop = np.floor(np.clip(seg_hi, -lmax - 1, lmax + 1)).astype(np.int64)
    count = np.where(seg_ok, np.clip(l_stop - l_start + 1, 0, 2 * lmax + 1), 0)
    if count.sum() == 0:
        return np.zeros((0, 3), np.int64)
    idx = np.repeat(np.arange(count.size), count)
    offs = np.arange(idx.size) - np.repeat(np.cumsum(count) - count, count)
    lvals = l_start[idx] + offs
    hkl = np.empty((idx.size, 3), np.int64)
    hkl[:, outer[0]] = g0[base[idx]]
    hkl[:, outer[1]] = g1[base[idx]]
    hkl[:, inner] = lvals
    hkl = hkl[np.any(hkl != 0, axis=1)]
    return hkl


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _spot_windows(
    y: np.ndarray, x: np.ndarray, sigma: np.ndarray, panel_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-integrated unit Gaussians in a ``(2R+1)²`` window around each centre.

    Returns ``(rows (S,K), cols (S,K), weights (S,K,K), inside (S,K,K))``; ``weights`` sum to ~1
    over the full window; ``inside`` marks window pixels that lie on the panel.
    """
    r = _RENDER_RADIUS
    offs = np.arange(-r, r + 1)
    rows = np.rint(y).astype(np.int64)[:, None] + offs[None, :]
    cols = np.rint(x).astype(np.int64)[:, None] + offs[None, :]
    s2 = (np.sqrt(2.0) * sigma)[:, None]

    def profile(idx: np.ndarray, centre: np.ndarray) -> np.ndarray:
        edges = np.concatenate([idx - 0.5, idx[:, -1:] + 0.5], axis=1) - centre[:, None]
        cdf = erf(edges / s2)
        return 0.5 * np.diff(cdf, axis=1)

    fy = profile(rows, y)
    fx = profile(cols, x)
    weights = fy[:, :, None] * fx[:, None, :]
    h, w = panel_shape
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    return rows, cols, weights, inside


def _render_spots(
    shape: tuple[int, int, int],
    panel: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    sigma: np.ndarray,
    photons: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Noiseless spot image (flat, float64) plus per spot: on-panel sum, peak value, peak flat index."""
    p, h, w = shape
    rows, cols, weights, inside = _spot_windows(y, x, sigma, (h, w))
    vals = weights * photons[:, None, None] * inside
    flat = (panel.astype(np.int64)[:, None, None] * h + np.clip(rows, 0, h - 1)[:, :, None]) * w + np.clip(
        cols, 0, w - 1
    )[:, None, :]
    image = np.bincount(flat.ravel(), weights=vals.ravel(), minlength=p * h * w)
    sums = vals.reshape(len(y), -1).sum(axis=1)
    arg = vals.reshape(len(y), -1).argmax(axis=1)
    peak = vals.reshape(len(y), -1)[np.arange(len(y)), arg]
    peak_idx = flat.reshape(len(y), -1)[np.arange(len(y)), arg]
    return image, sums, peak, peak_idx


def spot_label_mask(
    frame_shape: tuple[int, int, int],
    truth: TruthTable,
    fraction: float = 0.3,
    *,
    detectable_only: bool = True,
) -> np.ndarray:
    """Training labels ``(P, H, W)`` bool: pixels where a spot's noiseless value ≥ ``fraction`` × its peak.

    Each spot is re-rendered from its truth row with the simulator's own renderer, so labels are
    exactly the thresholded noiseless spot image (no per-frame image needs to be stored). With
    ``detectable_only`` (default) only detectable spots are labelled: undetectable ones look like
    noise and would teach a network to hallucinate. Overlapping spots: the union of their labels.
    """
    if not (0.0 < fraction <= 1.0):
        raise ConfigError(f"fraction: must be in (0, 1], got {fraction!r}")
    shape = tuple(int(v) for v in frame_shape)
    if len(shape) != 3:
        raise FrameError(f"frame_shape must be (P, H, W), got {frame_shape!r}")
    p, h, w = shape
    t = truth.detectable_only() if detectable_only else truth
    mask = np.zeros(p * h * w, bool)
    if t.n == 0:
        return mask.reshape(shape)
    if int(t.panel.max()) >= p:
        raise FrameError(f"truth has panel {int(t.panel.max())} but frame_shape has {p} panels")
    rows, cols, weights, inside = _spot_windows(t.y, t.x, t.sigma, (h, w))
    vals = weights * inside
    peak = vals.reshape(t.n, -1).max(axis=1)
    on = inside & (vals >= fraction * peak[:, None, None]) & (vals > 0)
    flat = (t.panel.astype(np.int64)[:, None, None] * h + np.clip(rows, 0, h - 1)[:, :, None]) * w + np.clip(
        cols, 0, w - 1
    )[:, None, :]
    mask[flat[on]] = True
    return mask.reshape(shape)


# --------------------------------------------------------------------------------------------
# Frames and datasets
# --------------------------------------------------------------------------------------------


def simulate_frame(
    rng: np.random.Generator,
    detector: str | DetectorPreset = "single",
    params: SimulationParams | None = None,
    *,
    calibration: DetectorCalibration | None = None,
    blank: bool | None = None,
) -> tuple[np.ndarray, TruthTable]:
    """Simulate one still shot.

    Args:
        rng: the random generator (all randomness comes from it).
        detector: a preset name from :data:`DETECTORS` or a :class:`DetectorPreset`.
        params: what to draw; default :class:`SimulationParams()`.
        calibration: fixed panel gains and hot/dead pixels (drawn from ``rng`` when None;
            :func:`simulate_dataset` draws one per dataset).
        blank: force (True) or forbid (False) a blank frame; None draws with ``blank_fraction``.

    Returns:
        ``(frame, truth)``: ``frame`` is ``(P, H, W)`` in ``detector.dtype``; ``truth`` a
        :class:`TruthTable` (photon energy included).
    """
    det = get_detector(detector)
    params = params or SimulationParams()
    geo = _pixel_geometry(det)
    shape = det.frame_shape
    p, h, w = shape
    if calibration is None:
        calibration = draw_calibration(rng, det, params)

    energy = float(rng.uniform(*params.photon_energy_ev))
    wavelength = photon_energy_to_wavelength(energy)
    if blank is None:
        blank = bool(rng.random() < params.blank_fraction)

    # ---- background (photons per pixel) ----
    s = geo.two_sin_theta / np.float32(wavelength)
    bg_flat = rng.uniform(*params.background_photons)
    ring = rng.uniform(*params.water_ring_photons)
    background = geo.solid * (
        np.float32(bg_flat) + np.float32(ring) * np.exp(-0.5 * ((s - _WATER_RING_S) / _WATER_RING_WIDTH) ** 2)
    )
    background = background.reshape(-1)

    # ---- crystal ----
    panel = np.zeros(0, np.int64)
    ys = xs = sig = photons = np.zeros(0)
    if not blank:
        cell = _random_cell(rng, params)
        rot = _random_rotation(rng)
        recip = (np.linalg.inv(cell).T) @ rot.T  # rows: a*, b*, c* in the lab
        d_min = rng.uniform(*params.d_min_a)
        width = rng.uniform(*params.excitation_width)
        k = 1.0 / wavelength
        s_max = min(1.0 / d_min, 2.0 * k)
        hkl = _reflections_near_ewald(recip, wavelength, s_max, 3.0 * width)
        g = hkl.astype(np.float64) @ recip
        gnorm = np.linalg.norm(g, axis=1)
        kout = g.copy()
        kout[:, 2] += k
        eps = np.linalg.norm(kout, axis=1) - k
        part = np.exp(-0.5 * (eps / width) ** 2)
        keep = (gnorm <= s_max) & (part >= params.min_partiality) & (kout[:, 2] > 1e-9)
        g, gnorm, kout, part = g[keep], gnorm[keep], kout[keep], part[keep]
        # projection onto the detector plane
        scale = det.distance_m / det.pixel_size_m / kout[:, 2]
        lab_x = det.beam_center[1] + kout[:, 0] * scale
        lab_y = det.beam_center[0] + kout[:, 1] * scale
        origins = np.asarray(det.panel_origins)
        py = lab_y[:, None] - origins[None, :, 0]
        px = lab_x[:, None] - origins[None, :, 1]
        on = (py >= -0.5) & (py < h - 0.5) & (px >= -0.5) & (px < w - 0.5)
        hit = on.any(axis=1)
        which = on.argmax(axis=1)
        n_refl = int(hit.sum())
        # draw per-reflection randoms for all kept reflections (keeps streams aligned)
        lo, hi = params.spot_photons
        i0 = np.exp(rng.uniform(math.log(lo), math.log(hi), size=len(part)))
        scale_c = math.exp(rng.uniform(*np.log(params.crystal_scale)))
        b_fac = rng.uniform(*params.wilson_b)
        sig_f = rng.uniform(*params.spot_sigma_px)
        sig_all = sig_f * rng.uniform(0.9, 1.1, size=len(part))
        intensity = i0 * scale_c * part * np.exp(-0.5 * b_fac * gnorm**2)
        if n_refl:
            panel = which[hit]
            ys = py[hit, panel]
            xs = px[hit, panel]
            sig = sig_all[hit]
            photons = intensity[hit]

    n = len(panel)
    expected = background.astype(np.float64)
    if n:
        spot_img, sums, peak, peak_idx = _render_spots(shape, panel, ys, xs, sig, photons)
        expected += spot_img
    else:
        sums = peak = np.zeros(0)
        peak_idx = np.zeros(0, np.int64)

    # ---- detector response ----
    counts = rng.poisson(expected).astype(np.float32)
    gain_e = det.gain(energy)
    panel_gain = (calibration.gain * gain_e).astype(np.float32)
    adu = counts.reshape(shape) * panel_gain[:, None, None]
    if params.read_noise_photons > 0:
        noise = rng.standard_normal(size=shape, dtype=np.float32)
        adu += noise * (np.float32(params.read_noise_photons) * panel_gain[:, None, None])
    sat = np.float32(det.saturation_adu)
    np.minimum(adu, sat, out=adu)
    adu[calibration.hot] = sat
    adu[calibration.dead] = 0.0
    dtype = np.dtype(det.dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        np.rint(adu, out=adu)
        np.clip(adu, max(info.min, 0), min(info.max, sat), out=adu)
        frame = adu.astype(dtype)
    else:
        frame = adu.astype(dtype, copy=False)

    # ---- truth ----
    if n:
        bg_at_peak = background[peak_idx]
        snr = peak / np.sqrt(bg_at_peak + 1.0)
        bad_flat = calibration.bad_pixels.reshape(-1)
        detectable = (snr >= params.detect_snr) & ~bad_flat[peak_idx]
        truth = TruthTable(
            panel=panel,
            y=ys,
            x=xs,
            intensity=sums * panel_gain[panel],
            sigma=sig,
            snr=snr,
            detectable=detectable,
            photon_energy_ev=energy,
            blank=blank,
        )
    else:
        truth = TruthTable(photon_energy_ev=energy, blank=blank)
    return frame, truth


@dataclass
class SimulatedDataset:
    """Frames ``(F, P, H, W)`` with their truth, photon energies (eV) and the fixed calibration."""

    frames: np.ndarray
    truths: list[TruthTable]
    photon_energy_ev: np.ndarray
    detector: str
    seed: int
    params: SimulationParams
    bad_pixel_mask: np.ndarray

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def panel_shape(self) -> tuple[int, int]:
        return (int(self.frames.shape[2]), int(self.frames.shape[3]))

    def __len__(self) -> int:
        return self.n_frames


def simulate_dataset(
    n_frames: int,
    *,
    detector: str | DetectorPreset = "single",
    seed: int = 0,
    params: SimulationParams | None = None,
    progress: bool = True,
) -> SimulatedDataset:
    """Simulate ``n_frames`` frames. Deterministic in ``seed``; frame ``i`` does not depend on
    ``n_frames`` (each frame has its own spawned stream; the calibration has another)."""
    n_frames = int(n_frames)
    if n_frames < 1:
        raise ConfigError(f"n_frames: must be >= 1, got {n_frames}")
    det = get_detector(detector)
    params = params or SimulationParams()
    streams = np.random.SeedSequence(int(seed)).spawn(n_frames + 1)
    calibration = draw_calibration(np.random.default_rng(streams[0]), det, params)
    frames = np.empty((n_frames,) + det.frame_shape, dtype=np.dtype(det.dtype))
    truths: list[TruthTable] = []
    iterator = range(n_frames)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"simulate {det.name}", unit="frame", disable=n_frames < 2)
    for i in iterator:
        frame, truth = simulate_frame(np.random.default_rng(streams[i + 1]), det, params, calibration=calibration)
        frames[i] = frame
        truths.append(truth)
    return SimulatedDataset(
        frames=frames,
        truths=truths,
        photon_energy_ev=np.array([t.photon_energy_ev for t in truths], np.float64),
        detector=det.name,
        seed=int(seed),
        params=params,
        bad_pixel_mask=calibration.bad_pixels,
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

_TRUTH_FIELDS = ("panel", "y", "x", "intensity", "sigma", "snr", "detectable")


def save_dataset(ds: SimulatedDataset, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``out_dir/frames.npy`` and ``out_dir/truth.h5``; return ``out_dir``.

    ``frames.npy`` holds the stacked 2-D slabs ``(F, P*H, W)`` in the detector's dtype (replay it
    with ``pvapy-ad-sim-server -if frames.npy``). ``truth.h5`` layout:

    - attrs: ``detector`` (name), ``seed``, ``panel_shape`` ``[H, W]``, ``n_panels``,
      ``n_frames``, ``params`` (JSON of :class:`SimulationParams`), ``detect_rule``.
    - ``photon_energy_ev`` ``(F,)`` float64, ``blank`` ``(F,)`` bool, ``n_spots`` ``(F,)`` int64,
      ``bad_pixel_mask`` ``(P, H, W)`` uint8.
    - ``spots/{frame,panel,y,x,intensity,sigma,snr,detectable}``: all frames' spots concatenated in
      frame order (frame ``i`` owns rows ``cumsum(n_spots)[i-1] : cumsum(n_spots)[i]``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    f, p, h, w = ds.frames.shape
    np.save(out / "frames.npy", np.ascontiguousarray(ds.frames).reshape(f, p * h, w))
    n_spots = np.array([t.n for t in ds.truths], np.int64)
    tmp = out / "truth.h5.inprogress"
    with h5py.File(tmp, "w") as h5:
        h5.attrs["detector"] = ds.detector
        h5.attrs["seed"] = int(ds.seed)
        h5.attrs["panel_shape"] = np.array([h, w], np.int64)
        h5.attrs["n_panels"] = int(p)
        h5.attrs["n_frames"] = int(f)
        h5.attrs["params"] = json.dumps(ds.params.as_dict())
        h5.attrs["detect_rule"] = "peak_photons / sqrt(background_photons + 1) >= detect_snr and peak pixel not bad"
        h5["photon_energy_ev"] = np.asarray(ds.photon_energy_ev, np.float64)
        h5["blank"] = np.array([t.blank for t in ds.truths], bool)
        h5["n_spots"] = n_spots
        h5["bad_pixel_mask"] = ds.bad_pixel_mask.astype(np.uint8)
        grp = h5.create_group("spots")
        grp["frame"] = np.repeat(np.arange(f, dtype=np.int64), n_spots)
        for name in _TRUTH_FIELDS:
            dtype = TruthTable._DTYPES[name]
            parts = [getattr(t, name) for t in ds.truths]
            grp[name] = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
    os.replace(tmp, out / "truth.h5")
    return out


def load_dataset(path: str | os.PathLike[str], *, mmap: bool = False) -> SimulatedDataset:
    """Read a dataset written by :func:`save_dataset` (``path`` = its folder or its truth.h5).

    ``mmap=True`` memory-maps ``frames.npy`` read-only instead of loading it.
    """
    path = Path(path)
    folder = path.parent if path.suffix == ".h5" else path
    truth_path = folder / "truth.h5"
    frames_path = folder / "frames.npy"
    for required in (truth_path, frames_path):
        if not required.is_file():
            raise FileNotFoundError(f"simulated dataset: missing {required}")
    with h5py.File(truth_path, "r") as h5:
        detector = str(h5.attrs["detector"])
        seed = int(h5.attrs["seed"])
        h, w = (int(v) for v in h5.attrs["panel_shape"])
        raw_params = json.loads(h5.attrs["params"])
        energy = h5["photon_energy_ev"][()]
        blank = h5["blank"][()]
        n_spots = h5["n_spots"][()]
        bad = h5["bad_pixel_mask"][()].astype(bool)
        cols = {name: h5["spots"][name][()] for name in _TRUTH_FIELDS}
    params = SimulationParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw_params.items()})
    frames = np.load(frames_path, mmap_mode="r" if mmap else None)
    if frames.ndim != 3 or frames.shape[2] != w or frames.shape[1] % h:
        raise FrameError(f"{frames_path}: shape {frames.shape} is not (F, P*{h}, {w})")
    frames = frames.reshape(frames.shape[0], frames.shape[1] // h, h, w)
    if frames.shape[0] != len(n_spots):
        raise FrameError(f"{frames_path}: {frames.shape[0]} frames but truth.h5 has {len(n_spots)}")
    ends = np.cumsum(n_spots)
    truths = []
    for i, (start, stop) in enumerate(zip(ends - n_spots, ends)):
        truths.append(
            TruthTable(
                **{name: col[start:stop] for name, col in cols.items()},
                photon_energy_ev=float(energy[i]),
                blank=bool(blank[i]),
            )
        )
    return SimulatedDataset(
        frames=frames,
        truths=truths,
        photon_energy_ev=np.asarray(energy, np.float64),
        detector=detector,
        seed=seed,
        params=params,
        bad_pixel_mask=bad,
    )
