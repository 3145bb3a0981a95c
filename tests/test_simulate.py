"""The simulator: determinism, presets, ground-truth consistency, blank frames, files, labels."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest

from peaknet_pva.errors import ConfigError
from peaknet_pva.frames import as_panel_stack
from peaknet_pva.simulate import (
    DETECTORS,
    SimulationParams,
    TruthTable,
    get_detector,
    load_dataset,
    save_dataset,
    simulate_dataset,
    simulate_frame,
    spot_label_mask,
)


def _truth_equal(a: TruthTable, b: TruthTable) -> bool:
    return (
        all(np.array_equal(getattr(a, f), getattr(b, f)) for f in TruthTable._DTYPES)
        and a.photon_energy_ev == b.photon_energy_ev
        and a.blank == b.blank
    )


@pytest.fixture(scope="module")
def single_ds():
    return simulate_dataset(6, detector="single", seed=3, params=SimulationParams(blank_fraction=0.0), progress=False)


def test_same_seed_same_data_different_seed_different():
    a = simulate_dataset(3, seed=5, progress=False)
    b = simulate_dataset(3, seed=5, progress=False)
    c = simulate_dataset(3, seed=6, progress=False)
    assert np.array_equal(a.frames, b.frames)
    assert all(_truth_equal(x, y) for x, y in zip(a.truths, b.truths))
    assert np.array_equal(a.photon_energy_ev, b.photon_energy_ev)
    assert np.array_equal(a.bad_pixel_mask, b.bad_pixel_mask)
    assert not np.array_equal(a.frames, c.frames)
    assert not np.array_equal(a.photon_energy_ev, c.photon_energy_ev)


def test_frame_i_does_not_depend_on_dataset_length():
    a = simulate_dataset(2, seed=9, progress=False)
    b = simulate_dataset(3, seed=9, progress=False)
    assert np.array_equal(a.frames, b.frames[:2])
    assert all(_truth_equal(x, y) for x, y in zip(a.truths, b.truths[:2]))


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_presets_shapes_dtypes_and_truth_on_panels(name):
    det = DETECTORS[name]
    frame, truth = simulate_frame(np.random.default_rng(1), name, blank=False)
    assert frame.shape == det.frame_shape
    assert frame.dtype == np.dtype(det.dtype)
    p, h, w = det.frame_shape
    assert truth.n > 0
    assert truth.panel.max() < p
    assert np.all((truth.y >= -0.5) & (truth.y < h - 0.5) & (truth.x >= -0.5) & (truth.x < w - 0.5))
    assert np.all(truth.intensity > 0) and np.all(truth.sigma >= 0.8 * 0.9) and np.all(truth.sigma <= 1.5 * 1.1)
    lo, hi = SimulationParams().photon_energy_ev
    assert lo <= truth.photon_energy_ev <= hi
    assert frame.max() <= det.saturation_adu
    # the stacked slab splits back into the same panels
    slab = frame.reshape(det.slab_shape)
    assert np.array_equal(as_panel_stack(slab[None], det.panel_shape)[0], frame)
    # the radius map is smallest next to the beam centre
    radius = det.radius_map()
    assert radius.shape == det.frame_shape and radius.min() < 40


def test_expected_presets():
    assert DETECTORS["single"].frame_shape == (1, 512, 512)
    assert DETECTORS["epix10k2m"].frame_shape == (16, 352, 384)
    assert DETECTORS["jungfrau4m"].frame_shape == (8, 512, 1024)
    for det in DETECTORS.values():
        with pytest.raises(dataclasses.FrozenInstanceError):
            det.distance_m = 1.0  # type: ignore[misc]
        # panels do not overlap in the lab
        origins = np.asarray(det.panel_origins)
        h, w = det.panel_shape
        for i in range(len(origins)):
            for j in range(i + 1, len(origins)):
                dy, dx = np.abs(origins[i] - origins[j])
                assert dy >= h or dx >= w
    with pytest.raises(ConfigError, match="detector"):
        get_detector("pilatus")


def test_bright_isolated_spots_sit_at_image_maxima_and_intensities_match(single_ds):
    checked = 0
    sums, truths = [], []
    for frame, truth in zip(single_ds.frames, single_ds.truths):
        img = frame[0].astype(np.float64)
        bad = single_ds.bad_pixel_mask[0]
        for i in range(truth.n):
            y, x = truth.y[i], truth.x[i]
            others = np.hypot(truth.y - y, truth.x - x)
            others[i] = np.inf
            yi, xi = int(round(y)), int(round(x))
            if others.min() < 10 or not (8 <= yi < 504 and 8 <= xi < 504) or bad[yi - 7 : yi + 8, xi - 7 : xi + 8].any():
                continue
            box = img[yi - 4 : yi + 5, xi - 4 : xi + 5]
            ring = np.concatenate([img[yi - 7, xi - 7 : xi + 8], img[yi + 7, xi - 7 : xi + 8],
                                   img[yi - 7 : yi + 8, xi - 7], img[yi - 7 : yi + 8, xi + 7]])
            if truth.snr[i] > 50 and box.max() < 0.9 * DETECTORS["single"].saturation_adu:
                py, px = np.unravel_index(np.argmax(box), box.shape)
                assert abs(yi - 4 + py - y) <= 1.0 and abs(xi - 4 + px - x) <= 1.0
                checked += 1
            if truth.intensity[i] < 0.9 * DETECTORS["single"].saturation_adu:
                sums.append(box.sum() - np.median(ring) * box.size)
                truths.append(truth.intensity[i])
    assert checked >= 20
    r = np.corrcoef(np.asarray(truths), np.asarray(sums))[0, 1]
    assert r > 0.98, r


def test_detectable_rule_and_energies(single_ds):
    p = single_ds.params
    for t, e in zip(single_ds.truths, single_ds.photon_energy_ev):
        assert t.photon_energy_ev == e
        assert np.all(t.snr[t.detectable] >= p.detect_snr)
        assert not np.any(t.detectable[t.snr < p.detect_snr])
    all_t = [t for t in single_ds.truths if t.n]
    assert sum(int(t.detectable.sum()) for t in all_t) > 50
    assert sum(int((~t.detectable).sum()) for t in all_t) > 10  # some very weak spots exist
    assert max(float(t.snr.max()) for t in all_t) > 500  # and some very bright ones


def test_blank_fraction():
    frames = simulate_dataset(40, seed=2, params=SimulationParams(blank_fraction=0.5), progress=False)
    blank = np.array([t.blank for t in frames.truths])
    assert 8 <= blank.sum() <= 32
    assert all(t.n == 0 for t in np.asarray(frames.truths)[blank])
    assert all(t.n > 0 for t in np.asarray(frames.truths)[~blank])
    none = simulate_dataset(5, seed=2, params=SimulationParams(blank_fraction=0.0), progress=False)
    assert not any(t.blank for t in none.truths)
    every = simulate_dataset(3, seed=2, params=SimulationParams(blank_fraction=1.0), progress=False)
    assert all(t.blank and t.n == 0 for t in every.truths)


def test_save_load_round_trip(tmp_path):
    ds = simulate_dataset(2, detector="epix10k2m", seed=4, progress=False)
    out = save_dataset(ds, tmp_path / "sim")
    slab = np.load(out / "frames.npy")
    assert slab.shape == (2, 16 * 352, 384) and slab.dtype == np.uint16
    with h5py.File(out / "truth.h5") as h5:
        assert h5.attrs["detector"] == "epix10k2m"
        assert list(h5.attrs["panel_shape"]) == [352, 384]
        assert h5.attrs["seed"] == 4
        assert h5["spots/y"].shape[0] == sum(t.n for t in ds.truths)
    back = load_dataset(out)
    assert np.array_equal(back.frames, ds.frames)
    assert back.detector == "epix10k2m" and back.seed == 4 and back.params == ds.params
    assert np.array_equal(back.photon_energy_ev, ds.photon_energy_ev)
    assert np.array_equal(back.bad_pixel_mask, ds.bad_pixel_mask)
    assert all(_truth_equal(x, y) for x, y in zip(back.truths, ds.truths))
    mm = load_dataset(out / "truth.h5", mmap=True)
    assert np.array_equal(mm.frames, ds.frames)
    with pytest.raises(FileNotFoundError, match="frames.npy"):
        (out / "frames.npy").unlink()
        load_dataset(out)


def test_spot_label_mask(single_ds):
    frame = single_ds.frames[0]
    truth = single_ds.truths[0]
    det = truth.detectable_only()
    labels = spot_label_mask(frame.shape, truth, 0.3)
    assert labels.shape == frame.shape and labels.dtype == bool
    # every detectable spot's centre pixel is labelled
    assert labels[det.panel, np.rint(det.y).astype(int), np.rint(det.x).astype(int)].all()
    # fraction=1 keeps exactly each spot's brightest pixel
    peaks_only = spot_label_mask(frame.shape, truth, 1.0)
    assert peaks_only.sum() == det.n
    loose = spot_label_mask(frame.shape, truth, 0.1)
    assert np.all(loose >= labels) and loose.sum() > labels.sum() > peaks_only.sum()
    everything = spot_label_mask(frame.shape, truth, 0.3, detectable_only=False)
    assert everything.sum() > labels.sum()
    # labelled pixels are bright in the image: their median beats the unlabelled median
    assert np.median(frame[labels]) > 3 * np.median(frame[~labels])
    with pytest.raises(ConfigError, match="fraction"):
        spot_label_mask(frame.shape, truth, 0.0)


def test_params_validation_names_the_field():
    with pytest.raises(ConfigError, match="blank_fraction"):
        SimulationParams(blank_fraction=1.5)
    with pytest.raises(ConfigError, match="photon_energy_ev"):
        SimulationParams(photon_energy_ev=(12000.0, 6000.0))
    with pytest.raises(ConfigError, match="spot_sigma_px"):
        SimulationParams(spot_sigma_px=(0.8, 5.0))
    with pytest.raises(ConfigError, match="n_frames"):
        simulate_dataset(0, progress=False)
