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
    assert main(["inspect", result["files"][0], "--min-peaks", "0", "--png", str(png), "--json"]) == 0
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
                 "--min-peaks", "0", "--photon-energy-ev", "9500"]) == 0
    path = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["files"][0]
    with h5py.File(path) as fh:
        assert fh["entry_1/data_1/data"].shape == (2, 128, 64)
        assert fh["entry_1/data_1/data"].dtype == np.uint16


# -- a CLI that helps (issue 11, part 4) -------------------------------------------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from peaknet_pva.geometry import from_preset, write_geometry  # noqa: E402
from peaknet_pva.simulate import get_detector  # noqa: E402

SCRIPT = Path(sys.executable).with_name("peaknet-pva")


def _run(*argv: str) -> subprocess.CompletedProcess:
    cmd = [str(SCRIPT), *argv] if SCRIPT.exists() else [sys.executable, "-m", "peaknet_pva.cli", *argv]
    env = dict(os.environ, PEAKNET_PVA_LAZY="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys; sys.argv[0] = 'peaknet-pva'; import peaknet_pva.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'scipy', 'h5py', 'numpy', 'pvaccess') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    t0 = time.perf_counter()
    res = _run("--help")
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0 and "infer" in res.stdout
    assert elapsed < 5.0  # ~0.2 s on an idle machine; generous for a loaded test box
    # every subcommand's --help answers without torch (train and replay parse their own options)
    for sub in ("train", "replay", "evaluate", "infer", "demo", "monitor"):
        code = ("import sys; sys.argv = ['peaknet-pva', %r, '--help']; import peaknet_pva.cli as c\n"
                "try:\n    c.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
                "print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))") % sub
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert "usage: peaknet-pva" in out.stdout and out.stdout.strip().endswith("[]"), (sub, out.stdout[-300:], out.stderr)


@pytest.mark.parametrize(
    "argv, names",
    [
        (["infer", "missing.npy"], "argument frames"),
        (["simulate", "--detector", "nope"], "argument --detector"),
        (["infer", "x.npy", "--panel-shape", "12"], "argument --panel-shape"),
        (["geometry", "--out", "g.geom", "--n-panels", "2", "--panel-shape", "0,4"], "argument --panel-shape"),
        (["inspect", "missing-dir"], "argument files"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, argv, names):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit) as exc:
            rc = main(argv)
            raise SystemExit(rc)
    finally:
        os.chdir(cwd)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if " INFO " not in line]
    assert len(err) == 1 and names in err[0], err


def test_infer_requires_an_energy_and_writes_the_geom(tmp_path, capsys):
    frames = np.zeros((2, 64, 64), np.float32)
    frames[:, 10:13, 20:23] = 500
    npy = tmp_path / "f.npy"
    np.save(npy, frames)
    assert main(["infer", str(npy), "--out", str(tmp_path / "o"), "--backend", "peakfinder8"]) == 2
    assert "--photon-energy-ev" in capsys.readouterr().err
    # an HDF5 input that carries its energies
    with h5py.File(tmp_path / "in.h5", "w") as fh:
        fh["entry_1/data_1/data"] = frames
        fh["LCLS/photon_energy_eV"] = np.array([8000.0, 8100.0])
    assert main(["infer", str(tmp_path / "in.h5"), "--out", str(tmp_path / "o"), "--backend", "peakfinder8",
                 "--min-peaks", "0", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    np.testing.assert_allclose(read_cxi(Path(result["files"][0])).photon_energy_ev, [8000.0, 8100.0])
    geom = read_geometry(result["geometry"])
    assert geom.peak_list == "/entry_1/result_1" and geom.photon_energy == "/LCLS/photon_energy_eV"


def test_infer_with_geometry_and_mask_and_tall_slab_warning(tmp_path, capsys, caplog):
    det = get_detector("epix10k2m")
    frames = np.full((1,) + det.slab_shape, 10, np.uint16)
    frames[0, 352 * 5 + 100 : 352 * 5 + 103, 50:53] = 3000
    frames[0, 352 * 7 + 200 : 352 * 7 + 203, 60:63] = 3000  # masked below
    npy = tmp_path / "f.npy"
    np.save(npy, frames)
    good = np.ones(det.slab_shape, np.uint8)
    good[352 * 7 + 190 : 352 * 7 + 210, 50:70] = 0
    np.save(tmp_path / "mask.npy", good)
    geom = tmp_path / "epix.geom"
    write_geometry(geom, from_preset(det))
    assert main(["infer", str(npy), "--out", str(tmp_path / "o"), "--backend", "peakfinder8", "--geometry",
                 str(geom), "--mask", str(tmp_path / "mask.npy"), "--min-peaks", "0",
                 "--photon-energy-ev", "9000", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    table = read_cxi(Path(result["files"][0])).peaks[0]
    panels = set(table.panel.tolist())
    assert 5 in panels and 7 not in panels
    assert read_geometry(result["geometry"]).n_panels == 16
    # a tall slab without a panel shape: warned
    with caplog.at_level("WARNING"):
        assert main(["infer", str(npy), "--out", str(tmp_path / "o2"), "--backend", "peakfinder8",
                     "--photon-energy-ev", "9000", "--no-progress", "--min-peaks", "0"]) == 0
    assert any("tall" in r.getMessage() for r in caplog.records)


def test_inspect_directory_table_and_png(tmp_path, capsys):
    frames = np.zeros((3, 64, 64), np.float32)
    frames[:, 10:13, 20:23] = 500
    np.save(tmp_path / "f.npy", frames)
    out = tmp_path / "cxi"
    assert main(["infer", str(tmp_path / "f.npy"), "--out", str(out), "--backend", "peakfinder8",
                 "--min-peaks", "0", "--photon-energy-ev", "9000", "--frames-per-file", "2", "--no-progress"]) == 0
    capsys.readouterr()
    png = tmp_path / "p.png"
    assert main(["inspect", str(out), "--min-peaks", "0", "--png", str(png), "--frame", "2"]) == 0
    text = capsys.readouterr().out
    assert "total: 2 file(s), 3 frames" in text and text.count(".cxi") >= 2
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_geometry_command_force_and_physics(tmp_path, capsys):
    path = tmp_path / "d.geom"
    argv = ["geometry", "--n-panels", "2", "--panel-shape", "64,64", "--out", str(path), "--pixel-size-um", "100",
            "--distance-m", "0.2", "--photon-energy-ev", "12000"]
    assert main(argv) == 0
    geom = read_geometry(path)
    assert geom.res == 1e4 and geom.clen_m == 0.2 and geom.photon_energy == 12000.0
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert main(argv + ["--force", "--n-panels", "3"]) == 0 and read_geometry(path).n_panels == 3
    assert main(["geometry", "--detector", "jungfrau4m", "--out", str(tmp_path / "jf.geom")]) == 0
    assert read_geometry(tmp_path / "jf.geom").n_panels == 8
