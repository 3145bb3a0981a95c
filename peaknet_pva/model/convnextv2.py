"""ConvNeXt V2 backbone, written natively in torch with HuggingFace parameter names.

Paper: S. Woo et al., "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders",
CVPR 2023 (arXiv:2301.00808). Global Response Normalization (GRN) is from that paper; the block
layout (7x7 depthwise conv, LayerNorm, 4x MLP) is from Z. Liu et al., "A ConvNet for the 2020s",
CVPR 2022 (arXiv:2201.03545).

Why not ``transformers.ConvNextV2Backbone``: PeakNet checkpoints were trained with it, so the
parameter names here copy its layout exactly (``embeddings.patch_embeddings``,
``encoder.stages.{i}.downsampling_layer.{0,1}``, ``encoder.stages.{i}.layers.{j}.{dwconv,layernorm,
pwconv1,grn,pwconv2}``, ``hidden_states_norms.stage{k}``) while the package stays free of the
``transformers`` dependency. Official ConvNeXt V2 weights are CC-BY-NC 4.0 (Meta); this file holds
code only.

Numerics follow HF ``modeling_convnextv2.py``: every LayerNorm has eps 1e-6 (``layer_norm_eps`` in
the HF config only affects the classification model's pooled norm, absent from the backbone), GELU
is exact (erf), GRN adds 1e-6 to the mean L2 norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvNeXtV2Backbone",
    "ConvNeXtV2Block",
    "ConvNeXtV2Stage",
    "DropPath",
    "GlobalResponseNorm",
    "LayerNorm2d",
]

#: LayerNorm epsilon used everywhere in the HF ConvNeXt V2 backbone.
LN_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an ``(N, C, H, W)`` tensor ("channels_first").

    Same parameters (``weight``, ``bias`` of shape ``(C,)``) as ``nn.LayerNorm(C)`` so checkpoints
    written by HF's ``ConvNextV2LayerNorm(data_format="channels_first")`` load unchanged.
    """

    def __init__(self, num_channels: int, *, eps: float = LN_EPS) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """GRN on a channels-last ``(N, H, W, C)`` tensor (ConvNeXt V2, eq. 1-3).

    Rescales each channel by its spatial L2 norm relative to the mean over channels, which keeps
    the MLP's channels from collapsing. ``weight``/``bias`` have shape ``(1, 1, 1, C)`` as in HF.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.weight * (x * nx) + self.bias + x


class DropPath(nn.Module):
    """Stochastic depth per sample (no parameters; identity in eval mode or with ``p = 0``)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class ConvNeXtV2Block(nn.Module):
    """ConvNeXt V2 block: dwconv 7x7 → LN → Linear(4C) → GELU → GRN → Linear(C), + residual.

    Args:
        dim: number of channels.
        drop_path: stochastic-depth rate of this block.
    """

    def __init__(self, dim: int, *, drop_path: float = 0.0) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.layernorm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C): Linear acts on the last axis
        x = self.pwconv2(self.grn(self.act(self.pwconv1(self.layernorm(x)))))
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


class ConvNeXtV2Stage(nn.Module):
    """Optional 2x2/stride-2 downsampling (LN + conv) followed by ``depth`` blocks.

    Args:
        in_dim: channels entering the stage.
        out_dim: channels inside the stage.
        depth: number of blocks.
        downsample: whether the stage halves the resolution (all stages but the first).
        drop_path_rates: one rate per block (defaults to zeros).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        depth: int,
        downsample: bool,
        drop_path_rates: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if downsample or in_dim != out_dim:
            self.downsampling_layer = nn.ModuleList(
                [LayerNorm2d(in_dim), nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2)]
            )
        else:
            self.downsampling_layer = nn.ModuleList()
        rates = list(drop_path_rates) if drop_path_rates is not None else [0.0] * depth
        self.layers = nn.ModuleList(
            [ConvNeXtV2Block(out_dim, drop_path=rates[j]) for j in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.downsampling_layer:
            x = layer(x)
        for layer in self.layers:
            x = layer(x)
        return x


class _Embeddings(nn.Module):
    """Patch-4 stem: Conv2d(in, d0, 4, stride 4) + channels-first LayerNorm."""

    def __init__(self, in_chans: int, dim: int, *, patch_size: int = 4) -> None:
        super().__init__()
        self.patch_embeddings = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.layernorm = LayerNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.patch_embeddings(x))


class _Encoder(nn.Module):
    """The four stages; holds them under ``stages`` to match HF's ``encoder.stages.{i}``."""

    def __init__(self, dims: Sequence[int], depths: Sequence[int], drop_path_rate: float) -> None:
        super().__init__()
        total = sum(depths)
        # Plain Python (not torch.linspace) so the model also builds under torch.device('meta').
        rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.stages = nn.ModuleList()
        prev, start = dims[0], 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            self.stages.append(
                ConvNeXtV2Stage(
                    prev,
                    dim,
                    depth=depth,
                    downsample=i > 0,
                    drop_path_rates=rates[start : start + depth],
                )
            )
            prev, start = dim, start + depth


class ConvNeXtV2Backbone(nn.Module):
    """ConvNeXt V2 feature extractor: four maps at strides 4, 8, 16, 32.

    Equivalent to HF ``ConvNextV2Backbone`` with ``out_features = stage1..stage4``: each stage's
    output passes through its own channels-first LayerNorm (``hidden_states_norms.stage{k}``).

    Args:
        dims: channels of the four stages, e.g. ``(40, 80, 160, 320)`` for atto.
        depths: blocks per stage, e.g. ``(2, 2, 6, 2)``.
        in_chans: input channels (1 for detector images).
        drop_path_rate: maximum stochastic-depth rate, linearly increasing over blocks.

    Example::

        feats = ConvNeXtV2Backbone(dims=(40, 80, 160, 320), depths=(2, 2, 6, 2))
        f4, f8, f16, f32 = feats.forward_intermediates(torch.zeros(1, 1, 64, 64))
    """

    def __init__(
        self,
        *,
        dims: Sequence[int],
        depths: Sequence[int],
        in_chans: int = 1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(dims) != 4 or len(depths) != 4:
            raise ValueError(f"ConvNeXtV2Backbone needs 4 stages, got dims={dims} depths={depths}")
        self.dims = tuple(int(d) for d in dims)
        self.depths = tuple(int(d) for d in depths)
        self.in_chans = int(in_chans)
        self.embeddings = _Embeddings(self.in_chans, self.dims[0])
        self.encoder = _Encoder(self.dims, self.depths, drop_path_rate)
        self.hidden_states_norms = nn.ModuleDict(
            {f"stage{k + 1}": LayerNorm2d(dim) for k, dim in enumerate(self.dims)}
        )

    #: Output stride of each returned feature map.
    feature_strides = (4, 8, 16, 32)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised output of each stage: ``(N, dims[k], H/s, W/s)`` for s = 4, 8, 16, 32."""
        x = self.embeddings(x)
        out = []
        for k, stage in enumerate(self.encoder.stages):
            x = stage(x)
            out.append(self.hidden_states_norms[f"stage{k + 1}"](x))
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_intermediates(x)
