"""preprocess.padded_shape / preprocess: shapes, padding, normalisation statistics, dtypes, out= reuse."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from peaknet_pva.errors import ConfigError, FrameError  # noqa: E402
from peaknet_pva.preprocess import padded_shape, preprocess  # noqa: E402


def reference(frames: np.ndarray, per_event: bool = False, eps: float = 1e-6) -> np.ndarray:
    """float64 instance norm of (B, P, H, W) over finite pixels; non-finite -> 0. Returns (B, P, H, W)."""
    x = frames.astype(np.float64)
    finite = np.isfinite(x)
    axes = (1, 2, 3) if per_event else (2, 3)
    n = finite.sum(axis=axes, keepdims=True)
    mean = np.where(finite, x, 0).sum(axis=axes, keepdims=True) / n
    var = np.where(finite, (x - mean) ** 2, 0).sum(axis=axes, keepdims=True) / n
    return np.where(finite, (x - mean) / np.sqrt(var + eps), 0.0)


def frames_of(dtype: str, shape: tuple[int, ...] = (2, 3, 50, 70), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(10, 1000, size=shape[:2] + (1, 1))  # panels with different gains
    data = rng.poisson(5.0, size=shape) * scale + 100
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        data = np.clip(data, info.min, info.max)
    return data.astype(dtype)


@pytest.mark.parametrize(
    "h, w, m, expected",
    [(50, 70, 32, (64, 96)), (352, 384, 32, (352, 384)), (512, 512, 32, (512, 512)), (1, 33, 32, (32, 64)),
     (100, 33, 16, (112, 48))],
)
def test_padded_shape(h: int, w: int, m: int, expected: tuple[int, int]) -> None:
    assert padded_shape(h, w, m) == expected


def test_padded_shape_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        padded_shape(10, 10, 0)
    with pytest.raises(ConfigError):
        padded_shape(10, 10, True)  # type: ignore[arg-type]
    with pytest.raises(FrameError):
        padded_shape(0, 10)


def test_shapes_padding_and_per_panel_statistics() -> None:
    frames = frames_of("uint16")
    x, valid = preprocess(torch.from_numpy(frames))
    assert valid == (50, 70)
    assert x.dtype == torch.float32 and tuple(x.shape) == (6, 1, 64, 96)
    a = x.numpy()[:, 0]
    assert (a[:, 50:, :] == 0).all() and (a[:, :, 70:] == 0).all()  # bottom-right zero pad
    v = a[:, :50, :70].reshape(6, -1).astype(np.float64)
    np.testing.assert_allclose(v.mean(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(v.var(1), 1.0, atol=1e-4)
    np.testing.assert_allclose(a[:, :50, :70], reference(frames).reshape(6, 50, 70), atol=1e-4)


def test_per_event_statistics() -> None:
    frames = frames_of("float32")
    x, _ = preprocess(torch.from_numpy(frames), per_event=True)
    v = x.numpy()[:, 0, :50, :70].reshape(2, 3, -1).astype(np.float64)
    ev = v.reshape(2, -1)
    np.testing.assert_allclose(ev.mean(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(ev.var(1), 1.0, atol=1e-4)
    assert np.abs(v.mean(2)).max() > 0.1  # panels with different gains are not each centred
    np.testing.assert_allclose(v.reshape(2, 3, 50, 70), reference(frames, per_event=True), atol=1e-4)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "uint32", "float32", "float64"])
def test_dtypes(dtype: str) -> None:
    frames = frames_of(dtype, (1, 2, 40, 33))
    x, valid = preprocess(torch.from_numpy(frames))
    assert valid == (40, 33) and tuple(x.shape) == (2, 1, 64, 64) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy()[:, 0, :40, :33], reference(frames)[0], atol=1e-4)


def test_numpy_input_and_no_cropping_at_multiples() -> None:
    frames = frames_of("int32", (1, 2, 64, 96))
    x, valid = preprocess(frames, multiple=32)
    assert valid == (64, 96) and tuple(x.shape) == (2, 1, 64, 96)
    np.testing.assert_allclose(x.numpy()[:, 0], reference(frames)[0], atol=1e-4)
    x, _ = preprocess(frames, multiple=64)
    assert tuple(x.shape) == (2, 1, 64, 128)


def test_out_buffer_is_reused_and_fully_overwritten() -> None:
    frames = torch.from_numpy(frames_of("uint16"))
    fresh, _ = preprocess(frames)
    out = torch.full((6, 1, 64, 96), float("nan"))
    got, valid = preprocess(frames, out=out)
    assert got is out and valid == (50, 70)
    torch.testing.assert_close(out, fresh, rtol=0, atol=0)
    got, _ = preprocess(frames.flip(0), out=out)  # second batch into the same buffer
    torch.testing.assert_close(got, preprocess(frames.flip(0))[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "out",
    [
        torch.zeros(6, 1, 64, 64),
        torch.zeros(6, 1, 64, 96, dtype=torch.float64),
        torch.zeros(6, 1, 96, 64).transpose(2, 3),
    ],
)
def test_bad_out_buffer(out: torch.Tensor) -> None:
    with pytest.raises(FrameError, match="out must be"):
        preprocess(torch.zeros(2, 3, 50, 70), out=out)


def test_non_finite_pixels_become_zero_and_do_not_poison_statistics() -> None:
    frames = frames_of("float32", (1, 2, 32, 40))
    frames[0, 0, 3, 4] = np.nan
    frames[0, 0, 10, 11] = np.inf
    frames[0, 1, 0, 0] = -np.inf
    x, _ = preprocess(torch.from_numpy(frames))
    a = x.numpy()[:, 0]
    assert np.isfinite(a).all()
    assert a[0, 3, 4] == 0 and a[0, 10, 11] == 0 and a[1, 0, 0] == 0
    np.testing.assert_allclose(a[:, :, :40], reference(frames)[0], atol=1e-4)


def test_constant_and_all_bad_panels_are_zero() -> None:
    frames = np.full((1, 2, 32, 32), 7.0, np.float32)
    frames[0, 1] = np.nan
    x, _ = preprocess(torch.from_numpy(frames))
    assert torch.count_nonzero(x) == 0


def test_bad_frames() -> None:
    with pytest.raises(FrameError, match=r"\(B, P, H, W\)"):
        preprocess(torch.zeros(3, 32, 32))
    with pytest.raises(FrameError, match="empty"):
        preprocess(torch.zeros(0, 1, 32, 32))
    with pytest.raises(FrameError, match="complex"):
        preprocess(torch.zeros(1, 1, 4, 4, dtype=torch.complex64))
    with pytest.raises(ConfigError):
        preprocess(torch.zeros(1, 1, 4, 4), multiple=0)


# -- robust normalisation ----------------------------------------------------------------------
def _photons(seed: int, level: float, shape=(1, 2, 128, 128)) -> np.ndarray:
    return np.random.default_rng(seed).poisson(level, size=shape).astype(np.float64)


@pytest.mark.parametrize("level", [0.01, 0.5, 10.0, 300.0])
def test_robust_norm_is_gain_and_pedestal_invariant(level: float) -> None:
    photons = _photons(0, level)
    ref, _ = preprocess(torch.from_numpy(photons.astype(np.float32)), norm="robust")
    for gain, pedestal, dtype in [(37.0, 1000.0, np.uint16), (0.1, 5.0, np.float32), (9.5, 0.0, np.float32)]:
        got, _ = preprocess(torch.from_numpy((photons * gain + pedestal).astype(dtype)), norm="robust")
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-3 if dtype is np.float32 else 1e-4)


def test_robust_norm_does_not_collapse_on_photon_counting_data() -> None:
    """At 0.01 photons/pixel the median and the plain MAD are 0; a single photon must still be a
    finite, modest value and the panel must not blow up."""
    photons = _photons(1, 0.01)
    x, _ = preprocess(torch.from_numpy(photons.astype(np.float32)), norm="robust")
    a = x.numpy()[:, 0]
    assert np.isfinite(a).all()
    one = a[photons.reshape(a.shape) == 1]
    assert 0.3 < one.min() <= one.max() < 1.5
    assert np.allclose(a[photons.reshape(a.shape) == 0], 0.0)


def test_a_handful_of_hot_pixels_cannot_swing_the_robust_norm() -> None:
    photons = _photons(2, 10.0)
    clean, _ = preprocess(torch.from_numpy(photons.astype(np.float32)), norm="robust")
    hot = photons.copy()
    idx = np.random.default_rng(3).integers(0, 128 * 128, 16)
    hot.reshape(2, -1)[:, idx] = 65535
    dirty, _ = preprocess(torch.from_numpy(hot.astype(np.float32)), norm="robust")
    keep = np.ones((2, 128 * 128), bool)
    keep[:, idx] = False
    diff = (dirty - clean).numpy()[:, 0].reshape(2, -1)[keep]
    assert np.abs(diff).max() < 0.05
    # The instance norm is swung by the same pixels: the noise shrinks several-fold.
    inst_clean, _ = preprocess(torch.from_numpy(photons.astype(np.float32)))
    inst_dirty, _ = preprocess(torch.from_numpy(hot.astype(np.float32)))
    assert inst_dirty.numpy()[:, 0].reshape(2, -1)[keep].std() < 0.3 * inst_clean.numpy().std()


def test_mask_is_excluded_and_zeroed_in_both_norms() -> None:
    photons = _photons(4, 20.0) + 500.0
    mask = np.zeros((2, 128, 128), bool)
    mask[:, :40] = True  # a third of each panel masked
    zeroed = photons.copy()
    zeroed[:, mask] = 0.0
    ref, _ = preprocess(torch.from_numpy(photons.astype(np.float32)), norm="robust")
    for norm in ("robust", "instance"):
        got, _ = preprocess(torch.from_numpy(zeroed.astype(np.float32)), norm=norm, mask=torch.from_numpy(mask))
        a = got.numpy()[:, 0]
        assert (a[mask] == 0).all()
        if norm == "robust":  # the statistics of the rest are those of the unmasked panel
            assert np.abs(a[~mask] - ref.numpy()[:, 0][~mask]).max() < 0.1
        else:
            v = a[~mask]
            assert abs(v.mean()) < 0.05 and abs(v.std() - 1) < 0.05
    # Without a declared mask the robust norm still keeps the zeroed third from widening the scale.
    undeclared, _ = preprocess(torch.from_numpy(zeroed.astype(np.float32)), norm="robust")
    a = undeclared.numpy()[:, 0]
    assert np.abs(a[~mask] - ref.numpy()[:, 0][~mask]).max() < 0.15
    assert a[mask].max() < -2.5  # clipped, bounded


def test_robust_norm_constant_and_nonfinite_panels() -> None:
    frames = np.full((1, 2, 64, 64), 42.0, np.float32)
    frames[0, 1, :5] = np.nan
    frames[0, 1, 5:7] = np.inf
    x, _ = preprocess(torch.from_numpy(frames), norm="robust")
    assert torch.isfinite(x).all() and float(x.abs().max()) == 0.0
    with pytest.raises(ConfigError):
        preprocess(torch.from_numpy(frames), norm="median")
