"""The broad training domain (augment.sample_panel): reproducible, labels follow the stated rule."""

from __future__ import annotations

import numpy as np
import pytest

from peaknet_pva.augment import DomainParams, sample_panel
from peaknet_pva.errors import ConfigError


def test_same_generator_state_gives_the_same_panel():
    a = sample_panel(np.random.default_rng([3, 7]))
    b = sample_panel(np.random.default_rng([3, 7]))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    c = sample_panel(np.random.default_rng([3, 8]))
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_domain_covers_what_beamlines_send():
    rng = np.random.default_rng(0)
    panels = [sample_panel(rng) for _ in range(150)]
    shapes = {p.image.shape for p in panels}
    assert len(shapes) > 100  # panel shapes are drawn, not three presets
    assert {"float32", "uint16", "int32", "uint32"} <= {p.dtype for p in panels}
    levels = np.array([p.background for p in panels])
    assert (levels == 0).any() and levels.max() > 50 and (levels[levels > 0] < 0.1).any()
    assert any(p.mask is not None for p in panels) and any(p.mask is None for p in panels)
    n = np.array([p.y.shape[0] for p in panels])
    assert (n == 0).any() and n.max() > 150
    det = np.concatenate([p.detectable for p in panels])
    assert 0.3 < det.mean() < 0.95  # both sides of the detection threshold are drawn


def test_labels_only_on_detectable_spots_and_never_on_bad_pixels():
    rng = np.random.default_rng(1)
    for _ in range(60):
        p = sample_panel(rng)
        if p.mask is not None:
            assert not p.label[p.mask].any()
        if not p.detectable.any():
            assert not p.label.any()
        else:
            # every detectable spot centre lies on (or next to) a labelled pixel
            for y, x in zip(p.y[p.detectable], p.x[p.detectable]):
                iy, ix = int(round(y)), int(round(x))
                win = p.label[max(0, iy - 1) : iy + 2, max(0, ix - 1) : ix + 2]
                assert win.any() or p.mask is not None or (p.image[max(0, iy - 1) : iy + 2, max(0, ix - 1) : ix + 2] == 0).any()


def test_flat_background_level_matches_the_draw():
    params = DomainParams(radial_prob=0, water_ring_prob=0, ice_ring_prob=0, smooth_random_prob=0, hot_prob=0,
                          mask_prob=0, blank_prob=1.0, no_read_noise_prob=1.0, pedestal_prob=0, float_prob=1.0,
                          kev_prob=0.0, zero_background_prob=0.0, dead_panel_prob=0.0)
    rng = np.random.default_rng(2)
    for _ in range(5):
        p = sample_panel(rng, params, shape=(128, 128))
        # float frames: value = photons x gain; the Poisson mean is the drawn level
        gain = p.image[p.image > 0].min() if p.background < 0.5 else None
        if gain is not None:
            photons = p.image / gain
            assert abs(photons.mean() - p.background) < 5 * np.sqrt(p.background / p.image.size) + 0.01
        assert not p.label.any()


def test_bad_ranges_are_refused():
    with pytest.raises(ConfigError):
        DomainParams(background=(0.0, 1.0))
    with pytest.raises(ConfigError):
        DomainParams(panel_min=4)


def test_smaller_labels_keep_the_same_detectable_spots():
    """label_fraction shrinks the footprint only; which spots count is set by detect_fraction."""
    wide, narrow = DomainParams(label_fraction=0.3), DomainParams(label_fraction=0.6)
    shrunk = 0
    for seed in range(6):
        a = sample_panel(np.random.default_rng(seed), wide, shape=(128, 128))
        b = sample_panel(np.random.default_rng(seed), narrow, shape=(128, 128))
        assert np.array_equal(a.image, b.image) and np.array_equal(a.detectable, b.detectable)
        assert not (b.label & ~a.label).any()  # narrow labels lie inside the wide ones
        shrunk += int(a.label.sum() - b.label.sum())
    assert shrunk > 0
    with pytest.raises(ConfigError, match="label_fraction"):
        DomainParams(label_fraction=1.5)


def test_bright_hot_pixels_only_when_asked():
    """hot_bright_prob puts float frames' hot pixels far above the frame's range (a calibrated
    full-scale hot pixel); at 0 the sampler draws exactly the original panels."""
    base = dict(hot_prob=1.0, float_prob=1.0, kev_prob=0.0, dead_panel_prob=0.0, mask_prob=0.0, blank_prob=0.0)
    ratios = {}
    for bright in (0.0, 1.0):
        p = DomainParams(hot_bright_prob=bright, **base)
        r = []
        for seed in range(12):
            panel = sample_panel(np.random.default_rng(seed), p, shape=(96, 96))
            r.append(float(panel.image.max() / max(np.percentile(panel.image, 99), 1.0)))
        ratios[bright] = np.median(r)
    assert ratios[1.0] > 3 * ratios[0.0], ratios  # measured ~7x (log-uniform up to 1e7 x gain)
    a = sample_panel(np.random.default_rng(3), DomainParams(**base), shape=(96, 96))
    b = sample_panel(np.random.default_rng(3), DomainParams(hot_bright_prob=0.0, **base), shape=(96, 96))
    assert np.array_equal(a.image, b.image)
