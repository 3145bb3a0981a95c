"""Train PeakNet on simulated still shots (no download: our own default weights come from here).

Frames are simulated with exact ground truth, normalised per panel exactly as inference does
(``preprocess``), and cut into crops centred near spots most of the time, so a small model learns
on two CPU cores in tens of minutes. Labels are the pixels where a spot's noiseless profile
exceeds a fraction of its peak. The loss is a focal loss: peaks cover well under 1 % of pixels.

    peaknet-pva train --out runs/default --steps 3000        # resumable: run again to continue
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainParams:
    """Everything that decides the trained weights (saved next to them)."""

    preset: str = "peaknet-atto-s"
    detectors: tuple[str, ...] = ("single", "epix10k2m", "jungfrau4m")
    frames_per_detector: int = 48
    val_frames_per_detector: int = 4
    crop: int = 128
    batch_size: int = 16
    steps: int = 3000
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    focal_gamma: float = 2.0
    pos_weight: float = 4.0
    label_fraction: float = 0.3
    spot_centred: float = 0.8
    seed: int = 0
    eval_every: int = 250
    threads: int = 2
    balance_detectors: bool = True

    def __post_init__(self) -> None:
        if self.crop % 32:
            raise ConfigError(f"crop must be a multiple of 32, got {self.crop}")
        for name in ("steps", "batch_size", "frames_per_detector"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")


@dataclass
class PanelPool:
    """Normalised panels (float16) and their labels (uint8), with spot positions for sampling."""

    images: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    spots: list[np.ndarray] = field(default_factory=list)  # (n, 2) y, x per panel
    groups: list[list[int]] = field(default_factory=list)  # panel indexes of each detector preset


def _normalise(frame: np.ndarray) -> np.ndarray:
    """Per-panel instance norm, the same function inference uses; returns (P, H, W) float32."""
    from .preprocess import preprocess

    x, (h, w) = preprocess(torch.from_numpy(np.ascontiguousarray(frame[None])))
    return x[:, 0, :h, :w].numpy()


def build_pool(params: TrainParams, *, seed: int, n_per_detector: int, progress: bool = True) -> PanelPool:
    """Simulate frames of every detector preset and keep each panel with its label mask."""
    from .simulate import DETECTORS, SimulationParams, simulate_frame, spot_label_mask

    rng = np.random.default_rng(seed)
    pool = PanelPool()
    total = n_per_detector * len(params.detectors)
    with tqdm(total=total, desc="simulating", disable=not progress) as bar:
        for name in params.detectors:
            det = DETECTORS[name]
            pool.groups.append([])
            for _ in range(n_per_detector):
                frame, truth = simulate_frame(rng, det, SimulationParams())
                labels = spot_label_mask(frame.shape, truth, fraction=params.label_fraction)
                norm = _normalise(frame)
                det_truth = truth.detectable_only()
                for p in range(frame.shape[0]):
                    pool.images.append(norm[p].astype(np.float16))
                    pool.labels.append(labels[p].astype(np.uint8))
                    sel = det_truth.panel == p
                    pool.spots.append(np.stack([det_truth.y[sel], det_truth.x[sel]], 1))
                    pool.groups[-1].append(len(pool.images) - 1)
                bar.update(1)
    return pool


def sample_batch(pool: PanelPool, params: TrainParams, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops ``(B, 1, c, c)`` and labels ``(B, c, c)``; most crops contain a spot, with random
    offsets so spots land anywhere in the crop, and random flips. With ``balance_detectors`` each
    crop first draws a detector preset uniformly (a 1-panel preset would otherwise be ~4 % of crops)."""
    c = params.crop
    xs = np.zeros((params.batch_size, 1, c, c), np.float32)
    ys = np.zeros((params.batch_size, c, c), np.int64)
    for b in range(params.batch_size):
        if params.balance_detectors and pool.groups:
            group = pool.groups[int(rng.integers(len(pool.groups)))]
            i = group[int(rng.integers(len(group)))]
        else:
            i = int(rng.integers(len(pool.images)))
        img, lab, spots = pool.images[i], pool.labels[i], pool.spots[i]
        h, w = img.shape
        ch, cw = min(c, h), min(c, w)
        if len(spots) and rng.random() < params.spot_centred:
            y, x = spots[rng.integers(len(spots))]
            y0 = int(np.clip(y - rng.integers(0, ch), 0, h - ch))
            x0 = int(np.clip(x - rng.integers(0, cw), 0, w - cw))
        else:
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop_img = img[y0 : y0 + ch, x0 : x0 + cw].astype(np.float32)
        crop_lab = lab[y0 : y0 + ch, x0 : x0 + cw]
        if rng.random() < 0.5:
            crop_img, crop_lab = crop_img[::-1], crop_lab[::-1]
        if rng.random() < 0.5:
            crop_img, crop_lab = crop_img[:, ::-1], crop_lab[:, ::-1]
        xs[b, 0, :ch, :cw] = crop_img
        ys[b, :ch, :cw] = crop_lab
    return torch.from_numpy(xs), torch.from_numpy(ys)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float, pos_weight: float) -> torch.Tensor:
    """Class-weighted focal loss over pixels: easy background pixels contribute almost nothing."""
    logp = F.log_softmax(logits.float(), dim=1)
    logp_t = logp.gather(1, target[:, None]).squeeze(1)
    weight = torch.where(target == 1, pos_weight, 1.0)
    loss = -weight * (1 - logp_t.exp()).pow(gamma) * logp_t
    return loss.sum() / weight.sum()


def evaluate_pool(model: torch.nn.Module, frames: list[tuple[np.ndarray, object]]) -> dict[str, float]:
    """F1 / RMSE of the model on whole simulated frames, through the same path as inference."""
    from .evaluate import evaluate
    from .pipeline import PeakNetBackend

    backend = PeakNetBackend(model)
    found, truths = [], []
    model.eval()
    for frame, truth in frames:
        t = torch.from_numpy(np.ascontiguousarray(frame[None]))
        found.extend(backend.extract(backend.compute(t), t))
        truths.append(truth)
    model.train()
    return evaluate(found, truths).as_dict()


def train(params: TrainParams, out_dir: Path, *, device: str = "auto", progress: bool = True) -> dict:
    """Train (or resume) into ``out_dir``; write ``last.pt`` (resumable), ``best.pt``, ``train.json``."""
    from .model import create_model, save_checkpoint
    from .pipeline import resolve_device
    from .simulate import DETECTORS, SimulationParams, simulate_frame

    torch.manual_seed(params.seed)
    torch.set_num_threads(params.threads)
    dev = resolve_device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = create_model(params.preset).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / params.warmup_steps)
        * 0.5 * (1 + np.cos(np.pi * min(1.0, s / params.steps))),
    )
    state_path = out_dir / "last.pt"
    step, best_f1, history = 0, -1.0, []
    if state_path.exists():
        state = torch.load(state_path, map_location=dev, weights_only=False)
        if state["params"] != asdict(params):
            raise ConfigError(f"{state_path} was trained with other parameters; use a new --out")
        model.load_state_dict(state["model_state_dict"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, best_f1, history = state["step"], state["best_f1"], state["history"]
        log.info("resuming from step %d (best F1 %.4f)", step, best_f1)

    pool = build_pool(params, seed=params.seed, n_per_detector=params.frames_per_detector, progress=progress)
    vrng = np.random.default_rng(params.seed + 10_000)
    val = [
        simulate_frame(vrng, DETECTORS[name], SimulationParams())
        for name in params.detectors
        for _ in range(params.val_frames_per_detector)
    ]
    rng = np.random.default_rng(params.seed + step)
    model.train()
    t0 = time.time()
    with tqdm(total=params.steps, initial=step, desc="training", disable=not progress) as bar:
        while step < params.steps:
            x, y = sample_batch(pool, params, rng)
            logits = model(x.to(dev))
            loss = focal_loss(logits, y.to(dev), gamma=params.focal_gamma, pos_weight=params.pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % params.eval_every == 0 or step == params.steps:
                metrics = evaluate_pool(model, val)
                metrics.update(step=step, loss=float(loss.item()), elapsed_s=time.time() - t0)
                history.append(metrics)
                log.info("step %d: %s", step, json.dumps(metrics))
                if metrics["f1"] > best_f1:
                    best_f1 = metrics["f1"]
                    save_checkpoint(out_dir / "best.pt", model)
                torch.save(
                    {
                        "model_state_dict": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "step": step,
                        "best_f1": best_f1,
                        "history": history,
                        "params": asdict(params),
                    },
                    state_path,
                )
    record = {"params": asdict(params), "history": history, "best_f1": best_f1, "device": str(dev)}
    (out_dir / "train.json").write_text(json.dumps(record, indent=2))
    return record


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def train_main(argv: list[str] | None = None) -> int:
    """CLI: ``peaknet-pva train --out DIR [--steps N] [--preset P] [--seed S] [--device D]``."""
    defaults = TrainParams()
    p = argparse.ArgumentParser(prog="peaknet-pva train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run directory (resumes if last.pt is there)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            p.add_argument(flag, default=",".join(value))
        elif isinstance(value, bool):
            p.add_argument(flag, type=_parse_bool, default=value, metavar="{true,false}")
        else:
            p.add_argument(flag, type=type(value), default=value)
    args = p.parse_args(argv)
    kwargs = {k: getattr(args, k) for k in asdict(defaults)}
    kwargs["detectors"] = tuple(str(args.detectors).split(","))
    params = TrainParams(**kwargs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text("peaknet-pva train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])) + "\n")
    record = train(params, out, device=args.device, progress=not args.no_progress)
    log.info("best F1 %.4f; weights in %s", record["best_f1"], out / "best.pt")
    return 0
