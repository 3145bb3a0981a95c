"""PeakNet architecture: parameter counts, published key layout, forward contract, configs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from peaknet_pva.errors import ConfigError
from peaknet_pva.model import (
    PRESETS,
    PeakNet,
    PeakNetConfig,
    config_from_mapping,
    config_from_yaml,
    create_model,
)
from peaknet_pva.model.bifpn import BiFPNBlock
from peaknet_pva.model.convnextv2 import ConvNeXtV2Backbone
from peaknet_pva.model.presets import CONVNEXTV2_SIZES
from upstream_ref import (  # noqa: I001  (tests/ is on sys.path under pytest)
    parse_layout,
    reference_head,
    seeded_state_dict,
    layout_of,
    upstream_w_q_mask,
)

GOLDEN = Path(__file__).parent / "golden"
#: The small learned-upsample architecture of the golden files (tests/golden/regenerate.py).
SMALL_LU = PRESETS["peaknet-atto-s"].replace(bifpn_num_blocks=2, uses_learned_upsample=True)


def meta_model(name: str, **overrides) -> PeakNet:
    with torch.device("meta"):
        return create_model(name, **overrides)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def atto_s() -> PeakNet:
    torch.manual_seed(0)
    return create_model("peaknet-atto-s").eval()


# -- sizes and layout ----------------------------------------------------------------------------
def test_peaknet_673m_has_673m_parameters():
    model = meta_model("peaknet-673m")
    assert n_params(model) == pytest.approx(673.0e6, abs=0.1e6)
    assert n_params(model) == 673_012_480  # exact, for the record (backbone 657_466_304)
    upstream = sum(
        math.prod(shape) for _, shape, dtype in layout_of(PRESETS["peaknet-673m"]) if dtype != "bool"
    )
    assert n_params(model) == upstream


def test_peaknet_atto_s_is_small():
    assert n_params(meta_model("peaknet-atto-s")) <= 4.0e6


@pytest.mark.parametrize("size", list(CONVNEXTV2_SIZES))
def test_convnextv2_backbones_match_paper_sizes(size):
    # ConvNeXt V2 paper / HF model cards (3-channel stem, 1000-class head + final LN), in millions.
    paper = {"atto": 3.7, "femto": 5.2, "pico": 9.1, "nano": 15.6, "tiny": 28.6,
             "base": 88.7, "large": 197.9, "huge": 660.3}  # fmt: skip
    dims, depths = CONVNEXTV2_SIZES[size]
    with torch.device("meta"):
        backbone = ConvNeXtV2Backbone(dims=dims, depths=depths, in_chans=3)
    norms = n_params(backbone.hidden_states_norms)
    classifier = 2 * dims[-1] + dims[-1] * 1000 + 1000  # final LayerNorm + Linear head
    total = n_params(backbone) - norms + classifier
    assert total / 1e6 == pytest.approx(paper[size], abs=0.06)


#: Golden state-dict layout file -> architecture (see tests/golden/README.md).
LAYOUT_GOLDENS = {
    "peaknet_tiny_state_dict.txt": PRESETS["peaknet-tiny"],
    "peaknet_673m_state_dict.txt": PRESETS["peaknet-673m"],
    "peaknet_small_lu_state_dict.txt": SMALL_LU,
}



def model_layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return sorted(
        (k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    )


@pytest.mark.parametrize("golden", list(LAYOUT_GOLDENS))
def test_golden_layout_files_are_the_upstream_layout(golden):
    """The golden files are exactly what the independent upstream description gives."""
    text = (GOLDEN / golden).read_text()
    assert parse_layout(text) == layout_of(LAYOUT_GOLDENS[golden])


@pytest.mark.parametrize("golden", list(LAYOUT_GOLDENS))
def test_state_dict_keys_shapes_dtypes_match_golden(golden):
    expected = parse_layout((GOLDEN / golden).read_text())
    with torch.device("meta"):
        model = PeakNet(LAYOUT_GOLDENS[golden])
    assert model_layout(model) == expected


def test_673m_head_is_upstreams():
    """``peaknet-673m.bin`` stores the learned upsample as (seg 256 -> 2 classes), k6."""
    layout = {k: shape for k, shape, _ in layout_of(PRESETS["peaknet-673m"])}
    assert len(layout) == 532
    assert layout["head_upsample_layer.0.weight"] == (256, 2, 6, 6)
    assert layout["head_upsample_layer.0.bias"] == (2,)
    convt = meta_model("peaknet-673m").head_upsample_layer[0]
    assert (convt.in_channels, convt.out_channels) == (256, 2)
    assert (convt.kernel_size, convt.stride, convt.padding) == ((6, 6), (4, 4), (1, 1))


def test_w_q_mask_is_upstreams_default_and_masks_top_p_low():
    block = BiFPNBlock(8)
    assert "w_q_mask" in block.state_dict()
    assert block.w_q_mask.dtype == torch.bool
    assert block.w_q_mask.tolist() == [[True] * 3, [True] * 3, [False, True, True]]
    assert torch.equal(block.w_q_mask, upstream_w_q_mask())
    torch.manual_seed(0)
    x = [torch.randn(1, 8, 16 // 2**k, 16 // 2**k) for k in range(4)]
    ref = block(x)
    with torch.no_grad():
        block.w_q[-1, 0] = 123.0  # weight of the top node's p_low, masked upstream: no effect
    for a, b in zip(ref, block(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        block.w_q[-1, 1] = 123.0  # ... while m_low (= p_top) counts
    assert not torch.equal(ref[-1], block(x)[-1])


# -- numerics against upstream ------------------------------------------------------------------
def _seeded_small_lu() -> tuple[PeakNet, dict, torch.Tensor]:
    golden = json.loads((GOLDEN / "peaknet_small_lu_logits.json").read_text())
    config = PeakNetConfig.from_dict(golden["config"])
    sd = seeded_state_dict(layout_of(config), golden["param_seed"])
    model = PeakNet(config).eval()
    model.load_state_dict(sd, strict=True)
    gen = torch.Generator().manual_seed(golden["input_seed"])
    return model, sd, torch.randn(*golden["input_shape"], generator=gen)


def test_logits_match_the_independent_upstream_reference():
    """Upstream-shaped weights: our logits are within 1e-5 of the written-out upstream forward."""
    model, sd, x = _seeded_small_lu()
    with torch.no_grad():
        ours = model(x)
        ref = reference_head(sd, model.backbone.forward_intermediates(x))
    assert ours.shape == ref.shape == (1, 2, 64, 96)
    assert (ours - ref).abs().max() <= 1e-5


def test_logits_match_numeric_golden():
    """A drift in layer order, eps or init-independent numerics shows up here."""
    golden = json.loads((GOLDEN / "peaknet_small_lu_logits.json").read_text())
    assert golden["config"] == {
        k: v for k, v in SMALL_LU.to_dict().items() if k in golden["config"]
    }
    model, _, x = _seeded_small_lu()
    with torch.no_grad():
        y = model(x).double()
    tol = golden["tolerance"]
    got = torch.tensor([float(y[tuple(p)]) for p in golden["points"]], dtype=torch.float64)
    want = torch.tensor(golden["values"], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=tol["values"], atol=tol["values"])
    assert abs(float(y.sum()) - golden["sum"]) <= tol["sum"]
    assert abs(float(y.square().sum()) - golden["sum_sq"]) <= tol["sum_sq"]


def test_bifpn_negative_weights_are_relud():
    block = BiFPNBlock(4)
    torch.manual_seed(1)
    x = [torch.randn(1, 4, 8 // 2**k, 8 // 2**k) for k in range(4)]
    with torch.no_grad():
        block.w_m[0, 1] = -5.0  # ReLU -> 0: the coarse input is ignored at node m6
    out_neg = block(x)
    with torch.no_grad():
        block.w_m[0, 1] = 0.0
    for a, b in zip(out_neg, block(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- forward contract ----------------------------------------------------------------------------
def test_forward_shape_and_dtype(atto_s):
    with torch.no_grad():
        y = atto_s(torch.randn(2, 1, 64, 96))
    assert y.shape == (2, 2, 64, 96)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_forward_split_and_intermediates(atto_s):
    x = torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        maps = atto_s.backbone.forward_intermediates(x)
        feats = atto_s.forward_features(x)
        pre = atto_s.forward_head(feats, pre_logits=True)
        y = atto_s.forward_head(feats)
        torch.testing.assert_close(y, atto_s(x), rtol=0, atol=0)
    dims = atto_s.config.backbone_dims
    assert [tuple(m.shape) for m in maps] == [
        (1, d, 64 // s, 96 // s) for d, s in zip(dims, (4, 8, 16, 32))
    ]
    assert [tuple(f.shape) for f in feats] == [(1, 64, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    assert tuple(pre.shape) == (1, 64, 16, 24)


def test_learned_upsample_forward():
    torch.manual_seed(0)
    model = create_model("peaknet-atto-s", uses_learned_upsample=True).eval()
    assert isinstance(model.head_upsample_layer[0], torch.nn.ConvTranspose2d)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 64)).shape == (1, 2, 32, 64)


def test_bf16_autocast_forward(atto_s):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = atto_s(torch.randn(1, 1, 32, 32))
    assert y.shape == (1, 2, 32, 32)


@pytest.mark.parametrize("shape", [(1, 1, 64, 90), (1, 1, 48, 64), (1, 2, 64, 64), (1, 64, 64)])
def test_bad_input_shape_raises_config_error(atto_s, shape):
    with pytest.raises(ConfigError, match=re.escape(str(tuple(shape)))):
        atto_s(torch.zeros(shape))


# -- config and presets --------------------------------------------------------------------------
def test_presets_cover_all_backbones():
    for size, (dims, depths) in CONVNEXTV2_SIZES.items():
        cfg = PRESETS[f"peaknet-{size}"]
        assert (cfg.backbone_dims, cfg.backbone_depths) == (dims, depths)
    big = PRESETS["peaknet-673m"]
    assert big.backbone_dims == (352, 704, 1408, 2816) and big.backbone_depths == (3, 3, 27, 3)
    assert (big.bifpn_num_blocks, big.bifpn_num_features) == (4, 512)
    assert big.seg_out_channels == 256 and big.uses_learned_upsample
    small = PRESETS["peaknet-atto-s"]
    assert (small.bifpn_num_blocks, small.bifpn_num_features, small.seg_out_channels) == (1, 64, 64)
    assert not small.uses_learned_upsample


def test_create_model_overrides_and_config_attribute():
    model = meta_model("peaknet-atto-s", uses_learned_upsample=True, num_classes=3)
    expected = PRESETS["peaknet-atto-s"].replace(uses_learned_upsample=True, num_classes=3)
    assert model.config == expected
    assert model.head_segmask.out_channels == 3
    with pytest.raises(ConfigError, match="nope"):
        create_model("nope")
    with pytest.raises(ConfigError, match="bogus"):
        create_model("peaknet-atto-s", bogus=1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("backbone_dims", (1, 2, 3)),
        ("backbone_depths", (1, 1, 0, 1)),
        ("bifpn_num_features", 0),
        ("seg_num_groups", 7),
        ("num_classes", True),
        ("uses_learned_upsample", "yes"),
        ("drop_path_rate", 1.5),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        PeakNetConfig(**{field: value})


def test_config_is_frozen_and_round_trips_through_json():
    cfg = PRESETS["peaknet-673m"]
    with pytest.raises(AttributeError):
        cfg.num_classes = 3  # type: ignore[misc]
    assert PeakNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="extra"):
        PeakNetConfig.from_dict({**cfg.to_dict(), "extra": 1})


# -- config readers ------------------------------------------------------------------------------
NESTED_673M = """\
dist:
  dtype: bfloat16
model:
  backbone:
    hf_config:
      num_channels: 1
      patch_size: 4
      num_stages: 4
      hidden_sizes: [352, 704, 1408, 2816]
      depths: [3, 3, 27, 3]
      hidden_act: gelu
      initializer_range: 0.02
      layer_norm_eps: 1.0e-12
      drop_path_rate: 0.0
      image_size: 1920
      out_features: [stage1, stage2, stage3, stage4]
      out_indices: null
    from_scratch: false
  bifpn:
    block:
      base_level: 4
      bn: {eps: 1.0e-05, momentum: 0.1}
      down_scale_factor: 0.5
      fusion: {eps: 1.0e-05}
      num_features: 512
      num_levels: 4
      relu_inplace: false
      up_scale_factor: 2
    num_blocks: 4
  freezes_backbone: false
  seg_head:
    base_scale_factor: 2
    num_classes: 2
    num_groups: 32
    out_channels: 256
    up_scale_factor: [4, 8, 16, 32]
    uses_learned_upsample: true
  uses_random_weights: false
"""

FLAT_PIPELINE = """\
model:
  weights_path: /somewhere/peaknet-atto.bin
  peaknet_config:
    model:
      image_size: 512
      num_channels: 1
      num_classes: 2
      backbone_hidden_sizes: [40, 80, 160, 320]
      backbone_depths: [2, 2, 6, 2]
      bifpn_num_blocks: 1
      bifpn_num_features: 64
      seg_out_channels: 64
      uses_learned_upsample: false
      from_scratch: false
runtime: {batch_size: 8}
"""


def test_nested_yaml_gives_673m(tmp_path):
    path = tmp_path / "peaknet-673m.yaml"
    path.write_text(NESTED_673M)
    cfg = config_from_yaml(path)
    assert cfg == PRESETS["peaknet-673m"]
    with torch.device("meta"):
        model = create_model(cfg)
    assert model.backbone.embeddings.patch_embeddings.out_channels == 352
    assert model.backbone_to_bifpn[3].in_channels == 2816
    assert len(model.bifpn.blocks) == 4


def test_flat_pipeline_yaml_gives_atto_s(tmp_path):
    path = tmp_path / "peaknet.yaml"
    path.write_text(FLAT_PIPELINE)
    cfg = config_from_yaml(path)
    assert cfg == PRESETS["peaknet-atto-s"]
    model = meta_model(cfg)  # type: ignore[arg-type]
    assert [m.in_channels for m in model.backbone_to_bifpn] == [40, 80, 160, 320]
    assert model.head_segmask.in_channels == 64


def test_to_dict_mapping_is_accepted():
    cfg = PRESETS["peaknet-tiny"].replace(uses_learned_upsample=True)
    assert config_from_mapping(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("hidden_sizes: [352, 704, 1408, 2816]", "hidden_sizes: [352, 704, 1408]"),
         "model.backbone.hf_config.hidden_sizes"),
        (("base_level: 4", "base_level: 2"), "model.bifpn.block.base_level"),
        (("num_blocks: 4", "num_blocks: 0"), "model.bifpn.num_blocks"),
        (("num_groups: 32", "num_groups: 30"), "model.seg_head.num_groups"),
        (("relu_inplace: false", "relu_inplce: false"), "model.bifpn.block.relu_inplce"),
        (("hidden_act: gelu", "hidden_act: relu"), "model.backbone.hf_config.hidden_act"),
    ],
)  # fmt: skip
def test_nested_yaml_errors_name_the_key(edit, key):
    import yaml

    data = yaml.safe_load(NESTED_673M.replace(*edit))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_mapping(data)


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("bifpn_num_features: 64", "bifpn_num_featurs: 64"), "bifpn_num_featurs"),
        (("backbone_depths: [2, 2, 6, 2]", "backbone_depths: [2, 2, 6]"), "backbone_depths"),
        (("uses_learned_upsample: false", "uses_learned_upsample: maybe"), "uses_learned_upsample"),
    ],
)
def test_flat_yaml_errors_name_the_key(edit, key):
    import yaml

    data = yaml.safe_load(FLAT_PIPELINE.replace(*edit))
    with pytest.raises(ConfigError, match=f"model.peaknet_config.model.{key}"):
        config_from_mapping(data)


def test_missing_yaml_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="absent.yaml"):
        config_from_yaml(tmp_path / "absent.yaml")
