"""areaDetector-faithful output (issue 11 part 2): input NTAttributes passed through with their
types, descriptor and source; codec fields as ADCore sets them; non-hits not published under the
default ``forward_images: hits``; the optional assembled view (``output_image: assembled``) with
the slab still reaching the CXI writer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pva_helpers import (  # noqa: I001
    CXI_CLASS,
    PEAKNET_CLASS,
    PEAKNET_CPU_ARGS,
    FakePublisher,
    consumer_set,
    planted_frames,
    unique_tag,
    user_stats,
    wait_until,
)

import pvaccess as pva  # noqa: E402

from peaknet_pva.assemble import Assembler  # noqa: E402
from peaknet_pva.cxi import read_cxi  # noqa: E402
from peaknet_pva.frames import PanelLayout, PeakTable  # noqa: E402
from peaknet_pva.geometry import DetectorGeometry, lab_xy  # noqa: E402
from peaknet_pva.pva import codec  # noqa: E402
from peaknet_pva.pva.peaknet_processor import PeakNetImageProcessor  # noqa: E402
from peaknet_pva.pva.replay import ReplayServer  # noqa: E402

pytestmark = [pytest.mark.timeout(300)]

PVAPY_KEYS = {"processorId": 1, "inputChannel": "x", "outputChannel": "y", "objectIdField": "uniqueId",
              "objectIdOffset": 1, "nSequentialUpdates": 1}

#: (name, pvaccess value, descriptor, sourceType, source) as an areaDetector IOC sends them
#: (NDAttrSourceDriver = 0, Param = 1, EPICS_PV = 2, Function = 3).
AD_ATTRIBUTES: list[tuple[str, Any, str, int, str]] = [
    ("ColorMode", pva.PvInt(0), "Color mode", 0, "Driver"),
    ("NDArrayNum", pva.PvInt(41), "Image counter", 1, "ARRAY_COUNTER"),
    ("AcquireTime", pva.PvDouble(0.004), "Camera acquire time", 2, "13SIM1:cam1:AcquireTime_RBV"),
    ("DetectorName", pva.PvString("ePix10k2M"), "Detector", 1, "MODEL"),
    ("PhotonEnergy", pva.PvDouble(9321.5), "Photon energy (eV)", 2, "BL:MONO:Energy"),
    ("Gain", pva.PvUShort(3), "Gain mode", 1, "GAIN"),
    ("TriggerCount", pva.PvULong(2**40 + 7), "Triggers", 3, "myFunct"),
    ("Temperature", pva.PvFloat(-31.25), "Sensor temperature", 2, "BL:DET:Temp"),
    ("Binning", pva.PvShort(-5), "signed short", 1, "BIN"),
    ("Shutter", pva.PvUByte(1), "Shutter open", 2, "BL:SHUTTER"),
    ("Offsets", pva.PvObject({"value": [pva.INT]}, {"value": [1, -2, 3]}), "array attribute", 3, "f"),
]


def _ad_frame(pixels: np.ndarray, uid: int) -> Any:
    """An NTNDArray as an areaDetector IOC would send it: attributes with types and sources."""
    nt = codec.encode_ntndarray(pixels, unique_id=uid, timestamp_ns=1_700_000_000_123_456_789 + uid,
                                data_timestamp_ns=1_700_000_000_000_000_000 + uid)
    attrs = []
    for name, value, descriptor, source_type, source in AD_ATTRIBUTES:
        a = pva.NtAttribute(name, value)
        a["descriptor"] = descriptor
        a["sourceType"] = source_type
        a["source"] = source
        a["tags"] = ["t1"] if name == "Gain" else []
        attrs.append(a)
    nt["attribute"] = attrs
    return nt


def _by_name(pv: Any) -> dict[str, dict[str, Any]]:
    return {str(a["name"]): a for a in pv["attribute"]}


def _check_passthrough(inp: Any, out: Any) -> None:
    got = _by_name(out)
    for want in inp["attribute"]:
        a = got[want["name"]]
        assert a["value"][1] == want["value"][1], want["name"]  # the pvData type
        np.testing.assert_equal(a["value"][0]["value"], want["value"][0]["value"])
        for key in ("descriptor", "sourceType", "source", "tags"):
            assert a[key] == want[key], (want["name"], key)
    assert got["PeakNetNPeaks"]["value"][0]["value"] == int(out["nPeaks"])
    assert got["PeakNetNPeaks"]["sourceType"] == codec.ATTR_SOURCE_FUNCT


def test_build_output_passes_attributes_and_sets_codec_like_adcore() -> None:
    frames = planted_frames(1, dtype="uint16")
    inp = _ad_frame(frames[0], 41)
    frame = codec.decode_ntndarray(inp, PanelLayout((64, 64)))
    peaks = PeakTable(panel=[0, 1], y=[3.0, 4.0], x=[5.0, 6.0], intensity=[10.0, 20.0], npix=[3, 4])
    out = codec.build_output(frame, peaks, include_image=True)
    _check_passthrough(inp, out)
    assert [str(a["name"]) for a in out["attribute"]].count("ColorMode") == 1  # not added twice
    assert out["codec"]["name"] == ""
    assert out["codec"]["parameters"][0]["value"] == int(pva.USHORT)
    assert out["compressedSize"] == out["uncompressedSize"] == frames[0].nbytes
    assert out["uniqueId"] == 41
    assert codec._ts_to_ns(out["timeStamp"]) == 1_700_000_000_123_456_789 + 41
    assert codec._ts_to_ns(out["dataTimeStamp"]) == 1_700_000_000_000_000_000 + 41
    # a frame without attributes gets ours: ColorMode, the photon energy, the peak count
    bare = codec.encode_ntndarray(frames[0], unique_id=2)
    bare["attribute"] = []
    out2 = codec.build_output(codec.decode_ntndarray(bare, PanelLayout((64, 64))), peaks, include_image=False,
                              photon_energy_ev=8000.0)
    names = _by_name(out2)
    assert names["ColorMode"]["value"][0]["value"] == 0
    assert names["PhotonEnergy"]["value"][0]["value"] == 8000.0
    assert names["PeakNetImage"]["value"][0]["value"] == "none"
    assert out2["compressedSize"] == out2["uncompressedSize"] == 0


def test_assembler_places_pixels_by_geometry_and_bins_with_max() -> None:
    geom = DetectorGeometry.stacked(4, (32, 48), gap_px=6)
    frame = np.zeros((4, 32, 48), np.float32)
    frame[2, 10, 20] = 500.0  # one bright pixel on panel 2
    asm = Assembler(frame.shape, geom, max_px=64)
    img = asm(frame)
    assert max(img.shape) <= 64 and asm.binning == 3
    assert img.max() == 500.0 and np.count_nonzero(img) == 1  # max binning keeps a one-pixel peak
    # it lands where the geometry puts that pixel
    x, y = lab_xy(geom)
    ss = 2 * 32 + 10
    xs, ys = x[np.isfinite(x)], y[np.isfinite(y)]
    row = int((ys.max() - y[ss, 20]) // asm.binning)
    col = int((x[ss, 20] - xs.min()) // asm.binning)
    assert img[row, col] == 500.0
    # without a geometry, 16 tall-ish panels become a near-square grid, not a strip
    grid = Assembler((16, 352, 384), None, max_px=1024)
    assert 0.7 < grid.shape[0] / grid.shape[1] < 1.4
    with pytest.raises(ValueError):
        Assembler((3, 32, 48), geom)  # geometry of another slab


def _make(args: dict) -> tuple[PeakNetImageProcessor, FakePublisher]:
    proc = PeakNetImageProcessor(dict(PVAPY_KEYS, **args))
    pub = FakePublisher()
    proc.outputChannel = "test:output"
    proc.dataPublisher = pub
    return proc, pub


SMALL = dict(PEAKNET_CPU_ARGS, batch_size=4, batch_timeout_ms=5)


@pytest.mark.parametrize(
    "mode, published, with_image",
    [("hits", [3, 4], [True, True]), ("hits_empty", [1, 2, 3, 4], [False, False, True, True]),
     ("all", [1, 2, 3, 4], [True] * 4), ("none", [1, 2, 3, 4], [False] * 4)],
)
def test_forward_images_modes(mode: str, published: list[int], with_image: list[bool]) -> None:
    """hits (default): non-hits are not published at all (no empty NTNDArray for viewers),
    counted in nNotPublished; hits_empty keeps one update per frame."""
    proc, pub = _make(dict(SMALL, min_peaks=100_000, forward_images=mode))
    proc.start()
    frames = planted_frames(4, seed=6)
    encoded = [codec.encode_ntndarray(f, unique_id=i + 1, attributes={"PhotonEnergy": 9000.0}) for i, f in enumerate(frames)]
    for obj in encoded[:2]:
        proc.process(obj)
    wait_until(lambda: proc.getStats()["nProcessed"] == 2, 60, what="2 frames processed")
    proc.configure({"min_peaks": 0})
    for obj in encoded[2:]:
        proc.process(obj)
    proc.stop()
    metas = [codec.decode_output(o)[1] for o in pub.objects]
    assert [m.unique_id for m in metas] == published
    assert [m.image is not None for m in metas] == with_image
    stats = proc.getStats()
    assert stats["nProcessed"] == 4
    assert stats["nNotPublished"] == (2 if mode == "hits" else 0)
    assert all(codec.same_structure(pub.objects[0], o) for o in pub.objects)


def test_assembled_output_in_process(tmp_path: Path) -> None:
    """output_image: assembled sends the binned lab image as the NTNDArray value (dims of the
    view, binning in the dimension) and the slab in ``slab``: decode_output still returns the
    frame's panels, so the CXI writer writes the real pixels."""
    from peaknet_pva.geometry import write_geometry

    geom_path = write_geometry(tmp_path / "d.geom", DetectorGeometry.stacked(2, (64, 64)))
    proc, pub = _make(dict(SMALL, output_image="assembled", assembled_max_px=32, geometry=str(geom_path),
                           panel_shape=None))
    proc.start()
    frames = planted_frames(2, seed=8)
    for i, f in enumerate(frames):
        proc.process(codec.encode_ntndarray(f, unique_id=i + 1, attributes={"PhotonEnergy": 9000.0}))
    proc.stop()
    assert len(pub.objects) == 2
    out = pub.objects[0]
    dims = [(int(d["size"]), int(d["binning"])) for d in out["dimension"]]
    assert max(s for s, _ in dims) <= 32 and dims[0][1] == dims[1][1] > 1
    assert _by_name(out)["PeakNetImage"]["value"][0]["value"] == "assembled"
    peaks, meta = codec.decode_output(out)
    np.testing.assert_array_equal(meta.image, frames[0])
    value = np.asarray(out["value"][0]["floatValue"])
    assert value.size == dims[0][0] * dims[1][0] and value.max() == pytest.approx(frames[0].max())


@pytest.mark.pva
def test_attributes_survive_a_real_consumer(tmp_path: Path) -> None:
    """An areaDetector-style frame with 11 attributes of 9 pvData types through a real
    pvapy-hpc-consumer: every attribute arrives with its type, value, descriptor, source and
    sourceType; ids, time stamps and codec fields as ADCore sets them; and under the default
    forward_images (hits) the non-hits are not published while the hit is, with the CXI writer
    behind it writing exactly the hit."""
    tag = unique_tag("adout")
    image = f"{tag}:image"
    args = dict(PEAKNET_CPU_ARGS, backend="peakfinder8", forward_images="hits", min_peaks=1)  # deterministic peaks
    args.pop("photon_energy_ev")
    frames = planted_frames(3, seed=21, dtype="uint16")
    frames[0] = 0  # no peak can be found in an all-zero frame: a non-hit
    frames[1] = 0
    received: list[Any] = []
    out_dir = tmp_path / "cxi"
    with ReplayServer(image) as srv:
        with consumer_set(PEAKNET_CLASS, image, tag, tmp_path, role="pk", processor_args=args) as pk:
            ch = pva.Channel(pk.output_channels[0], pva.PVA)
            ch.monitor(lambda pv: received.append(pv.copy()), "")
            try:
                writer_args = {"output_dir": str(out_dir), "frames_per_file": 10, "min_peaks": 0, "idle_close_s": 60}
                with consumer_set(CXI_CLASS, f"{tag}:pk:*:output", tag, tmp_path, role="wr",
                                  processor_args=writer_args, output=False) as wr:
                    time.sleep(1.0)
                    sent = []
                    for i, f in enumerate(frames):
                        nt = _ad_frame(f, 0)
                        sent.append(nt)
                        srv.publish_prepared(nt, timestamp_ns=1_700_000_000_000_000_000 + i)
                    wait_until(lambda: pk_stats(pk)["nProcessed"] == 3, 120, what="3 frames processed")
                    stats = pk_stats(pk)
                    wait_until(lambda: any(int(o["uniqueId"]) == 3 for o in received), 30, what="the hit")
                    wait_until(lambda: user_stats(wr, fresh_after=time.time())[0]["nReceived"] >= 1, 30,
                               what="writer got the hit")
            finally:
                ch.stopMonitor()
    assert stats["nNotPublished"] == 2 and stats["nHits"] == 1, stats
    outs = [o for o in received if int(o["uniqueId"]) > 0]
    assert [int(o["uniqueId"]) for o in outs] == [3]  # only the hit
    out = outs[0]
    _check_passthrough(sent[2], out)
    assert out["codec"]["name"] == "" and out["codec"]["parameters"][0]["value"] == int(pva.USHORT)
    assert out["compressedSize"] == out["uncompressedSize"] == frames[2].nbytes
    assert codec._ts_to_ns(out["timeStamp"]) == 1_700_000_000_000_000_002
    assert float(out["photonEnergy"]) == 9321.5
    files = sorted(out_dir.glob("*.cxi"))
    assert len(files) == 1
    c = read_cxi(files[0])
    assert c.unique_id.tolist() == [3]
    np.testing.assert_array_equal(c.data[0], frames[2].reshape(-1, 64))
    assert (out_dir / "peaknet.lst").read_text().splitlines() == [str(files[0].absolute())]


def pk_stats(proc: Any) -> dict[str, Any]:
    return user_stats(proc, fresh_after=time.time())[0]


def test_placeholder_is_a_valid_image_of_the_output_structure() -> None:
    """Before the first frame the record holds a 1 x 1 mono image (c2dv shows it without error),
    with the output structure; readers see a frame with no peaks and no image."""
    ph = codec.placeholder_output()
    assert codec.same_structure(ph, codec.output_type())
    assert [int(d["size"]) for d in ph["dimension"]] == [1, 1]
    assert _by_name(ph)["ColorMode"]["value"][0]["value"] == 0
    peaks, meta = codec.decode_output(ph)
    assert peaks.n == 0 and meta.image is None and meta.unique_id == 0
