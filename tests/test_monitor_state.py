"""MonitorState without PVA or a browser: rates, hits, counters, histograms, pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from peaknet_pva.geometry import DetectorGeometry
from peaknet_pva.monitor.pva_source import expand_channels
from peaknet_pva.monitor.server import to_json
from peaknet_pva.monitor.state import HitImage, MonitorConfig, MonitorState, PeakUpdate, resolution_a


def _update(ch: str, uid: int, n: int, *, panel_shape=(64, 64)) -> PeakUpdate:
    rng = np.random.default_rng(uid)
    return PeakUpdate(channel=ch, unique_id=uid, n_peaks=n, panel=rng.integers(0, 2, n), y=rng.uniform(0, 63, n).astype(np.float32),
                      x=rng.uniform(0, 63, n).astype(np.float32), intensity=rng.uniform(10, 1e4, n).astype(np.float32),
                      photon_energy_ev=9500.0, panel_shape=panel_shape)


def test_rates_hits_histogram_and_powder() -> None:
    st = MonitorState(MonitorConfig(min_peaks=5, bin_s=1.0, window_s=60), channels=["a:1:output", "a:2:output"],
                      status_channels=["a:1:status", "a:2:status"])
    t0 = 1000.0
    for i in range(20):  # 10 frames/s on channel 1 for 2 s, every other one a hit
        st.add_peaks(_update("a:1:output", i + 1, 8 if i % 2 else 0), now=t0 + i * 0.1)
    st.add_status("a:1:status", {"consumerId": 1, "userStats": {"nProcessed": 20, "nDropped": 2, "nBadFrames": 1, "minPeaks": 5,
                                                                 "device": "cpu"}}, now=t0 + 2)
    snap = st.snapshot(now=t0 + 2.0)
    c1, c2 = snap["consumers"]
    assert c1["frames"] == 20 and c1["hits"] == 10 and c1["hitRate"] == pytest.approx(0.5)
    assert c1["counters"]["processed"] == 20 and c1["counters"]["dropped"] == 2 and c1["counters"]["bad"] == 1
    assert c1["config"]["device"] == "cpu" and c1["config"]["minPeaks"] == 5
    assert [b[1] for b in c1["series"]] == [10.0, 10.0]  # frames/s per 1-s bin
    assert not c2["connected"] and c2["frames"] == 0
    assert snap["peaksHist"]["counts"][0] == 10 and snap["peaksHist"]["counts"][8] == 10
    assert snap["powder"]["nPeaks"] == 80 and snap["powder"]["png"].startswith("data:image/png;base64,")
    assert snap["photonEnergy"] == 9500.0
    json.loads(to_json(snap))
    # old bins leave the window
    st.add_peaks(_update("a:1:output", 99, 0), now=t0 + 100)
    assert len(st.snapshot(now=t0 + 100)["consumers"][0]["series"]) == 1


def test_latest_hit_peaks_in_view_coordinates_with_geometry() -> None:
    geom = DetectorGeometry.stacked(2, (64, 64), clen_m=0.1)
    st = MonitorState(MonitorConfig(min_peaks=1), geometry=geom)
    px = np.zeros((2, 64, 64), np.float32)
    px[1, 10, 20] = 1000
    hit = HitImage(channel="c", unique_id=7, pixels=px, panel=np.array([1]), y=np.array([10.0]), x=np.array([20.0]),
                   intensity=np.array([1000.0]), photon_energy_ev=float("nan"))
    st.set_hit(hit)
    snap = st.snapshot()
    h = snap["latestHit"]
    assert h["nPeaks"] == 1 and h["uniqueId"] == 7 and len(h["peaks"]) == 1
    col, row = h["peaks"][0]
    # the brightest pixel of the assembled picture is where the peak circle goes
    img = st.view.assembler(px)
    r, c = np.unravel_index(int(np.argmax(img)), img.shape)
    assert abs(col - (c + 0.5)) <= 1 and abs(row - (r + 0.5)) <= 1
    assert json.loads(to_json(snap))["latestHit"]["photonEnergy"] is None  # NaN is not JSON
    assert "png" not in st.snapshot(hit_version=h["version"])["latestHit"]  # sent once per version


def test_resolution_and_channel_expansion() -> None:
    d = resolution_a(np.array([1000.0]), clen_m=0.1, res=1 / 75e-6, photon_energy_ev=12398.419843320026)
    theta = 0.5 * np.arctan(1000 * 75e-6 / 0.1)
    assert d[0] == pytest.approx(1.0 / (2 * np.sin(theta)))
    assert expand_channels("p:*:output", 3) == ["p:1:output", "p:2:output", "p:3:output"]
    assert expand_channels("x:a, y:b", 5) == ["x:a", "y:b"]
    assert expand_channels("", 2) == []
