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

from .errors import CheckpointError, ConfigError
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
CENTROIDS = ("mask", "intensity")
NORMS = ("auto", "instance", "robust")


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
    centroid: str = "mask"
    max_peaks: int = 2048
    per_event_norm: bool = False
    #: input normalisation: "auto" = what the checkpoint declares (``PeakNetConfig.norm``), or force
    #: "instance" / "robust" (only meaningful for weights trained that way).
    norm: str = "auto"
    #: peakfinder8 backend only: a detector preset name (tuned parameters and its radius map, see
    #: ``peakfinder8.TUNED_PARAMS``) or a dict of ``Peakfinder8Params`` fields; None = defaults.
    peakfinder8: str | dict[str, Any] | None = field(default=None, hash=False)

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
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"dtype must be auto, bf16, fp16 or fp32; got {self.dtype!r}")

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


def build_peakfinder8(spec: str | dict[str, Any] | None, device: torch.device) -> Any:
    """A ``Peakfinder8`` from a detector preset name (tuned parameters + that detector's radius
    map), a dict of ``Peakfinder8Params`` fields, or None (defaults, radius from panel centres)."""
    from .peakfinder8 import Peakfinder8, Peakfinder8Params, tuned_params

    if isinstance(spec, str):
        from .simulate import get_detector

        return Peakfinder8(tuned_params(spec), radius=get_detector(spec).radius_map(), device=device)
    try:
        params = Peakfinder8Params(**(spec or {}))
    except TypeError as exc:
        raise ConfigError(f"peakfinder8: {exc}") from None
    return Peakfinder8(params, device=device)


class PeakFinder:
    """Find Bragg peaks in detector frames with PeakNet (or peakfinder8), on CPU or GPU.

    Keyword arguments are the fields of ``FinderConfig``. ``weights="random"`` is for tests.
    """

    def __init__(self, weights: str = "default", **kwargs: Any) -> None:
        self.config = FinderConfig(weights=weights, **kwargs)
        cfg = self.config
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
            )
        else:
            pf8 = build_peakfinder8(cfg.peakfinder8, self.device)
            self.model = None
            backend = FunctionBackend(pf8.find_peaks)
        self.pipeline = Pipeline(
            backend, device=self.device, batch_size=cfg.batch_size, num_buffers=cfg.num_buffers
        )
        log.info(
            "PeakFinder ready: backend=%s device=%s weights=%s norm=%s", cfg.backend, self.device, cfg.weights,
            backend.input_norm if cfg.backend == "peaknet" else "-",
        )

    def warmup(self, frame_shape: tuple[int, int, int], dtype: np.dtype | str = np.float32) -> None:
        """Run one full batch of zeros so allocation, cuDNN and compile costs happen now."""
        zeros = np.zeros((self.config.batch_size,) + tuple(frame_shape), dtype=np.dtype(dtype))
        self.pipeline.submit(zeros)
        self.pipeline.drain()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def find(self, frames: np.ndarray) -> list[PeakTable]:
        """One PeakTable per frame; ``frames`` is ``(F, P*H, W)``, ``(F, P, H, W)`` or ``(H, W)``."""
        stack = as_panel_stack(frames, self.config.panel_shape)
        out: list[PeakTable] = []
        bs = self.config.batch_size
        for start in range(0, stack.shape[0], bs):
            for res in self.pipeline.submit(stack[start : start + bs]):
                out.extend(res.peaks)
        for res in self.pipeline.drain():
            out.extend(res.peaks)
        return out
