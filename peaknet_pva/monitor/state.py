"""What the live monitor shows, computed without PVA or a web server: pure aggregation + pictures.

The PVA adapter (:mod:`peaknet_pva.monitor.pva_source`) feeds :class:`MonitorState` with one
:class:`PeakUpdate` per published frame (peaks are cheap: every frame), the consumers' status
objects (once per report period) and, a few times a second at most, a sampled hit with its image.
The web adapter (:mod:`peaknet_pva.monitor.server`) only serialises :meth:`MonitorState.snapshot`.

Everything is bounded: rate history is kept in ``bin_s`` bins for ``window_s`` seconds, the
histograms have fixed bins, the virtual powder pattern has the shape of the assembled view.
Coordinates: peaks are panel-local ``(panel, y, x)`` (pixel centre at the integer); the assembled
view is :class:`peaknet_pva.assemble.Assembler`'s (lab x to the right, lab y up, max-binned).
"""

from __future__ import annotations

import base64
import io
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..assemble import Assembler
from ..geometry import DetectorGeometry, lab_xy

log = logging.getLogger(__name__)

__all__ = ["DetectorView", "HitImage", "MonitorConfig", "MonitorState", "PeakUpdate", "encode_png", "resolution_a"]

#: hc in eV * Angstrom: wavelength (A) = HC_EV_A / photon energy (eV).
HC_EV_A = 12398.419843320026
#: Status counters shown per consumer: (label, section of the status object, key).
STATUS_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("processed", "userStats", "nProcessed"),
    ("hits", "userStats", "nHits"),
    ("dropped", "userStats", "nDropped"),
    ("bad", "userStats", "nBadFrames"),
    ("missedIds", "userStats", "nMissedIds"),
    ("missed", "processorStats", "nMissed"),
    ("overruns", "receiverStats", "nOverruns"),
    ("errors", "processorStats", "nErrors"),
)


@dataclass(frozen=True)
class MonitorConfig:
    """What the monitor keeps and how it draws it.

    ``window_s`` seconds of rate history in ``bin_s`` bins; a frame is a hit when ``nPeaks >=
    min_peaks`` (a consumer's own ``minPeaks`` from its status wins once known); images are
    assembled and binned to at most ``image_max_px`` on their longer side; ``image_hz`` is the
    most images a second the PVA adapter decodes.
    """

    window_s: float = 300.0
    bin_s: float = 1.0
    min_peaks: int = 10
    image_max_px: int = 512
    image_hz: float = 2.0
    max_peaks_hist: int = 200
    peakogram_bins: tuple[int, int] = (96, 96)

    def __post_init__(self) -> None:
        if not (self.window_s > 0 and self.bin_s > 0 and self.window_s >= self.bin_s):
            raise ValueError(f"need window_s >= bin_s > 0, got {self.window_s}, {self.bin_s}")
        if self.min_peaks < 0 or self.max_peaks_hist < 1:
            raise ValueError("min_peaks must be >= 0 and max_peaks_hist >= 1")
        if self.image_max_px < 16:
            raise ValueError(f"image_max_px must be >= 16, got {self.image_max_px}")
        if not self.image_hz > 0:
            raise ValueError(f"image_hz must be > 0, got {self.image_hz}")


@dataclass
class PeakUpdate:
    """One published frame as the monitor needs it (no pixels). Arrays are per peak."""

    channel: str
    unique_id: int
    n_peaks: int
    panel: np.ndarray
    y: np.ndarray
    x: np.ndarray
    intensity: np.ndarray
    photon_energy_ev: float
    panel_shape: tuple[int, int]
    timestamp_ns: int = 0


@dataclass
class HitImage:
    """A sampled hit: its ``(P, H, W)`` pixels and the peaks published with it."""

    channel: str
    unique_id: int
    pixels: np.ndarray
    panel: np.ndarray
    y: np.ndarray
    x: np.ndarray
    intensity: np.ndarray
    photon_energy_ev: float


def resolution_a(radius_px: np.ndarray | float, *, clen_m: float, res: float, photon_energy_ev: float) -> np.ndarray:
    """Bragg resolution d (Angstrom) at ``radius_px`` from the beam (pixels of ``res`` px/m), for a
    detector ``clen_m`` from the sample: d = lambda / (2 sin(theta)), 2 theta = atan(r / clen)."""
    r = np.asarray(radius_px, dtype=np.float64) / float(res)
    theta = 0.5 * np.arctan2(r, float(clen_m))
    wavelength = HC_EV_A / float(photon_energy_ev)
    with np.errstate(divide="ignore"):
        return np.where(theta > 0, wavelength / (2.0 * np.sin(theta)), np.inf)


class DetectorView:
    """Where a frame's pixels and peaks land in the assembled, binned picture (and how far from
    the beam), for frames of ``frame_shape = (P, H, W)``.

    With a geometry (whose slab must be ``(P*H, W)``) the picture is the lab frame; without one the
    panels sit in a grid (as :class:`Assembler` does) and radii come from a default stacked layout
    (``DetectorGeometry.stacked``: beam in the middle of the stack), which is only a rough guide.
    """

    def __init__(self, frame_shape: tuple[int, int, int], geometry: DetectorGeometry | None = None,
                 max_px: int = 512) -> None:
        p, h, w = (int(v) for v in frame_shape)
        self.frame_shape = (p, h, w)
        self.geometry = geometry
        self.assembler = Assembler(self.frame_shape, geometry, max_px)
        self.shape = self.assembler.shape
        b = self.assembler.binning
        if geometry is not None:
            x, y = lab_xy(geometry)
            col_f, row_f = x, -y
            radius_geom = geometry
        else:
            cols = max(1, min(math.ceil(math.sqrt(p * h / w)) if p > 1 else 1, p))
            gap = max(2, min(h, w) // 32)
            idx = np.arange(p)
            rr, cc = np.mgrid[0:h, 0:w]
            row_f = (((idx // cols) * (h + gap))[:, None, None] + rr[None] + 0.5).reshape(p * h, w).astype(np.float64)
            col_f = (((idx % cols) * (w + gap))[:, None, None] + cc[None] + 0.5).reshape(p * h, w).astype(np.float64)
            radius_geom = DetectorGeometry.stacked(p, (h, w))
            x, y = lab_xy(radius_geom)
        valid = np.isfinite(col_f) & np.isfinite(row_f)
        c0, r0 = float(col_f[valid].min()), float(row_f[valid].min())
        # binned view coordinates of every slab pixel centre (float; the same grid as the Assembler)
        self._col = ((col_f - c0) / b).astype(np.float32)
        self._row = ((row_f - r0) / b).astype(np.float32)
        rx, ry = lab_xy(radius_geom)
        self._radius = np.nan_to_num(np.hypot(rx, ry), nan=0.0).astype(np.float32)
        self.radius_max = float(self._radius.max()) if self._radius.size else 1.0
        self.radius_geometry = radius_geom
        self.binning = b

    def _slab_index(self, panel: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p, h, w = self.frame_shape
        panel = np.clip(np.asarray(panel, dtype=np.int64), 0, p - 1)
        yi = np.clip(np.rint(np.asarray(y, dtype=np.float64)).astype(np.int64), 0, h - 1)
        xi = np.clip(np.rint(np.asarray(x, dtype=np.float64)).astype(np.int64), 0, w - 1)
        return panel * h + yi, xi

    def view_xy(self, panel: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Peaks -> ``(col, row)`` in the binned view (float, pixel centre at +0.5), NaN off-view."""
        ss, fs = self._slab_index(panel, y, x)
        return self._col[ss, fs], self._row[ss, fs]

    def radius(self, panel: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Distance of each peak from the beam, in pixels."""
        ss, fs = self._slab_index(panel, y, x)
        return self._radius[ss, fs]

    def resolution_ticks(self, photon_energy_ev: float, n: int = 5) -> list[tuple[float, float]]:
        """``[(radius_px, d_A), ...]`` at ``n`` radii, or [] without a geometry / energy / clen."""
        g = self.geometry
        if g is None or g.clen_m is None or g.res is None or not (photon_energy_ev > 0):
            return []
        radii = np.linspace(0, self.radius_max, n + 1)[1:]
        d = resolution_a(radii, clen_m=g.clen_m, res=g.res, photon_energy_ev=photon_energy_ev)
        return [(float(r), float(v)) for r, v in zip(radii, d)]


def encode_png(rgb_or_grey: np.ndarray) -> str:
    """A ``uint8`` image (H, W) or (H, W, 3) as a ``data:image/png;base64,...`` URL."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb_or_grey)).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _scale_image(img: np.ndarray) -> np.ndarray:
    """Detector picture -> uint8: log(1 + max(v - 1st percentile, 0)), clipped at the 99.9th."""
    v = np.asarray(img, dtype=np.float32)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return np.zeros(v.shape, np.uint8)
    lo, hi = np.percentile(finite, [1.0, 99.9])
    v = np.log1p(np.clip(np.nan_to_num(v, nan=lo) - lo, 0, None))
    top = math.log1p(max(float(hi - lo), 1e-6))
    return (np.clip(v / top, 0, 1) * 255).astype(np.uint8)


def _heat(counts: np.ndarray) -> np.ndarray:
    """Counts -> an RGB heat map (log scale; 0 stays black), uint8 (H, W, 3)."""
    c = np.log1p(np.asarray(counts, dtype=np.float64))
    top = float(c.max()) if c.size else 0.0
    t = c / top if top > 0 else c
    r = np.clip(3 * t, 0, 1)
    g = np.clip(3 * t - 1, 0, 1)
    b = np.clip(3 * t - 2, 0, 1) * 0.7 + np.where(t > 0, 0.3 * (1 - t), 0)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


@dataclass
class _Channel:
    """Per consumer (output channel) bookkeeping."""

    name: str
    n_frames: int = 0
    n_hits: int = 0
    n_peaks: int = 0
    last_unique_id: int = 0
    last_update: float | None = None
    #: the output monitor has its first value (a consumer's placeholder counts): frames from now on are seen
    output_connected: bool = False
    min_peaks: int | None = None
    bins: deque = field(default_factory=deque)  # [bin_start, frames, hits]
    status: dict[str, Any] = field(default_factory=dict)
    status_channel: str = ""
    status_time: float | None = None


class MonitorState:
    """Thread-safe aggregate of everything the page shows (fed from PVA threads, read by the web
    loop). ``now`` arguments are ``time.time()`` seconds (injectable for tests)."""

    def __init__(self, config: MonitorConfig | None = None, *, geometry: DetectorGeometry | None = None,
                 channels: list[str] | None = None, status_channels: list[str] | None = None) -> None:
        self.config = config or MonitorConfig()
        self.geometry = geometry
        self._lock = threading.Lock()
        self._channels: dict[str, _Channel] = {}
        self._status_to_output: dict[str, str] = {}
        for i, name in enumerate(channels or []):
            self._channels[name] = _Channel(name)
            if status_channels and i < len(status_channels):
                self._channels[name].status_channel = status_channels[i]
                self._status_to_output[status_channels[i]] = name
        self.t_start = time.time()
        self.n_updates = 0
        self.n_peaks_total = 0
        self.n_images = 0
        self.n_errors = 0
        self.photon_energy_ev = float("nan")
        self.panel_shape: tuple[int, int] | None = None
        self.view: DetectorView | None = None
        self._n_panels_seen = 0
        self.peaks_hist = np.zeros(self.config.max_peaks_hist + 1, np.int64)  # last bin = overflow
        self.powder: np.ndarray | None = None
        self.peakogram: np.ndarray | None = None
        self._peakogram_range: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 7.0)
        self.latest_hit: dict[str, Any] | None = None
        self._hit_version = 0
        self._pictures_version = -1
        self._pictures: dict[str, str] = {}
        self._data_version = 0

    # -- feeding -------------------------------------------------------------------------------

    def _channel(self, name: str) -> _Channel:
        ch = self._channels.get(name)
        if ch is None:
            ch = self._channels[name] = _Channel(name)
        return ch

    def _ensure_view(self, n_panels: int, panel_shape: tuple[int, int]) -> None:
        """(Re)build the detector view when the frame layout changes (accumulations restart)."""
        if self.view is not None and self.view.frame_shape == (n_panels, *panel_shape):
            return
        geometry = self.geometry
        if geometry is not None and geometry.slab_shape != (n_panels * panel_shape[0], panel_shape[1]):
            log.warning("geometry slab %s does not fit frames of %d x %s; using a panel grid",
                        geometry.slab_shape, n_panels, panel_shape)
            geometry = None
        self.view = DetectorView((n_panels, *panel_shape), geometry, self.config.image_max_px)
        self.powder = np.zeros(self.view.shape, np.int64)
        self.peakogram = np.zeros(self.config.peakogram_bins, np.int64)
        self._peakogram_range = (0.0, max(self.view.radius_max, 1.0), 0.0, 7.0)
        log.info("monitor view %s for frames %d x %s", self.view.shape, n_panels, panel_shape)

    def add_peaks(self, update: PeakUpdate, now: float | None = None) -> None:
        """Account one published frame (every frame: O(nPeaks))."""
        now = time.time() if now is None else now
        cfg = self.config
        n = int(update.n_peaks)
        with self._lock:
            ch = self._channel(update.channel)
            min_peaks = cfg.min_peaks if ch.min_peaks is None else ch.min_peaks
            hit = n >= min_peaks
            ch.n_frames += 1
            ch.n_hits += int(hit)
            ch.n_peaks += n
            ch.last_unique_id = int(update.unique_id)
            ch.last_update = now
            start = math.floor(now / cfg.bin_s) * cfg.bin_s
            if ch.bins and ch.bins[-1][0] == start:
                ch.bins[-1][1] += 1
                ch.bins[-1][2] += int(hit)
            else:
                ch.bins.append([start, 1, int(hit)])
            while ch.bins and ch.bins[0][0] < now - cfg.window_s:
                ch.bins.popleft()
            self.n_updates += 1
            self.n_peaks_total += n
            self.peaks_hist[min(n, cfg.max_peaks_hist)] += 1
            if math.isfinite(update.photon_energy_ev) and update.photon_energy_ev > 0:
                self.photon_energy_ev = float(update.photon_energy_ev)
            if n and len(update.panel):
                h, w = update.panel_shape
                if h > 0 and w > 0:
                    n_panels = max(int(np.max(update.panel)) + 1, self._n_panels_seen,
                                   self.view.frame_shape[0] if self.view is not None else 1)
                    if self.geometry is not None and self.geometry.slab_shape[1] == w and self.geometry.slab_shape[0] % h == 0:
                        n_panels = max(n_panels, self.geometry.slab_shape[0] // h)
                    self._n_panels_seen = n_panels
                    self._ensure_view(n_panels, (h, w))
                    self.panel_shape = (h, w)
                    self._accumulate(update)
            self._data_version += 1

    def _accumulate(self, u: PeakUpdate) -> None:
        """Powder pattern and peakogram (lock held)."""
        view = self.view
        assert view is not None and self.powder is not None and self.peakogram is not None
        col, row = view.view_xy(u.panel, u.y, u.x)
        ok = np.isfinite(col) & np.isfinite(row)
        ci = np.clip(col[ok].astype(np.int64), 0, view.shape[1] - 1)
        ri = np.clip(row[ok].astype(np.int64), 0, view.shape[0] - 1)
        np.add.at(self.powder, (ri, ci), 1)
        r = view.radius(u.panel, u.y, u.x)
        li = np.log10(np.clip(np.asarray(u.intensity, dtype=np.float64), 1.0, None))
        r0, r1, l0, l1 = self._peakogram_range
        nb_r, nb_i = self.peakogram.shape
        bi_r = np.clip(((r - r0) / (r1 - r0) * nb_r).astype(np.int64), 0, nb_r - 1)
        bi_i = np.clip(((li - l0) / (l1 - l0) * nb_i).astype(np.int64), 0, nb_i - 1)
        np.add.at(self.peakogram, (nb_i - 1 - bi_i, bi_r), 1)  # row 0 = the brightest

    def add_status(self, status_channel: str, status: dict[str, Any], now: float | None = None) -> None:
        """A consumer's status object (``toDict()`` of its status channel)."""
        now = time.time() if now is None else now
        with self._lock:
            name = self._status_to_output.get(status_channel, status_channel)
            ch = self._channel(name)
            ch.status_channel = status_channel
            ch.status = status
            ch.status_time = now
            mp = status.get("userStats", {}).get("minPeaks")
            if isinstance(mp, (int, float)) and not isinstance(mp, bool):
                ch.min_peaks = int(mp)
            self._data_version += 1

    def set_hit(self, hit: HitImage) -> None:
        """A sampled hit: assemble it, scale it, keep it with its peaks in view coordinates."""
        pixels = np.asarray(hit.pixels)
        if pixels.ndim == 2:
            pixels = pixels[None]
        p, h, w = pixels.shape
        with self._lock:
            self._n_panels_seen = max(self._n_panels_seen, p)
            self._ensure_view(p, (h, w))
            view = self.view
        assert view is not None
        img = view.assembler(pixels)  # outside the lock: the heavy part
        grey = _scale_image(img)
        col, row = view.view_xy(hit.panel, hit.y, hit.x)
        peaks = [[round(float(c), 2), round(float(r), 2)] for c, r in zip(col, row) if math.isfinite(c) and math.isfinite(r)]
        png = encode_png(grey)
        with self._lock:
            self._hit_version += 1
            self.n_images += 1
            self.latest_hit = {
                "version": self._hit_version,
                "channel": hit.channel,
                "uniqueId": int(hit.unique_id),
                "nPeaks": int(len(hit.panel)),
                "photonEnergy": float(hit.photon_energy_ev),
                "width": int(view.shape[1]),
                "height": int(view.shape[0]),
                "binning": int(view.binning),
                "png": png,
                "peaks": peaks,
                "time": time.time(),
            }

    def count_error(self) -> None:
        with self._lock:
            self.n_errors += 1

    def mark_output_connected(self, channel: str) -> None:
        """The output channel's monitor got its first value: no frame published from now is missed."""
        with self._lock:
            self._channel(channel).output_connected = True

    # -- reading -------------------------------------------------------------------------------

    def _render_pictures(self) -> dict[str, str]:
        """PNG data URLs of the powder pattern and the peakogram (cached until data changes)."""
        with self._lock:
            if self._pictures_version == self._data_version:
                return self._pictures
            powder = None if self.powder is None else self.powder.copy()
            peakogram = None if self.peakogram is None else self.peakogram.copy()
            version = self._data_version
        out: dict[str, str] = {}
        if powder is not None:
            out["powder"] = encode_png(_heat(powder))
        if peakogram is not None:
            out["peakogram"] = encode_png(_heat(peakogram))
        with self._lock:
            self._pictures, self._pictures_version = out, version
        return out

    def snapshot(self, now: float | None = None, *, hit_version: int = -1) -> dict[str, Any]:
        """Everything the page shows, JSON-ready. The latest hit's picture is included only when
        its version differs from ``hit_version`` (the one the page already has)."""
        now = time.time() if now is None else now
        pictures = self._render_pictures()
        cfg = self.config
        with self._lock:
            consumers = []
            for name, ch in self._channels.items():
                recent = [b for b in ch.bins if b[0] >= now - 10.0 - cfg.bin_s]
                span = max(min(10.0, now - (recent[0][0] if recent else now)), cfg.bin_s)
                frames_recent = sum(b[1] for b in recent)
                st = ch.status
                counters = {label: st.get(section, {}).get(key) for label, section, key in STATUS_COUNTERS}
                config = {
                    "consumerId": st.get("consumerId"),
                    "inputChannel": st.get("inputChannel"),
                    "device": st.get("userStats", {}).get("device"),
                    "minPeaks": ch.min_peaks if ch.min_peaks is not None else cfg.min_peaks,
                    "statusChannel": ch.status_channel,
                }
                consumers.append({
                    "channel": name,
                    "connected": ch.output_connected or ch.last_update is not None or ch.status_time is not None,
                    "outputConnected": ch.output_connected or ch.last_update is not None,
                    "alive": (ch.status_time is not None and now - ch.status_time < 10.0)
                             or (ch.last_update is not None and now - ch.last_update < 10.0),
                    "frames": ch.n_frames,
                    "hits": ch.n_hits,
                    "peaks": ch.n_peaks,
                    "hitRate": ch.n_hits / ch.n_frames if ch.n_frames else 0.0,
                    "fpsRecent": frames_recent / span if recent else 0.0,
                    "lastUniqueId": ch.last_unique_id,
                    "counters": counters,
                    "statusAge": None if ch.status_time is None else round(now - ch.status_time, 2),
                    "config": config,
                    "series": [[round(now - b[0], 3), b[1] / cfg.bin_s, (b[2] / b[1]) if b[1] else 0.0]
                               for b in ch.bins],
                })
            hist = self.peaks_hist
            top = int(np.flatnonzero(hist)[-1]) + 1 if hist.any() else 1
            view = self.view
            snap: dict[str, Any] = {
                "time": now,
                "uptime": now - self.t_start,
                "nUpdates": self.n_updates,
                "nPeaksTotal": self.n_peaks_total,
                "nImages": self.n_images,
                "nErrors": self.n_errors,
                "photonEnergy": self.photon_energy_ev if math.isfinite(self.photon_energy_ev) else None,
                "panelShape": list(self.panel_shape) if self.panel_shape else None,
                "nPanels": view.frame_shape[0] if view else None,
                "geometry": "file" if (view is not None and view.geometry is not None) else "panel grid",
                "windowS": cfg.window_s,
                "binS": cfg.bin_s,
                "consumers": consumers,
                "peaksHist": {"counts": hist[:top].tolist(), "overflowAt": cfg.max_peaks_hist},
                "peakogram": {
                    "png": pictures.get("peakogram"),
                    "radiusMax": self._peakogram_range[1],
                    "log10IntensityRange": [self._peakogram_range[2], self._peakogram_range[3]],
                    "resolutionTicks": view.resolution_ticks(self.photon_energy_ev) if view else [],
                },
                "powder": {"png": pictures.get("powder"), "nPeaks": int(self.powder.sum()) if self.powder is not None else 0},
            }
            hit = self.latest_hit
            if hit is not None:
                snap["latestHit"] = hit if hit["version"] != hit_version else {k: v for k, v in hit.items() if k != "png"}
            else:
                snap["latestHit"] = None
        return snap
