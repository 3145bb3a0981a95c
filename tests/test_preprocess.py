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


@pytest.mark.parametrize("norm", ["robust", "local"])
@pytest.mark.parametrize("level", [0.01, 0.5, 10.0, 300.0])
def test_robust_norm_is_gain_and_pedestal_invariant(level: float, norm: str) -> None:
    photons = _photons(0, level)
    ref, _ = preprocess(torch.from_numpy(photons.astype(np.float32)), norm=norm)
    for gain, pedestal, dtype in [(37.0, 1000.0, np.uint16), (0.1, 5.0, np.float32), (9.5, 0.0, np.float32)]:
        got, _ = preprocess(torch.from_numpy((photons * gain + pedestal).astype(dtype)), norm=norm)
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-3 if dtype is np.float32 else 1e-4)


@pytest.mark.parametrize("norm", ["robust", "local"])
def test_robust_norm_does_not_collapse_on_photon_counting_data(norm: str) -> None:
    """At 0.01 photons/pixel the median and the plain MAD are 0; a single photon must still be a
    finite, modest value and the panel must not blow up."""
    photons = _photons(1, 0.01)
    x, _ = preprocess(torch.from_numpy(photons.astype(np.float32)), norm=norm)
    a = x.numpy()[:, 0]
    assert np.isfinite(a).all()
    one = a[photons.reshape(a.shape) == 1]
    assert 0.3 < one.min() <= one.max() < 1.5
    assert np.allclose(a[photons.reshape(a.shape) == 0], 0.0)


@pytest.mark.parametrize("norm", ["robust", "local"])
def test_a_handful_of_hot_pixels_cannot_swing_the_robust_norm(norm: str) -> None:
    photons = _photons(2, 10.0)
    clean, _ = preprocess(torch.from_numpy(photons.astype(np.float32)), norm=norm)
    hot = photons.copy()
    idx = np.random.default_rng(3).integers(0, 128 * 128, 16)
    hot.reshape(2, -1)[:, idx] = 65535
    dirty, _ = preprocess(torch.from_numpy(hot.astype(np.float32)), norm=norm)
    keep = np.ones((2, 128 * 128), bool)
    keep[:, idx] = False
    diff = (dirty - clean).numpy()[:, 0].reshape(2, -1)[keep]
    # One hot pixel among a block's 64 sampled pixels moves that block's median a little.
    assert np.abs(diff).max() < (0.05 if norm == "robust" else 0.4)
    assert np.abs(diff).mean() < 0.02
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


@pytest.mark.parametrize("norm", ["robust", "local"])
def test_robust_norm_constant_and_nonfinite_panels(norm: str) -> None:
    frames = np.full((1, 2, 64, 64), 42.0, np.float32)
    frames[0, 1, :5] = np.nan
    frames[0, 1, 5:7] = np.inf
    x, _ = preprocess(torch.from_numpy(frames), norm=norm)
    assert torch.isfinite(x).all() and float(x.abs().max()) == 0.0
    with pytest.raises(ConfigError):
        preprocess(torch.from_numpy(frames), norm="median")


# -- local normalisation -----------------------------------------------------------------------
def _ring_panel(seed: int = 1, h: int = 256, w: int = 256, level: float = 300.0) -> tuple[np.ndarray, np.ndarray]:
    """Photons on a steep radial background with a 12-px water ring (mean ``level``), and the
    expected background."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - 40, xx - 60)
    bg = (1 + 8 * 80**2 / (r**2 + 80**2)) + 2 * np.exp(-0.5 * ((r - 150) / 12) ** 2)
    bg = bg * level / bg.mean()
    return np.random.default_rng(seed).poisson(bg).astype(np.float32), bg


def test_local_norm_scales_each_pixel_by_its_own_noise_on_a_structured_background() -> None:
    """On a 300-photon ring background the panel-wide robust scale is set by the background's
    structure, not the noise: the normalised panel barely correlates with the true noise z.
    The local norm recovers it (unit scale, high correlation)."""
    photons, bg = _ring_panel()
    z = ((photons - bg) / np.sqrt(bg)).ravel()
    corr = {}
    for norm in ("robust", "local"):
        x, _ = preprocess(torch.from_numpy(photons[None, None] + 1000), norm=norm)
        a = np.sinh(x[0, 0].numpy()).ravel()
        corr[norm] = np.corrcoef(a, z)[0, 1]
        if norm == "local":
            assert 0.9 < a.std() / z.std() < 1.1
    assert corr["robust"] < 0.3 and corr["local"] > 0.85, corr


def test_local_norm_keeps_a_lone_spot_bright_on_an_empty_panel() -> None:
    """A block holding nothing but one spot must not take its noise scale from the spot (the
    block scale is capped at the panel's)."""
    photons = _photons(5, 0.02, shape=(1, 1, 128, 128))
    photons[0, 0, 60:63, 70:73] += 200.0
    for norm in ("robust", "local"):
        x, _ = preprocess(torch.from_numpy(photons.astype(np.float32)), norm=norm)
        assert float(x[0, 0, 61, 71]) > 4.0, norm  # asinh(100 noise units) ~ 5.3


def test_local_norm_zeroed_region_under_a_pedestal_is_clipped_not_background() -> None:
    photons, _ = _ring_panel(2, level=50.0)
    frame = photons + 1000.0
    frame[100:180, 30:140] = 0.0  # an undeclared dead region
    x, _ = preprocess(torch.from_numpy(frame[None, None]), norm="local")
    a = x[0, 0].numpy()
    assert a[100:180, 30:140].max() < -2.5  # clipped far below, as the robust norm does
    assert np.abs(a[:90]).max() < 5.0  # the data next to it is plain noise, no bright seam
    with pytest.raises(ConfigError, match="per panel"):
        preprocess(torch.from_numpy(frame[None, None]), norm="local", per_event=True)


def test_local_norm_declared_mask_is_excluded_and_zeroed() -> None:
    photons, _ = _ring_panel(3, level=20.0)
    mask = np.zeros(photons.shape, bool)
    mask[:, :70] = True
    frame = photons.copy()
    frame[mask] = 65535.0  # whatever a masked pixel holds, it does not count
    x, _ = preprocess(torch.from_numpy(frame[None, None]), norm="local", mask=torch.from_numpy(mask))
    a = x[0, 0].numpy()
    assert (a[mask] == 0).all()
    v = np.sinh(a[~mask])
    assert abs(np.median(v)) < 0.15 and 0.85 < v.std() < 1.2


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 1, 5000), (2, 2, 17, 33), (1, 1, 40, 3)])
def test_local_norm_odd_shapes_and_hostile_values(shape: tuple[int, ...]) -> None:
    """Panels smaller than a block, single rows, NaN/inf, an all-masked panel: finite output, masked
    and non-finite pixels 0, never an exception."""
    rng = np.random.default_rng(sum(shape))
    frames = rng.poisson(20.0, shape).astype(np.float32)
    flat = frames.reshape(-1)
    flat[rng.integers(0, flat.size, max(1, flat.size // 7))] = np.nan
    flat[rng.integers(0, flat.size, max(1, flat.size // 11))] = np.inf
    mask = np.zeros(shape, bool)
    mask[0, 0] = True  # the first panel entirely masked
    x, (h, w) = preprocess(torch.from_numpy(frames), norm="local", mask=torch.from_numpy(mask))
    a = x.numpy().reshape(shape[0], shape[1], x.shape[-2], x.shape[-1])[:, :, :h, :w]
    assert np.isfinite(a).all()
    assert (a[~np.isfinite(frames) | mask] == 0).all()
