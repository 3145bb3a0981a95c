"""Train PeakNet (no download: our own default weights come from here).

Crops come from fresh broad-domain panels (``augment``) and from the physical simulator's presets,
each panel normalised exactly as inference does (``preprocess`` with the checkpoint's ``norm``).
Labels are the pixels where a detectable spot's noiseless profile exceeds a fraction of its peak;
the loss is a focal loss (peaks cover well under 1 % of pixels). See docs/TRAINING.md.

    peaknet-pva train --out runs/default --steps 3000        # resumable: run again to continue
"""

from __future__ import annotations

import json
import math
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

from typing import Any

from .augment import DomainParams
from .errors import ConfigError
from .train_params import TrainParams, build_parser, params_from_args

log = logging.getLogger(__name__)


@dataclass
class PanelPool:
    """Normalised panels (float16) and their labels (uint8), with spot positions for sampling."""

    images: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    spots: list[np.ndarray] = field(default_factory=list)  # (n, 2) y, x per panel
    groups: list[list[int]] = field(default_factory=list)  # panel indexes of each detector preset


def _normalise(frame: np.ndarray, norm: str = "instance", mask: np.ndarray | None = None) -> np.ndarray:
    """Per-panel normalisation, the same function inference uses; returns (P, H, W) float32."""
    from .preprocess import preprocess

    bad = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask))
    x, (h, w) = preprocess(torch.from_numpy(np.ascontiguousarray(frame[None])), norm=norm, mask=bad)
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
                norm = _normalise(frame, params.norm)
                det_truth = truth.detectable_only()
                for p in range(frame.shape[0]):
                    pool.images.append(norm[p].astype(np.float16))
                    pool.labels.append(labels[p].astype(np.uint8))
                    sel = det_truth.panel == p
                    pool.spots.append(np.stack([det_truth.y[sel], det_truth.x[sel]], 1))
                    pool.groups[-1].append(len(pool.images) - 1)
                bar.update(1)
    return pool


def _cut(
    img: np.ndarray, lab: np.ndarray, spots: np.ndarray, c: int, centred: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One ``c x c`` crop (zero-padded bottom-right if the panel is smaller, as inference pads),
    near a spot with probability ``centred``, randomly flipped and transposed."""
    h, w = img.shape
    ch, cw = min(c, h), min(c, w)
    if len(spots) and rng.random() < centred:
        y, x = spots[rng.integers(len(spots))]
        y0 = int(np.clip(y - rng.integers(0, ch), 0, h - ch))
        x0 = int(np.clip(x - rng.integers(0, cw), 0, w - cw))
    else:
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    ci = img[y0 : y0 + ch, x0 : x0 + cw].astype(np.float32)
    cl = lab[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < 0.5:
        ci, cl = ci[::-1], cl[::-1]
    if rng.random() < 0.5:
        ci, cl = ci[:, ::-1], cl[:, ::-1]
    xs = np.zeros((c, c), np.float32)
    ys = np.zeros((c, c), np.int64)
    if ch == cw and rng.random() < 0.5:
        ci, cl = ci.T, cl.T
    xs[: ci.shape[0], : ci.shape[1]] = ci
    ys[: cl.shape[0], : cl.shape[1]] = cl
    return xs, ys


def sample_batch(
    pool: PanelPool, params: TrainParams, rng: np.random.Generator, domain: DomainParams | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops ``(B, 1, c, c)`` and labels ``(B, c, c)``.

    A ``sim_fraction`` share comes from the simulator pool (with ``balance_detectors`` each such
    crop first draws a detector preset uniformly); the rest from fresh ``augment`` panels, each
    normalised whole (with its declared mask) exactly as inference does, ``crops_per_panel`` crops
    each. Crops sit near a spot with probability ``spot_centred``, at random offsets.
    """
    from .augment import sample_panel

    c, bsz = params.crop, params.batch_size
    xs = np.zeros((bsz, 1, c, c), np.float32)
    ys = np.zeros((bsz, c, c), np.int64)
    n_sim = int(rng.binomial(bsz, params.sim_fraction)) if pool.images else 0
    for b in range(n_sim):
        if params.balance_detectors and pool.groups:
            group = pool.groups[int(rng.integers(len(pool.groups)))]
            i = group[int(rng.integers(len(group)))]
        else:
            i = int(rng.integers(len(pool.images)))
        xs[b, 0], ys[b] = _cut(pool.images[i], pool.labels[i], pool.spots[i], c, params.spot_centred, rng)
    b = n_sim
    while b < bsz:
        panel = sample_panel(rng, domain)
        norm = _normalise(panel.image[None], params.norm, None if panel.mask is None else panel.mask[None])[0]
        spots = np.stack([panel.y[panel.detectable], panel.x[panel.detectable]], 1)
        for _ in range(min(params.crops_per_panel, bsz - b)):
            xs[b, 0], ys[b] = _cut(norm, panel.label, spots, c, params.spot_centred, rng)
            b += 1
    return torch.from_numpy(xs), torch.from_numpy(ys)


class _BatchStream(torch.utils.data.IterableDataset):
    """Batches for steps ``start, start+1, ...``; step ``k``'s batch depends only on (seed, k)."""

    def __init__(self, pool: PanelPool, params: TrainParams, start: int, domain: DomainParams) -> None:
        self.pool, self.params, self.start, self.domain = pool, params, start, domain

    def __iter__(self):  # type: ignore[override]
        torch.set_num_threads(1)
        for step in range(self.start, self.params.steps):
            yield sample_batch(self.pool, self.params, np.random.default_rng([self.params.seed, step]), self.domain)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float, pos_weight: float) -> torch.Tensor:
    """Class-weighted focal loss over pixels: easy background pixels contribute almost nothing."""
    logp = F.log_softmax(logits.float(), dim=1)
    logp_t = logp.gather(1, target[:, None]).squeeze(1)
    weight = torch.where(target == 1, pos_weight, 1.0)
    loss = -weight * (1 - logp_t.exp()).pow(gamma) * logp_t
    return loss.sum() / weight.sum()


@dataclass
class ValItem:
    """A whole frame for validation: raw values ``(P, H, W)``, its truth, an optional bad mask."""

    frame: np.ndarray
    truth: Any
    mask: np.ndarray | None = None
    label: np.ndarray | None = None  # (P, H, W) training labels, where the generator gives them


def validation_set(params: TrainParams, domain: DomainParams) -> tuple[list[ValItem], list[ValItem]]:
    """Fixed validation frames from streams training never draws: ``augment`` panels and
    simulator frames. (The robustness matrix, which reports, has its own generator.)"""
    from .augment import sample_panel
    from .simulate import DETECTORS, SimulationParams, TruthTable, simulate_frame

    rng = np.random.default_rng([params.seed, 10_000_019])
    broad = []
    for _ in range(params.val_panels):
        p = sample_panel(rng, domain, shape=(256, 256))
        n = p.y.shape[0]
        truth = TruthTable(
            panel=np.zeros(n, np.uint16), y=p.y, x=p.x, intensity=np.zeros(n), sigma=np.zeros(n),
            snr=p.snr, detectable=p.detectable,
        )
        broad.append(ValItem(p.image[None], truth, None if p.mask is None else p.mask[None], p.label[None]))
    vrng = np.random.default_rng(params.seed + 10_000)
    sim = [
        ValItem(*simulate_frame(vrng, DETECTORS[name], SimulationParams()))
        for name in params.detectors
        for _ in range(params.val_frames_per_detector)
    ]
    return broad, sim


def evaluate_items(model: torch.nn.Module, items: list[ValItem]) -> dict[str, float]:
    """F1 / RMSE of the model on whole frames, through the inference path (``PeakNetBackend``)."""
    from .evaluate import evaluate
    from .pipeline import PeakNetBackend

    found, truths = [], []
    model.eval()
    for item in items:
        bad = None if item.mask is None else torch.from_numpy(item.mask)
        backend = PeakNetBackend(model, bad_pixels=bad)
        t = torch.from_numpy(np.ascontiguousarray(item.frame[None]))
        found.extend(backend.extract(backend.compute(t), t))
        truths.append(item.truth)
    model.train()
    return evaluate(found, truths).as_dict()


def label_ceiling(items: list[ValItem]) -> dict[str, float]:
    """F1 / RMSE of connected components of the *labels* themselves: what a perfect segmentation
    would score. Touching spots share a component, so on dense panels this is well below 1 and
    the model's validation F1 is read against it, not against 1."""
    from .evaluate import evaluate
    from .peaks import find_peaks

    found, truths = [], []
    for item in items:
        if item.label is None:
            raise ValueError("label_ceiling needs items with labels")
        t = torch.from_numpy(np.ascontiguousarray(item.frame, np.float32))
        lab = torch.from_numpy(np.ascontiguousarray(item.label, np.uint8))
        found.extend(find_peaks(lab, t, n_panels=t.shape[0], valid_shape=tuple(t.shape[1:]), centroid="mask", max_peaks=1 << 16))
        truths.append(item.truth)
    return evaluate(found, truths).as_dict()


def evaluate_pool(model: torch.nn.Module, frames: list[tuple[np.ndarray, object]]) -> dict[str, float]:
    """F1 / RMSE of the model on whole simulated ``(frame, truth)`` pairs."""
    return evaluate_items(model, [ValItem(f, t) for f, t in frames])


def _init_model(params: TrainParams) -> torch.nn.Module:
    from .model import create_model, load_checkpoint

    model = create_model(params.preset)
    if params.init:
        from .finder import default_weights_path

        src = default_weights_path() if params.init == "default" else Path(params.init)
        load_checkpoint(src, model)
    model.config = model.config.replace(norm=params.norm)
    return model


def train(params: TrainParams, out_dir: Path, *, device: str = "auto", progress: bool = True) -> dict:
    """Train (or resume) into ``out_dir``; write ``last.pt`` (resumable), ``best.pt``, ``train.json``."""
    from .augment import DomainParams
    from .model import save_checkpoint
    from .pipeline import resolve_device

    torch.manual_seed(params.seed)
    torch.set_num_threads(params.threads)
    dev = resolve_device(device)
    domain = DomainParams(label_fraction=params.label_fraction, detect_snr=params.detect_snr,
                          background=(DomainParams.background[0], params.max_background),
                          hot_prob=params.hot_prob, hot_bright_prob=params.hot_bright_prob)
    val_domain = DomainParams(label_fraction=params.label_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _init_model(params).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / params.warmup_steps)
        * 0.5 * (1 + math.cos(math.pi * min(1.0, s / params.steps))),
    )
    state_path = out_dir / "last.pt"
    step, best_score, history = 0, -1.0, []
    horizons = [[0, params.steps]]  # [first step, total steps] of each LR schedule in force
    if state_path.exists():
        # weights_only: a planted last.pt cannot run code; everything saved is tensors and plain data.
        state = torch.load(state_path, map_location=dev, weights_only=True)
        # Fields added since the run started count at their defaults.
        saved = {**_plain(asdict(TrainParams())), **dict(state["params"])}
        now = _plain(asdict(params))
        horizon_change = saved.pop("steps") != now.pop("steps")
        if saved != now:
            raise ConfigError(f"{state_path} was trained with other parameters; use a new --out")
        if horizon_change and params.steps < state["step"]:
            raise ConfigError(f"{state_path} is at step {state['step']}, past --steps {params.steps}")
        model.load_state_dict(state["model_state_dict"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, best_score, history = state["step"], state["best_score"], state["history"]
        horizons = list(state.get("horizons", [[0, state["params"]["steps"]]]))
        if horizon_change:
            # Only the length changed: the cosine decay continues towards the new last step.
            log.info("resuming at step %d with a new horizon: %d steps (was %d)", step, params.steps,
                     state["params"]["steps"])
            horizons.append([step, params.steps])
        log.info("resuming from step %d (best score %.4f)", step, best_score)

    pool = (
        build_pool(params, seed=params.seed, n_per_detector=params.frames_per_detector, progress=progress)
        if params.sim_fraction > 0
        else PanelPool()
    )
    val_broad, val_sim = validation_set(params, val_domain)
    ceiling = label_ceiling(val_broad)
    log.info("validation ceiling (components of the broad labels): F1 %.4f P %.4f R %.4f",
             ceiling["f1"], ceiling["precision"], ceiling["recall"])
    stream = _BatchStream(pool, params, step, domain)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=params.workers, prefetch_factor=4 if params.workers else None
    )
    model.train()
    t0, start = time.time(), step
    with tqdm(total=params.steps, initial=step, desc="training", disable=not progress) as bar:
        for x, y in loader:
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
            if step % 100 == 0:
                log.info("step %d loss %.5f (%.2f s/step)", step, loss.item(), (time.time() - t0) / max(1, step - start))
            if step % params.eval_every == 0 or step == params.steps:
                broad = evaluate_items(model, val_broad)
                sim = evaluate_items(model, val_sim)
                # Best = the weaker of the two domains: the default must not trade one for the other.
                score = min(broad["f1"], sim["f1"])
                metrics = {"step": step, "loss": float(loss.item()), "elapsed_s": time.time() - t0,
                           "score": score, "broad": broad, "sim": sim}
                history.append(metrics)
                log.info("step %d: %s", step, json.dumps(metrics))
                bar.write(f"step {step}: broad F1 {broad['f1']:.4f} P {broad['precision']:.4f} "
                          f"R {broad['recall']:.4f} | sim F1 {sim['f1']:.4f} RMSE {sim['rmse_px']}")
                if score > best_score:
                    best_score = score
                    save_checkpoint(out_dir / "best.pt", model)
                tmp = state_path.with_name("last.pt.tmp")
                torch.save(
                    {
                        "model_state_dict": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "step": step,
                        "best_score": best_score,
                        "history": history,
                        "params": _plain(asdict(params)),
                        "horizons": horizons,
                    },
                    tmp,
                )
                tmp.replace(state_path)
            if step >= params.steps:
                break
    record = {"params": _plain(asdict(params)), "horizons": horizons, "domain": _plain(domain.as_dict()),
              "validation_domain": _plain(val_domain.as_dict()),
              "history": history, "label_ceiling_broad": ceiling,
              "best_score": best_score, "device": str(dev)}
    (out_dir / "train.json").write_text(json.dumps(record, indent=2))
    return record


def _plain(d: dict) -> dict:
    """Tuples as lists, so what ``torch.load(weights_only=True)`` gives back compares equal."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def train_main(argv: list[str] | None = None) -> int:
    """CLI: ``peaknet-pva train --out DIR [--steps N] [--preset P] [--seed S] [--device D]``."""
    args = build_parser().parse_args(argv)
    params = params_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text("peaknet-pva train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])) + "\n")
    record = train(params, out, device=args.device, progress=not args.no_progress)
    log.info("best score %.4f; weights in %s", record["best_score"], out / "best.pt")
    return 0
