"""CrystFEL detector geometry (``.geom``) for our slab layout, and slab coordinate clamping.

Two coordinate systems meet here (see ``man crystfel_geometry``):

* **data (file) coordinates**: ``ss`` (slow scan, rows) and ``fs`` (fast scan, columns) in the
  2-D slab ``(P*H, W)`` that the CXI file stores per frame. Panel ``p`` owns the inclusive
  ranges ``min_ss..max_ss`` / ``min_fs..max_fs``.
* **lab coordinates**: ``x``/``y`` in pixels (CrystFEL: +z along the beam, +y up), where each
  panel's first corner sits at ``corner_x, corner_y`` and its fs/ss axes point along the lab
  vectors ``fs``/``ss``.

Our peaks are panel-local ``(panel, y, x)`` with the pixel centre at the integer (the CXI/Cheetah
convention); CrystFEL adds 0.5 to every peak it reads from a CXI peak list and then looks up the
panel with ``min <= v + 0.5 < max + 1``. :func:`panel_to_slab` clamps slab coordinates to
``min - 0.5 <= v < max + 0.5`` so that a peak centroid sitting on the outer half of an edge pixel
is still given to its own panel rather than dropped or handed to the neighbour.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, FrameError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RES",
    "DetectorGeometry",
    "PanelGeometry",
    "panel_to_slab",
    "read_geometry",
    "slab_bounds",
    "write_geometry",
]

#: Default resolution in pixels per metre (75 um pixels, e.g. Jungfrau/ePix10k).
DEFAULT_RES: float = 1.0 / 75e-6

#: Where our CXI files keep things (DESIGN 2.4); the defaults of a generated geometry.
CXI_DATA_PATH = "/entry_1/data_1/data"
CXI_PEAK_LIST = "/entry_1/result_1"
CXI_PHOTON_ENERGY_PATH = "/LCLS/photon_energy_eV"

Vector = tuple[float, float, float]

_PANEL_INT_KEYS = ("min_fs", "max_fs", "min_ss", "max_ss")
# Names CrystFEL reserves for things that look like panels but are not (bad regions, groups).
_RESERVED_PREFIXES = ("bad", "group", "rigid_group")
_VECTOR_TERM = re.compile(r"([+-]?)\s*((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)?\s*([xyz])")


@dataclass(frozen=True)
class PanelGeometry:
    """One panel: where its pixels are in the slab, and where the slab pixels are in the lab.

    ``min_ss..max_ss`` and ``min_fs..max_fs`` are inclusive slab ranges (CrystFEL convention).
    ``corner_x``/``corner_y`` are the lab position (pixels) of the panel's first corner (the corner
    of pixel (0, 0), not its centre). ``fs``/``ss`` are the lab vectors ``(x, y, z)`` of one step
    along fast/slow scan, in pixels. ``res`` (pixels per metre) and ``coffset`` (metres) override
    the global values when set; ``extra`` keeps any other ``name/key = value`` lines verbatim.
    """

    name: str
    min_ss: int
    max_ss: int
    min_fs: int
    max_fs: int
    corner_x: float
    corner_y: float
    fs: Vector = (1.0, 0.0, 0.0)
    ss: Vector = (0.0, 1.0, 0.0)
    res: float | None = None
    coffset: float | None = None
    extra: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "=" in self.name or any(c.isspace() for c in self.name):
            raise ConfigError(f"invalid panel name {self.name!r}")
        if self.name.startswith(_RESERVED_PREFIXES):
            raise ConfigError(f"panel name {self.name!r} starts with a name CrystFEL reserves (bad/group)")
        for key in _PANEL_INT_KEYS:
            value = getattr(self, key)
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"panel {self.name}: {key} must be an integer, got {value!r}")
            object.__setattr__(self, key, int(value))
        if self.min_ss < 0 or self.min_fs < 0 or self.max_ss < self.min_ss or self.max_fs < self.min_fs:
            raise ConfigError(
                f"panel {self.name}: invalid slab ranges ss {self.min_ss}..{self.max_ss}, "
                f"fs {self.min_fs}..{self.max_fs}"
            )
        for key in ("fs", "ss"):
            vec = tuple(float(v) for v in getattr(self, key))
            if len(vec) == 2:
                vec = vec + (0.0,)
            if len(vec) != 3 or not all(math.isfinite(v) for v in vec) or not any(vec):
                raise ConfigError(f"panel {self.name}: {key} must be a non-zero (x, y, z) vector, got {vec!r}")
            object.__setattr__(self, key, vec)
        object.__setattr__(self, "corner_x", float(self.corner_x))
        object.__setattr__(self, "corner_y", float(self.corner_y))
        object.__setattr__(self, "extra", dict(self.extra))

    @property
    def height(self) -> int:
        """Rows (slow scan) in the panel."""
        return self.max_ss - self.min_ss + 1

    @property
    def width(self) -> int:
        """Columns (fast scan) in the panel."""
        return self.max_fs - self.min_fs + 1

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the panel."""
        return (self.height, self.width)


@dataclass(frozen=True)
class DetectorGeometry:
    """A detector as CrystFEL sees it: panels in the slab plus the global keys we care about.

    ``clen`` is the camera length in metres, or a data location string (e.g.
    ``"/LCLS/detector_1/EncoderValue mm"``) kept verbatim. ``photon_energy`` is a literal in eV or
    a data location (default: the per-frame ``/LCLS/photon_energy_eV`` our CXI files carry).
    ``res`` is pixels per metre (1 / pixel size). ``dims`` are ``dim0, dim1, ...`` in order
    (``("%", "ss", "fs")``: frames, then the slab). ``extra`` keeps other global lines (and bad
    regions / groups) verbatim so a real-world file survives a read/write round trip.
    """

    panels: tuple[PanelGeometry, ...]
    clen: float | str | None = 0.1
    res: float | None = DEFAULT_RES
    photon_energy: float | str | None = CXI_PHOTON_ENERGY_PATH
    adu_per_photon: float | None = 1.0
    adu_per_ev: float | None = None
    data: str | None = CXI_DATA_PATH
    dims: tuple[str, ...] = ("%", "ss", "fs")
    peak_list: str | None = CXI_PEAK_LIST
    peak_list_type: str | None = "cxi"
    extra: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        panels = tuple(self.panels)
        if not panels:
            raise ConfigError("a detector geometry needs at least one panel")
        names = [p.name for p in panels]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate panel names in geometry: {names}")
        object.__setattr__(self, "panels", panels)
        object.__setattr__(self, "dims", tuple(str(d) for d in self.dims))
        object.__setattr__(self, "extra", dict(self.extra))
        for key in ("clen", "res", "photon_energy", "adu_per_photon", "adu_per_ev"):
            value = getattr(self, key)
            if isinstance(value, bool):
                raise ConfigError(f"geometry {key} must be a number, got {value!r}")
            if isinstance(value, (int, float, np.integer, np.floating)):
                object.__setattr__(self, key, float(value))
        if self.adu_per_photon is not None and self.adu_per_ev is not None:
            raise ConfigError("give only one of adu_per_photon and adu_per_eV")

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def stacked(
        cls,
        n_panels: int,
        panel_shape: tuple[int, int],
        *,
        clen_m: float = 0.1,
        res: float = DEFAULT_RES,
        photon_energy_ev: float | None = None,
        gap_px: float = 10.0,
        adu_per_photon: float = 1.0,
    ) -> DetectorGeometry:
        """Our default layout: ``n_panels`` panels ``p0..`` of ``panel_shape = (H, W)``.

        In the slab, panel ``p`` owns rows ``p*H .. p*H+H-1`` (the ``(P*H, W)`` slab DESIGN 2.1/2.4
        use). In the lab they are stacked along +y in the same order with ``gap_px`` pixels between
        them, ``fs = +x``, ``ss = +y``, and the beam (x = y = 0) in the middle of the stack.
        ``photon_energy_ev=None`` makes CrystFEL read the per-frame energy from the CXI file.
        """
        n_panels = int(n_panels)
        if n_panels <= 0:
            raise ConfigError(f"n_panels must be > 0, got {n_panels}")
        try:
            h, w = (int(v) for v in panel_shape)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"panel_shape must be (H, W), got {panel_shape!r}") from exc
        if h <= 0 or w <= 0:
            raise ConfigError(f"panel_shape must be (H, W) with H, W > 0, got {panel_shape!r}")
        if not (clen_m > 0 and res > 0 and gap_px >= 0):
            raise ConfigError(f"need clen_m > 0, res > 0, gap_px >= 0 (got {clen_m}, {res}, {gap_px})")
        if photon_energy_ev is not None and not (math.isfinite(photon_energy_ev) and photon_energy_ev > 0):
            raise ConfigError(f"photon_energy_ev must be > 0 eV, got {photon_energy_ev!r}")
        total_h = n_panels * h + (n_panels - 1) * gap_px
        panels = tuple(
            PanelGeometry(
                name=f"p{i}",
                min_ss=i * h,
                max_ss=(i + 1) * h - 1,
                min_fs=0,
                max_fs=w - 1,
                corner_x=-w / 2.0,
                corner_y=-total_h / 2.0 + i * (h + gap_px),
            )
            for i in range(n_panels)
        )
        return cls(
            panels=panels,
            clen=float(clen_m),
            res=float(res),
            photon_energy=CXI_PHOTON_ENERGY_PATH if photon_energy_ev is None else float(photon_energy_ev),
            adu_per_photon=float(adu_per_photon),
        )

    # -- queries -----------------------------------------------------------------------------

    @property
    def n_panels(self) -> int:
        return len(self.panels)

    @property
    def slab_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the smallest slab holding every panel."""
        return (max(p.max_ss for p in self.panels) + 1, max(p.max_fs for p in self.panels) + 1)

    @property
    def panel_shape(self) -> tuple[int, int] | None:
        """The common ``(H, W)`` of all panels, or None if they differ."""
        shapes = {p.shape for p in self.panels}
        return shapes.pop() if len(shapes) == 1 else None

    @property
    def clen_m(self) -> float | None:
        """Camera length in metres if it is a literal, else None (read per frame by CrystFEL)."""
        return self.clen if isinstance(self.clen, float) else None

    def panel_index(self, name: str) -> int:
        """Index of the panel called ``name`` (its position in ``panels``)."""
        for i, p in enumerate(self.panels):
            if p.name == name:
                return i
        raise ConfigError(f"no panel named {name!r} in geometry (panels: {[p.name for p in self.panels]})")

    def is_stacked_slab(self, panel_shape: tuple[int, int]) -> bool:
        """True if panel ``i`` is rows ``i*H..i*H+H-1``, all columns, of a ``(P*H, W)`` slab."""
        h, w = (int(v) for v in panel_shape)
        return all(
            (p.min_ss, p.max_ss, p.min_fs, p.max_fs) == (i * h, (i + 1) * h - 1, 0, w - 1)
            for i, p in enumerate(self.panels)
        )

    def slab_to_panel(self, ss: np.ndarray, fs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slab ``(ss, fs)`` -> ``(panel, y, x)`` panel-local, with CrystFEL's panel rule.

        A coordinate belongs to the panel with ``min <= v + 0.5 < max + 1`` (CrystFEL adds the half
        pixel itself). Coordinates on no panel raise FrameError.
        """
        ss = np.asarray(ss, dtype=np.float64)
        fs = np.asarray(fs, dtype=np.float64)
        if ss.shape != fs.shape:
            raise FrameError(f"ss and fs differ in shape: {ss.shape} vs {fs.shape}")
        panel = np.full(ss.shape, -1, dtype=np.int64)
        sh, fh = ss + 0.5, fs + 0.5
        for i, p in enumerate(self.panels):
            hit = (sh >= p.min_ss) & (sh < p.max_ss + 1) & (fh >= p.min_fs) & (fh < p.max_fs + 1) & (panel < 0)
            panel[hit] = i
        if np.any(panel < 0):
            bad = int(np.count_nonzero(panel < 0))
            raise FrameError(f"{bad} slab coordinate(s) fall on no panel of the geometry")
        min_ss = np.array([p.min_ss for p in self.panels], dtype=np.float64)
        min_fs = np.array([p.min_fs for p in self.panels], dtype=np.float64)
        return panel, ss - min_ss[panel], fs - min_fs[panel]


# -- slab coordinates -------------------------------------------------------------------------


def slab_bounds(
    geometry: DetectorGeometry, *, dtype: np.dtype | type = np.float32
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-panel clamp bounds ``(ss_lo, ss_hi, fs_lo, fs_hi)`` in ``dtype`` (read-only arrays).

    ``lo = min - 0.5`` and ``hi`` = the largest ``dtype`` value strictly below ``max + 0.5``, so a
    value stored in ``dtype`` and shifted by CrystFEL's +0.5 stays inside ``[min, max + 1)``.
    """
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ConfigError(f"slab coordinates need a floating dtype, got {dtype}")
    return _panel_tables(geometry, dtype.str)[2:]


@functools.lru_cache(maxsize=32)
def _panel_tables(geometry: DetectorGeometry, dtype_str: str) -> tuple[np.ndarray, ...]:
    """``(min_ss, min_fs, ss_lo, ss_hi, fs_lo, fs_hi)`` per panel, computed once per geometry."""
    dtype = np.dtype(dtype_str)
    panels = geometry.panels
    min_ss = np.array([p.min_ss for p in panels], dtype=np.float64)
    min_fs = np.array([p.min_fs for p in panels], dtype=np.float64)
    max_ss = np.array([p.max_ss for p in panels], dtype=np.float64)
    max_fs = np.array([p.max_fs for p in panels], dtype=np.float64)
    below = dtype.type(-np.inf)
    tables = (
        min_ss,
        min_fs,
        (min_ss - 0.5).astype(dtype),
        np.nextafter((max_ss + 0.5).astype(dtype), below),
        (min_fs - 0.5).astype(dtype),
        np.nextafter((max_fs + 0.5).astype(dtype), below),
    )
    for t in tables:
        t.flags.writeable = False
    return tables


def panel_to_slab(
    panel: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    geometry: DetectorGeometry,
    *,
    dtype: np.dtype | type = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Panel-local peaks -> slab ``(ss, fs)`` as CrystFEL reads them from a CXI peak list.

    ``ss = min_ss[panel] + y`` and ``fs = min_fs[panel] + x`` (pixels, pixel centre at the integer),
    rounded to ``dtype`` (float32: what ``peakYPosRaw``/``peakXPosRaw`` store) and then clamped
    to ``min - 0.5 <= v < max + 0.5`` of the peak's own panel, so CrystFEL (which adds 0.5) assigns
    it to that panel. Panel indexes outside the geometry or non-finite y/x raise FrameError.

    Example: ``ss, fs = panel_to_slab(peaks.panel, peaks.y, peaks.x, geom)``.
    """
    panel = np.asarray(panel)
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if not (panel.shape == y.shape == x.shape):
        raise FrameError(f"panel, y, x differ in shape: {panel.shape}, {y.shape}, {x.shape}")
    if panel.size and panel.dtype.kind not in "iu":
        if not np.all(np.isfinite(panel)) or np.any(panel != np.round(panel)):
            raise FrameError("panel indexes must be integers")
    panel = panel.astype(np.int64, copy=False)
    n_panels = geometry.n_panels
    if panel.size and (panel.min() < 0 or panel.max() >= n_panels):
        raise FrameError(
            f"panel index out of range: got {int(panel.min())}..{int(panel.max())}, "
            f"geometry has {n_panels} panel(s)"
        )
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(x))):
        raise FrameError("peak coordinates contain NaN or Inf")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ConfigError(f"slab coordinates need a floating dtype, got {dtype}")
    min_ss, min_fs, ss_lo, ss_hi, fs_lo, fs_hi = _panel_tables(geometry, dtype.str)
    ss = (min_ss[panel] + y).astype(dtype)
    fs = (min_fs[panel] + x).astype(dtype)
    ss = np.clip(ss, ss_lo[panel], ss_hi[panel])
    fs = np.clip(fs, fs_lo[panel], fs_hi[panel])
    return ss, fs


# -- writing ----------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    """A float that reads back exactly (``repr``), as CrystFEL's strtod expects it."""
    return repr(float(value))


def _fmt_vector(vec: Vector) -> str:
    terms = [f"{format(float(c), '+')}{axis}" for c, axis in zip(vec, "xyz") if c != 0.0]
    return " ".join(terms)


def format_geometry(geometry: DetectorGeometry) -> str:
    """The ``.geom`` text for ``geometry`` (what :func:`write_geometry` writes)."""
    g = geometry
    lines: list[str] = [
        "; CrystFEL geometry written by peaknet-pva",
        f"; {g.n_panels} panel(s), slab {g.slab_shape[0]} x {g.slab_shape[1]} (ss x fs)",
        "; peaks: peakXPosRaw = fs, peakYPosRaw = ss in the slab, pixel centre at the integer",
        "; (indexamajig --peaks=cxi adds the half pixel itself)",
        "",
    ]
    if isinstance(g.photon_energy, str):
        lines.append(f"photon_energy = {g.photon_energy}")
    elif g.photon_energy is not None:
        lines.append(f"photon_energy = {_fmt(g.photon_energy)}")
    if isinstance(g.clen, str):
        lines.append(f"clen = {g.clen}")
    elif g.clen is not None:
        lines.append("; clen in metres")
        lines.append(f"clen = {_fmt(g.clen)}")
    if g.res is not None:
        lines.append("; res in pixels per metre (1 / pixel size)")
        lines.append(f"res = {_fmt(g.res)}")
    if g.adu_per_photon is not None:
        lines.append(f"adu_per_photon = {_fmt(g.adu_per_photon)}")
    if g.adu_per_ev is not None:
        lines.append(f"adu_per_eV = {_fmt(g.adu_per_ev)}")
    lines.append("")
    if g.data is not None:
        lines.append(f"data = {g.data}")
    for i, dim in enumerate(g.dims):
        lines.append(f"dim{i} = {dim}")
    if g.peak_list is not None:
        lines.append(f"peak_list = {g.peak_list}")
    if g.peak_list_type is not None:
        lines.append(f"peak_list_type = {g.peak_list_type}")
    globals_extra = {k: v for k, v in g.extra.items() if "/" not in k}
    regions_extra = {k: v for k, v in g.extra.items() if "/" in k}
    for key, value in globals_extra.items():
        lines.append(f"{key} = {value}")
    for p in g.panels:
        lines.append("")
        n = p.name
        lines += [
            f"{n}/min_fs = {p.min_fs}",
            f"{n}/max_fs = {p.max_fs}",
            f"{n}/min_ss = {p.min_ss}",
            f"{n}/max_ss = {p.max_ss}",
            f"{n}/fs = {_fmt_vector(p.fs)}",
            f"{n}/ss = {_fmt_vector(p.ss)}",
            f"{n}/corner_x = {_fmt(p.corner_x)}",
            f"{n}/corner_y = {_fmt(p.corner_y)}",
        ]
        if p.res is not None:
            lines.append(f"{n}/res = {_fmt(p.res)}")
        if p.coffset is not None:
            lines.append(f"{n}/coffset = {_fmt(p.coffset)}")
        for key, value in p.extra.items():
            lines.append(f"{n}/{key} = {value}")
    if regions_extra:
        lines.append("")
        for key, value in regions_extra.items():
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def write_geometry(path: str | os.PathLike[str], geometry: DetectorGeometry, *, overwrite: bool = True) -> Path:
    """Write ``geometry`` as a CrystFEL ``.geom`` file (via a temporary name, fsync, then rename).

    ``overwrite=False`` never replaces an existing file, also when several processes race to
    create it (the final name is a hard link, which fails if it exists): raises FileExistsError.
    """
    path = Path(path)
    text = format_geometry(geometry)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote CrystFEL geometry %s (%d panels)", path, geometry.n_panels)
    return path


# -- reading ----------------------------------------------------------------------------------


def _parse_float(text: str, *, where: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: expected a number, got {text!r}") from exc


def _parse_int(text: str, *, where: str) -> int:
    value = _parse_float(text, where=where)
    if not value.is_integer():
        raise ConfigError(f"{where}: expected an integer, got {text!r}")
    return int(value)


def _parse_vector(text: str, *, where: str) -> Vector:
    """``"+0.0010x -0.9999y"`` / ``"-x"`` / ``"1.0x +0.0y +0.0z"`` -> ``(x, y, z)``."""
    compact = text.strip()
    vec = {"x": 0.0, "y": 0.0, "z": 0.0}
    pos = 0
    seen = False
    while pos < len(compact):
        if compact[pos].isspace():
            pos += 1
            continue
        m = _VECTOR_TERM.match(compact, pos)
        if m is None:
            raise ConfigError(f"{where}: cannot parse direction vector {text!r}")
        sign = -1.0 if m.group(1) == "-" else 1.0
        coeff = float(m.group(2)) if m.group(2) else 1.0
        vec[m.group(3)] += sign * coeff
        pos = m.end()
        seen = True
    if not seen:
        raise ConfigError(f"{where}: empty direction vector")
    return (vec["x"], vec["y"], vec["z"])


def _parse_length_m(text: str) -> float | str:
    """``"0.1"`` / ``"0.1 m"`` / ``"100 mm"`` -> metres; anything else (a data location) verbatim."""
    parts = text.split()
    try:
        value = float(parts[0])
    except (ValueError, IndexError):
        return text
    if len(parts) == 1 or parts[1] == "m":
        return value
    if len(parts) == 2 and parts[1] == "mm":
        return value * 1e-3
    return text


def _parse_energy_ev(text: str) -> float | str:
    """``"9500"`` / ``"9500 eV"`` / ``"9.5 keV"`` -> eV; a data location verbatim."""
    parts = text.split()
    try:
        value = float(parts[0])
    except (ValueError, IndexError):
        return text
    if len(parts) == 1 or parts[1] == "eV":
        return value
    if len(parts) == 2 and parts[1] == "keV":
        return value * 1e3
    return text


def parse_geometry(text: str, *, source: str = "<string>") -> DetectorGeometry:
    """Parse CrystFEL ``.geom`` text (see :func:`read_geometry`)."""
    glob: dict[str, str] = {}
    dims: dict[int, str] = {}
    panels: dict[str, dict[str, str]] = {}
    extra: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        if "=" not in line:
            raise ConfigError(f"{where}: expected 'key = value', got {raw.strip()!r}")
        key, value = (s.strip() for s in line.split("=", 1))
        if not key:
            raise ConfigError(f"{where}: missing key in {raw.strip()!r}")
        if "/" in key:
            name, _, pkey = key.partition("/")
            if name.startswith(_RESERVED_PREFIXES):
                extra[key] = value
                continue
            panels.setdefault(name, {})[pkey] = value
        elif re.fullmatch(r"dim\d+", key):
            dims[int(key[3:])] = value
        elif key in ("clen", "res", "photon_energy", "adu_per_photon", "adu_per_eV", "data",
                     "peak_list", "peak_list_type"):
            glob[key] = value
        else:
            extra[key] = value
    if not panels:
        raise ConfigError(f"{source}: no panels defined (expected lines like 'p0/min_fs = 0')")
    if dims and sorted(dims) != list(range(len(dims))):
        raise ConfigError(f"{source}: dim keys must be dim0, dim1, ... without gaps, got {sorted(dims)}")

    panel_objs = []
    for name, kv in panels.items():
        missing = [k for k in (*_PANEL_INT_KEYS, "corner_x", "corner_y") if k not in kv]
        if missing:
            raise ConfigError(f"{source}: panel {name} lacks {', '.join(missing)}")
        where = f"{source}: panel {name}"
        known = {*_PANEL_INT_KEYS, "corner_x", "corner_y", "fs", "ss", "res", "coffset"}
        panel_objs.append(
            PanelGeometry(
                name=name,
                min_ss=_parse_int(kv["min_ss"], where=f"{where} min_ss"),
                max_ss=_parse_int(kv["max_ss"], where=f"{where} max_ss"),
                min_fs=_parse_int(kv["min_fs"], where=f"{where} min_fs"),
                max_fs=_parse_int(kv["max_fs"], where=f"{where} max_fs"),
                corner_x=_parse_float(kv["corner_x"], where=f"{where} corner_x"),
                corner_y=_parse_float(kv["corner_y"], where=f"{where} corner_y"),
                fs=_parse_vector(kv.get("fs", "+1.0x"), where=f"{where} fs"),
                ss=_parse_vector(kv.get("ss", "+1.0y"), where=f"{where} ss"),
                res=_parse_float(kv["res"], where=f"{where} res") if "res" in kv else None,
                coffset=_parse_float(kv["coffset"], where=f"{where} coffset") if "coffset" in kv else None,
                extra={k: v for k, v in kv.items() if k not in known},
            )
        )

    def opt_float(key: str) -> float | None:
        return _parse_float(glob[key], where=f"{source}: {key}") if key in glob else None

    return DetectorGeometry(
        panels=tuple(panel_objs),
        clen=_parse_length_m(glob["clen"]) if "clen" in glob else None,
        res=opt_float("res"),
        photon_energy=_parse_energy_ev(glob["photon_energy"]) if "photon_energy" in glob else None,
        adu_per_photon=opt_float("adu_per_photon"),
        adu_per_ev=opt_float("adu_per_eV"),
        data=glob.get("data"),
        dims=tuple(dims[i] for i in range(len(dims))),
        peak_list=glob.get("peak_list"),
        peak_list_type=glob.get("peak_list_type"),
        extra=extra,
    )


def read_geometry(path: str | os.PathLike[str]) -> DetectorGeometry:
    """Read a CrystFEL ``.geom`` file.

    Understands what :func:`write_geometry` writes and the usual real-world files: ``;`` comments
    (whole-line or trailing), global ``clen`` (m/mm or a data location), ``res``, ``photon_energy``
    (eV/keV or a data location), ``adu_per_photon``/``adu_per_eV``, ``data``, ``dimN``,
    ``peak_list``/``peak_list_type``, and panel blocks ``name/min_fs ... name/ss``. Anything else
    (``wavelength``, masks, bad regions, groups, per-panel ``dimN`` ...) is kept verbatim in
    ``extra``. Panels are numbered in order of first mention. Errors name the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"cannot read geometry file {path}: {exc}") from exc
    return parse_geometry(text, source=str(path))


# -- pixel maps, masks and processing tiles ----------------------------------------------------
#
# A geometry describes the *slab* (the 2-D data array, ``slab_shape`` = (rows, cols)). The
# pipeline works on a ``(P, H, W)`` stack of equal *tiles* cut from the slab by rows
# (:func:`tile_shape_for`); peaks are reported tile-local ("panel" = tile index), as with a plain
# ``panel_shape``. For our stacked geometries the tiles are the geometry's panels.

#: How a user's mask array is read (``mask_convention``).
MASK_CONVENTIONS = ("om", "nonzero_bad", "crystfel")
_TRUE = ("1", "true", "yes")


def from_preset(
    detector: object, *, photon_energy_ev: float | None = None, adu_per_photon: float | None = None
) -> DetectorGeometry:
    """The physical geometry of a simulator preset (``simulate.DetectorPreset``, duck-typed).

    Panel ``p`` is slab rows ``p*H .. p*H+H-1`` (the ``(P*H, W)`` slab the simulator writes),
    ``fs = +x``, ``ss = +y``, and ``corner = origin - beam_center - 0.5`` (the preset's origins are
    pixel *centres*; CrystFEL's corners are pixel corners, beam at x = y = 0). ``radius_map``
    of the result equals ``detector.radius_map()`` up to float32 rounding.
    """
    h, w = (int(v) for v in detector.panel_shape)  # type: ignore[attr-defined]
    by, bx = (float(v) for v in detector.beam_center)  # type: ignore[attr-defined]
    panels = tuple(
        PanelGeometry(
            name=f"p{i}",
            min_ss=i * h,
            max_ss=(i + 1) * h - 1,
            min_fs=0,
            max_fs=w - 1,
            corner_x=float(ox) - bx - 0.5,
            corner_y=float(oy) - by - 0.5,
        )
        for i, (oy, ox) in enumerate(detector.panel_origins)  # type: ignore[attr-defined]
    )
    adu_per_ev = None
    if adu_per_photon is None:
        if getattr(detector, "kev_units", False):  # energy-calibrated frames: 1 unit = 1 keV
            adu_per_ev = 1e-3
        else:
            adu_per_photon = float(getattr(detector, "adu_per_photon", 1.0))
    return DetectorGeometry(
        panels=panels,
        clen=float(detector.distance_m),  # type: ignore[attr-defined]
        res=1.0 / float(detector.pixel_size_m),  # type: ignore[attr-defined]
        photon_energy=CXI_PHOTON_ENERGY_PATH if photon_energy_ev is None else float(photon_energy_ev),
        adu_per_photon=None if adu_per_photon is None else float(adu_per_photon),
        adu_per_ev=adu_per_ev,
    )


def tile_shape_for(geometry: DetectorGeometry, panel_shape: tuple[int, int] | None = None) -> tuple[int, int]:
    """The ``(H, W)`` tiles the slab is cut into for processing (``W`` = the slab width).

    ``panel_shape`` (if given) must tile the slab by rows without cutting a geometry panel in two.
    Otherwise the finest such tiling is chosen: for a stacked geometry that is its panels, for a
    single large module the whole slab, for a module split into ASIC panels the ASIC rows.
    """
    rows, cols = geometry.slab_shape
    panels = geometry.panels
    if panel_shape is not None:
        h, w = (int(v) for v in panel_shape)
        if w != cols or h <= 0 or rows % h:
            raise ConfigError(
                f"panel_shape {h},{w} does not tile the geometry's {rows} x {cols} slab "
                f"(need W = {cols} and H dividing {rows})"
            )
        for p in panels:
            if p.min_ss // h != p.max_ss // h:
                raise ConfigError(
                    f"panel_shape {h},{w}: geometry panel {p.name} (ss {p.min_ss}..{p.max_ss}) crosses a tile boundary"
                )
        return (h, w)
    tallest = max(p.height for p in panels)
    for h in range(tallest, rows + 1):
        if rows % h == 0 and all(p.min_ss // h == p.max_ss // h for p in panels):
            return (h, cols)
    return (rows, cols)  # pragma: no cover - h = rows always qualifies


def panel_index_map(geometry: DetectorGeometry) -> np.ndarray:
    """``(rows, cols)`` int32: the geometry panel of each slab pixel, -1 where no panel is."""
    out = np.full(geometry.slab_shape, -1, dtype=np.int32)
    for i, p in enumerate(geometry.panels):
        region = out[p.min_ss : p.max_ss + 1, p.min_fs : p.max_fs + 1]
        region[region < 0] = i
    return out


def _ref_res(geometry: DetectorGeometry) -> float | None:
    if geometry.res is not None:
        return geometry.res
    for p in geometry.panels:
        if p.res is not None:
            return p.res
    return None


def lab_xy(geometry: DetectorGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Lab ``(x, y)`` of every slab pixel *centre*, ``(rows, cols)`` float64, NaN off-panel.

    Pixel ``(ss, fs)`` of a panel has its centre at ``corner + (fs - min_fs + 0.5) * fs_vec +
    (ss - min_ss + 0.5) * ss_vec`` (CrystFEL: the corner is the corner of the first pixel, and a
    pixel's centre is half a pixel in along both axes). Units: pixels of the reference resolution
    (the global ``res``; panels with their own ``res`` are scaled to it).
    """
    rows, cols = geometry.slab_shape
    x = np.full((rows, cols), np.nan)
    y = np.full((rows, cols), np.nan)
    ref = _ref_res(geometry)
    for p in reversed(geometry.panels):  # the first panel wins where panels overlap
        fs = np.arange(p.width, dtype=np.float64)[None, :] + 0.5
        ss = np.arange(p.height, dtype=np.float64)[:, None] + 0.5
        px = p.corner_x + fs * p.fs[0] + ss * p.ss[0]
        py = p.corner_y + fs * p.fs[1] + ss * p.ss[1]
        scale = ref / p.res if (ref is not None and p.res is not None) else 1.0
        x[p.min_ss : p.max_ss + 1, p.min_fs : p.max_fs + 1] = px * scale
        y[p.min_ss : p.max_ss + 1, p.min_fs : p.max_fs + 1] = py * scale
    return x, y


def radius_map(geometry: DetectorGeometry) -> np.ndarray:
    """Distance of every slab pixel centre from the beam axis (lab x = y = 0), ``(rows, cols)``
    float32, in pixels; 0 off-panel (those pixels are bad in :func:`geometry_bad_pixels`)."""
    x, y = lab_xy(geometry)
    r = np.hypot(x, y)
    return np.nan_to_num(r, nan=0.0).astype(np.float32)


def _region_groups(extra: dict[str, str]) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    for key, value in extra.items():
        name, sep, sub = key.partition("/")
        if sep and name.startswith("bad"):
            groups.setdefault(name, {})[sub] = value
    return groups


def _as_int_bits(text: str, *, where: str) -> int:
    try:
        return int(str(text).strip(), 0)
    except ValueError as exc:
        raise ConfigError(f"{where}: expected an integer (0x.. hex allowed), got {text!r}") from exc


def _mask_specs(keys: dict[str, str]) -> list[dict[str, str]]:
    """CrystFEL mask directives in ``keys`` -> ``[{data, file, goodbits, badbits}]`` (mask0..7)."""
    specs: dict[int, dict[str, str]] = {}
    legacy = {"mask": "data", "mask_file": "file", "mask_good": "goodbits", "mask_bad": "badbits"}
    for key, value in keys.items():
        if key in legacy:
            specs.setdefault(0, {})[legacy[key]] = value
            continue
        m = re.fullmatch(r"mask([0-7])_(data|file|goodbits|badbits)", key)
        if m:
            specs.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return [specs[k] for k in sorted(specs)]


def _resolve_file(name: str, base_dir: Path | None) -> Path:
    path = Path(name)
    if path.is_absolute() or path.exists() or base_dir is None:
        return path
    alt = base_dir / path
    return alt if alt.exists() else path


def read_mask_array(path: str | os.PathLike[str], dataset: str | None = None) -> np.ndarray:
    """A mask array from ``.npy`` or HDF5 (``.h5``/``.hdf5``/``.cxi``/``.nxs``).

    HDF5: ``dataset`` if given, else the only 2-D/3-D integer or boolean dataset in the file
    (``/data/data``, ``/mask``, ... ). A ``file.h5:/path`` suffix names the dataset too.
    """
    text = str(path)
    if dataset is None and ":" in text and not Path(text).exists():
        text, _, dataset = text.rpartition(":")
    p = Path(text)
    if not p.exists():
        raise ConfigError(f"mask: no such file: {p}")
    if p.suffix == ".npy":
        try:
            return np.load(p, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"mask: cannot read {p}: {exc}") from None
    import h5py

    try:
        fh = h5py.File(p, "r")
    except OSError as exc:
        raise ConfigError(f"mask: cannot open {p} as HDF5 (or give a .npy): {exc}") from None
    with fh:
        if dataset is not None:
            if dataset not in fh or not isinstance(fh[dataset], h5py.Dataset):
                raise ConfigError(f"mask: {p} has no dataset {dataset}")
            return np.asarray(fh[dataset][()])
        found: list[str] = []

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset) and obj.ndim in (2, 3) and obj.dtype.kind in "biu":
                found.append(name)

        fh.visititems(visit)
        if len(found) != 1:
            raise ConfigError(
                f"mask: {p} holds {len(found)} candidate datasets ({', '.join(found[:5]) or 'none'}): "
                "name one with mask_dataset (or FILE:/dataset)"
            )
        return np.asarray(fh[found[0]][()])


def bad_from_array(
    values: np.ndarray,
    convention: str = "om",
    *,
    good_bits: int | None = None,
    bad_bits: int | None = None,
) -> np.ndarray:
    """Bad pixels (True = bad) of a mask array read with ``convention``:

    * ``"om"``: OM / Cheetah / psana, nonzero = good, 0 = bad;
    * ``"nonzero_bad"``: pyFAI / NeXus ``pixel_mask`` / our ``truth.h5`` ``bad_pixel_mask``;
    * ``"crystfel"``: bit flags: bad unless every bit of ``good_bits`` is set, or if any bit of
      ``bad_bits`` is set (CrystFEL's ``mask_good``/``mask_bad``; defaults 0 and all bits).
    """
    arr = np.asarray(values)
    if arr.dtype.kind not in "biuf":
        raise ConfigError(f"mask: expected a numeric or boolean array, got dtype {arr.dtype}")
    if convention == "om":
        return arr == 0
    if convention == "nonzero_bad":
        return arr != 0
    if convention == "crystfel":
        if arr.dtype.kind == "f":
            if np.any(arr != np.round(arr)):
                raise ConfigError("mask: a crystfel bit mask must hold integers")
            arr = arr.astype(np.int64)
        bits = arr.astype(np.int64)
        good = 0 if good_bits is None else int(good_bits)
        bad = -1 if bad_bits is None else int(bad_bits)
        return ((bits & good) != good) | ((bits & bad) != 0)
    raise ConfigError(f"mask_convention must be one of {MASK_CONVENTIONS}, got {convention!r}")


def fit_to_slab(bad: np.ndarray, slab_shape: tuple[int, int], *, what: str = "mask") -> np.ndarray:
    """``bad`` as ``slab_shape`` (a 2-D slab, or a ``(P, H, W)`` stack of it); ConfigError if it
    does not fit."""
    rows, cols = slab_shape
    arr = np.asarray(bad)
    if arr.ndim == 2 and arr.shape == (rows, cols):
        return arr
    if arr.ndim == 3 and arr.shape[0] * arr.shape[1] == rows and arr.shape[2] == cols:
        return arr.reshape(rows, cols)
    raise ConfigError(f"{what}: shape {arr.shape} does not fit frames of {rows} x {cols} (slab rows x cols)")


def geometry_bad_pixels(
    geometry: DetectorGeometry,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    use_mask_files: bool = True,
) -> np.ndarray:
    """What the geometry itself marks bad, ``(rows, cols)`` bool (True = bad):

    slab pixels on no panel; panels with ``no_index = 1``; ``mask_edge_pixels``; ``bad*`` regions
    (fs/ss ranges, inclusive, in data coordinates, optionally limited to ``panel``; or lab
    ``min_x..max_x`` / ``min_y..max_y`` in pixels, tested at pixel centres); and the CrystFEL masks
    ``mask``/``mask_file``/``mask_good``/``mask_bad`` and ``maskN_data``/``maskN_file``/
    ``maskN_goodbits``/``maskN_badbits`` (global or per panel) when the mask is in a separate file
    (``mask_file``, absolute, relative to the working directory, or else to ``base_dir``). A mask
    that lives in each data file (no ``mask_file``) cannot be read from a stream: it is skipped
    with a warning (pass it as ``mask``). ``flag_lessthan``/``flag_morethan``/``flag_equal`` are
    per-frame value tests and are not applied (warning).
    """
    base = Path(base_dir) if base_dir is not None else None
    rows, cols = geometry.slab_shape
    index = panel_index_map(geometry)
    bad = index < 0
    glob = {k: v for k, v in geometry.extra.items() if "/" not in k}
    edge_global = glob.get("mask_edge_pixels")
    warned_flags = False
    for i, p in enumerate(geometry.panels):
        view = bad[p.min_ss : p.max_ss + 1, p.min_fs : p.max_fs + 1]
        mine = index[p.min_ss : p.max_ss + 1, p.min_fs : p.max_fs + 1] == i
        if str(p.extra.get("no_index", "0")).strip().lower() in _TRUE:
            view[mine] = True
            continue
        edge = p.extra.get("mask_edge_pixels", edge_global)
        if edge is not None:
            n = _parse_int(edge, where=f"panel {p.name} mask_edge_pixels")
            if n > 0:
                e = np.zeros(view.shape, bool)
                e[:n, :] = e[-n:, :] = e[:, :n] = e[:, -n:] = True
                view[e & mine] = True
        if not warned_flags and any(k.startswith("flag_") for k in (*p.extra, *glob)):
            log.warning("geometry: flag_lessthan/flag_morethan/flag_equal are per-frame value tests; not applied")
            warned_flags = True
    # bad regions
    x = y = None
    for name, kv in _region_groups(geometry.extra).items():
        where = f"geometry bad region {name}"
        if any(k in kv for k in ("min_x", "max_x", "min_y", "max_y")):
            if x is None:
                x, y = lab_xy(geometry)
            lo_x = _parse_float(kv.get("min_x", "-inf"), where=where)
            hi_x = _parse_float(kv.get("max_x", "inf"), where=where)
            lo_y = _parse_float(kv.get("min_y", "-inf"), where=where)
            hi_y = _parse_float(kv.get("max_y", "inf"), where=where)
            with np.errstate(invalid="ignore"):
                hit = (x >= lo_x) & (x <= hi_x) & (y >= lo_y) & (y <= hi_y)
            if "panel" in kv:
                hit &= index == geometry.panel_index(kv["panel"].strip())
            bad |= hit
            continue
        if not all(k in kv for k in ("min_fs", "max_fs", "min_ss", "max_ss")):
            raise ConfigError(f"{where}: needs min_fs/max_fs/min_ss/max_ss or min_x/max_x/min_y/max_y")
        fs0, fs1, ss0, ss1 = (_parse_int(kv[k], where=f"{where} {k}") for k in ("min_fs", "max_fs", "min_ss", "max_ss"))
        region = np.zeros((rows, cols), bool)
        region[max(ss0, 0) : ss1 + 1, max(fs0, 0) : fs1 + 1] = True
        if "panel" in kv:
            region &= index == geometry.panel_index(kv["panel"].strip())
        bad |= region
    # CrystFEL masks: the global directives, overridden per panel by the panel's own
    if use_mask_files:
        cache: dict[tuple, np.ndarray] = {}
        for i, p in enumerate(geometry.panels):
            own = {k: v for k, v in p.extra.items() if k.startswith("mask") and k != "mask_edge_pixels"}
            for spec in _mask_specs({**glob, **own}):
                key = tuple(sorted(spec.items()))
                if key not in cache:
                    cache[key] = _crystfel_mask(spec, (rows, cols), base, where=f"geometry (panel {p.name})")
                sl = (slice(p.min_ss, p.max_ss + 1), slice(p.min_fs, p.max_fs + 1))
                mine = index[sl] == i
                bad[sl] |= cache[key][sl] & mine
    return bad


def _crystfel_mask(spec: dict[str, str], slab_shape: tuple[int, int], base: Path | None, *, where: str) -> np.ndarray:
    data = spec.get("data")
    if data is None and "file" not in spec:
        return np.zeros(slab_shape, bool)
    if "file" not in spec:
        log.warning("%s: mask %s is read from each data file by CrystFEL; a stream has none: "
                    "not applied (pass the mask file as mask=...)", where, data)
        return np.zeros(slab_shape, bool)
    path = _resolve_file(spec["file"].strip(), base)
    if data is not None and "%" in data:
        log.warning("%s: per-event mask location %s not supported: not applied", where, data)
        return np.zeros(slab_shape, bool)
    values = read_mask_array(path, data.strip() if data else None)
    good = _as_int_bits(spec["goodbits"], where=f"{where} mask_good") if "goodbits" in spec else 0
    badb = _as_int_bits(spec["badbits"], where=f"{where} mask_bad") if "badbits" in spec else 0
    bad = bad_from_array(values, "crystfel", good_bits=good, bad_bits=badb)
    return fit_to_slab(bad, slab_shape, what=f"{where} mask {path}")


def tiles_to_slab(
    panel: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    geometry: DetectorGeometry,
    tile_shape: tuple[int, int],
    *,
    dtype: np.dtype | type = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Tile-local peaks (``panel`` = tile index of a ``(rows/H, H, W)`` stack) -> slab ``(ss, fs)``,
    clamped to the geometry panel the peak's pixel belongs to (see :func:`panel_to_slab`).

    For a stacked geometry whose panels are the tiles this is exactly :func:`panel_to_slab`.
    A peak whose pixel lies on no panel is clamped onto the nearest panel.
    """
    h, w = (int(v) for v in tile_shape)
    if geometry.n_panels * h == geometry.slab_shape[0] and geometry.is_stacked_slab((h, w)):
        return panel_to_slab(panel, y, x, geometry, dtype=dtype)
    panel = np.asarray(panel).astype(np.int64)
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(x))):
        raise FrameError("peak coordinates contain NaN or Inf")
    rows, cols = geometry.slab_shape
    if panel.size and (panel.min() < 0 or panel.max() >= rows // h):
        raise FrameError(f"tile index out of range: {int(panel.min())}..{int(panel.max())}, slab has {rows // h} tiles")
    ss = panel * h + y
    fs = x
    dtype = np.dtype(dtype)
    if not ss.size:
        return ss.astype(dtype), fs.astype(dtype)
    index = _index_map_cached(geometry)
    pi = np.clip(np.floor(ss + 0.5).astype(np.int64), 0, rows - 1)
    pj = np.clip(np.floor(fs + 0.5).astype(np.int64), 0, cols - 1)
    owner = index[pi, pj].astype(np.int64)
    if np.any(owner < 0):
        lo_ss = np.array([p.min_ss for p in geometry.panels], float)
        hi_ss = np.array([p.max_ss for p in geometry.panels], float)
        lo_fs = np.array([p.min_fs for p in geometry.panels], float)
        hi_fs = np.array([p.max_fs for p in geometry.panels], float)
        miss = np.nonzero(owner < 0)[0]
        dss = np.maximum(0, np.maximum(lo_ss[None] - ss[miss, None], ss[miss, None] - hi_ss[None]))
        dfs = np.maximum(0, np.maximum(lo_fs[None] - fs[miss, None], fs[miss, None] - hi_fs[None]))
        owner[miss] = np.argmin(dss * dss + dfs * dfs, axis=1)
    _, _, ss_lo, ss_hi, fs_lo, fs_hi = _panel_tables(geometry, dtype.str)
    ss_out = np.clip(ss.astype(dtype), ss_lo[owner], ss_hi[owner])
    fs_out = np.clip(fs.astype(dtype), fs_lo[owner], fs_hi[owner])
    return ss_out, fs_out


@functools.lru_cache(maxsize=8)
def _index_map_cached(geometry: DetectorGeometry) -> np.ndarray:
    out = panel_index_map(geometry)
    out.flags.writeable = False
    return out


def for_cxi(geometry: DetectorGeometry, *, base_dir: str | os.PathLike[str] | None = None) -> DetectorGeometry:
    """``geometry`` pointed at our CXI files, for indexamajig: ``data``, ``dim0..2 = %, ss, fs``,
    ``peak_list``/``peak_list_type = cxi`` and the per-frame ``photon_energy`` location; relative
    ``*_file`` paths (``mask_file``, ...) made absolute (working directory, else ``base_dir``).
    Panels, clen, res and bad regions are kept."""
    import dataclasses

    base = Path(base_dir) if base_dir is not None else None
    extra = dict(geometry.extra)
    for key in [k for k in extra if k.endswith("_file") and "/" not in k]:
        path = _resolve_file(extra[key].strip(), base)
        extra[key] = str(path.resolve())
    return dataclasses.replace(
        geometry,
        data=CXI_DATA_PATH,
        dims=("%", "ss", "fs"),
        peak_list=CXI_PEAK_LIST,
        peak_list_type="cxi",
        photon_energy=CXI_PHOTON_ENERGY_PATH,
        extra=extra,
    )
