"""An independent description of upstream PeakNet (carbonscott/peaknet HEAD), for tests only.

Nothing here imports ``peaknet_pva.model``: the state-dict layout and the forward of the adapters,
BiFPN and head are written from upstream's module structure (``convnextv2_bifpn_net.py``,
``bifpn.py``, HF ``ConvNextV2Backbone``) with plain ``torch.nn.functional`` calls on the raw
tensors, so a test comparing our model against them compares two separate implementations.

Upstream facts used (model code unchanged since a3ec64a, HEAD 48aec06):

* HF backbone: ``embeddings.patch_embeddings`` Conv2d(in, d0, 4, stride 4), ``embeddings.layernorm``;
  stage 0 has no downsampling layer (same width, stride 1), stages 1-3 have
  ``downsampling_layer.{0: LayerNorm, 1: Conv2d k2 s2}``; each layer has ``dwconv`` (7x7 depthwise),
  ``layernorm``, ``pwconv1`` Linear(d, 4d), ``grn`` (1, 1, 1, 4d) weight/bias, ``pwconv2``;
  ``hidden_states_norms.stage1..4``.
* ``backbone_to_bifpn.{i}``: Conv2d(d_i, F, 1) with bias.
* BiFPN block (base level 4, 4 levels): nodes ``m4 m5 m6`` then ``q5 q6 q7``, each
  DepthwiseSeparableConv2d(k1, no bias) -> channels-first LayerNorm (eps 1e-6) -> GELU, plus the
  node's same-level input as a skip; fusion weights ReLU'd, normalised with eps 1e-5; bilinear x2
  / x0.5 in float32; ``w_q_mask`` a bool (3, 3) buffer, all True but ``[-1, 0]`` (since dfbc832).
* Seg head: lateral layers with 1, 1, 2, 3 (conv3x3 -> GroupNorm -> GELU [-> bilinear x2]) for
  strides 4..32, summed coarse to fine; ``head_segmask`` 1x1; output bilinear x4 of the logits
  plus, with ``uses_learned_upsample``, ``head_upsample_layer.0`` =
  ConvTranspose2d(seg_out, num_classes, 6, stride 4, padding 1) applied to the summed features.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

Layout = list[tuple[str, tuple[int, ...], str]]

BASE_LEVEL = 4
NUM_LEVELS = 4
#: Lateral layers per level (strides 4, 8, 16, 32): max(int(log2(s / 4)), 1).
LATERAL_LAYERS = (1, 1, 2, 3)


def upstream_layout(
    dims: tuple[int, ...],
    depths: tuple[int, ...],
    *,
    in_chans: int = 1,
    bifpn_num_blocks: int,
    bifpn_num_features: int,
    seg_out_channels: int,
    num_classes: int = 2,
    uses_learned_upsample: bool,
) -> Layout:
    """``(key, shape, dtype)`` of every state-dict entry upstream's PeakNet has, sorted by key."""
    out: Layout = []

    def add(key: str, *shape: int, dtype: str = "float32") -> None:
        out.append((key, tuple(shape), dtype))

    def norm(prefix: str, c: int) -> None:
        add(f"{prefix}.weight", c)
        add(f"{prefix}.bias", c)

    bb = "backbone"
    add(f"{bb}.embeddings.patch_embeddings.weight", dims[0], in_chans, 4, 4)
    add(f"{bb}.embeddings.patch_embeddings.bias", dims[0])
    norm(f"{bb}.embeddings.layernorm", dims[0])
    prev = dims[0]
    for i, (d, depth) in enumerate(zip(dims, depths)):
        stage = f"{bb}.encoder.stages.{i}"
        if i > 0:
            norm(f"{stage}.downsampling_layer.0", prev)
            add(f"{stage}.downsampling_layer.1.weight", d, prev, 2, 2)
            add(f"{stage}.downsampling_layer.1.bias", d)
        for j in range(depth):
            layer = f"{stage}.layers.{j}"
            add(f"{layer}.dwconv.weight", d, 1, 7, 7)
            add(f"{layer}.dwconv.bias", d)
            norm(f"{layer}.layernorm", d)
            add(f"{layer}.pwconv1.weight", 4 * d, d)
            add(f"{layer}.pwconv1.bias", 4 * d)
            add(f"{layer}.grn.weight", 1, 1, 1, 4 * d)
            add(f"{layer}.grn.bias", 1, 1, 1, 4 * d)
            add(f"{layer}.pwconv2.weight", d, 4 * d)
            add(f"{layer}.pwconv2.bias", d)
        norm(f"{bb}.hidden_states_norms.stage{i + 1}", d)
        prev = d

    f = bifpn_num_features
    for i, d in enumerate(dims):
        add(f"backbone_to_bifpn.{i}.weight", f, d, 1, 1)
        add(f"backbone_to_bifpn.{i}.bias", f)
    lo, hi = BASE_LEVEL, BASE_LEVEL + NUM_LEVELS - 1
    nodes = [f"m{lv}" for lv in range(lo, hi)] + [f"q{lv}" for lv in range(lo + 1, hi + 1)]
    for b in range(bifpn_num_blocks):
        block = f"bifpn.blocks.{b}"
        for node in nodes:
            add(f"{block}.conv.{node}.0.depthwise_conv.weight", f, 1, 1, 1)
            add(f"{block}.conv.{node}.0.pointwise_conv.weight", f, f, 1, 1)
            norm(f"{block}.conv.{node}.1", f)
        add(f"{block}.w_m", NUM_LEVELS - 1, 2)
        add(f"{block}.w_q", NUM_LEVELS - 1, 3)
        add(f"{block}.w_q_mask", NUM_LEVELS - 1, 3, dtype="bool")

    s = seg_out_channels
    for i, n_layers in enumerate(LATERAL_LAYERS):
        for k in range(n_layers):
            prefix = f"seg_lateral_layers.{i}.layers.{k}"
            add(f"{prefix}.0.weight", s, f if k == 0 else s, 3, 3)
            add(f"{prefix}.0.bias", s)
            norm(f"{prefix}.1", s)
    add("head_segmask.weight", num_classes, s, 1, 1)
    add("head_segmask.bias", num_classes)
    if uses_learned_upsample:
        add("head_upsample_layer.0.weight", s, num_classes, 6, 6)  # ConvT: (in, out, kH, kW)
        add("head_upsample_layer.0.bias", num_classes)
    return sorted(out)


def layout_of(config) -> list[tuple[str, tuple[int, ...], str]]:
    """``upstream_layout`` for any object with PeakNetConfig's attribute names (read by name only,
    so this module stays independent of our model code)."""
    return upstream_layout(
        config.backbone_dims,
        config.backbone_depths,
        in_chans=config.in_chans,
        bifpn_num_blocks=config.bifpn_num_blocks,
        bifpn_num_features=config.bifpn_num_features,
        seg_out_channels=config.seg_out_channels,
        num_classes=config.num_classes,
        uses_learned_upsample=config.uses_learned_upsample,
    )


def format_layout(layout: Layout) -> str:
    """One ``key shape dtype`` line per entry (shape as ``a,b,c``): the golden-file format."""
    return "".join(f"{k} {','.join(map(str, shape))} {dtype}\n" for k, shape, dtype in layout)


def parse_layout(text: str) -> Layout:
    rows = []
    for line in text.splitlines():
        key, shape, dtype = line.split()
        rows.append((key, tuple(int(v) for v in shape.split(",")), dtype))
    return rows


def upstream_w_q_mask() -> torch.Tensor:
    mask = torch.ones(NUM_LEVELS - 1, 3, dtype=torch.bool)
    mask[-1, 0] = False
    return mask


def seeded_state_dict(layout: Layout, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic, init-independent values for every entry (what a trained file would hold).

    Matrices/kernels ~ N(0, 1/fan_in), norm weights 1 + N(0, 0.1), biases and GRN N(0, 0.1),
    fusion weights U(0, 1), masks upstream's default. Keys are filled in sorted order from one
    generator, so the values depend only on the layout and the seed.
    """
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape, dtype in sorted(layout):
        if dtype == "bool":
            sd[key] = upstream_w_q_mask()
        elif key.endswith((".w_m", ".w_q")):
            sd[key] = torch.rand(shape, generator=g)
        elif key.endswith(".bias") or ".grn." in key:
            sd[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return sd


# -- forward of everything after the backbone, on raw tensors ---------------------------------------
def _ln_channels_first(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``ConvNextV2LayerNorm(data_format="channels_first")``, written out."""
    u = x.mean(1, keepdim=True)
    v = (x - u).pow(2).mean(1, keepdim=True)
    return w[:, None, None] * ((x - u) / torch.sqrt(v + eps)) + b[:, None, None]


def _resample(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x.float(), scale_factor=factor, mode="bilinear", align_corners=False)


def _bifpn_block(sd: Mapping[str, torch.Tensor], block: str, x: list[torch.Tensor]) -> list:
    lo, hi = BASE_LEVEL, BASE_LEVEL + NUM_LEVELS - 1
    eps = 1e-5
    p = {lv: x[i] for i, lv in enumerate(range(lo, hi + 1))}

    def node(name: str, t: torch.Tensor) -> torch.Tensor:
        pre = f"{block}.conv.{name}"
        dw = sd[f"{pre}.0.depthwise_conv.weight"]
        t = F.conv2d(t, dw, groups=dw.shape[0])
        t = F.conv2d(t, sd[f"{pre}.0.pointwise_conv.weight"])
        t = _ln_channels_first(t, sd[f"{pre}.1.weight"], sd[f"{pre}.1.bias"], 1e-6)
        return F.gelu(t)

    w_m = F.relu(sd[f"{block}.w_m"])
    w_q = F.relu(sd[f"{block}.w_q"]) * sd[f"{block}.w_q_mask"].to(torch.float32)
    m: dict[int, torch.Tensor] = {}
    for idx, level_low in enumerate(range(hi, lo, -1)):
        level_high = level_low - 1
        m_low = p[level_low] if idx == 0 else m[level_low]
        w1, w2 = w_m[idx]
        fused = (w1 * p[level_high] + w2 * _resample(m_low, 2.0)) / (w1 + w2 + eps)
        m[level_high] = node(f"m{level_high}", fused) + p[level_high]
    q = {lo: m[lo]}
    for idx, level_high in enumerate(range(lo, hi)):
        level_low = level_high + 1
        m_low = m[level_low] if level_low < hi else p[level_low]
        w1, w2, w3 = w_q[idx]
        fused = w1 * p[level_low] + w2 * m_low + w3 * _resample(q[level_high], 0.5)
        fused = fused / (w1 + w2 + w3 + eps)
        q[level_low] = node(f"q{level_low}", fused) + p[level_low]
    return [q[lv] for lv in range(lo, hi + 1)]


def reference_head(
    sd: Mapping[str, torch.Tensor], stage_maps: list[torch.Tensor], *, seg_num_groups: int = 32
) -> torch.Tensor:
    """Upstream's logits from the four normalised backbone stage maps (fp32)."""
    feats = [
        F.conv2d(t, sd[f"backbone_to_bifpn.{i}.weight"], sd[f"backbone_to_bifpn.{i}.bias"])
        for i, t in enumerate(stage_maps)
    ]
    n_blocks = len({k.split(".")[2] for k in sd if k.startswith("bifpn.blocks.")})
    for b in range(n_blocks):
        feats = _bifpn_block(sd, f"bifpn.blocks.{b}", feats)

    acc = None
    for i in reversed(range(len(LATERAL_LAYERS))):
        t = feats[i]
        for k in range(LATERAL_LAYERS[i]):
            pre = f"seg_lateral_layers.{i}.layers.{k}"
            t = F.conv2d(t, sd[f"{pre}.0.weight"], sd[f"{pre}.0.bias"], padding=1)
            t = F.group_norm(t, seg_num_groups, sd[f"{pre}.1.weight"], sd[f"{pre}.1.bias"], 1e-5)
            t = F.gelu(t)
            if i > 0:
                t = _resample(t, 2.0)
        acc = t if acc is None else acc + t
    assert acc is not None
    logits = F.conv2d(acc, sd["head_segmask.weight"], sd["head_segmask.bias"])
    out = _resample(logits, 4.0)
    if "head_upsample_layer.0.weight" in sd:
        out = out + F.conv_transpose2d(
            acc, sd["head_upsample_layer.0.weight"], sd["head_upsample_layer.0.bias"],
            stride=4, padding=1,
        )
    return out
