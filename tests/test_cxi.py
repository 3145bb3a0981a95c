"""CXI writer/reader: the DESIGN 2.4 layout field by field, chunking, naming, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from peaknet_pva.cxi import EV_TO_J, CxiWriter, read_cxi, summarize_cxi
from peaknet_pva.errors import ConfigError, FrameError, PeakNetPvaError
from peaknet_pva.frames import PeakTable
from peaknet_pva.geometry import DetectorGeometry, panel_to_slab, read_geometry, write_geometry

P, H, W = 2, 8, 16


def make_peaks(rng: np.random.Generator, n: int, *, n_panels: int = P, centroid: str = "mask") -> PeakTable:
    return PeakTable(
        panel=rng.integers(0, n_panels, n),
        y=rng.uniform(0, H - 1, n),
        x=rng.uniform(0, W - 1, n),
        intensity=rng.uniform(1, 1000, n),
        npix=rng.integers(1, 30, n),
        centroid=centroid,
    )


def write_frames(writer: CxiWriter, n: int, *, seed: int = 0, start_id: int = 0) -> list[Path | None]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        frame = rng.random((P, H, W), dtype=np.float32)
        out.append(
            writer.add(frame, make_peaks(rng, int(rng.integers(0, 6))), photon_energy_ev=9000.0 + i,
                       unique_id=start_id + i, timestamp_ns=1_700_000_000_000_000_000 + start_id + i)
        )
    return out


def cxi_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".cxi"))


# -- layout ---------------------------------------------------------------------------------------


def test_layout_field_by_field(tmp_path: Path) -> None:
    max_peaks = 32
    frames = np.arange(3 * P * H * W, dtype=np.float64).reshape(3, P, H, W)
    tables = [
        PeakTable(  # edge cases: y = H-1+0.49 stays, y = H clamps, x < -0.5 clamps
            panel=[0, 1, 1, 0],
            y=[1.25, H - 1 + 0.49, H, 3.0],
            x=[2.5, 0.0, 4.0, -0.9],
            intensity=[10.0, 20.0, 30.0, 40.0],
            npix=[3, 4, 5, 6],
            centroid="intensity",
        ),
        PeakTable.empty(),
        PeakTable(panel=[1], y=[0.0], x=[W - 1.0], intensity=[5.5], npix=[1], n_overflow=3,
                  centroid="intensity"),
    ]
    energies = [9500.0, 9501.5, 12000.0]
    uids = [7, 2**63 + 5, 2**64 - 1]
    stamps = [0, 1_700_000_000_123_456_789, 2**64 - 2]
    with CxiWriter(tmp_path, frames_per_file=10, max_peaks=max_peaks) as w:
        for f, t, e, u, s in zip(frames, tables, energies, uids, stamps):
            assert w.add(f, t, photon_energy_ev=e, unique_id=u, timestamp_ns=s) is None
    (path,) = w.files
    assert path.name == "peaknet-c1-00000.cxi"

    with h5py.File(path, "r") as f:
        data = f["/entry_1/data_1/data"]
        assert data.shape == (3, P * H, W) and data.dtype == np.float32
        assert data.chunks == (1, P * H, W)
        assert data.compression is None
        np.testing.assert_array_equal(data[()], frames.reshape(3, P * H, W).astype(np.float32))
        assert tuple(data.attrs["panel_shape"]) == (H, W)

        r = f["/entry_1/result_1"]
        assert r["nPeaks"].dtype == np.int32 and r["nPeaks"].shape == (3,)
        np.testing.assert_array_equal(r["nPeaks"][()], [4, 0, 1])
        for name in ("peakXPosRaw", "peakYPosRaw", "peakTotalIntensity", "peakNPixels",
                     "peakSegPosRaw", "peakYPosPanel", "peakXPosPanel"):
            assert r[name].dtype == np.float32, name
            assert r[name].shape == (3, max_peaks), name
            arr = r[name][()]
            assert not arr[0, 4:].any() and not arr[1].any() and not arr[2, 1:].any(), f"{name} not zero-padded"
        ss = r["peakYPosRaw"][0, :4]
        fs = r["peakXPosRaw"][0, :4]
        hi = np.nextafter(np.float32(2 * H - 0.5), np.float32(-np.inf))
        np.testing.assert_array_equal(ss, np.array([1.25, H + H - 1 + 0.49, hi, 3.0], np.float32))
        np.testing.assert_array_equal(fs, np.array([2.5, 0.0, 4.0, -0.5], np.float32))
        np.testing.assert_array_equal(r["peakSegPosRaw"][0, :4], [0, 1, 1, 0])
        np.testing.assert_array_equal(r["peakYPosPanel"][0, :4], np.float32([1.25, H - 1 + 0.49, H, 3.0]))
        np.testing.assert_array_equal(r["peakXPosPanel"][0, :4], np.float32([2.5, 0.0, 4.0, -0.9]))
        np.testing.assert_array_equal(r["peakTotalIntensity"][0, :4], [10, 20, 30, 40])
        np.testing.assert_array_equal(r["peakNPixels"][0, :4], [3, 4, 5, 6])
        np.testing.assert_array_equal(r["peakYPosRaw"][2, :1], [H + 0.0])
        np.testing.assert_array_equal(r["peakXPosRaw"][2, :1], [W - 1.0])
        np.testing.assert_array_equal(r["nPeaksOverflow"][()], [0, 0, 3])
        assert r.attrs["centroid"] == "intensity"
        assert tuple(r.attrs["panel_shape"]) == (H, W) and r.attrs["n_panels"] == P
        np.testing.assert_array_equal(r.attrs["panel_min_ss"], [0, H])
        assert r.attrs["max_peaks"] == max_peaks

        e = f["/LCLS/photon_energy_eV"]
        assert e.dtype == np.float64 and e.shape == (3,)
        np.testing.assert_array_equal(e[()], energies)
        j = f["/entry_1/instrument_1/source_1/energy"]
        assert j.dtype == np.float64 and j.shape == (3,)
        np.testing.assert_allclose(j[()], np.array(energies) * 1.602176634e-19, rtol=1e-15)
        assert j[0] == pytest.approx(1.5220677e-15, rel=1e-6)  # 9.5 keV in J

        u = f["/entry_1/pva/uniqueId"]
        t = f["/entry_1/pva/timestamp_ns"]
        assert u.dtype == np.uint64 and t.dtype == np.uint64 and u.shape == t.shape == (3,)
        assert [int(v) for v in u[()]] == uids
        assert [int(v) for v in t[()]] == stamps
        ids = [s.decode() if isinstance(s, bytes) else s for s in f["/entry_1/experiment_identifier"][()]]
        assert ids == [f"uniqueId={v}" for v in uids]
        assert int(f["/cxi_version"][()]) == 150

    c = read_cxi(path)
    assert c.n_frames == 3 and c.panel_shape == (H, W) and c.centroid == "intensity"
    np.testing.assert_array_equal(c.data, frames.reshape(3, P * H, W).astype(np.float32))
    for got, want in zip(c.peaks, tables):
        np.testing.assert_array_equal(got.panel, want.panel)
        np.testing.assert_array_equal(got.y, want.y)
        np.testing.assert_array_equal(got.x, want.x)
        np.testing.assert_array_equal(got.intensity, want.intensity)
        np.testing.assert_array_equal(got.npix, want.npix)
        assert got.n_overflow == want.n_overflow
    np.testing.assert_array_equal(c.photon_energy_ev, energies)
    np.testing.assert_allclose(c.photon_energy_j, np.array(energies) * EV_TO_J)
    assert [int(v) for v in c.unique_id] == uids and [int(v) for v in c.timestamp_ns] == stamps
    assert c.frame(0).shape == (P, H, W)
    np.testing.assert_array_equal(c.frame(2), frames[2].astype(np.float32))


def test_integer_dtype_and_gzip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 60000, (P, H, W)).astype(np.uint16)
    with CxiWriter(tmp_path, compression="gzip", max_peaks=8) as w:
        w.add(frame, make_peaks(rng, 3), photon_energy_ev=8000, unique_id=1, timestamp_ns=2)
    with h5py.File(w.files[0], "r") as f:
        d = f["/entry_1/data_1/data"]
        assert d.dtype == np.uint16 and d.compression == "gzip" and d.chunks == (1, P * H, W)
        np.testing.assert_array_equal(d[0], frame.reshape(P * H, W))
    with pytest.raises(ConfigError, match="compression"):
        CxiWriter(tmp_path, compression="bitshuffle")


def test_slab_coordinates_match_geometry_and_crystfel_rule(tmp_path: Path) -> None:
    """Read the written .geom like indexamajig: every stored peak lands on its peakSegPosRaw panel."""
    geom = DetectorGeometry.stacked(P, (H, W), photon_energy_ev=None)
    write_geometry(tmp_path / "det.geom", geom)
    g = read_geometry(tmp_path / "det.geom")
    rng = np.random.default_rng(5)
    with CxiWriter(tmp_path, geometry=g, max_peaks=64) as w:
        for i in range(5):
            t = PeakTable(panel=rng.integers(0, P, 40), y=rng.uniform(-1.5, H + 1, 40),
                          x=rng.uniform(-1.5, W + 1, 40), intensity=np.ones(40), npix=np.ones(40))
            w.add(rng.random((P, H, W)), t, photon_energy_ev=9000, unique_id=i, timestamp_ns=i)
    with h5py.File(w.files[0], "r") as f:
        r = f[g.peak_list]
        n = r["nPeaks"][()]
        for i in range(len(n)):
            ss = r["peakYPosRaw"][i, : n[i]].astype(np.float64) + 0.5
            fs = r["peakXPosRaw"][i, : n[i]].astype(np.float64) + 0.5
            seg = r["peakSegPosRaw"][i, : n[i]].astype(int)
            for s, x, p in zip(ss.astype(np.float32), fs.astype(np.float32), seg):
                owners = [k for k, pn in enumerate(g.panels)
                          if pn.min_ss <= s < pn.max_ss + 1 and pn.min_fs <= x < pn.max_fs + 1]
                assert owners == [p]
        assert f[g.data].shape[1:] == g.slab_shape
        assert f[g.photon_energy].shape == (5,)


def test_writer_rejects_geometry_that_does_not_match(tmp_path: Path) -> None:
    w = CxiWriter(tmp_path, geometry=DetectorGeometry.stacked(3, (H, W)))
    with pytest.raises(FrameError, match="does not match the geometry"):
        w.add(np.zeros((P, H, W), np.float32), PeakTable.empty(), photon_energy_ev=1, unique_id=0, timestamp_ns=0)
    assert w.n_frames_buffered == 0
    w.close()
    assert cxi_files(tmp_path) == []


def test_bad_frames_raise_and_change_nothing(tmp_path: Path) -> None:
    w = CxiWriter(tmp_path, frames_per_file=4)
    good = np.zeros((P, H, W), np.float32)
    kw = dict(photon_energy_ev=9000.0, unique_id=1, timestamp_ns=1)
    w.add(good, PeakTable.empty(), **kw)
    bad_calls = [
        (np.zeros((1, P, H, W)), PeakTable.empty(), kw),
        (np.zeros((P, 0, W)), PeakTable.empty(), kw),
        (np.zeros((P, H, W), np.complex64), PeakTable.empty(), kw),
        (good, PeakTable(panel=[P], y=[0], x=[0], intensity=[1], npix=[1]), kw),
        (good, PeakTable(panel=[0], y=[np.nan], x=[0], intensity=[1], npix=[1]), kw),
        (good, PeakTable.empty(), dict(kw, photon_energy_ev=0.0)),
        (good, PeakTable.empty(), dict(kw, photon_energy_ev=float("nan"))),
        (good, PeakTable.empty(), dict(kw, photon_energy_ev=None)),
        (good, PeakTable.empty(), dict(kw, unique_id=-1)),
        (good, PeakTable.empty(), dict(kw, timestamp_ns=2**64)),
        (good, [[0, 1.0, 2.0]], kw),
    ]
    for frame, peaks, kwargs in bad_calls:
        with pytest.raises(FrameError):
            w.add(frame, peaks, **kwargs)
    assert w.n_frames_buffered == 1
    w.close()
    c = read_cxi(w.files[0])
    assert c.n_frames == 1
    with pytest.raises(PeakNetPvaError, match="closed"):
        w.add(good, PeakTable.empty(), **kw)
    w.close()  # twice is fine
    assert w.flush() is None


def test_writer_config_errors(tmp_path: Path) -> None:
    for kwargs in (dict(frames_per_file=0), dict(max_peaks=0), dict(consumer_id=-1),
                   dict(file_prefix=""), dict(file_prefix="a/b"), dict(compression_level=12)):
        with pytest.raises(ConfigError):
            CxiWriter(tmp_path, **kwargs)


def test_max_peaks_truncation_is_counted(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    t = make_peaks(rng, 10)
    t.n_overflow = 2
    with CxiWriter(tmp_path, max_peaks=4) as w:
        w.add(np.zeros((P, H, W), np.float32), t, photon_energy_ev=1e4, unique_id=0, timestamp_ns=0)
    assert w.n_peaks_truncated == 6
    assert w.stats()["n_peaks_truncated"] == 6
    c = read_cxi(w.files[0])
    assert c.n_peaks[0] == 4 and c.max_peaks == 4
    np.testing.assert_array_equal(c.peaks[0].panel, t.panel[:4])
    np.testing.assert_allclose(c.peaks[0].y, t.y[:4])
    assert c.peaks[0].n_overflow == 2 + 6


# -- chunking and naming ------------------------------------------------------------------------


def test_chunking_250_frames(tmp_path: Path) -> None:
    w = CxiWriter(tmp_path, frames_per_file=100, max_peaks=16)
    returned = write_frames(w, 250)
    closed = [p for p in returned if p is not None]
    assert [i for i, p in enumerate(returned) if p is not None] == [99, 199]
    assert w.n_files_written == 2 and w.n_frames_written == 200 and w.n_frames_buffered == 50
    last = w.flush()
    assert last is not None and last.name == "peaknet-c1-00002.cxi"
    w.close()
    assert [p.name for p in closed] == ["peaknet-c1-00000.cxi", "peaknet-c1-00001.cxi"]
    assert cxi_files(tmp_path) == [f"peaknet-c1-{i:05d}.cxi" for i in range(3)]
    assert not list(tmp_path.glob("*.inprogress"))
    sizes = [read_cxi(p, load_data=False).n_frames for p in w.files]
    assert sizes == [100, 100, 50]
    # counters agree with the disk
    assert w.n_files_written == len(w.files) == len(cxi_files(tmp_path))
    assert w.n_frames_written == sum(sizes) == 250
    ids = np.concatenate([read_cxi(p, load_data=False).unique_id for p in w.files])
    np.testing.assert_array_equal(ids, np.arange(250))


def test_shape_change_closes_chunk(tmp_path: Path) -> None:
    kw = dict(photon_energy_ev=9000.0, timestamp_ns=0)
    with CxiWriter(tmp_path, frames_per_file=10) as w:
        assert w.add(np.zeros((P, H, W), np.float32), PeakTable.empty(), unique_id=0, **kw) is None
        assert w.add(np.zeros((P, H, W), np.float32), PeakTable.empty(), unique_id=1, **kw) is None
        closed = w.add(np.zeros((1, H, W), np.float32), PeakTable.empty(), unique_id=2, **kw)
        assert closed is not None and closed.name == "peaknet-c1-00000.cxi"
        # dtype change (float -> integer) also starts a new file
        closed = w.add(np.zeros((1, H, W), np.int32), PeakTable.empty(), unique_id=3, **kw)
        assert closed is not None and closed.name == "peaknet-c1-00001.cxi"
        # 2-D frames are one panel
        assert w.add(np.zeros((H, W), np.int32), PeakTable.empty(), unique_id=4, **kw) is None
    shapes = [read_cxi(p, load_data=False).data_shape for p in w.files]
    assert shapes == [(2, P * H, W), (1, H, W), (2, H, W)]
    assert read_cxi(w.files[2], load_data=False).data_dtype == np.int32


def test_never_overwrite_and_numbering_continues(tmp_path: Path) -> None:
    with CxiWriter(tmp_path, frames_per_file=2) as w1:
        write_frames(w1, 5)  # 00000, 00001, 00002 (1 frame)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.suffix == ".cxi"}  # the .lst is meant to change
    with CxiWriter(tmp_path, frames_per_file=2) as w2:
        assert w2.next_chunk == 3
        write_frames(w2, 2, start_id=100)
    assert [p.name for p in w2.files] == ["peaknet-c1-00003.cxi"]
    for name, mtime in before.items():
        assert (tmp_path / name).stat().st_mtime_ns == mtime
    assert read_cxi(tmp_path / "peaknet-c1-00002.cxi").n_frames == 1

    # a stale .inprogress (crash) also counts and is left alone
    stale = tmp_path / "peaknet-c1-00007.cxi.inprogress"
    stale.write_bytes(b"partial")
    with CxiWriter(tmp_path, frames_per_file=2) as w3:
        write_frames(w3, 1)
    assert [p.name for p in w3.files] == ["peaknet-c1-00008.cxi"]
    assert stale.read_bytes() == b"partial"

    # other consumers and prefixes number independently
    with CxiWriter(tmp_path, consumer_id=2, frames_per_file=2) as w4:
        write_frames(w4, 1)
    with CxiWriter(tmp_path, file_prefix="run12", frames_per_file=2) as w5:
        write_frames(w5, 1)
    assert w4.files[0].name == "peaknet-c2-00000.cxi"
    assert w5.files[0].name == "run12-c1-00000.cxi"


def test_file_appearing_under_the_name_is_not_overwritten(tmp_path: Path) -> None:
    w = CxiWriter(tmp_path, frames_per_file=1)
    squatter = tmp_path / "peaknet-c1-00000.cxi"
    squatter.write_bytes(b"someone else's file")
    write_frames(w, 1)
    w.close()
    assert squatter.read_bytes() == b"someone else's file"
    assert [p.name for p in w.files] == ["peaknet-c1-00001.cxi"]


def test_rename_never_replaces_a_file_that_appears_during_the_write(tmp_path: Path) -> None:
    w = CxiWriter(tmp_path, frames_per_file=1)
    real_write = w._write_file

    def write_and_squat(fh: h5py.File, n: int, chunk: int) -> None:
        real_write(fh, n, chunk)
        (tmp_path / f"peaknet-c1-{chunk:05d}.cxi").write_bytes(b"late squatter")

    w._write_file = write_and_squat  # type: ignore[method-assign]
    write_frames(w, 1)
    w.close()
    assert (tmp_path / "peaknet-c1-00000.cxi").read_bytes() == b"late squatter"
    assert [p.name for p in w.files] == ["peaknet-c1-00001.cxi"]
    assert read_cxi(w.files[0]).n_frames == 1
    assert not list(tmp_path.glob("*.inprogress"))


def test_no_inprogress_left_and_context_manager_flushes_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with CxiWriter(tmp_path, frames_per_file=100) as w:
            write_frames(w, 3)
            raise RuntimeError("boom")
    assert w.closed and w.n_frames_written == 3
    assert cxi_files(tmp_path) == ["peaknet-c1-00000.cxi"]
    assert not list(tmp_path.glob("*.inprogress"))


def test_failed_write_is_counted_and_cleaned_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = CxiWriter(tmp_path, frames_per_file=10)
    write_frames(w, 3)

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w, "_write_file", fail)
    with pytest.raises(OSError):
        w.flush()
    assert w.n_frames_lost == 3 and w.n_frames_written == 0 and w.n_frames_buffered == 0
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    write_frames(w, 2)
    w.close()
    assert w.n_frames_written == 2 and len(w.files) == 1


# -- reading / summary --------------------------------------------------------------------------


def test_read_lazily_and_summarize(tmp_path: Path) -> None:
    with CxiWriter(tmp_path, frames_per_file=4, max_peaks=16) as w:
        rng = np.random.default_rng(2)
        for i, n in enumerate([0, 12, 3, 15, 10, 1]):
            w.add(rng.random((P, H, W)), make_peaks(rng, n), photon_energy_ev=9000.0 + 10 * i,
                  unique_id=50 + i, timestamp_ns=1000 + i)
    c = read_cxi(w.files[0], load_data=False)
    assert c.data is None and c.data_shape == (4, P * H, W)
    assert c.read_frames(1).shape == (P * H, W)
    assert c.read_frames(slice(0, 2)).shape == (2, P * H, W)
    assert c.frame(3).shape == (P, H, W)
    s = summarize_cxi([tmp_path], min_peaks=10)
    assert s["n_files"] == 2 and s["n_frames"] == 6
    assert s["n_peaks_total"] == 41
    assert s["peaks_per_frame_mean"] == pytest.approx(41 / 6)
    assert s["peaks_per_frame_median"] == pytest.approx(6.5)
    assert s["n_hits"] == 3 and s["hit_rate"] == pytest.approx(0.5)
    assert s["photon_energy_ev_range"] == [9000.0, 9050.0]
    assert s["unique_id_range"] == [50, 55]
    assert s["timestamp_ns_range"] == [1000, 1005]
    assert s["frame_shapes"] == [[P * H, W]] and s["dtypes"] == ["float32"]
    assert all(type(v) in (int, float, list, str) for v in s.values())
    empty = summarize_cxi([])
    assert empty["n_frames"] == 0 and empty["photon_energy_ev_range"] is None


def test_read_foreign_cheetah_style_file(tmp_path: Path) -> None:
    """A minimal Cheetah-like file: slab peaks only, panel from the geometry."""
    g = DetectorGeometry.stacked(P, (H, W))
    path = tmp_path / "cheetah.cxi"
    with h5py.File(path, "w") as f:
        f["entry_1/data_1/data"] = np.zeros((1, P * H, W), np.float32)
        f["entry_1/result_1/nPeaks"] = np.array([2], np.int32)
        x = np.zeros((1, 8), np.float32)
        y = np.zeros((1, 8), np.float32)
        x[0, :2] = [3.0, 4.0]
        y[0, :2] = [2.0, H + 5.0]
        f["entry_1/result_1/peakXPosRaw"] = x
        f["entry_1/result_1/peakYPosRaw"] = y
        f["LCLS/photon_energy_eV"] = np.array([9000.0])
    c = read_cxi(path, geometry=g)
    np.testing.assert_array_equal(c.peaks[0].panel, [0, 1])
    np.testing.assert_array_equal(c.peaks[0].y, [2.0, 5.0])
    assert c.unique_id is None and c.photon_energy_ev[0] == 9000.0
    with pytest.raises(PeakNetPvaError):
        read_cxi(tmp_path / "nope.cxi")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(PeakNetPvaError, match="not a CXI file"):
        read_cxi(tmp_path / "other.h5")


# -- crash safety -------------------------------------------------------------------------------


CRASH_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from peaknet_pva.cxi import CxiWriter
    from peaknet_pva.frames import PeakTable

    rng = np.random.default_rng(0)
    w = CxiWriter(sys.argv[1], frames_per_file=4, max_peaks=16)
    for i in range(40000):  # bounded in case the kill never comes
        k = int(rng.integers(0, 12))
        t = PeakTable(panel=rng.integers(0, 2, k), y=rng.uniform(-1, 9, k), x=rng.uniform(-1, 17, k),
                      intensity=rng.uniform(1, 100, k), npix=rng.integers(1, 9, k))
        w.add(rng.random((2, 8, 16), dtype=np.float32), t, photon_energy_ev=9000.0 + i,
              unique_id=i, timestamp_ns=10**18 + i)
    """
)


def test_sigkill_mid_run_leaves_every_cxi_valid(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 25.0
        while len(cxi_files(out)) < 6:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "writer subprocess produced no files"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    names = cxi_files(out)
    leftovers = sorted(p.name for p in out.iterdir() if p.name.endswith(".inprogress"))
    assert len(leftovers) <= 1
    numbers = [int(n.split("-")[-1].split(".")[0]) for n in names]
    assert numbers == list(range(len(numbers)))  # closed files are consecutive from 0
    for chunk, name in zip(numbers, names):
        c = read_cxi(out / name)
        assert c.n_frames == 4 and c.data.shape == (4, 16, 16)
        np.testing.assert_array_equal(c.unique_id, np.arange(4 * chunk, 4 * chunk + 4))
        with h5py.File(out / name, "r") as f:
            r = f["entry_1/result_1"]
            n = r["nPeaks"][()]
            assert np.all((n >= 0) & (n <= 16))
            for key in ("peakXPosRaw", "peakYPosRaw", "peakTotalIntensity", "peakNPixels", "peakSegPosRaw"):
                arr = r[key][()]
                assert arr.shape == (4, 16)
                for i in range(4):
                    assert not arr[i, n[i]:].any()
            assert np.all(r["peakTotalIntensity"][()][np.arange(16)[None] < n[:, None]] > 0)

    # a new writer after the crash never reuses a number (stale .inprogress included)
    highest = max(numbers + [int(n.split("-")[-1].split(".")[0]) for n in leftovers])
    with CxiWriter(out, frames_per_file=4) as w:
        write_frames(w, 1)
    assert w.files[0].name == f"peaknet-c1-{highest + 1:05d}.cxi"


def test_panel_to_slab_is_what_the_writer_stores(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    t = make_peaks(rng, 20)
    with CxiWriter(tmp_path) as w:
        w.add(np.zeros((P, H, W), np.float32), t, photon_energy_ev=9000, unique_id=0, timestamp_ns=0)
    ss, fs = panel_to_slab(t.panel, t.y, t.x, DetectorGeometry.stacked(P, (H, W)))
    with h5py.File(w.files[0], "r") as f:
        np.testing.assert_array_equal(f["entry_1/result_1/peakYPosRaw"][0, :20], ss)
        np.testing.assert_array_equal(f["entry_1/result_1/peakXPosRaw"][0, :20], fs)
