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
    summary = run_demo(tmp_path, duration_s=5.0, fps=4.0, n_consumers=2, channel_prefix=f"t{uuid.uuid4().hex[:8]}:",
                       monitor_port=0)
    assert summary.ok, summary.as_text()
    assert summary.frames_sent == summary.frames_published == summary.frames_processed == 20
    assert summary.frames_dropped == 0 and summary.missed_ids == 0
    assert summary.accuracy["f1"] >= 0.85, summary.accuracy
    assert summary.cxi_files and summary.cxi_frames == sum(len(read_cxi(Path(f)).peaks) for f in summary.cxi_files)
    assert Path(summary.png).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((Path(summary.run_dir) / "summary.json").read_text())
    assert saved["frames_processed"] == 20
    assert "peaknet-pva demo: OK" in summary.as_text()
    # the live monitor ran alongside, on loopback, and counted the published frames
    assert summary.monitor_url.startswith("http://127.0.0.1:") and summary.monitor_url in summary.as_text()
    assert 15 <= summary.monitor_frames <= 20, summary.monitor_frames  # it may connect after the first frames
    assert "Traceback" not in (Path(summary.run_dir) / "monitor.log").read_text()


def test_demo_refuses_channels_another_pipeline_serves(tmp_path: Path):
    """Two demos on the same names would trade frames silently: the second one refuses, in one line."""
    from pva_helpers import tiny_dataset
    from peaknet_pva.errors import ConfigError
    from peaknet_pva.pva import procs

    prefix = f"t{uuid.uuid4().hex[:8]}:"
    other = procs.start_replay(tiny_dataset(tmp_path / "data", n_frames=2, seed=1), f"{prefix}pvapy:image", fps=1,
                               wait_connected=[f"{prefix}nobody:status"], extra=["--wait-timeout", "60"],
                               log_path=tmp_path / "other.log")
    try:
        procs.wait_for_status([f"{prefix}pvapy:image"], timeout_s=30, proc=other)
        with pytest.raises(ConfigError, match="already served.*pvapy:image"):
            run_demo(tmp_path / "demo", duration_s=1.0, channel_prefix=prefix, monitor_port=None)
        assert other.poll() is None  # the running one was left alone
    finally:
        other.stop(10)
