"""BiFPN: weighted bidirectional feature-pyramid fusion, as used by PeakNet.

Paper: M. Tan, R. Pang, Q. V. Le, "EfficientDet: Scalable and Efficient Object Detection",
CVPR 2020 (arXiv:1911.09070), section 3 ("fast normalized fusion": ReLU'd weights divided by their
sum plus eps).

PeakNet's variant (carbonscott/peaknet, ``peaknet/modeling/bifpn.py``):

* all levels share ``num_features`` channels (1x1 adapters upstream do the projection);
* levels are named from ``base_level = 4`` (PeakNet's convention; only the names depend on it:
  nodes ``m4..m6`` top-down and ``q5..q7`` bottom-up for four levels);
* every fusion node is a *kernel-1* depthwise-separable conv (bias-free) → channels-first
  LayerNorm (eps 1e-6) → GELU, and the node's same-level input is added back as a skip;
* resampling is bilinear x2 / x0.5 computed in float32 (bf16 interpolation loses peaks);
* ``w_q_mask`` (a persistent bool buffer, upstream since commit dfbc832) drops one of the two
  identical inputs of the top bottom-up node: the top level has no top-down node, so its
  "m_low" is p_top itself. Upstream masks ``[-1, 0]`` (the p_low term) and keeps ``[-1, 1]``;
  which of the two is kept changes the output (the weights differ), so the default must be
  upstream's. A mask stored in a checkpoint (bool, or 0/1 floats as older files of this project
  have) always wins over the default.

Parameter names match PeakNet checkpoints: ``blocks.{b}.conv.{m4,m5,m6,q5,q6,q7}.{0,1}``,
``blocks.{b}.w_m`` (L-1, 2), ``blocks.{b}.w_q`` (L-1, 3), bool buffer ``blocks.{b}.w_q_mask`` (L-1, 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .convnextv2 import LayerNorm2d

__all__ = ["BiFPN", "BiFPNBlock", "DepthwiseSeparableConv2d", "default_w_q_mask"]

#: BiFPN LayerNorm epsilon (PeakNet's ``BiFPNLayerNorm`` default).
BIFPN_LN_EPS = 1e-6


def _resample(x: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Bilinear resampling in float32, cast back to the input dtype (as PeakNet does)."""
    y = F.interpolate(
        x.float(), scale_factor=scale_factor, mode="bilinear", align_corners=False
    )
    return y.to(x.dtype)


class DepthwiseSeparableConv2d(nn.Module):
    """Depthwise (per-channel) conv followed by a pointwise 1x1 conv.

    With PeakNet's kernel size 1 the depthwise part is a per-channel scale; it is kept so the
    checkpoint's ``depthwise_conv``/``pointwise_conv`` tensors load.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, kernel_size: int = 1, bias: bool = False
    ) -> None:
        super().__init__()
        self.depthwise_conv = nn.Conv2d(
            in_channels,
            in_channels,
            kernel_size=kernel_size,
            padding=kernel_size // 2,
            groups=in_channels,
            bias=bias,
        )
        self.pointwise_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


def default_w_q_mask(num_levels: int) -> torch.Tensor:
    """Upstream's ``w_q_mask``: all True except ``[-1, 0]`` (the top node's duplicated p_low)."""
    mask = torch.ones(num_levels - 1, 3, dtype=torch.bool)
    mask[-1, 0] = False
    return mask


def _fusion_node(num_features: int) -> nn.Sequential:
    return nn.Sequential(
        DepthwiseSeparableConv2d(num_features, num_features, bias=False),
        LayerNorm2d(num_features, eps=BIFPN_LN_EPS),
        nn.GELU(),
    )


class BiFPNBlock(nn.Module):
    """One top-down (M) then bottom-up (Q) pass over ``num_levels`` maps of equal channels.

    Input/output: a list of ``num_levels`` tensors ``(N, C, H/2**k, W/2**k)``, finest first.

    Args:
        num_features: channels C of every level.
        num_levels: number of pyramid levels (PeakNet: 4).
        base_level: name of the finest level (PeakNet: 4 → nodes ``m4..m6``, ``q5..q7``).
        fusion_eps: eps of the normalised weighted sum (PeakNet: 1e-5).
    """

    def __init__(
        self,
        num_features: int,
        *,
        num_levels: int = 4,
        base_level: int = 4,
        fusion_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if num_levels < 3:
            raise ValueError(f"BiFPNBlock needs at least 3 levels, got {num_levels}")
        self.num_levels = num_levels
        self.min_level = base_level
        self.max_level = base_level + num_levels - 1
        self.fusion_eps = float(fusion_eps)

        self.conv = nn.ModuleDict()
        for level in range(self.min_level, self.max_level):
            self.conv[f"m{level}"] = _fusion_node(num_features)
        for level in range(self.min_level + 1, self.max_level + 1):
            self.conv[f"q{level}"] = _fusion_node(num_features)

        n = num_levels - 1
        self.w_m = nn.Parameter(torch.ones(n, 2))  # (p_high, m_low_up) per top-down node
        self.w_q = nn.Parameter(torch.ones(n, 3))  # (p_low, m_low, q_high_down) per bottom-up node
        self.register_buffer("w_q_mask", default_w_q_mask(num_levels), persistent=True)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        lo, hi, eps = self.min_level, self.max_level, self.fusion_eps
        if len(x) != self.num_levels:
            raise ValueError(f"BiFPNBlock expects {self.num_levels} maps, got {len(x)}")
        p = {level: x[i] for i, level in enumerate(range(lo, hi + 1))}
        w_m = F.relu(self.w_m)
        w_q = F.relu(self.w_q) * self.w_q_mask

        # Top-down (M): coarse → fine, m_l = node(w1 p_l + w2 up(m_{l+1})) + p_l.
        m: dict[int, torch.Tensor] = {}
        for i, level_low in enumerate(range(hi, lo, -1)):
            level_high = level_low - 1
            m_low = p[level_low] if i == 0 else m[level_low]
            w1, w2 = w_m[i]
            fused = (w1 * p[level_high] + w2 * _resample(m_low, 2.0)) / (w1 + w2 + eps)
            m[level_high] = self.conv[f"m{level_high}"](fused) + p[level_high]

        # Bottom-up (Q): fine → coarse, q_l = node(w1 p_l + w2 m_l + w3 down(q_{l-1})) + p_l.
        q: dict[int, torch.Tensor] = {lo: m[lo]}
        for i, level_high in enumerate(range(lo, hi)):
            level_low = level_high + 1
            m_low = m[level_low] if level_low < hi else p[level_low]
            w1, w2, w3 = w_q[i]
            fused = w1 * p[level_low] + w2 * m_low + w3 * _resample(q[level_high], 0.5)
            fused = fused / (w1 + w2 + w3 + eps)
            q[level_low] = self.conv[f"q{level_low}"](fused) + p[level_low]

        return [q[level] for level in range(lo, hi + 1)]


class BiFPN(nn.Module):
    """A stack of ``num_blocks`` BiFPN blocks (``blocks.{b}``), same list in and out."""

    def __init__(
        self,
        *,
        num_blocks: int,
        num_features: int,
        num_levels: int = 4,
        base_level: int = 4,
        fusion_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[
                BiFPNBlock(
                    num_features,
                    num_levels=num_levels,
                    base_level=base_level,
                    fusion_eps=fusion_eps,
                )
                for _ in range(num_blocks)
            ]
        )

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        for block in self.blocks:
            x = block(x)
        return x
