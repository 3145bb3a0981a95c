"""Training: runs, checkpoints, resumes where it stopped, refuses a different config, balances presets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from peaknet_pva.errors import ConfigError
from peaknet_pva.model import load_checkpoint
from peaknet_pva.train import PanelPool, TrainParams, focal_loss, sample_batch, train, train_main

TINY = dict(detectors=("single",), frames_per_detector=1, val_frames_per_detector=1, crop=64, batch_size=2,
            eval_every=2, warmup_steps=1, threads=1, val_panels=2, workers=0)


def test_train_checkpoints_and_resumes(tmp_path: Path):
    out = tmp_path / "run"
    record = train(TrainParams(steps=2, **TINY), out, device="cpu", progress=False)
    assert [h["step"] for h in record["history"]] == [2]
    assert (out / "best.pt").exists() and (out / "last.pt").exists()
    model = load_checkpoint(out / "best.pt")  # embedded config: loads without naming the preset
    assert model.config.backbone_dims == (40, 80, 160, 320)
    assert model.config.norm == "robust"  # the normalisation it was trained for travels with it
    state = torch.load(out / "last.pt", weights_only=True)  # plain data: resumable without pickle code
    assert state["step"] == 2
    with pytest.raises(ConfigError, match="other parameters"):
        train(TrainParams(steps=2, lr=1e-3, **TINY), out, device="cpu", progress=False)
    # Only the horizon changed: it continues from step 2 to 4 and records the new schedule.
    record = train(TrainParams(steps=4, **TINY), out, device="cpu", progress=False)
    assert [h["step"] for h in record["history"]] == [2, 4]
    assert record["horizons"] == [[0, 2], [2, 4]]
    with pytest.raises(ConfigError, match="past --steps"):
        train(TrainParams(steps=3, **TINY), out, device="cpu", progress=False)


def test_train_cli_resume(tmp_path: Path):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--detectors", "single", "--frames-per-detector", "1", "--val-frames-per-detector", "1",
            "--crop", "64", "--batch-size", "2", "--steps", "2", "--eval-every", "2", "--warmup-steps", "1",
            "--threads", "1", "--no-progress", "--balance-detectors", "false", "--val-panels", "2",
            "--workers", "1"]
    assert train_main(args) == 0
    assert train_main(args) == 0  # already done: resumes at step 2 and stops
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    assert (out / "command.txt").read_text().startswith("peaknet-pva train --out")


def test_sampling_balances_presets():
    pool = PanelPool()
    for g, n_panels in enumerate((1, 30)):  # one 1-panel preset, one 30-panel preset
        pool.groups.append([])
        for _ in range(n_panels):
            pool.images.append(np.full((64, 64), g, np.float16))
            pool.labels.append(np.zeros((64, 64), np.uint8))
            pool.spots.append(np.zeros((0, 2)))
            pool.groups[-1].append(len(pool.images) - 1)
    params = TrainParams(crop=64, batch_size=400, sim_fraction=1.0)
    x, _ = sample_batch(pool, params, np.random.default_rng(0))
    share = float((x[:, 0, 0, 0] == 0).float().mean())
    assert 0.4 < share < 0.6
    x, _ = sample_batch(
        pool, TrainParams(crop=64, batch_size=400, balance_detectors=False, sim_fraction=1.0), np.random.default_rng(0)
    )
    assert float((x[:, 0, 0, 0] == 0).float().mean()) < 0.1


def test_focal_loss_prefers_correct_predictions():
    target = torch.tensor([[[0, 1]]])
    good = torch.tensor([[[[5.0, -5.0]], [[-5.0, 5.0]]]])
    bad = -good
    assert focal_loss(good, target, gamma=2.0, pos_weight=4.0) < 1e-3 < focal_loss(bad, target, gamma=2.0, pos_weight=4.0)


def test_batches_mix_simulator_and_broad_domain_reproducibly():
    """A sim_fraction share of crops comes from the pool, the rest from fresh augment panels; the
    batch of a step depends only on (seed, step), which is what makes resuming exact."""
    pool = PanelPool(groups=[[0]])
    pool.images.append(np.full((64, 64), 7.0, np.float16))
    pool.labels.append(np.zeros((64, 64), np.uint8))
    pool.spots.append(np.zeros((0, 2)))
    params = TrainParams(crop=64, batch_size=64, sim_fraction=0.25)
    x, y = sample_batch(pool, params, np.random.default_rng([0, 5]))
    from_pool = (x[:, 0] == 7.0).flatten(1).all(1)
    assert 5 < int(from_pool.sum()) < 30
    assert float(x[~from_pool].abs().amax()) > 0  # broad-domain crops are real data
    x2, y2 = sample_batch(pool, params, np.random.default_rng([0, 5]))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_planted_last_pt_is_not_unpickled(tmp_path: Path):
    """``last.pt`` is loaded with weights_only=True: a pickle that would run code is refused."""
    import pickle

    out = tmp_path / "run"
    out.mkdir()

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    with open(out / "last.pt", "wb") as f:
        pickle.dump({"params": Boom()}, f)
    with pytest.raises(Exception):
        train(TrainParams(steps=2, **TINY), out, device="cpu", progress=False)
    assert not (tmp_path / "pwned").exists()


def test_label_ceiling_counts_merged_labels_as_misses():
    """Perfect labels score 1 when spots are apart; two touching spots make one component."""
    from peaknet_pva.simulate import TruthTable
    from peaknet_pva.train import ValItem, label_ceiling

    def item(ys, xs):
        frame = np.zeros((1, 64, 64), np.float32)
        label = np.zeros((1, 64, 64), np.uint8)
        for y, x in zip(ys, xs):
            frame[0, y - 1 : y + 2, x - 1 : x + 2] = 10.0
            frame[0, y, x] = 50.0
            label[0, y - 1 : y + 2, x - 1 : x + 2] = 1
        n = len(ys)
        truth = TruthTable(panel=np.zeros(n, np.uint16), y=np.array(ys, float), x=np.array(xs, float),
                           intensity=np.ones(n), sigma=np.ones(n), snr=np.full(n, 50.0),
                           detectable=np.ones(n, bool))
        return ValItem(frame, truth, None, label)

    apart = label_ceiling([item([10, 40], [10, 40])])
    assert apart["f1"] == 1.0 and apart["rmse_px"] < 1e-6
    touching = label_ceiling([item([10, 40, 40], [10, 40, 43])])
    assert touching["tp"] == 2 and touching["recall"] == pytest.approx(2 / 3)  # 3 spots, 2 components


def test_max_background_and_detect_snr_change_training_not_validation(tmp_path: Path):
    """--max-background moves the top of the training background range; validation keeps the
    default domain (runs compare); a run saved before the field existed still resumes."""
    with pytest.raises(ConfigError, match="max_background"):
        TrainParams(max_background=0.001)
    with pytest.raises(ConfigError, match="detect_snr"):
        TrainParams(detect_snr=0.5)
    out = tmp_path / "run"
    record = train(TrainParams(steps=2, max_background=1000.0, detect_snr=5.0, **TINY), out, device="cpu",
                   progress=False)
    assert record["domain"]["background"] == [0.01, 1000.0] and record["domain"]["detect_snr"] == 5.0
    assert record["validation_domain"]["background"] == [0.01, 300.0]
    assert record["validation_domain"]["detect_snr"] == 6.0
    # An older last.pt has no max_background key: it counts at its default, so resuming works.
    state = torch.load(out / "last.pt", weights_only=True)
    del state["params"]["max_background"], state["params"]["detect_snr"]
    state["params"]["steps"] = 2
    torch.save(state, out / "last.pt")
    with pytest.raises(ConfigError, match="other parameters"):  # saved default 300 != 1000 now
        train(TrainParams(steps=3, max_background=1000.0, detect_snr=5.0, **TINY), out, device="cpu", progress=False)
    record = train(TrainParams(steps=3, **TINY), out, device="cpu", progress=False)
    assert [h["step"] for h in record["history"]] == [2, 3]
