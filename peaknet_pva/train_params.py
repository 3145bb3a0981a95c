"""What decides a training run (``TrainParams``) and the ``peaknet-pva train`` argument parser.

Kept apart from ``train`` (torch, SciPy) so ``peaknet-pva train --help`` answers at once.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class TrainParams:
    """Everything that decides the trained weights (saved next to them)."""

    preset: str = "peaknet-atto-s"
    detectors: tuple[str, ...] = ("single", "epix10k2m", "jungfrau4m")
    frames_per_detector: int = 32
    val_frames_per_detector: int = 1
    val_panels: int = 48
    crop: int = 96
    batch_size: int = 16
    steps: int = 3000
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    focal_gamma: float = 2.0
    pos_weight: float = 4.0
    label_fraction: float = 0.3
    spot_centred: float = 0.5
    seed: int = 0
    eval_every: int = 250
    threads: int = 2
    balance_detectors: bool = True
    #: input normalisation the weights are trained for (stored in the checkpoint config).
    norm: str = "robust"
    #: share of crops from the physical simulator's presets; the rest come from ``augment``.
    sim_fraction: float = 0.25
    #: crops cut from each freshly drawn ``augment`` panel.
    crops_per_panel: int = 4
    #: start from these weights ("" = random init, "default" = the shipped ones, or a path).
    init: str = ""
    #: processes drawing batches ahead of the training loop (0 = in the loop).
    workers: int = 1
    #: top of the training background range (photons/pixel, log-uniform from 0.01). Validation
    #: always uses ``DomainParams``' own range, so runs with different ranges compare.
    max_background: float = 300.0
    #: SNR from which a training spot is labelled (``DomainParams.detect_snr``). Validation always
    #: scores against ``DomainParams``' own rule (6); a peak found on a weaker real spot counts
    #: neither way there, so training the boundary lower buys recall at the reporting boundary.
    detect_snr: float = 6.0
    #: hot pixels in the training domain (``DomainParams.hot_prob`` / ``hot_bright_prob``).
    hot_prob: float = 0.5
    hot_bright_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.crop % 32:
            raise ConfigError(f"crop must be a multiple of 32, got {self.crop}")
        for name in ("steps", "batch_size", "frames_per_detector", "crops_per_panel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if not 0.0 <= self.sim_fraction <= 1.0:
            raise ConfigError(f"sim_fraction must be in [0, 1], got {self.sim_fraction}")
        for name in ("hot_prob", "hot_bright_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 1.0 <= self.detect_snr <= 50.0:
            raise ConfigError(f"detect_snr must be in [1, 50], got {self.detect_snr}")
        if not self.max_background > 0.01:
            raise ConfigError(f"max_background must be > 0.01 photons/pixel, got {self.max_background}")
        if self.norm not in ("instance", "robust", "local"):
            raise ConfigError(f"norm must be instance, robust or local, got {self.norm!r}")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """``peaknet-pva train``'s options: ``--out``, ``--device``, ``--no-progress`` and one per field."""
    p = argparse.ArgumentParser(prog="peaknet-pva train",
                                description="Train PeakNet (resumable: run again with the same --out to continue).")
    p.add_argument("--out", required=True, help="run directory (resumes if last.pt is there)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    for name, value in asdict(TrainParams()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            p.add_argument(flag, default=",".join(value))
        elif isinstance(value, bool):
            p.add_argument(flag, type=_parse_bool, default=value, metavar="{true,false}")
        else:
            p.add_argument(flag, type=type(value), default=value)
    return p


def params_from_args(args: argparse.Namespace) -> TrainParams:
    kwargs = {k: getattr(args, k) for k in asdict(TrainParams())}
    kwargs["detectors"] = tuple(str(args.detectors).split(","))
    return TrainParams(**kwargs)
