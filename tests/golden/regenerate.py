"""Rewrite the golden files from ``tests/upstream_ref.py`` (only after a reviewed layout change).

    .venv/bin/python tests/golden/regenerate.py

The state-dict layouts come from the independent upstream description alone; the numeric golden
is our model's output for upstream-shaped seeded weights (``tests/test_model.py`` also checks it
against the independent reference forward).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent
sys.path.insert(0, str(GOLDEN.parent))

from upstream_ref import format_layout, layout_of, seeded_state_dict  # noqa: E402

from peaknet_pva.model import PRESETS, PeakNet, PeakNetConfig  # noqa: E402

log = logging.getLogger("regenerate")

#: A small learned-upsample architecture (atto backbone, 2 BiFPN blocks x 64, seg 64).
SMALL_LU = PRESETS["peaknet-atto-s"].replace(bifpn_num_blocks=2, uses_learned_upsample=True)
#: Golden file -> architecture.
LAYOUT_FILES = {
    "peaknet_tiny_state_dict.txt": PRESETS["peaknet-tiny"],
    "peaknet_673m_state_dict.txt": PRESETS["peaknet-673m"],
    "peaknet_small_lu_state_dict.txt": SMALL_LU,
}
LOGITS_FILE = "peaknet_small_lu_logits.json"
#: Architecture fields recorded with the numeric golden (everything that shapes the network).
ARCH_FIELDS = (
    "backbone_dims", "backbone_depths", "in_chans", "bifpn_num_blocks", "bifpn_num_features",
    "bifpn_fusion_eps", "seg_out_channels", "seg_num_groups", "num_classes",
    "uses_learned_upsample",
)  # fmt: skip
POINTS = [
    [0, c, y, x]
    for c in (0, 1)
    for y, x in [(0, 0), (0, 95), (63, 0), (63, 95), (17, 42), (40, 70), (31, 32), (5, 88)]
]



def small_lu_logits(config: PeakNetConfig, param_seed: int, input_seed: int, shape) -> torch.Tensor:
    model = PeakNet(config).eval()
    model.load_state_dict(seeded_state_dict(layout_of(config), param_seed), strict=True)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(input_seed))
    with torch.no_grad():
        return model(x)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, config in LAYOUT_FILES.items():
        (GOLDEN / name).write_text(format_layout(layout_of(config)))
        log.info("wrote %s (%d entries)", name, len(layout_of(config)))
    torch.set_num_threads(1)
    shape = [1, 1, 64, 96]
    y = small_lu_logits(SMALL_LU, 0, 1, shape)
    record = {
        "about": "logits of tests/upstream_ref.seeded_state_dict(seed=param_seed) weights for "
        "this architecture on torch.randn(input_shape, seed=input_seed); see README.md",
        "config": {k: v for k, v in SMALL_LU.to_dict().items() if k in ARCH_FIELDS},
        "param_seed": 0,
        "input_seed": 1,
        "input_shape": shape,
        "points": POINTS,
        "values": [round(float(y[tuple(p)]), 7) for p in POINTS],
        "sum": float(y.double().sum()),
        "sum_sq": float(y.double().square().sum()),
        "tolerance": {"values": 1e-5, "sum": 5e-3, "sum_sq": 2e-2},
    }
    (GOLDEN / LOGITS_FILE).write_text(json.dumps(record, indent=1) + "\n")
    log.info("wrote %s", LOGITS_FILE)


if __name__ == "__main__":
    main()
