"""Named PeakNet architectures, as data, and the one factory that builds them.

ConvNeXt V2 sizes are those of the paper (Woo et al., CVPR 2023, table 11) and of timm /
HF ``facebook/convnextv2-*``. ``peaknet-<backbone>`` presets pair each backbone with the
peaknet-pipeline-ray defaults (2 BiFPN blocks x 256 features, 256 seg channels, bilinear x4).
``peaknet-673m`` is the published PeakNet-673M (``peaknet-673m.yaml``: huge backbone, 4 BiFPN
blocks x 512 features, 256 seg channels, learned upsample). ``peaknet-atto-s`` is this project's
small model (about 3.7 M parameters) for the shipped default weights and CPU use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .peaknet import PeakNet, PeakNetConfig

__all__ = ["CONVNEXTV2_SIZES", "PRESETS", "create_model"]

logger = logging.getLogger(__name__)

#: ConvNeXt V2 backbone sizes: name -> (stage dims, stage depths).
CONVNEXTV2_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((40, 80, 160, 320), (2, 2, 6, 2)),
    "femto": ((48, 96, 192, 384), (2, 2, 6, 2)),
    "pico": ((64, 128, 256, 512), (2, 2, 6, 2)),
    "nano": ((80, 160, 320, 640), (2, 2, 8, 2)),
    "tiny": ((96, 192, 384, 768), (3, 3, 9, 3)),
    "base": ((128, 256, 512, 1024), (3, 3, 27, 3)),
    "large": ((192, 384, 768, 1536), (3, 3, 27, 3)),
    "huge": ((352, 704, 1408, 2816), (3, 3, 27, 3)),
}


def _preset(size: str, **kwargs: Any) -> PeakNetConfig:
    dims, depths = CONVNEXTV2_SIZES[size]
    return PeakNetConfig(backbone_dims=dims, backbone_depths=depths, **kwargs)


#: Preset name -> architecture. ``create_model(name, **overrides)`` builds one.
PRESETS: dict[str, PeakNetConfig] = {
    **{f"peaknet-{size}": _preset(size) for size in CONVNEXTV2_SIZES},
    "peaknet-673m": _preset(
        "huge",
        bifpn_num_blocks=4,
        bifpn_num_features=512,
        seg_out_channels=256,
        uses_learned_upsample=True,
    ),
    "peaknet-atto-s": _preset(
        "atto",
        bifpn_num_blocks=1,
        bifpn_num_features=64,
        seg_out_channels=64,
        uses_learned_upsample=False,
    ),
}


def resolve_config(
    name_or_config: str | PeakNetConfig | Mapping[str, Any], **overrides: Any
) -> PeakNetConfig:
    """Turn a preset name, a config or a ``to_dict()`` mapping (+ overrides) into a config."""
    if isinstance(name_or_config, PeakNetConfig):
        config = name_or_config
    elif isinstance(name_or_config, str):
        try:
            config = PRESETS[name_or_config]
        except KeyError:
            raise ConfigError(
                f"unknown PeakNet preset {name_or_config!r}; available: {sorted(PRESETS)}"
            ) from None
    elif isinstance(name_or_config, Mapping):
        config = PeakNetConfig.from_dict(name_or_config)
    else:
        raise ConfigError(
            "create_model: expected a preset name, PeakNetConfig or mapping, "
            f"got {type(name_or_config).__name__}"
        )
    return config.replace(**overrides) if overrides else config


def create_model(
    name_or_config: str | PeakNetConfig | Mapping[str, Any] = "peaknet-atto-s", **overrides: Any
) -> PeakNet:
    """Build a randomly initialised PeakNet from a preset name or config.

    Args:
        name_or_config: a key of :data:`PRESETS`, a :class:`PeakNetConfig`, or its ``to_dict()``.
        **overrides: ``PeakNetConfig`` fields to change, e.g. ``uses_learned_upsample=True``.

    Build big models without allocating memory with ``with torch.device("meta"): ...``.
    Load weights with :func:`peaknet_pva.model.load_checkpoint`.
    """
    config = resolve_config(name_or_config, **overrides)
    logger.debug("building PeakNet %s", config)
    return PeakNet(config)
