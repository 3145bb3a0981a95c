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


# -- files written by upstream PeakNet ----------------------------------------------------------
UPSTREAM_CFG = PRESETS["peaknet-atto-s"].replace(bifpn_num_blocks=2, uses_learned_upsample=True)


@pytest.fixture(scope="module")
def upstream_file() -> tuple[dict, torch.Tensor]:
    """A state dict named, shaped and typed as upstream writes it (bool w_q_mask), and the
    independent reference logits for it (upstream's head and BiFPN written out in upstream_ref)."""
    from upstream_ref import reference_head, seeded_state_dict, upstream_layout

    c = UPSTREAM_CFG
    layout = upstream_layout(
        c.backbone_dims, c.backbone_depths, bifpn_num_blocks=c.bifpn_num_blocks,
        bifpn_num_features=c.bifpn_num_features, seg_out_channels=c.seg_out_channels,
        uses_learned_upsample=True,
    )  # fmt: skip
    sd = seeded_state_dict(layout, seed=7)
    backbone = PeakNet(c).backbone.eval()  # HF-identical backbone: only its weights are needed
    backbone.load_state_dict({k[9:]: v for k, v in sd.items() if k.startswith("backbone.")})
    with torch.no_grad():
        ref = reference_head(sd, backbone.forward_intermediates(X))
    return sd, ref


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("given_model", [False, True], ids=["inferred", "given"])
def test_upstream_state_dict_gives_upstream_logits(tmp_path, upstream_file, layout, given_model):
    sd, ref = upstream_file
    path = tmp_path / "peaknet-upstream.bin"
    torch.save(LAYOUTS[layout](sd), path)
    loaded = load_checkpoint(path, create_model(UPSTREAM_CFG) if given_model else None)
    assert loaded.config == UPSTREAM_CFG
    assert loaded.bifpn.blocks[0].w_q_mask.tolist()[-1] == [False, True, True]
    assert (outputs(loaded) - ref).abs().max() <= 1e-5


def test_upstream_training_directory(tmp_path, upstream_file):
    sd, ref = upstream_file
    (tmp_path / "ckpt").mkdir()
    torch.save({k: v.clone() for k, v in sd.items()}, tmp_path / "ckpt" / MODEL_STATE_DICT_FILE)
    assert (outputs(load_checkpoint(tmp_path / "ckpt")) - ref).abs().max() <= 1e-5


def test_float_mask_loads_like_bool(tmp_path, upstream_file):
    sd, ref = upstream_file
    as_float = {k: v.float() if k.endswith("w_q_mask") else v for k, v in sd.items()}
    torch.save(as_float, tmp_path / "f.bin")
    loaded = load_checkpoint(tmp_path / "f.bin")
    assert loaded.bifpn.blocks[1].w_q_mask.dtype == torch.bool
    assert (outputs(loaded) - ref).abs().max() <= 1e-5


def test_stored_mask_wins_over_default(tmp_path, upstream_file):
    """A file trained with another mask (this project's old default) keeps it."""
    sd, _ = upstream_file
    old = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    torch.save({**sd, "bifpn.blocks.0.w_q_mask": old}, tmp_path / "old.bin")
    loaded = load_checkpoint(tmp_path / "old.bin")
    assert loaded.bifpn.blocks[0].w_q_mask.tolist() == old.bool().tolist()
    assert loaded.bifpn.blocks[1].w_q_mask.tolist()[-1] == [False, True, True]


@pytest.mark.parametrize("bad", [torch.full((3, 3), 0.5), torch.full((3, 3), 2, dtype=torch.int64)])
def test_non_binary_mask_is_refused(tmp_path, upstream_file, bad):
    sd, _ = upstream_file
    torch.save({**sd, "bifpn.blocks.1.w_q_mask": bad}, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError, match=r"bifpn\.blocks\.1\.w_q_mask must be a bool"):
        load_checkpoint(tmp_path / "bad.bin")


def test_default_weights_keep_their_stored_mask():
    from peaknet_pva.finder import default_weights_path

    raw = torch.load(default_weights_path(), weights_only=True)["model_state_dict"]
    model = load_checkpoint(default_weights_path())
    for key, value in raw.items():
        if key.endswith("w_q_mask"):
            assert model.get_buffer(key).tolist() == value.bool().tolist(), key


# -- superseded head layouts: refused by name -------------------------------------------------------
def _legacy(sd: dict, layout: str) -> dict:
    """``sd`` (a current learned-upsample file) with its head rewritten to an older layout."""
    out = {k: v for k, v in sd.items() if not k.startswith("head_upsample_layer.")}
    convt_w, convt_b = torch.zeros(2, 2, 6, 6), torch.zeros(2)
    if layout == "bare":  # upstream before 03513c0
        out |= {"head_upsample_layer.weight": convt_w, "head_upsample_layer.bias": convt_b}
    elif layout == "final_conv":  # upstream 03513c0..addd7f6, learned upsample on
        out |= {
            "head_upsample_layer.0.weight": convt_w, "head_upsample_layer.0.bias": convt_b,
            "head_upsample_layer.1.weight": torch.ones(2), "head_upsample_layer.1.bias": convt_b,
            "final_conv.weight": torch.zeros(2, 2, 3, 3), "final_conv.bias": convt_b,
        }  # fmt: skip
    elif layout == "final_conv_only":  # upstream 03513c0..addd7f6, bilinear only
        out |= {"final_conv.weight": torch.zeros(2, 2, 3, 3), "final_conv.bias": convt_b}
    elif layout == "logits_convt":  # peaknet-pva's own earlier layout
        out |= {"head_upsample_layer.0.weight": convt_w, "head_upsample_layer.0.bias": convt_b}
    return out


@pytest.mark.parametrize(
    ("layout", "named"),
    [
        ("bare", r"bare 'head_upsample_layer.\{weight,bias\}'.*before commit 03513c0"),
        ("final_conv", r"GroupNorm \+ GELU.*'final_conv'.*03513c0\.\.addd7f6"),
        ("final_conv_only", r"'final_conv'.*03513c0\.\.addd7f6"),
        ("logits_convt", r"on the logits.*peaknet-pva before"),
    ],
)
@pytest.mark.parametrize("given_model", [False, True], ids=["inferred", "given"])
def test_legacy_head_layouts_fail_naming_layout(tmp_path, upstream_file, layout, named, given_model):
    sd, _ = upstream_file
    path = tmp_path / "legacy.bin"
    torch.save({"model_state_dict": _legacy(sd, layout)}, path)
    target = create_model(UPSTREAM_CFG) if given_model else None
    with pytest.raises(CheckpointError, match=named) as info:
        load_checkpoint(path, target)
    assert "legacy.bin" in str(info.value) and "docs/CHECKPOINTS.md" in str(info.value)
    with pytest.raises(CheckpointError, match=named):
        infer_config(_legacy(sd, layout))


def test_current_layouts_are_not_legacy(upstream_file):
    from peaknet_pva.model.checkpoint import legacy_head_layout

    sd, _ = upstream_file
    assert legacy_head_layout(sd) is None
    for preset in ("peaknet-673m", "peaknet-tiny", "peaknet-atto-s"):
        with torch.device("meta"):
            assert legacy_head_layout(create_model(preset).state_dict()) is None
