"""The newcomer's path: the demo runs the real system (replay → 2 PeakNet consumers with the shipped
weights → 2 CXI writers) on loopback, loses nothing, and finds the simulated peaks."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

pytest.importorskip("pvaccess")

from peaknet_pva.cxi import read_cxi  # noqa: E402
from peaknet_pva.demo import run_demo  # noqa: E402

pytestmark = [pytest.mark.pva, pytest.mark.timeout(400)]


def test_demo_short_run(tmp_path: Path):
    summary = run_demo(tmp_path, duration_s=5.0, fps=4.0, n_consumers=2, channel_prefix=f"t{uuid.uuid4().hex[:8]}:")
    assert summary.ok, summary.as_text()
    assert summary.frames_sent == summary.frames_published == summary.frames_processed == 20
    assert summary.frames_dropped == 0 and summary.missed_ids == 0
    assert summary.accuracy["f1"] >= 0.85, summary.accuracy
    assert summary.cxi_files and summary.cxi_frames == sum(len(read_cxi(Path(f)).peaks) for f in summary.cxi_files)
    assert Path(summary.png).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((Path(summary.run_dir) / "summary.json").read_text())
    assert saved["frames_processed"] == 20
    assert "peaknet-pva demo: OK" in summary.as_text()
