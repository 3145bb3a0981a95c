"""``PeakFinder``: frames in, peak tables out, for users without PVA.

It resolves the weights, model and device once, builds a ``Pipeline`` and feeds it in batches::

    from peaknet_pva import PeakFinder
    finder = PeakFinder(weights="default", device="auto", panel_shape=(352, 384))
    tables = finder.find(frames)          # frames: (F, P*H, W) slabs or (F, P, H, W)
    tables[0].as_list()                   # [[panel, y, x], ...]

The PVA processor builds the same object and drives ``finder.pipeline`` itself.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, ConfigError, FrameError
from .frames import PeakTable, as_panel_stack
from .pipeline import (
    FunctionBackend,
    PeakNetBackend,
    Pipeline,
    resolve_amp_dtype,
    resolve_device,
)

log = logging.getLogger(__name__)

#: The preset used with ``weights="random"`` when no model is named.
DEFAULT_PRESET = "peaknet-atto-s"
#: File name of the shipped default weights inside the package.
DEFAULT_WEIGHTS_FILE = "peaknet-default.pt"
BACKENDS = ("peaknet", "peakfinder8")
CENTROIDS = ("auto", "mask", "intensity", "signal")
NORMS = ("auto", "instance", "robust", "local")


def default_weights_path() -> Path:
    """Path of the weights shipped inside the package (``weights="default"``)."""
    return Path(str(resources.files("peaknet_pva") / "weights" / DEFAULT_WEIGHTS_FILE))


@dataclass(frozen=True)
class FinderConfig:
    """Everything that decides which peaks come out. Validated at construction."""

    weights: str = "default"
    model: str | None = None
    backend: str = "peaknet"
    device: str = "auto"
    panel_shape: tuple[int, int] | None = None
    batch_size: int = 8
    num_buffers: int = 3
    dtype: str = "auto"
    compile: bool = False
    centroid: str = "auto"
    max_peaks: int = 2048
    per_event_norm: bool = False
    #: input normalisation: "auto" = what the checkpoint declares (``PeakNetConfig.norm``), or force
    #: "instance" / "robust" (only meaningful for weights trained that way).
    norm: str = "auto"
    #: isolated-pixel (hot pixel) veto of the PeakNet backend, see ``pipeline.isolated_pixels``:
    #: None = auto (0.05 with the robust or local norm, off with the instance norm), 0 = off, or a ratio.
    isolated_ratio: float | None = None
    #: PeakNet backend: split components holding separate signal maxima (touching spots), see
    #: ``peaks.find_peaks(split=...)``. None = auto (on with the robust or local norm, off with instance).
    split: bool | None = None
    #: peakfinder8 backend only: a detector preset name (tuned parameters and its radius map, see
    #: ``peakfinder8.TUNED_PARAMS``) or a dict of ``Peakfinder8Params`` fields; None = defaults.
    peakfinder8: str | dict[str, Any] | None = field(default=None, hash=False)
    #: a CrystFEL ``.geom`` path (or a ``DetectorGeometry``): the slab layout (tiles, see
    #: ``geometry.tile_shape_for``), peakfinder8's radius map (pixel positions and beam centre)
    #: and the bad pixels it declares (off-panel, ``bad_*`` regions, ``no_index``, ``mask_file``).
    geometry: Any = field(default=None, hash=False)
    #: a bad-pixel mask: ``.npy`` / HDF5 path (``FILE.h5:/dataset`` or ``mask_dataset``) or an
    #: array, read with ``mask_convention``; slab ``(rows, cols)`` or ``(P, H, W)``.
    mask: Any = field(default=None, hash=False)
    #: "om" (nonzero = good, OM/Cheetah), "nonzero_bad" (pyFAI/NeXus, our truth.h5), "crystfel"
    #: (bit flags with ``mask_good_bits``/``mask_bad_bits``, default: the geometry's mask_good/mask_bad).
    mask_convention: str = "om"
    mask_dataset: str | None = None
    mask_good_bits: int | None = None
    mask_bad_bits: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.centroid not in CENTROIDS:
            raise ConfigError(f"centroid must be one of {CENTROIDS}, got {self.centroid!r}")
        for name in ("batch_size", "num_buffers", "max_peaks"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.panel_shape is not None:
            shape = tuple(int(v) for v in self.panel_shape)
            if len(shape) != 2 or min(shape) < 1:
                raise ConfigError(f"panel_shape must be [H, W], got {self.panel_shape!r}")
            object.__setattr__(self, "panel_shape", shape)
        if self.peakfinder8 is not None and not isinstance(self.peakfinder8, (str, dict)):
            raise ConfigError(f"peakfinder8 must be a detector preset name or a dict, got {self.peakfinder8!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.isolated_ratio is not None and not 0.0 <= float(self.isolated_ratio) < 1.0:
            raise ConfigError(f"isolated_ratio must be None (auto) or in [0, 1), got {self.isolated_ratio!r}")
        if self.split is not None and not isinstance(self.split, bool):
            raise ConfigError(f"split must be None (auto), true or false, got {self.split!r}")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"dtype must be auto, bf16, fp16 or fp32; got {self.dtype!r}")
        from .geometry import MASK_CONVENTIONS, DetectorGeometry

        if self.geometry is not None and not isinstance(self.geometry, (str, Path, DetectorGeometry)):
            raise ConfigError(f"geometry must be a CrystFEL .geom path, got {self.geometry!r}")
        if self.mask_convention not in MASK_CONVENTIONS:
            raise ConfigError(f"mask_convention must be one of {MASK_CONVENTIONS}, got {self.mask_convention!r}")
        if self.mask is not None and not isinstance(self.mask, (str, Path, np.ndarray)):
            raise ConfigError(f"mask must be a .npy/HDF5 path or an array, got {type(self.mask).__name__}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_model(weights: str, model: str | None = None) -> torch.nn.Module:
    """Resolve ``weights`` ("default" | "random" | a checkpoint path) and ``model`` (a preset name
    or a YAML config path) into an eval-mode PeakNet on the CPU. Never silently random: only
    ``weights="random"`` gives random weights."""
    from .model import config_from_yaml, create_model, load_checkpoint

    config = None
    if model is not None:
        config = config_from_yaml(model) if Path(model).suffix in (".yaml", ".yml") else model
    if weights == "random":
        net = create_model(config or DEFAULT_PRESET)
    else:
        path = default_weights_path() if weights == "default" else Path(weights)
        if weights == "default" and not path.exists():
            raise CheckpointError(f"the default weights are not shipped in this install: {path}")
        built = create_model(config) if config is not None else None
        net = load_checkpoint(path, built)
    return net.eval()


def build_peakfinder8(
    spec: str | dict[str, Any] | None,
    device: torch.device,
    *,
    radius: np.ndarray | None = None,
    bad_pixels: np.ndarray | None = None,
) -> Any:
    """A ``Peakfinder8`` from a detector preset name (tuned parameters + that detector's radius
    map), a dict of ``Peakfinder8Params`` fields, or None (defaults, radius from panel centres).

    ``radius`` ``(P, H, W)`` (e.g. from a geometry) replaces the preset's radius map;
    ``bad_pixels`` (True = bad) becomes peakfinder8's good-pixel mask."""
    from .peakfinder8 import Peakfinder8, Peakfinder8Params, tuned_params

    mask = None if bad_pixels is None else ~np.asarray(bad_pixels, dtype=bool)
    if isinstance(spec, str):
        params = tuned_params(spec)
        if radius is None:
            from .simulate import get_detector

            radius = get_detector(spec).radius_map()
    else:
        try:
            params = Peakfinder8Params(**(spec or {}))
        except TypeError as exc:
            raise ConfigError(f"peakfinder8: {exc}") from None
    return Peakfinder8(params, radius=radius, mask=mask, device=device)


def resolve_layout(cfg: FinderConfig) -> tuple[Any, tuple[int, int] | None, np.ndarray | None, np.ndarray | None]:
    """``(geometry, panel_shape, bad_pixels, radius)`` from a config's geometry/mask/panel_shape.

    ``bad_pixels`` (True = bad) and ``radius`` are ``(P, H, W)`` (None when not known). Without a
    geometry a 2-D mask is split by ``panel_shape`` (one panel if None). A mask that does not fit
    is a one-line ConfigError.
    """
    from .geometry import (
        DetectorGeometry,
        bad_from_array,
        fit_to_slab,
        geometry_bad_pixels,
        radius_map,
        read_geometry,
        read_mask_array,
        tile_shape_for,
    )

    geometry = cfg.geometry
    base_dir = None
    if isinstance(geometry, (str, Path)):
        gpath = Path(geometry)
        if not gpath.exists():
            raise ConfigError(f"geometry: no such file: {gpath}")
        base_dir = gpath.parent
        geometry = read_geometry(gpath)
    user_bad = None
    if cfg.mask is not None:
        values = cfg.mask if isinstance(cfg.mask, np.ndarray) else read_mask_array(cfg.mask, cfg.mask_dataset)
        good_bits, bad_bits = cfg.mask_good_bits, cfg.mask_bad_bits
        if cfg.mask_convention == "crystfel" and geometry is not None:
            from .geometry import _as_int_bits

            if good_bits is None and "mask_good" in geometry.extra:
                good_bits = _as_int_bits(geometry.extra["mask_good"], where="geometry mask_good")
            if bad_bits is None and "mask_bad" in geometry.extra:
                bad_bits = _as_int_bits(geometry.extra["mask_bad"], where="geometry mask_bad")
        user_bad = bad_from_array(values, cfg.mask_convention, good_bits=good_bits, bad_bits=bad_bits)
    if isinstance(geometry, DetectorGeometry):
        tile = tile_shape_for(geometry, cfg.panel_shape)
        rows, cols = geometry.slab_shape
        bad = geometry_bad_pixels(geometry, base_dir=base_dir)
        if user_bad is not None:
            bad = bad | fit_to_slab(user_bad, (rows, cols))
        shape = (rows // tile[0],) + tile
        radius = radius_map(geometry).reshape(shape)
        return geometry, tile, bad.reshape(shape), radius
    panel_shape = cfg.panel_shape
    if user_bad is None:
        return None, panel_shape, None, None
    if user_bad.ndim == 3:
        if panel_shape is not None and tuple(user_bad.shape[1:]) != tuple(panel_shape):
            raise ConfigError(f"mask: shape {user_bad.shape} does not fit panels of {panel_shape[0]} x {panel_shape[1]}")
        return None, tuple(user_bad.shape[1:]), user_bad, None
    if user_bad.ndim != 2:
        raise ConfigError(f"mask: expected a 2-D slab or a (P, H, W) stack, got shape {user_bad.shape}")
    if panel_shape is None:
        return None, None, user_bad[None], None
    h, w = panel_shape
    if user_bad.shape[1] != w or user_bad.shape[0] % h:
        raise ConfigError(f"mask: shape {user_bad.shape} does not fit panels of {h} x {w}")
    return None, panel_shape, user_bad.reshape(-1, h, w), None


class PeakFinder:
    """Find Bragg peaks in detector frames with PeakNet (or peakfinder8), on CPU or GPU.

    Keyword arguments are the fields of ``FinderConfig``. ``weights="random"`` is for tests.
    """

    def __init__(self, weights: str = "default", **kwargs: Any) -> None:
        self.config = FinderConfig(weights=weights, **kwargs)
        cfg = self.config
        #: the detector geometry (``DetectorGeometry``) or None; ``panel_shape``: the tiles frames
        #: are split into; ``bad_pixels`` / ``radius``: ``(P, H, W)`` maps or None;
        #: ``frame_shape``: ``(P, H, W)`` every frame must have, when the geometry/mask fix it.
        self.geometry, self.panel_shape, self.bad_pixels, self.radius = resolve_layout(cfg)
        self.frame_shape = None if self.bad_pixels is None else tuple(int(v) for v in self.bad_pixels.shape)
        self.device = resolve_device(cfg.device)
        if cfg.backend == "peaknet":
            net = build_model(cfg.weights, cfg.model).to(self.device)
            if cfg.compile:
                net = torch.compile(net)
            self.model: torch.nn.Module | None = net
            backend: Any = PeakNetBackend(
                net,
                amp_dtype=resolve_amp_dtype(cfg.dtype, self.device),
                centroid=cfg.centroid,
                max_peaks=cfg.max_peaks,
                per_event_norm=cfg.per_event_norm,
                norm=None if cfg.norm == "auto" else cfg.norm,
                isolated_ratio=cfg.isolated_ratio,
                split=cfg.split,
                bad_pixels=(
                    torch.from_numpy(self.bad_pixels.copy()).to(self.device)
                    if self.bad_pixels is not None and self.bad_pixels.any() else None
                ),
            )
        else:
            pf8 = build_peakfinder8(cfg.peakfinder8, self.device, radius=self.radius, bad_pixels=self.bad_pixels)
            self.model = None
            backend = FunctionBackend(pf8.find_peaks)
        self.pipeline = Pipeline(
            backend, device=self.device, batch_size=cfg.batch_size, num_buffers=cfg.num_buffers
        )
        log.info(
            "PeakFinder ready: backend=%s device=%s weights=%s norm=%s", cfg.backend, self.device, cfg.weights,
            backend.input_norm if cfg.backend == "peaknet" else "-",
        )

    def check_frames(self, stack: np.ndarray) -> np.ndarray:
        """``stack`` ``(F, P, H, W)`` if it fits the geometry/mask, else FrameError."""
        if self.frame_shape is not None and tuple(stack.shape[1:]) != self.frame_shape:
            raise FrameError(
                f"frames of panels {tuple(stack.shape[1:])} do not fit the geometry/mask {self.frame_shape} (P, H, W)"
            )
        return stack

    def warmup(self, frame_shape: tuple[int, int, int], dtype: np.dtype | str = np.float32) -> None:
        """Run one full batch of zeros so allocation, cuDNN and compile costs happen now."""
        zeros = np.zeros((self.config.batch_size,) + tuple(frame_shape), dtype=np.dtype(dtype))
        self.pipeline.submit(zeros)
        self.pipeline.drain()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def find(self, frames: np.ndarray) -> list[PeakTable]:
        """One PeakTable per frame; ``frames`` is ``(F, P*H, W)``, ``(F, P, H, W)`` or ``(H, W)``."""
        stack = self.check_frames(as_panel_stack(frames, self.panel_shape))
        out: list[PeakTable] = []
        bs = self.config.batch_size
        for start in range(0, stack.shape[0], bs):
            for res in self.pipeline.submit(stack[start : start + bs]):
                out.extend(res.peaks)
        for res in self.pipeline.drain():
            out.extend(res.peaks)
        return out
