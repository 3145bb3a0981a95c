"""The two pvapy processors driven in-process (no pvapy-hpc-consumer, no network): argument
parsing, the receive-thread → engine → publish path, drain on stop, configure, stats, CXI writing.
The same classes run inside real consumers in test_pva_stream.py."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from pva_helpers import FakePublisher, planted_frames, wait_until  # noqa: I001

from peaknet_pva.errors import ConfigError  # noqa: E402
from peaknet_pva.frames import PanelLayout, PeakTable  # noqa: E402
from peaknet_pva.pva import codec  # noqa: E402
from peaknet_pva.pva.cxi_processor import CxiFileProcessor, CxiProcessorParams  # noqa: E402
from peaknet_pva.pva.peaknet_processor import (  # noqa: E402
    IdGapCounter,
    PeakNetImageProcessor,
    PeakNetProcessorParams,
)
from peaknet_pva.pva.replay import bad_frame  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PVAPY_KEYS = {  # what pvapy adds to every configDict
    "processorId": 1, "inputChannel": "x", "inputMode": "pva", "inputArgs": None, "outputChannel": "y",
    "outputMode": "pvas", "outputArgs": None, "objectIdField": "uniqueId", "skipInitialUpdates": 1,
    "objectIdOffset": 1, "nSequentialUpdates": 1, "fieldRequest": "",
}
SMALL = {"model": "peaknet-atto-s", "weights": "random", "device": "cpu", "panel_shape": [64, 64],
         "min_peaks": 0, "forward_images": "all", "photon_energy_ev": 9000.0}


# -- parameters -------------------------------------------------------------------------------


def test_params_defaults_and_pvapy_keys_ignored() -> None:
    p = PeakNetProcessorParams.from_config(dict(PVAPY_KEYS))
    assert (p.batch_size, p.batch_timeout_ms, p.num_buffers, p.min_peaks, p.max_peaks) == (8, 50.0, 3, 10, 2048)
    assert (p.forward_images, p.photon_energy_attribute, p.device, p.weights) == ("hits", "PhotonEnergy", "auto", "default")
    assert p.panel_shape is None and p.photon_energy_ev is None


@pytest.mark.parametrize(
    "key,value",
    [("min_peaks", -1), ("batch_size", 0), ("forward_images", "some"), ("centroid", "middle"),
     ("panel_shape", [64]), ("batch_timeout_ms", "soon"), ("compile", "maybe"), ("ring_size", 0),
     ("photon_energy_ev", -5), ("backend", "magic"), ("dtype", "int4"), ("max_peaks", 1.5),
     ("split", "sometimes"), ("split", 2), ("norm", "median"), ("isolated_ratio", 1.5)],
)
def test_params_invalid_value_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        PeakNetProcessorParams.from_config({key: value})


def test_params_unknown_key_rejected() -> None:
    with pytest.raises(ConfigError, match="min_peak\\b"):
        PeakNetProcessorParams.from_config({"min_peak": 3})


def test_params_runtime_changes() -> None:
    p = PeakNetProcessorParams.from_config({"min_peaks": 5})
    q = p.with_changes({"min_peaks": "7", "forward_images": "none", "centroid": "intensity", "batch_timeout_ms": 5})
    assert (q.min_peaks, q.forward_images, q.centroid, q.batch_timeout_ms) == (7, "none", "intensity", 5.0)
    assert p.centroid == "auto" and p.with_changes({"centroid": "signal"}).centroid == "signal"
    assert PeakNetProcessorParams.from_config({"split": "false"}).split is False
    assert p.min_peaks == 5  # frozen, replaced
    with pytest.raises(ConfigError, match="batch_size"):
        p.with_changes({"batch_size": 4})
    with pytest.raises(ConfigError, match="min_peaks"):
        p.with_changes({"min_peaks": -3})


@pytest.mark.parametrize("change", [{"min_peaks": 2**32}, {"min_peaks": 2**31}, {"batch_timeout_ms": 1e16},
                                    {"batch_timeout_ms": float("inf")}])
def test_runtime_changes_are_bounded_to_what_stats_and_timeouts_hold(change) -> None:
    """A control put that would overflow a UINT status field or a threading timeout is a refused
    put (ConfigError, old value kept), not a dead consumer."""
    p = PeakNetProcessorParams.from_config({})
    with pytest.raises(ConfigError, match=next(iter(change))):
        p.with_changes(change)
    import dataclasses

    from peaknet_pva.pva.cxi_processor import CxiProcessorParams

    if "min_peaks" in change:  # the writer's configure() validates the same way (dataclasses.replace)
        with pytest.raises(ConfigError, match="min_peaks"):
            dataclasses.replace(CxiProcessorParams.from_config({"output_dir": "/tmp"}), **change)


# The shipped example argument files are checked in tests/test_examples.py.


def test_writer_params() -> None:
    with pytest.raises(ConfigError, match="output_dir"):
        CxiProcessorParams.from_config({})
    with pytest.raises(ConfigError, match="frames_per_file"):
        CxiProcessorParams.from_config({"output_dir": "x", "frames_per_file": 0})
    with pytest.raises(ConfigError, match="unknown"):
        CxiProcessorParams.from_config({"output_dir": "x", "frame_per_file": 3})


# -- uniqueId gaps ----------------------------------------------------------------------------


def test_id_gaps_single_consumer() -> None:
    c = IdGapCounter(1, 1)
    for uid in (1, 2, 3, 6, 7, 10):
        c.update(uid)
    assert c.missed == 4


def test_id_gaps_distributor_pattern() -> None:
    # 2 consumers x 4 updates: consumer 1 sees 1-4, 9-12, 17-20; pvapy passes offset (2-1)*4+1 = 5.
    c = IdGapCounter(4, 5)
    for uid in (1, 2, 3, 4, 9, 10, 11, 12, 17, 18, 19, 20):
        c.update(uid)
    assert c.missed == 0
    for uid in (26, 27, 28, 41):  # lost 25; then 33-36 and 41's predecessors? 33..36 + nothing in 37..40
        c.update(uid)
    assert c.missed == 1 + 4
    c.reset()
    assert c.missed == 0


# -- the PeakNet processor in-process ---------------------------------------------------------


def _make(args: dict) -> tuple[PeakNetImageProcessor, FakePublisher]:
    config = dict(PVAPY_KEYS)
    config.update(args)
    proc = PeakNetImageProcessor(config)
    pub = FakePublisher()
    proc.outputChannel = "test:output"
    proc.dataPublisher = pub
    assert proc  # pvapy's `if not o` must not reject it
    return proc, pub


def _encode(frames: np.ndarray, first_id: int = 1, energy: float | None = 9500.0) -> list:
    attrs = {} if energy is None else {"PhotonEnergy": energy}
    return [codec.encode_ntndarray(f, unique_id=first_id + i, attributes=attrs) for i, f in enumerate(frames)]


def test_processor_publishes_every_good_frame_in_order() -> None:
    frames = planted_frames(20, seed=3)
    proc, pub = _make(dict(SMALL, batch_size=4, batch_timeout_ms=20))
    expected = proc.finder.find(frames)  # same model; before the engine thread owns the pipeline
    proc.start()
    objs = _encode(frames)
    bad = [codec.encode_ntndarray(bad_frame(k, frames[0]), unique_id=100 + i) for i, k in enumerate(["1d", "nan", "rows", "int64"])]
    for i, obj in enumerate(objs):
        proc.process(obj)
        if i % 5 == 0:
            proc.process(bad[i // 5])
    wait_until(lambda: len(pub.objects) == 20, 60, what="20 outputs")
    stats = proc.getStats()
    proc.stop()
    decoded = [codec.decode_output(o) for o in pub.objects]
    assert [m.unique_id for _, m in decoded] == list(range(1, 21))
    for (peaks, meta), exp, frame in zip(decoded, expected, frames):
        assert meta.n_peaks == peaks.n == exp.n
        np.testing.assert_allclose(peaks.y, exp.y, atol=1e-4)
        np.testing.assert_allclose(peaks.x, exp.x, atol=1e-4)
        np.testing.assert_array_equal(peaks.panel, exp.panel)
        assert meta.photon_energy_ev == 9500.0 and meta.panel_shape == (64, 64)
        np.testing.assert_array_equal(meta.image, frame)
    assert stats["nFramesIn"] == 24 and stats["nBadFrames"] == 4 and stats["nProcessed"] == 20
    assert stats["nDropped"] == 0 and stats["nHits"] == 20 and stats["nPeaks"] == sum(e.n for e in expected)
    assert stats["nBatches"] >= 5 and stats["hitRate"] == 1.0 and stats["device"] == "cpu"
    types = proc.getStatsPvaTypes()
    assert set(stats) == set(types)
    for key, value in stats.items():  # plain Python only: numpy scalars break the status channel
        assert type(value) in (int, float, str), (key, type(value))


def test_stop_drains_queued_frames() -> None:
    # A batch timeout of a minute and a big batch: nothing runs until stop() drains.
    proc, pub = _make(dict(SMALL, batch_size=64, batch_timeout_ms=60_000, ring_size=64))
    proc.start()
    for obj in _encode(planted_frames(13, seed=4)):
        proc.process(obj)
    assert pub.objects == []
    proc.stop()
    assert [codec.decode_output(o)[1].unique_id for o in pub.objects] == list(range(1, 14))
    assert proc.finder is None  # released


def test_ring_full_drops_and_counts() -> None:
    proc, pub = _make(dict(SMALL, ring_size=3))
    for obj in _encode(planted_frames(5, seed=5)):  # engine not started: the ring fills up
        proc.process(obj)
    assert proc.getStats()["nDropped"] == 2
    proc.start()
    proc.stop()
    assert [codec.decode_output(o)[1].unique_id for o in pub.objects] == [1, 2, 3]


def test_configure_changes_hit_threshold_and_keeps_old_on_error() -> None:
    proc, pub = _make(dict(SMALL, min_peaks=100_000, forward_images="hits_empty", batch_size=2, batch_timeout_ms=5))
    proc.start()
    frames = planted_frames(4, seed=6)
    for obj in _encode(frames[:2]):
        proc.process(obj)
    wait_until(lambda: len(pub.objects) == 2, 30, what="2 outputs")
    proc.configure({"min_peaks": -4})  # invalid: logged, ignored
    proc.configure({"batch_size": 1})  # not changeable at run time: logged, ignored
    proc.configure("not json")
    assert proc.params.min_peaks == 100_000 and proc.params.batch_size == 2
    proc.configure({"min_peaks": 0, "skipInitialUpdates": 0})  # pvapy's own key is ignored
    assert proc.params.min_peaks == 0
    for obj in _encode(frames[2:], first_id=3):
        proc.process(obj)
    proc.stop()
    metas = [codec.decode_output(o)[1] for o in pub.objects]
    assert [m.image is not None for m in metas] == [False, False, True, True]
    assert codec.same_structure(pub.objects[0], pub.objects[3])
    assert proc.getStats()["minPeaks"] == 0


def test_photon_energy_fallback_and_nan() -> None:
    proc, pub = _make(dict(SMALL, photon_energy_ev=7777.0))
    proc.start()
    proc.process(_encode(planted_frames(1))[0])
    proc.process(_encode(planted_frames(1), first_id=2, energy=None)[0])
    proc.stop()
    energies = [codec.decode_output(o)[1].photon_energy_ev for o in pub.objects]
    assert energies == [9500.0, 7777.0]


def test_variable_shapes_and_dtypes_without_panel_shape() -> None:
    proc, pub = _make(dict(SMALL, panel_shape=None, batch_size=4, batch_timeout_ms=10))
    proc.start()
    a = planted_frames(3, n_panels=1, seed=7)[:, 0]
    b = planted_frames(3, n_panels=1, shape=(32, 96), seed=8, dtype="uint16")[:, 0]
    for i, frame in enumerate([a[0], b[0], a[1], a[2], b[1], b[2]]):
        proc.process(codec.encode_ntndarray(frame, unique_id=i + 1))
    proc.stop()
    metas = [codec.decode_output(o)[1] for o in pub.objects]
    assert [m.unique_id for m in metas] == [1, 2, 3, 4, 5, 6]
    assert [m.panel_shape for m in metas] == [(64, 64), (32, 96), (64, 64), (64, 64), (32, 96), (32, 96)]
    assert metas[1].image.dtype == np.uint16


def test_class_loads_like_pvapy_does(tmp_path: Path) -> None:
    from pvapy.utility.objectUtility import ObjectUtility

    args = dict(PVAPY_KEYS, **SMALL)
    obj = ObjectUtility.createObjectInstanceFromFile(
        str(REPO / "processors" / "peaknet_processor.py"), "userDataProcessorModule", "PeakNetImageProcessor", args
    )
    assert type(obj).__name__ == "PeakNetImageProcessor"
    obj.stop()
    obj2 = ObjectUtility.createObjectInstanceFromFile(
        str(REPO / "processors" / "cxi_processor.py"), "userDataProcessorModule", "CxiFileProcessor",
        dict(PVAPY_KEYS, output_dir=str(tmp_path)),
    )
    assert type(obj2).__name__ == "CxiFileProcessor"
    obj2.stop()


# -- the CXI writer processor in-process ------------------------------------------------------


def _outputs(n: int, *, n_peaks_each: int = 3, include_image: bool = True, energy: float | None = 9100.0, first_id: int = 1) -> list:
    frames = planted_frames(n, seed=9)
    out = []
    for i in range(n):
        nt = codec.encode_ntndarray(frames[i], unique_id=first_id + i, timestamp_ns=10**18 + i,
                                    attributes={} if energy is None else {"PhotonEnergy": energy + i})
        f = codec.decode_ntndarray(nt, PanelLayout((64, 64)))
        k = n_peaks_each if i % 2 == 0 else 0
        peaks = PeakTable(panel=np.arange(k) % 2, y=np.arange(k) + 0.5, x=np.arange(k) * 2.0,
                          intensity=np.full(k, 100.0), npix=np.full(k, 9))
        out.append(codec.build_output(f, peaks, include_image=include_image))
    return out


def test_cxi_processor_writes_hits(tmp_path: Path) -> None:
    from peaknet_pva.cxi import read_cxi

    w = CxiFileProcessor(dict(PVAPY_KEYS, output_dir=str(tmp_path), frames_per_file=3, min_peaks=1, idle_close_s=60))
    assert w
    w.start()
    for obj in _outputs(10):  # even uids 1,3,5,7,9 have 3 peaks; the others 0
        w.process(obj)
    for obj in _outputs(2, include_image=False, first_id=50):
        w.process(obj)
    w.stop()
    stats = w.getStats()
    assert stats["nReceived"] == 12 and stats["nWritten"] == 5 and stats["nSkipped"] == 6
    assert stats["nNoImage"] == 1 and stats["nFiles"] == 2
    files = sorted(tmp_path.glob("*.cxi"))
    assert [f.name for f in files] == ["peaknet-c1-00000.cxi", "peaknet-c1-00001.cxi"]
    assert not list(tmp_path.glob("*.inprogress"))
    assert (tmp_path / "peaknet.geom").is_file()
    uids = []
    for f in files:
        c = read_cxi(f)
        uids += c.unique_id.tolist()
        assert (c.n_peaks == 3).all()
        np.testing.assert_allclose(c.photon_energy_ev, 9100.0 + c.unique_id - 1)
    assert uids == [1, 3, 5, 7, 9]


def test_cxi_processor_idle_close(tmp_path: Path) -> None:
    w = CxiFileProcessor(dict(PVAPY_KEYS, output_dir=str(tmp_path), frames_per_file=100, min_peaks=0, idle_close_s=0.3))
    w.start()
    for obj in _outputs(2):
        w.process(obj)
    wait_until(lambda: len(list(tmp_path.glob("*.cxi"))) == 1, 10, what="idle close")
    with h5py.File(next(tmp_path.glob("*.cxi")), "r") as fh:
        assert fh["entry_1/data_1/data"].shape == (2, 128, 64)
    w.stop()
    assert len(list(tmp_path.glob("*.cxi"))) == 1


def test_stop_twice_is_harmless() -> None:
    proc, pub = _make(SMALL)
    proc.start()
    proc.process(_encode(planted_frames(1))[0])
    proc.stop()
    proc.stop()
    proc.process(_encode(planted_frames(1), first_id=2)[0])  # after stop: counted, not queued
    assert len(pub.objects) == 1 and proc.getStats()["nDropped"] == 1


def test_processors_exported_for_pvapy() -> None:
    """pvapy loads ``--processor-class peaknet_pva.X`` with ``module.__dict__.get('X')``."""
    import peaknet_pva

    assert peaknet_pva.__dict__.get("PeakNetImageProcessor") is PeakNetImageProcessor
    assert peaknet_pva.__dict__.get("CxiFileProcessor") is CxiFileProcessor


# -- replay helpers ---------------------------------------------------------------------------


def test_load_source_npy_and_dataset(tmp_path: Path) -> None:
    from peaknet_pva.pva.replay import load_source

    frames = planted_frames(3, seed=1)
    np.save(tmp_path / "f.npy", frames.reshape(3, 128, 64))
    src = load_source(tmp_path / "f.npy", panel_shape=(64, 64))
    assert src.frames.shape == (3, 2, 64, 64) and src.photon_energy_ev is None
    np.testing.assert_array_equal(src.frames, frames)
    with pytest.raises(ConfigError, match="panels"):
        load_source(tmp_path / "f.npy", panel_shape=(60, 64))
    with pytest.raises(ConfigError, match="replay source"):
        load_source(tmp_path / "f.txt")
    from pva_helpers import tiny_dataset

    ds_dir = tiny_dataset(tmp_path / "ds", n_frames=3)
    src = load_source(ds_dir)
    assert src.frames.shape == (3, 2, 64, 64) and src.photon_energy_ev.shape == (3,)
    assert load_source(ds_dir / "truth.h5").n_frames == 3
