"""The command line on files (no PVA): simulate → infer → inspect (+PNG) → geometry → evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from peaknet_pva.cli import main
from peaknet_pva.cxi import read_cxi
from peaknet_pva.geometry import read_geometry
from peaknet_pva.simulate import load_dataset


def test_simulate_infer_inspect(tmp_path: Path, capsys):
    sim = tmp_path / "sim"
    assert main(["simulate", "--detector", "single", "--n-frames", "3", "--seed", "5", "--out", str(sim)]) == 0
    ds = load_dataset(sim)
    assert np.load(sim / "frames.npy").shape == (3, 512, 512)
    capsys.readouterr()

    out = tmp_path / "cxi"
    assert main(["infer", str(sim / "frames.npy"), "--out", str(out), "--backend", "peakfinder8",
                 "--min-peaks", "0", "--batch-size", "2", "--photon-energy-ev", "9000"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["frames"] == 3 and result["hits"] == 3 and len(result["files"]) == 1
    contents = read_cxi(Path(result["files"][0]))
    assert contents.unique_id.tolist() == [1, 2, 3]
    np.testing.assert_allclose(contents.photon_energy_ev, 9000.0)
    np.testing.assert_array_equal(contents.frame(1)[0], ds.frames[1][0])
    assert sum(t.n for t in contents.peaks) > 0

    png = tmp_path / "frame.png"
    assert main(["inspect", result["files"][0], "--min-peaks", "0", "--png", str(png)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_frames"] == 3 and summary["hit_rate"] == 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_geometry_command(tmp_path: Path):
    path = tmp_path / "d.geom"
    assert main(["geometry", "--n-panels", "4", "--panel-shape", "352,384", "--out", str(path)]) == 0
    geom = read_geometry(path)
    assert geom.n_panels == 4 and geom.panel_shape == (352, 384)
    assert geom.panels[3].min_ss == 3 * 352 and geom.panels[3].max_fs == 383


def test_evaluate_command_peakfinder8(tmp_path: Path, capsys):
    out = tmp_path / "m.json"
    assert main(["evaluate", "--backends", "peakfinder8", "--n-frames", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    metrics = result["backends"]["peakfinder8"] if "backends" in result else result["peakfinder8"]
    assert metrics["f1"] > 0.9


def test_infer_writes_valid_cxi_for_multi_panel(tmp_path: Path, capsys):
    frames = np.zeros((2, 2 * 64, 64), np.uint16)
    frames[:, 10:13, 20:23] = 500  # panel 0
    frames[:, 64 + 40 : 64 + 43, 5:8] = 700  # panel 1
    npy = tmp_path / "f.npy"
    np.save(npy, frames)
    out = tmp_path / "cxi"
    assert main(["infer", str(npy), "--out", str(out), "--backend", "peakfinder8", "--panel-shape", "64,64",
                 "--min-peaks", "0"]) == 0
    path = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["files"][0]
    with h5py.File(path) as fh:
        assert fh["entry_1/data_1/data"].shape == (2, 128, 64)
        assert fh["entry_1/data_1/data"].dtype == np.uint16
