"""The shipped default weights: they load strictly, and they find real peaks (a real accuracy test)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from peaknet_pva import PeakFinder
from peaknet_pva.evaluate import evaluate
from peaknet_pva.finder import default_weights_path
from peaknet_pva.model import load_checkpoint
from peaknet_pva.simulate import simulate_dataset


def test_default_weights_are_shipped_and_small():
    path = default_weights_path()
    assert path.exists(), f"default weights missing at {path}"
    assert path.stat().st_size <= 20 * 1024 * 1024
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["command"].startswith("peaknet-pva train")
    model = load_checkpoint(path)
    assert sum(p.numel() for p in model.parameters()) == meta["parameters"]


@pytest.mark.parametrize("detector,n_frames", [("single", 6), ("epix10k2m", 1)])
def test_default_weights_accuracy(detector: str, n_frames: int):
    """Held-out frames (seed never used in training), issue 8's targets: F1 >= 0.97, RMSE <= 0.3 px
    (measured with the 2026-12-04 evening weights: single 0.995 / 0.13, epix10k2m 0.992 / 0.13)."""
    torch.set_num_threads(2)
    ds = simulate_dataset(n_frames, detector=detector, seed=424242, progress=False)
    finder = PeakFinder(weights="default", device="cpu", panel_shape=ds.panel_shape, batch_size=2)
    metrics = evaluate(finder.find(np.asarray(ds.frames)), ds.truths)
    assert metrics.n_truth > 50, "the test set must contain peaks to mean anything"
    assert metrics.f1 >= 0.97, metrics.as_dict()
    assert metrics.rmse_px <= 0.3, metrics.as_dict()


def test_default_weights_find_nothing_on_blank_frames():
    ds = simulate_dataset(8, detector="single", seed=99, progress=False)
    blank = [i for i, t in enumerate(ds.truths) if not t.detectable.any()]
    frames = np.asarray(ds.frames)
    if not blank:  # make one: background only, the spots' region replaced by a spot-free frame's noise
        rng = np.random.default_rng(0)
        frames = rng.poisson(2.0, size=(1,) + frames.shape[1:]).astype(np.float32)
        blank = [0]
    finder = PeakFinder(weights="default", device="cpu", batch_size=2)
    tables = finder.find(frames[blank])
    assert sum(t.n for t in tables) <= 2 * len(blank)


# -- robustness slice (frames from peaknet_pva.robustness, a generator written apart from training) --
# Seeds differ from the reported matrix (seed 1000, tuning 8919). The shipped weights before the
# robust retraining found 1600-6600 false peaks per Mpx here and F1 0.016 on base@10.
ROBUST_SEED = 4242


@pytest.fixture(scope="module")
def default_finder():
    torch.set_num_threads(2)
    return PeakFinder(weights="default", device="cpu", batch_size=2)


def test_default_weights_declare_the_local_norm(default_finder):
    assert default_finder.model.config.norm == "local"


@pytest.mark.parametrize("background", [0.0, 10.0, 300.0])
@pytest.mark.parametrize("hot", [False, True])
def test_default_weights_find_no_peaks_in_noise(default_finder, background: float, hot: bool):
    """Noise-only 512² frames at any background, with or without hot pixels: target <= 1 false
    peak per Mpx; two frames (0.52 Mpx) may hold at most 2."""
    from peaknet_pva.robustness import false_peaks_per_mpix, noise_only_frames

    frames = noise_only_frames(background, hot_pixels=hot, n_frames=2, seed=ROBUST_SEED)
    tables = default_finder.find(frames)
    n = sum(t.n for t in tables)
    assert n <= 2, f"{n} false peaks ({false_peaks_per_mpix(tables, frames.shape):.1f}/Mpx) at bg {background}"


def test_default_weights_on_a_mid_background_cell(default_finder):
    """A ring background of 10 photons/px with read noise, gain 30 + pedestal (uint16), hot pixels:
    nothing the training sampler drew with this generator's code."""
    from peaknet_pva.robustness import Cell, cell_frames

    cell = Cell(10.0, variant="ci", noise="poisson+read", hot_pixels=True, gain="g30p", density="dense")
    frames, truths = cell_frames(cell, 1, ROBUST_SEED)
    metrics = evaluate(default_finder.find(frames), truths)
    assert metrics.n_truth > 100
    # Measured 0.80 (precision 0.94) with the weights of 2026-12-02 (before them: 0.016), 0.863
    # (precision 0.956) with the first of 2026-12-04, 0.933 (precision 0.996) with the local-norm
    # weights, signal centroids and splitting; the target is 0.95: this guards against
    # regression, it does not claim the target.
    assert metrics.f1 >= 0.9, metrics.as_dict()
    assert metrics.precision >= 0.95, metrics.as_dict()
