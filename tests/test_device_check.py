"""``benchmarks/device_check.sh --cpu`` (what CI runs so that the one-shot GPU check cannot rot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_check  # noqa: E402

STEPS = {"cuda-tests", "peakfinder8-gpu", "peaks-cupy", "pipeline", "pva-4-consumers"}


def test_device_check_cpu_mode_reports_every_step_skipped_and_checks_command_lines(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["mode"] == "cpu" and report["ok"] is True
    assert {s["name"] for s in report["steps"]} == STEPS
    for s in report["steps"]:
        assert s["result"]["status"] == "skipped", s
        # each GPU command line parses with its script's own parser (pvapy may be absent: not checked)
        assert str(s["result"]["argv_check"]).startswith(("ok", "n/a", "not checked")), s
    md = (tmp_path / "device_check.md").read_text()
    assert "| pipeline |" in md and "skipped" in md
    assert report["elapsed_s"] < 60


def test_device_check_report_from_step_output(tmp_path):
    """The GPU-mode machinery (subprocess, JSON rows, report tables) on a fake step."""
    row = {"preset": "peaknet-atto", "frame": [1, 8, 8], "batch_size": 8}
    code = "import json; " + "; ".join(
        f"print(json.dumps({json.dumps(dict(row, mode=m, frames_per_s=v))}))"
        for m, v in (("compute_only", 10.0), ("sequential", 8.0), ("buffered", 9.5))
    ) + f"; print(json.dumps({json.dumps(dict(row, ratio_buffered_vs_compute_only=0.95))}))"
    step = device_check.Step("pipeline", "fake", ["-c", code], 30, needs=())
    device_check.run_step(step, {}, 60, tmp_path)
    assert step.result["status"] == "ok" and len(step.result["rows"]) == 4
    bad = device_check.Step("peaks-cupy", "fails", ["-c", "import sys; sys.exit(3)"], 30, needs=())
    device_check.run_step(bad, {}, 60, tmp_path)
    assert bad.result["status"] == "failed" and bad.result["rc"] == 3
    gone = device_check.Step("pva-4-consumers", "needs pvapy", [], 30, needs=("pvapy",))
    device_check.run_step(gone, {"pvapy": None}, 60, tmp_path)
    assert gone.result["status"] == "skipped"
    report = {"mode": "gpu", "date": "today", "command": "x", "elapsed_s": 1.0, "env": {"gpu": "fake"},
              "steps": [{"name": s.name, "what": s.what, "result": s.result} for s in (step, bad, gone)]}
    md = device_check.markdown(report)
    assert "| peaknet-atto | 1×8×8 | 8 | 10 | 8 | 9.5 | 0.95 |" in md
    assert "| peaks-cupy | fails | failed |" in md
