"""PeakNet: ConvNeXt V2 backbone + BiFPN + segmentation head for Bragg-peak segmentation.

Papers: C. Wang, P. Li, J. Thayer, C. H. Yoon, "PeakNet: An Autonomous Bragg Peak Finder with Deep
Neural Networks" (arXiv:2303.15301); ConvNeXt V2 (Woo et al., CVPR 2023, arXiv:2301.00808);
BiFPN (Tan et al., EfficientDet, CVPR 2020, arXiv:1911.09070); the lateral/summed segmentation
head follows Panoptic FPN (Kirillov et al., CVPR 2019, arXiv:1901.02446).

Reference implementation: carbonscott/peaknet ``peaknet/modeling/convnextv2_bifpn_net.py`` (built on
HF ``ConvNextV2Backbone``). Parameter names here match its state dicts so published checkpoints
(e.g. ``peaknet-673m.bin``) load with ``strict=True``:

``backbone.*`` (HF ConvNextV2Backbone), ``backbone_to_bifpn.{i}`` (1x1 conv + bias, no norm),
``bifpn.blocks.{b}.*``, ``seg_lateral_layers.{i}.layers.{k}.{0: conv3x3, 1: GroupNorm}``,
``head_segmask`` (1x1 conv), optional ``head_upsample_layer.0`` (ConvTranspose2d k6 s4 p1).

Head (upstream HEAD, unchanged since a3ec64a): ``logits = head_segmask(acc)`` on the summed stride-4
seg features ``acc``; output = bilinear x4 of ``logits`` [+ ``head_upsample_layer(acc)``, a
``seg_out_channels -> num_classes`` transposed conv, with ``uses_learned_upsample``]. Older
upstream heads (a bare logits->logits ConvT, or ConvT + GroupNorm + GELU + ``final_conv``) are
refused by name in ``checkpoint.py``; docs/CHECKPOINTS.md lists the layouts per commit range.

Data contract: input ``(N, in_chans, H, W)`` float, H and W multiples of 32 (the stride of the
coarsest stage); output logits ``(N, num_classes, H, W)`` in the input's dtype (autocast aside).
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .bifpn import BiFPN, DepthwiseSeparableConv2d
from .convnextv2 import ConvNeXtV2Backbone, GlobalResponseNorm

__all__ = ["PeakNet", "PeakNetConfig", "SegLateralLayer"]

logger = logging.getLogger(__name__)

#: Output stride of each backbone/BiFPN level, finest first (fixed by ConvNeXt's 4 stages).
LEVEL_STRIDES = (4, 8, 16, 32)
#: Input sizes must be multiples of this (the coarsest stride).
SIZE_MULTIPLE = 32
#: Each lateral layer upsamples by this factor (PeakNet ``seg_head.base_scale_factor``).
BASE_SCALE_FACTOR = 2
#: Input normalisations a checkpoint can declare (``PeakNetConfig.norm``); see ``preprocess``.
NORMS = ("instance", "robust", "local")


def _as_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ConfigError(f"PeakNetConfig.{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _as_int_tuple(name: str, value: Any, *, length: int, minimum: int) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"PeakNetConfig.{name}: expected {length} integers, got {value!r}")
    items = tuple(value)
    if len(items) != length or any(
        isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < minimum
        for v in items
    ):
        raise ConfigError(
            f"PeakNetConfig.{name}: expected {length} integers >= {minimum}, got {list(items)!r}"
        )
    return tuple(int(v) for v in items)


@dataclasses.dataclass(frozen=True)
class PeakNetConfig:
    """Everything that changes PeakNet's architecture (and hence its state-dict keys/shapes).

    Defaults are peaknet-pipeline-ray's ``SimplePeakNetConfig`` defaults (ConvNeXt V2 tiny,
    2 BiFPN blocks x 256 features, 256 seg channels, bilinear upsampling). Invalid values raise
    ``ConfigError`` naming the field; :meth:`to_dict`/:meth:`from_dict` round-trip through JSON.

    Attributes:
        backbone_dims: channels of the four ConvNeXt V2 stages (HF ``hidden_sizes``).
        backbone_depths: blocks per stage (HF ``depths``).
        in_chans: input channels (HF ``num_channels``; 1 for detector frames).
        drop_path_rate: stochastic depth for training (0 for inference).
        bifpn_num_blocks: number of stacked BiFPN blocks.
        bifpn_num_features: channels inside the BiFPN (adapter output).
        bifpn_fusion_eps: eps of BiFPN's normalised weighted fusion.
        seg_out_channels: channels of the segmentation lateral layers.
        seg_num_groups: GroupNorm groups in the lateral layers (must divide seg_out_channels).
        num_classes: output classes (2: background, peak).
        uses_learned_upsample: add a learned x4 upsample of the seg features (ConvTranspose2d
            ``seg_out_channels -> num_classes``) to the bilinear x4 of the logits.
        norm: input normalisation the weights were trained with (not an architecture change, but
            part of what the weights mean): ``"instance"`` (mean/std per panel, as published
            PeakNet checkpoints were trained), ``"robust"`` (median / MAD of nonzero deviations,
            masked and non-finite pixels excluded, outliers clipped) or ``"local"`` (the same per
            block, interpolated: our default weights); see ``preprocess``.
    """

    backbone_dims: tuple[int, ...] = (96, 192, 384, 768)
    backbone_depths: tuple[int, ...] = (3, 3, 9, 3)
    in_chans: int = 1
    drop_path_rate: float = 0.0
    bifpn_num_blocks: int = 2
    bifpn_num_features: int = 256
    bifpn_fusion_eps: float = 1e-5
    seg_out_channels: int = 256
    seg_num_groups: int = 32
    num_classes: int = 2
    uses_learned_upsample: bool = False
    norm: str = "instance"

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put(
            "backbone_dims",
            _as_int_tuple("backbone_dims", self.backbone_dims, length=4, minimum=1),
        )
        put(
            "backbone_depths",
            _as_int_tuple("backbone_depths", self.backbone_depths, length=4, minimum=1),
        )
        put("in_chans", _as_int("in_chans", self.in_chans, minimum=1))
        put("bifpn_num_blocks", _as_int("bifpn_num_blocks", self.bifpn_num_blocks, minimum=1))
        put(
            "bifpn_num_features",
            _as_int("bifpn_num_features", self.bifpn_num_features, minimum=1),
        )
        put("seg_out_channels", _as_int("seg_out_channels", self.seg_out_channels, minimum=1))
        put("seg_num_groups", _as_int("seg_num_groups", self.seg_num_groups, minimum=1))
        put("num_classes", _as_int("num_classes", self.num_classes, minimum=1))
        for name in ("drop_path_rate", "bifpn_fusion_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ConfigError(f"PeakNetConfig.{name}: expected a number, got {value!r}")
            put(name, float(value))
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(
                f"PeakNetConfig.drop_path_rate: expected 0 <= value < 1, got {self.drop_path_rate}"
            )
        if not self.bifpn_fusion_eps > 0.0:
            raise ConfigError(
                f"PeakNetConfig.bifpn_fusion_eps: expected > 0, got {self.bifpn_fusion_eps}"
            )
        if self.seg_out_channels % self.seg_num_groups:
            raise ConfigError(
                f"PeakNetConfig.seg_num_groups: {self.seg_num_groups} does not divide "
                f"seg_out_channels={self.seg_out_channels}"
            )
        if self.norm not in NORMS:
            raise ConfigError(f"PeakNetConfig.norm: expected one of {list(NORMS)}, got {self.norm!r}")
        if not isinstance(self.uses_learned_upsample, bool):
            raise ConfigError(
                "PeakNetConfig.uses_learned_upsample: expected true/false, "
                f"got {self.uses_learned_upsample!r}"
            )

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists); inverse of :meth:`from_dict`."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeakNetConfig:
        """Build from :meth:`to_dict` output; unknown keys raise ``ConfigError`` naming them."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"PeakNetConfig: expected a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"PeakNetConfig: unknown key(s) {unknown}; known: {list(cls.field_names())}"
            )
        return cls(**dict(data))

    def replace(self, **overrides: Any) -> PeakNetConfig:
        """Copy with some fields changed (validated); unknown names raise ``ConfigError``."""
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise ConfigError(
                f"PeakNetConfig: unknown field(s) {unknown}; known: {list(self.field_names())}"
            )
        return dataclasses.replace(self, **overrides)


class SegLateralLayer(nn.Module):
    """Bring one BiFPN level to stride 4 with (conv3x3 → GroupNorm → GELU [→ x2]) layers.

    As in PeakNet, the stride-4 level gets one conv layer and no upsampling; a level at stride
    ``4 * 2**k`` (k >= 1) gets k layers, each followed by a bilinear x2 (computed in float32).

    Args:
        in_channels: BiFPN features.
        out_channels: seg head channels.
        num_groups: GroupNorm groups.
        num_upsamples: number of x2 steps (0 for the stride-4 level).
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, num_groups: int, num_upsamples: int
    ) -> None:
        super().__init__()
        self.upsamples = num_upsamples > 0
        num_layers = max(num_upsamples, 1)
        self.layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(
                        in_channels if k == 0 else out_channels,
                        out_channels,
                        kernel_size=3,
                        padding=1,
                    ),
                    nn.GroupNorm(num_groups, out_channels),
                    nn.GELU(),
                )
                for k in range(num_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
            if self.upsamples:
                x = _upsample(x, BASE_SCALE_FACTOR)
        return x


def _upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear upsampling in float32, cast back (bf16 interpolation blurs single-pixel peaks)."""
    y = F.interpolate(x.float(), scale_factor=factor, mode="bilinear", align_corners=False)
    return y.to(x.dtype)


class PeakNet(nn.Module):
    """PeakNet segmentation network; ``forward(x)`` returns per-pixel class logits.

    Args:
        config: the architecture (defaults to ``PeakNetConfig()``); kept as ``self.config``.

    Example::

        from peaknet_pva.model import create_model
        net = create_model("peaknet-atto-s").eval()
        logits = net(torch.zeros(2, 1, 64, 96))      # (2, 2, 64, 96)
        mask = logits.argmax(1) == 1
    """

    def __init__(self, config: PeakNetConfig | None = None) -> None:
        super().__init__()
        if config is None:
            config = PeakNetConfig()
        if not isinstance(config, PeakNetConfig):
            raise ConfigError(
                f"PeakNet: config must be a PeakNetConfig, got {type(config).__name__}"
            )
        self.config = config
        c = config
        self.backbone = ConvNeXtV2Backbone(
            dims=c.backbone_dims,
            depths=c.backbone_depths,
            in_chans=c.in_chans,
            drop_path_rate=c.drop_path_rate,
        )
        self.backbone_to_bifpn = nn.ModuleList(
            [nn.Conv2d(dim, c.bifpn_num_features, kernel_size=1) for dim in c.backbone_dims]
        )
        self.bifpn = BiFPN(
            num_blocks=c.bifpn_num_blocks,
            num_features=c.bifpn_num_features,
            num_levels=len(LEVEL_STRIDES),
            base_level=4,
            fusion_eps=c.bifpn_fusion_eps,
        )
        self.seg_lateral_layers = nn.ModuleList(
            [
                SegLateralLayer(
                    c.bifpn_num_features,
                    c.seg_out_channels,
                    num_groups=c.seg_num_groups,
                    num_upsamples=(s // LEVEL_STRIDES[0]).bit_length() - 1,
                )
                for s in LEVEL_STRIDES
            ]
        )
        self.head_segmask = nn.Conv2d(c.seg_out_channels, c.num_classes, kernel_size=1)
        self.upsample_factor = LEVEL_STRIDES[0]
        if c.uses_learned_upsample:
            # Upstream layout: features (not logits) in, classes out; weight (seg, classes, 6, 6).
            # (H/4 - 1) * 4 - 2 * 1 + 6 = H: an exact x4 with a 1-px overlap on each side.
            f = self.upsample_factor
            self.head_upsample_layer = nn.Sequential(
                nn.ConvTranspose2d(
                    c.seg_out_channels, c.num_classes, kernel_size=f + 2, stride=f, padding=1
                )
            )
        else:
            self.head_upsample_layer = None
        self.init_weights()

    # -- init ---------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Fresh-training init as in PeakNet's ``init_weights`` (HF init for the backbone)."""
        for m in self.backbone.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, GlobalResponseNorm):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.backbone_to_bifpn:
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="linear")
            nn.init.zeros_(m.bias)
        for m in self.bifpn.modules():
            if isinstance(m, DepthwiseSeparableConv2d):
                nn.init.kaiming_uniform_(
                    m.depthwise_conv.weight, mode="fan_in", nonlinearity="relu"
                )
                nn.init.kaiming_uniform_(
                    m.pointwise_conv.weight, mode="fan_out", nonlinearity="relu"
                )
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.seg_lateral_layers.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.kaiming_normal_(self.head_segmask.weight, mode="fan_in", nonlinearity="linear")
        nn.init.zeros_(self.head_segmask.bias)
        if self.head_upsample_layer is not None:
            convt = self.head_upsample_layer[0]
            nn.init.kaiming_normal_(convt.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(convt.bias)

    # -- forward ------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ConfigError`` unless ``x`` is ``(N, in_chans, H, W)`` with H, W % 32 == 0."""
        c = self.config.in_chans
        if x.ndim != 4 or x.shape[1] != c:
            raise ConfigError(
                f"PeakNet input must be (N, {c}, H, W), got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE or h == 0 or w == 0:
            raise ConfigError(
                f"PeakNet input H and W must be positive multiples of {SIZE_MULTIPLE} "
                f"(pad bottom-right first), got shape {tuple(x.shape)}"
            )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Input → BiFPN outputs: ``(N, bifpn_num_features, H/s, W/s)`` for s = 4, 8, 16, 32."""
        self.check_input(x)
        feats = self.backbone.forward_intermediates(x)
        feats = [adapter(f) for adapter, f in zip(self.backbone_to_bifpn, feats)]
        return self.bifpn(feats)

    def forward_head(self, feats: list[torch.Tensor], *, pre_logits: bool = False) -> torch.Tensor:
        """BiFPN outputs → logits ``(N, num_classes, H, W)``.

        With ``pre_logits=True`` returns the summed stride-4 seg features
        ``(N, seg_out_channels, H/4, W/4)`` instead.
        """
        acc = None
        # Coarse to fine, as PeakNet sums them (the order only matters for rounding).
        for lateral, f in zip(reversed(self.seg_lateral_layers), reversed(feats)):
            y = lateral(f)
            acc = y if acc is None else acc + y
        assert acc is not None
        if pre_logits:
            return acc
        logits = self.head_segmask(acc)
        out = _upsample(logits, self.upsample_factor)
        if self.head_upsample_layer is not None:
            out = out + self.head_upsample_layer(acc)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dims={list(c.backbone_dims)}, depths={list(c.backbone_depths)}, "
            f"bifpn={c.bifpn_num_blocks}x{c.bifpn_num_features}, seg={c.seg_out_channels}, "
            f"learned_upsample={c.uses_learned_upsample}"
        )
