"""Checkpoint loading: every published layout round-trips exactly; wrong files fail loudly."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from peaknet_pva.errors import CheckpointError
from peaknet_pva.model import (
    PRESETS,
    PeakNet,
    clean_state_dict,
    create_model,
    infer_config,
    load_checkpoint,
    save_checkpoint,
)
from peaknet_pva.model.checkpoint import MODEL_STATE_DICT_FILE

X = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))


def randomized(name: str, **overrides) -> PeakNet:
    """A model whose every parameter differs from a fresh init (GRN starts at zero otherwise)."""
    torch.manual_seed(123)
    model = create_model(name, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def source() -> tuple[PeakNet, torch.Tensor]:
    model = randomized("peaknet-atto-s")
    with torch.no_grad():
        return model, model(X)


def outputs(model: PeakNet) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def _prefixed(prefix: str) -> Callable[[dict], dict]:
    return lambda sd: {prefix + k: v for k, v in sd.items()}


def _without_mask(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.endswith("w_q_mask")}


LAYOUTS: dict[str, Callable[[dict], object]] = {
    "plain": lambda sd: sd,
    "model_state_dict": lambda sd: {"model_state_dict": sd, "iteration": 10},
    "state_dict": lambda sd: {"state_dict": sd},
    "model": lambda sd: {"model": sd},
    "module": _prefixed("module."),
    "orig_mod": _prefixed("_orig_mod."),
    "module_orig_mod": _prefixed("module._orig_mod."),
    "no_w_q_mask": _without_mask,
    "wrapped_prefixed_no_mask": lambda sd: {
        "model_state_dict": _prefixed("module.")(_without_mask(sd))
    },
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("given_model", [False, True], ids=["inferred", "given"])
def test_layouts_round_trip_exactly(tmp_path, source, layout, given_model):
    model, expected = source
    path = tmp_path / "weights.bin"
    torch.save(LAYOUTS[layout](model.state_dict()), path)
    target = create_model("peaknet-atto-s") if given_model else None
    loaded = load_checkpoint(path, target)
    assert loaded.config == model.config
    if given_model:
        assert loaded is target
    torch.testing.assert_close(outputs(loaded), expected, rtol=0, atol=0)


def test_training_directory(tmp_path, source):
    model, expected = source
    (tmp_path / "chkpt").mkdir()
    torch.save(model.state_dict(), tmp_path / "chkpt" / MODEL_STATE_DICT_FILE)
    torch.save({"lr": 1.0}, tmp_path / "chkpt" / "lr_state_dict.pt")
    torch.testing.assert_close(
        outputs(load_checkpoint(tmp_path / "chkpt")), expected, rtol=0, atol=0
    )


def test_save_checkpoint_embeds_config(tmp_path):
    model = randomized("peaknet-atto-s", uses_learned_upsample=True, seg_out_channels=32)
    path = save_checkpoint(tmp_path / "sub" / "model.pt", model)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model_state_dict", "config"}
    assert raw["config"] == model.config.to_dict()
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)


def test_inferred_config_tiny_with_learned_upsample(tmp_path):
    model = randomized("peaknet-tiny", uses_learned_upsample=True)
    path = tmp_path / "tiny.bin"
    torch.save({"model_state_dict": model.state_dict()}, path)
    loaded = load_checkpoint(path)
    assert loaded.config == PRESETS["peaknet-tiny"].replace(uses_learned_upsample=True)
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_infer_config_recovers_every_preset(preset):
    with torch.device("meta"):
        sd = create_model(preset).state_dict()
    assert infer_config(sd) == PRESETS[preset]


def test_clean_state_dict():
    t = torch.zeros(1)
    sd = {"module._orig_mod.a.b": t, "_orig_mod.module.c": t, "d.module.e": t}
    assert list(clean_state_dict(sd)) == ["a.b", "c", "d.module.e"]
    with pytest.raises(CheckpointError, match="twice"):
        clean_state_dict({"module.a": t, "a": t})


# -- wrong files --------------------------------------------------------------------------------
def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-weights.bin"
    with pytest.raises(CheckpointError, match="no-such-weights.bin"):
        load_checkpoint(missing)


def test_directory_without_weights_names_it(tmp_path):
    with pytest.raises(CheckpointError, match=MODEL_STATE_DICT_FILE):
        load_checkpoint(tmp_path)


def test_other_preset_fails_listing_keys(tmp_path):
    other = create_model("peaknet-atto-s", bifpn_num_blocks=2, bifpn_num_features=32)
    path = tmp_path / "other.bin"
    torch.save(other.state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, create_model("peaknet-atto-s"))
    msg = str(info.value)
    assert "unexpected key(s)" in msg and "bifpn.blocks.1.w_m" in msg
    assert "shape mismatch" in msg and "backbone_to_bifpn.0.weight" in msg
    assert "other.bin" in msg


def test_extra_key_is_named(tmp_path, source):
    model, _ = source
    path = tmp_path / "extra.bin"
    torch.save({**model.state_dict(), "head_extra.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): \[head_extra.weight\]"):
        load_checkpoint(path)


def test_missing_key_is_named(tmp_path, source):
    model, _ = source
    sd = model.state_dict()
    del sd["seg_lateral_layers.2.layers.1.1.bias"]
    path = tmp_path / "missing.bin"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"seg_lateral_layers\.2\.layers\.1\.1\.bias"):
        load_checkpoint(path, create_model("peaknet-atto-s"))
    with pytest.raises(CheckpointError, match="missing key"):
        load_checkpoint(path)


def test_explicit_config_mismatch_fails(tmp_path, source):
    model, _ = source
    path = tmp_path / "w.bin"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="head_upsample_layer.0.weight"):
        load_checkpoint(path, config=PRESETS["peaknet-atto-s"].replace(uses_learned_upsample=True))


def test_non_state_dict_files_fail(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="garbage.bin"):
        load_checkpoint(garbage)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CheckpointError, match="list"):
        load_checkpoint(listed)
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"weight": torch.zeros(3)}, unrelated)
    with pytest.raises(CheckpointError, match="cannot infer"):
        load_checkpoint(unrelated)


class _Payload:
    """Pickled object: weights_only loading must refuse to run it."""


def test_pickled_objects_are_refused(tmp_path, source):
    model, _ = source
    path = tmp_path / "pickled.bin"
    torch.save({"model_state_dict": model.state_dict(), "extra": _Payload()}, path)
    with pytest.raises(CheckpointError, match="pickled.bin"):
        load_checkpoint(path)


def test_loaded_weights_are_the_files_not_random(tmp_path, source):
    model, _ = source
    path = tmp_path / "w.bin"
    torch.save(model.state_dict(), path)
    loaded = load_checkpoint(path)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_save_requires_peaknet(tmp_path):
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path / "x.pt", torch.nn.Linear(1, 1))  # type: ignore[arg-type]


def test_path_types(tmp_path, source):
    model, expected = source
    path = tmp_path / "w.bin"
    torch.save(model.state_dict(), path)
    torch.testing.assert_close(outputs(load_checkpoint(str(path))), expected, rtol=0, atol=0)


def test_wrapped_models_are_unwrapped(tmp_path, source):
    model, expected = source
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DDP / DataParallel look like
    path = save_checkpoint(tmp_path / "w.pt", wrapper)  # type: ignore[arg-type]
    assert all(not k.startswith("module.") for k in torch.load(path)["model_state_dict"])
    target = torch.nn.Module()
    target.module = create_model("peaknet-atto-s")
    loaded = load_checkpoint(path, target)  # type: ignore[arg-type]
    assert loaded is target.module
    torch.testing.assert_close(outputs(loaded), expected, rtol=0, atol=0)
