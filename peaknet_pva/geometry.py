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
