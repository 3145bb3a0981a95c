"""Frames -> PeakNet input: cast, instance norm, bottom-right zero pad, ``(B*P, 1, H', W')`` packing.

Runs wherever the frames live (CPU or CUDA tensors): the GPU pipeline sends raw integer frames over
PCIe and casts/normalises on the device (DESIGN 4), writing into a preallocated buffer it reuses.

Normalisation is ``(x - mean) / sqrt(var + eps)`` with the biased variance, per panel by default or
over all panels of an event (``per_event=True``; the seed's ``InstanceNorm`` on ``(B, P, H, W)``
reduced over ``(P, H, W)``, i.e. per event). Statistics use the valid ``H x W`` pixels only (never
the padding) and, for float frames, only finite pixels; non-finite pixels become 0 afterwards. The
padding is 0, which is the mean after normalisation, and nothing is ever cropped.

torch is imported lazily so ``peaknet_pva`` imports without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigError, FrameError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["padded_shape", "preprocess"]


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
    b, p, h, w = (int(v) for v in frames.shape)
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
    if frames.is_floating_point():
        _normalise_finite_(x, dims, eps)
    else:
        var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
        x.sub_(mean).mul_(torch.rsqrt(var + eps))
    return out, (h, w)


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


def _check_multiple(multiple: int) -> int:
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ConfigError(f"multiple must be a positive int, got {multiple!r}")
    return multiple
