"""The shipped example argument files are valid processor args (every key real, every value valid)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("pvaccess")

from peaknet_pva.pva.cxi_processor import CxiProcessorParams  # noqa: E402
from peaknet_pva.pva.peaknet_processor import PeakNetProcessorParams  # noqa: E402

ARGS = sorted((Path(__file__).parents[1] / "examples" / "args").glob("*.json"))


def test_there_are_example_args():
    names = {p.name for p in ARGS}
    assert {"cpu.json", "gpu-4consumers.json", "cxi-writer.json", "epix10k2m.json", "jungfrau4m.json"} <= names


@pytest.mark.parametrize("path", ARGS, ids=lambda p: p.name)
def test_example_args_parse(path: Path):
    config = json.loads(path.read_text())
    if "output_dir" in config:
        params = CxiProcessorParams.from_config(config)
        assert params.output_dir == config["output_dir"]
    else:
        params = PeakNetProcessorParams.from_config(config)
        for key, value in config.items():
            got = getattr(params, key)
            assert (list(got) if isinstance(got, tuple) else got) == value, key
