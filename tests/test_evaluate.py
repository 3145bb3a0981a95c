"""Peak matching and metrics on hand-made cases; the PNG overlay."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peaknet_pva.evaluate import Metrics, evaluate, match_peaks
from peaknet_pva.frames import PeakTable
from peaknet_pva.plotting import plot_frame_peaks
from peaknet_pva.simulate import TruthTable, simulate_frame


def table(rows):
    """PeakTable from ``[(panel, y, x), ...]``."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    n = len(rows)
    return PeakTable(panel=rows[:, 0], y=rows[:, 1], x=rows[:, 2], intensity=np.ones(n), npix=np.ones(n))


def truth(rows, detectable):
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    n = len(rows)
    return TruthTable(
        panel=rows[:, 0], y=rows[:, 1], x=rows[:, 2], intensity=np.ones(n), sigma=np.ones(n),
        snr=np.ones(n), detectable=detectable,
    )


def test_one_to_one():
    # two found peaks near one true spot: one TP, one FP
    tp, fp, fn, pairs = match_peaks(table([(0, 10, 10), (0, 10, 10.5)]), table([(0, 10, 10.2)]))
    assert (tp, fp, fn) == (1, 1, 0)
    assert pairs.tolist() == [[0, 0]]  # the nearer one
    # one found peak between two true spots: one TP, one FN
    tp, fp, fn, pairs = match_peaks(table([(0, 10, 10)]), table([(0, 10, 9), (0, 10, 11.2)]))
    assert (tp, fp, fn) == (1, 0, 1) and pairs.tolist() == [[0, 0]]


def test_hungarian_beats_greedy():
    # greedy nearest-first would pair f0-t0 (0.8 px) and leave f1 alone; the optimum pairs both
    found = table([(0, 5, 1.0), (0, 5, -0.9)])
    true = table([(0, 5, 0.2), (0, 5, 2.3)])
    tp, fp, fn, pairs = match_peaks(found, true)
    assert (tp, fp, fn) == (2, 0, 0)
    assert pairs.tolist() == [[0, 1], [1, 0]]


def test_distance_threshold_and_panel():
    true = table([(0, 20, 20)])
    assert match_peaks(table([(0, 20, 21.49)]), true)[:3] == (1, 0, 0)
    assert match_peaks(table([(0, 20, 21.51)]), true)[:3] == (0, 1, 1)
    assert match_peaks(table([(0, 20, 21.51)]), true, max_dist=2.0)[:3] == (1, 0, 0)
    assert match_peaks(table([(1, 20, 20)]), true)[:3] == (0, 1, 1)  # same place, other panel
    assert match_peaks(table([]), true)[:3] == (0, 0, 1)
    assert match_peaks(table([(0, 1, 1)]), table([]))[:3] == (0, 1, 0)
    with pytest.raises(ValueError, match="max_dist"):
        match_peaks(true, true, max_dist=0.0)


def test_detectable_only_counts():
    true = truth([(0, 10, 10), (0, 30, 30), (0, 50, 50)], detectable=[True, False, False])
    found = table([(0, 10, 10.1), (0, 30, 30.2), (0, 70, 70)])
    tp, fp, fn, pairs = match_peaks(found, true)
    # the faint spot found is neither TP nor FP; the faint spot missed is no FN
    assert (tp, fp, fn) == (1, 1, 0) and pairs.tolist() == [[0, 0]]
    # a found peak in reach of a detectable and an undetectable spot goes to the detectable one
    true2 = truth([(0, 10, 10), (0, 10, 11)], detectable=[True, False])
    assert match_peaks(table([(0, 10, 10.8)]), true2)[:3] == (1, 0, 0)


def test_evaluate_pools_frames_and_rmse():
    found = [table([(0, 0, 0.3), (0, 10, 10), (0, 40, 40)]), table([(2, 5, 6.0)])]
    true = [table([(0, 0.4, 0.0), (0, 10, 11.0), (0, 80, 80)]), table([(2, 5, 5.0), (2, 60, 60)])]
    m = evaluate(found, true)
    assert isinstance(m, Metrics)
    assert (m.tp, m.fp, m.fn, m.n_found, m.n_truth, m.n_frames) == (3, 1, 2, 4, 5, 2)
    assert m.precision == pytest.approx(0.75) and m.recall == pytest.approx(0.6)
    assert m.f1 == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    # offsets (-0.4, 0.3) -> 0.5 px, (0, -1) -> 1 px, (0, 1) -> 1 px
    assert m.rmse_px == pytest.approx(math.sqrt((0.25 + 1 + 1) / 3), abs=1e-6)
    assert m.mean_dx == pytest.approx((0.3 - 1 + 1) / 3, abs=1e-6)
    d = m.as_dict()
    assert d["tp"] == 3 and isinstance(d["f1"], float)


def test_evaluate_empty_conventions():
    m = evaluate([table([])], [table([])])
    assert (m.precision, m.recall, m.f1) == (1.0, 1.0, 1.0)
    assert math.isnan(m.rmse_px) and m.as_dict()["rmse_px"] is None
    m = evaluate([table([(0, 1, 1)])], [table([(0, 9, 9)])])
    assert (m.precision, m.recall, m.f1) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="2 truth"):
        evaluate([table([])], [table([]), table([])])


def test_many_peaks_match_quickly():
    rng = np.random.default_rng(0)
    n = 3000
    t = np.c_[rng.integers(0, 4, n), rng.uniform(0, 500, n), rng.uniform(0, 500, n)]
    f = t + np.c_[np.zeros(n), rng.normal(0, 0.3, (n, 2))]
    m = evaluate([table(f)], [table(t)])
    assert m.tp >= n - 60 and m.rmse_px < 0.6


def test_plot_frame_peaks_writes_png(tmp_path):
    frame, tr = simulate_frame(np.random.default_rng(0), "single", blank=False)
    found = tr.as_peak_table()
    out = plot_frame_peaks(frame, found, tr, path=tmp_path / "a" / "frame.png", title="single")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    multi = np.random.default_rng(1).poisson(5.0, (4, 32, 64)).astype(np.uint16)
    out2 = plot_frame_peaks(multi, table([(3, 10, 20)]), None, path=tmp_path / "m.png")
    assert out2.stat().st_size > 1000


def test_evaluate_main_scores_peakfinder8(tmp_path, capsys):
    import argparse
    import json

    args = argparse.Namespace(data=None, detector="single", n_frames=3, seed=5, backends="peakfinder8,bogus",
                              device="cpu", png=str(tmp_path / "o.png"), json=str(tmp_path / "m.json"))
    from peaknet_pva.evaluate import evaluate_main

    assert evaluate_main(args) == 1  # the bogus backend fails, the other is still scored
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["backends"]["peakfinder8"]["f1"] > 0.9
    assert "unknown backend" in result["backends"]["bogus"]["error"]
    assert (tmp_path / "o.png").stat().st_size > 1000
    assert json.loads(capsys.readouterr().out) == result
