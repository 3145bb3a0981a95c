"""Frames -> PeakNet input: cast, normalise, bottom-right zero pad, ``(B*P, 1, H', W')`` packing.

Runs wherever the frames live (CPU or CUDA tensors): the GPU pipeline sends raw integer frames over
PCIe and casts/normalises on the device (DESIGN 4), writing into a preallocated buffer it reuses.

Normalisation is ``(x - mean) / sqrt(var + eps)`` with the biased variance, per panel by default or
over all panels of an event (``per_event=True``; the seed's ``InstanceNorm`` on ``(B, P, H, W)``
reduced over ``(P, H, W)``, i.e. per event). Statistics use the valid ``H x W`` pixels only (never
the padding) and, for float frames, only finite pixels; non-finite pixels become 0 afterwards. The
padding is 0, which is the mean after normalisation, and nothing is ever cropped.

Two normalisations (``norm``; a checkpoint declares which one its weights expect,
``PeakNetConfig.norm``):

- ``"instance"``: the above mean/std, exactly what published PeakNet checkpoints were trained with.
  A handful of saturated pixels or one very bright spot sets the std, so the scale of the noise
  depends on what else is in the panel.
- ``"robust"``: ``asinh(clamp((x - c) / s, min=-CLIP))`` with ``c`` the median and ``s`` 1.4826 x
  the median of the *nonzero* absolute deviations from ``c`` (a MAD that does not collapse to 0
  on photon-counting data whose median pixel is exactly the pedestal), refined once over the
  pixels within ``REFINE_K * s`` of ``c`` (so masked-to-zero regions and gaps under a pedestal do
  not widen it). Masked and non-finite pixels are excluded and become 0; statistics use a fixed
  strided subset of at most ``STAT_SAMPLES`` pixels per panel. ``asinh`` is linear for noise and
  logarithmic for spots, so the network sees spot *shape* the same at any brightness. The result is
  invariant to gain (ADU/photon, keV, ...) and pedestal, and a few hot pixels cannot move it.
- ``"local"``: the robust norm with ``c`` and ``s`` taken per block and interpolated bilinearly between block centres, so a structured background (radial fall-off,
  water ring, smooth scatter) is subtracted and each pixel is scaled by the noise *where it is*.
  A panel-wide ``s`` on a 300-photon ring background is 3-16x the pixel noise, which makes
  faint spots there look like noise to the network. A block's ``c`` is its median over pixels not
  more than ``REFINE_K`` panel scales *below* the panel's ``c`` (zeroed gaps under a pedestal are
  not background; a bright beam centre is); its ``s`` is the nonzero MAD of the residual after
  ``c`` is subtracted, refined once, never above the panel's robust ``s`` (a block of zeros holding one spot would otherwise take its scale
  from the spot). ``c`` comes from ``LOCAL_BLOCK``² blocks, ``s`` from coarser ``SCALE_BLOCK``²
  ones; a block with under ``LOCAL_MIN_SHARE`` of its sampled pixels valid takes the panel's
  values. Per panel only.

torch is imported lazily so ``peaknet_pva`` imports without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigError, FrameError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["NORMS", "padded_shape", "preprocess", "signal_units"]

NORMS = ("instance", "robust", "local")
#: Robust norm: deviations below ``-CLIP`` scales (masked zeros under a pedestal, dead rows) are cut.
CLIP = 10.0
#: Robust norm: the refinement keeps pixels within this many scales of the first median.
REFINE_K = 5.0
#: Robust norm: at most this many pixels (a fixed stride through each panel) feed the statistics.
STAT_SAMPLES = 65536
_MAD_TO_SIGMA = 1.4826
#: Local norm: side of the square blocks whose median background is interpolated over the panel
#: (small enough to follow a 10-px-wide water ring at a 300-photon level).
LOCAL_BLOCK = 16
#: Local norm: side of the blocks whose noise scale is interpolated (noise varies slowly, and a
#: scale from too few pixels would itself be noisy).
SCALE_BLOCK = 32
#: Local norm: every LOCAL_STEP-th row and column of a block feeds its statistics.
LOCAL_STEP = 2
#: Local norm: a block needs this share of its sampled pixels valid, else it takes the panel's statistics.
LOCAL_MIN_SHARE = 1 / 3


def padded_shape(h: int, w: int, multiple: int = 32) -> tuple[int, int]:
    """Smallest ``(H', W')`` with ``H' >= h``, ``W' >= w``, both multiples of ``multiple``.

    PeakNet needs H, W divisible by 32 (its deepest stage has stride 32). Never smaller than the
    input: ``padded_shape(352, 384) == (352, 384)``, ``padded_shape(100, 33) == (128, 64)``.
    """
    multiple = _check_multiple(multiple)
    h, w = int(h), int(w)
    if h <= 0 or w <= 0:
        raise FrameError(f"panel shape must be positive, got ({h}, {w})")
    return (-(-h // multiple) * multiple, -(-w // multiple) * multiple)


def preprocess(
    frames: Any,
    *,
    per_event: bool = False,
    eps: float = 1e-6,
    multiple: int = 32,
    out: torch.Tensor | None = None,
    norm: str = "instance",
    mask: Any = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Normalise and pad a batch of multi-panel frames for PeakNet.

    Args:
        frames: ``(B, P, H, W)`` tensor of any integer or float dtype on any device (a numpy array
            is accepted and wrapped without a copy). Raw detector values, e.g. ADU.
        per_event: normalise with statistics over all ``P`` panels of an event instead of per panel.
        eps: added to the variance (units of ADU^2), keeps constant panels finite (they become 0).
        multiple: pad H and W up to multiples of this (bottom-right).
        out: optional preallocated float32 ``(B*P, 1, H', W')`` tensor on the frames' device; it is
            fully overwritten (padding included) and returned.
        norm: ``"instance"`` or ``"robust"`` (module docstring).
        mask: optional bad-pixel mask, True = bad, broadcastable to ``(B, P, H, W)`` (e.g.
            ``(P, H, W)``): excluded from the statistics and 0 in the output.

    Returns:
        ``(x, (H, W))``: ``x`` float32 ``(B*P, 1, H', W')`` on the frames' device with
        ``(H', W') = padded_shape(H, W, multiple)``; ``(H, W)`` is the valid extent inside it.

    Example:
        >>> x, (h, w) = preprocess(torch.zeros(2, 4, 352, 380, dtype=torch.uint16))
        >>> x.shape, (h, w)
        (torch.Size([8, 1, 352, 384]), (352, 380))
    """
    import torch

    if not isinstance(frames, torch.Tensor):
        try:
            frames = torch.as_tensor(frames)
        except (TypeError, RuntimeError) as exc:
            raise FrameError(f"frames must be a tensor or array, got {type(frames).__name__}: {exc}") from exc
    if frames.ndim != 4:
        raise FrameError(f"frames must be (B, P, H, W), got shape {tuple(frames.shape)}")
    if frames.numel() == 0:
        raise FrameError(f"empty frames of shape {tuple(frames.shape)}")
    if frames.is_complex():
        raise FrameError(f"complex frames are not supported (dtype {frames.dtype})")
    if not eps >= 0:
        raise ConfigError(f"eps must be >= 0, got {eps!r}")
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {NORMS}, got {norm!r}")
    b, p, h, w = (int(v) for v in frames.shape)
    bad = None
    if mask is not None:
        bad = torch.as_tensor(mask, device=frames.device).to(torch.bool)
        try:
            bad = torch.broadcast_to(bad, (b, p, h, w))
        except RuntimeError as exc:
            raise FrameError(f"mask of shape {tuple(bad.shape)} does not fit frames {(b, p, h, w)}") from exc
    hp, wp = padded_shape(h, w, multiple)

    if out is None:
        out = torch.empty((b * p, 1, hp, wp), dtype=torch.float32, device=frames.device)
    elif (
        tuple(out.shape) != (b * p, 1, hp, wp)
        or out.dtype != torch.float32
        or out.device != frames.device
        or not out.is_contiguous()
    ):
        raise FrameError(
            f"out must be a contiguous float32 tensor of shape {(b * p, 1, hp, wp)} on {frames.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )

    # Zero only the padding strips; the valid region is written below.
    planes = out.view(b, p, hp, wp)
    if hp > h:
        planes[:, :, h:, :].zero_()
    if wp > w:
        planes[:, :, :h, w:].zero_()
    x = planes[:, :, :h, :w]  # strided view of the valid region
    x.copy_(frames)  # cast to float32 where the frames live

    dims = (1, 2, 3) if per_event else (2, 3)
    if norm == "robust":
        _normalise_robust_(x, bad, per_event)
    elif norm == "local":
        if per_event:
            raise ConfigError("norm='local' is per panel; per_event=True is not supported with it")
        _normalise_local_(x, bad)
    elif bad is not None:
        x.masked_fill_(bad, float("nan"))
        _normalise_finite_(x, dims, eps)
    elif frames.is_floating_point():
        _normalise_finite_(x, dims, eps)
    else:
        var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
        x.sub_(mean).mul_(torch.rsqrt(var + eps))
    return out, (h, w)


def signal_units(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Normalised input -> signal above the (local) background in noise units: ``sinh`` undoes
    the robust and local norms' ``asinh``; the instance norm is already linear. A new tensor."""
    import torch

    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {NORMS}, got {norm!r}")
    return torch.sinh(x) if norm in ("robust", "local") else x.clone()


def _normalise_finite_(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> None:
    """In-place instance norm of float ``x`` with statistics over finite pixels; non-finite -> 0.

    Works without a host sync (no data-dependent branching), so it stays cheap on the GPU.
    """
    import torch

    bad = ~torch.isfinite(x)
    x.masked_fill_(bad, 0.0)
    n_bad = bad.sum(dim=dims, keepdim=True, dtype=torch.float32)
    n_all = 1.0
    for d in dims:
        n_all *= x.shape[d]
    n_good = (n_all - n_bad).clamp_(min=1.0)
    mean = x.sum(dim=dims, keepdim=True) / n_good
    # Two-pass variance; each bad pixel (now 0) adds mean^2 to the sum of squares: take it back out.
    sq = (x - mean).square_().sum(dim=dims, keepdim=True)
    var = ((sq - n_bad * mean.square()) / n_good).clamp_(min=0.0)
    x.sub_(mean).mul_(torch.rsqrt(var + eps))
    x.masked_fill_(bad, 0.0)


def _nonzero_mad(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """1.4826 x median of the nonzero |x - c| over non-NaN entries, per row; 1 where none."""
    import torch

    d = (x - c).abs_()
    d.masked_fill_(d == 0, float("nan"))
    s = torch.nanmedian(d, dim=1, keepdim=True).values.mul_(_MAD_TO_SIGMA)
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


def _robust_stats(sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(c, s)`` of a NaN-marked ``(rows, n)`` sample: median / nonzero MAD, refined once."""
    import torch

    c = torch.nanmedian(sample, dim=1, keepdim=True).values
    c = torch.nan_to_num(c, nan=0.0)
    s = _nonzero_mad(sample, c)
    # One refinement over the core: far outliers (zeroed gaps under a pedestal, bright rings) out.
    core = sample.masked_fill((sample - c).abs() > REFINE_K * s, float("nan"))
    c2 = torch.nanmedian(core, dim=1, keepdim=True).values
    c = torch.where(torch.isfinite(c2), c2, c)
    return c, _nonzero_mad(core, c)


def _normalise_robust_(x: torch.Tensor, bad: torch.Tensor | None, per_event: bool) -> None:
    """In place: ``asinh(clamp((x - c) / s, min=-CLIP))`` with robust per-panel ``c``, ``s``.

    No host sync: NaN marks excluded pixels and ``nanmedian`` skips them (a row with nothing valid
    gets c = 0, s = 1).
    """
    import torch

    b, p, h, w = x.shape
    excl = ~torch.isfinite(x)
    if bad is not None:
        excl |= bad
    rows = b if per_event else b * p
    stride = max(1, -(-(x[0].numel() if per_event else h * w) // STAT_SAMPLES))
    # A strided sample (in the frames' memory order) is plenty for a median of a quarter million pixels.
    sample = x.masked_fill(excl, float("nan")).reshape(rows, -1)[:, ::stride]
    c, s = _robust_stats(sample)
    shape = (b, 1, 1, 1) if per_event else (b, p, 1, 1)
    x.sub_(c.view(shape)).div_(s.view(shape)).clamp_(min=-CLIP).asinh_()
    x.masked_fill_(excl, 0.0)


def _blocks(v: torch.Tensor, bs: int) -> torch.Tensor:
    """``(n, h, w)`` NaN-marked samples -> ``(n * hb * wb, bs * bs)``: square blocks of side ``bs``
    (NaN-padded at the bottom-right)."""
    import torch.nn.functional as F

    n, h, w = v.shape
    hb, wb = -(-h // bs), -(-w // bs)
    v = F.pad(v, (0, wb * bs - w, 0, hb * bs - h), value=float("nan"))
    return v.view(n, hb, bs, wb, bs).permute(0, 1, 3, 2, 4).reshape(n * hb * wb, bs * bs)


def _block_map(stat: torch.Tensor, n: int, bs: int, h: int, w: int) -> torch.Tensor:
    """Per-block values ``(n * hb * wb, 1)`` -> ``(n, h, w)``, bilinear between block centres."""
    import torch.nn.functional as F

    hb, wb = -(-h // bs), -(-w // bs)
    full = F.interpolate(stat.view(n, 1, hb, wb), size=(hb * bs, wb * bs), mode="bilinear", align_corners=False)
    return full[:, 0, :h, :w]


def _block_stat(vs: torch.Tensor, bs: int, panel: torch.Tensor, stat) -> tuple[torch.Tensor, torch.Tensor]:
    """``stat`` of each ``bs``-block of the panels, from their samples ``vs`` (every ``LOCAL_STEP``-th
    row and column, NaN-marked; ``(rows, k)`` -> ``(rows, 1)``); the panel's value where a block
    has too few valid samples or no answer. Returns it and the panel's value per block."""
    import torch

    n = vs.shape[0]
    blocks = _blocks(vs, bs // LOCAL_STEP)
    k = blocks.shape[1]
    fallback = panel.repeat_interleave(blocks.shape[0] // n, dim=0)
    few = (~blocks.isnan()).sum(dim=1, keepdim=True) < max(1, int(LOCAL_MIN_SHARE * k))
    got = stat(blocks)
    return torch.where(few | ~torch.isfinite(got), fallback, got), fallback


def _normalise_local_(x: torch.Tensor, bad: torch.Tensor | None) -> None:
    """In place: ``asinh(clamp((x - c(y, x)) / s(y, x), min=-CLIP))`` with block-wise robust
    ``c``, ``s`` (module docstring). No host sync, like the robust norm. Statistics come from the
    every-``LOCAL_STEP``-th-row-and-column samples; only the result is computed at full size."""
    import torch

    b, p, h, w = x.shape
    n = b * p
    excl = ~torch.isfinite(x)
    if bad is not None:
        excl |= bad
    x3, excl3 = x.reshape(n, h, w), excl.reshape(n, h, w)  # views (b and p merge): x is written below
    stride = max(1, -(-(h * w) // STAT_SAMPLES))
    flat = x3.reshape(n, -1)[:, ::stride]
    cg, sg = _robust_stats(flat.masked_fill(excl3.reshape(n, -1)[:, ::stride], float("nan")))  # the panel's (n, 1)
    st = LOCAL_STEP
    vs = x3[:, ::st, ::st].masked_fill(excl3[:, ::st, ::st], float("nan"))
    # Far *below* the panel (zeroed gaps and dead areas under a pedestal) is not background; far
    # above can be (the beam centre, a ring), so only the low side is left out of the statistics.
    vs = vs.masked_fill(vs < (cg - REFINE_K * sg).view(n, 1, 1), float("nan"))
    cb, _ = _block_stat(vs, LOCAL_BLOCK, cg, lambda t: torch.nanmedian(t, dim=1, keepdim=True).values)
    c = _block_map(cb, n, LOCAL_BLOCK, h, w)

    def scale(t: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros_like(t[:, :1])
        s1 = _nonzero_mad(t, zero)
        s2 = _nonzero_mad(t.masked_fill(t.abs() > REFINE_K * s1, float("nan")), zero)
        # _nonzero_mad answers 1 where nothing deviates: no answer (the panel's scale is taken).
        moved = ((t != 0) & ~t.isnan()).any(dim=1, keepdim=True)
        return torch.where(moved, s2, torch.full_like(s2, float("nan")))

    sb, panel_s = _block_stat(vs - c[:, ::st, ::st], SCALE_BLOCK, sg, scale)
    s = _block_map(torch.minimum(sb, panel_s), n, SCALE_BLOCK, h, w)
    x3.sub_(c).div_(s).clamp_(min=-CLIP).asinh_()
    x3.masked_fill_(excl3, 0.0)


def _check_multiple(multiple: int) -> int:
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ConfigError(f"multiple must be a positive int, got {multiple!r}")
    return multiple
