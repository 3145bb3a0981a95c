"""PeakNet in native torch: ConvNeXt V2 + BiFPN + segmentation head, presets, configs, weights.

Typical use::

    from peaknet_pva.model import create_model, load_checkpoint
    net = create_model("peaknet-atto-s")                 # random weights, a named preset
    net = load_checkpoint("peaknet-673m.bin")            # architecture inferred from the file
    logits = net.eval()(frames)                          # (N, 1, H, W) -> (N, 2, H, W)

H and W must be multiples of 32 (pad bottom-right first).
"""

from __future__ import annotations

from .checkpoint import clean_state_dict, infer_config, load_checkpoint, save_checkpoint
from .config import config_from_mapping, config_from_yaml
from .peaknet import PeakNet, PeakNetConfig
from .presets import PRESETS, create_model

__all__ = [
    "PRESETS",
    "PeakNet",
    "PeakNetConfig",
    "clean_state_dict",
    "config_from_mapping",
    "config_from_yaml",
    "create_model",
    "infer_config",
    "load_checkpoint",
    "save_checkpoint",
]
