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
    """Held-out frames (seed never used in training): F1 >= 0.9, centroids well under a pixel."""
    torch.set_num_threads(2)
    ds = simulate_dataset(n_frames, detector=detector, seed=424242, progress=False)
    finder = PeakFinder(weights="default", device="cpu", panel_shape=ds.panel_shape, batch_size=2)
    metrics = evaluate(finder.find(np.asarray(ds.frames)), ds.truths)
    assert metrics.n_truth > 50, "the test set must contain peaks to mean anything"
    assert metrics.f1 >= 0.9, metrics.as_dict()
    assert metrics.rmse_px <= 0.6, metrics.as_dict()


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
