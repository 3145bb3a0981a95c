"""Load and save PeakNet weights: every published layout in, one strict check, no silent randoms.

Accepted inputs to :func:`load_checkpoint`:

* a plain state-dict file (``peaknet-673m.bin``, ``*.pt``);
* a dict wrapping it under ``model_state_dict`` (PeakNet training, and :func:`save_checkpoint`),
  ``state_dict`` or ``model``, optionally with an embedded ``config`` (``PeakNetConfig.to_dict()``);
* a training checkpoint directory holding ``model_state_dict.pt`` (PeakNet's ``Checkpoint.save``).

Keys wrapped by DDP (``module.``) or ``torch.compile`` (``_orig_mod.``) are unwrapped. Files are
read with ``torch.load(weights_only=True)``: no pickled code runs. The architecture comes from, in
order, the ``model`` argument, the ``config`` argument, the embedded config, or
:func:`infer_config` on the tensor shapes. The state dict must then match exactly
(``strict=True``); the only tolerated gap is the BiFPN ``w_q_mask`` buffer, a constant that
older checkpoints do not store (filled with upstream's default). A stored mask may be bool
(upstream) or 0/1 floats (older files of this project); anything else is refused.

Heads from older upstream commits (see docs/CHECKPOINTS.md) are recognised and refused with an
error naming the layout and its commit range: their forward differs from today's head, and no
exact mapping exists, so loading them "mostly" would give silently different peaks.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from .peaknet import PeakNet, PeakNetConfig

__all__ = [
    "MODEL_STATE_DICT_FILE",
    "clean_state_dict",
    "infer_config",
    "legacy_head_layout",
    "load_checkpoint",
    "load_state_dict_file",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

#: File name of the model weights inside a PeakNet training checkpoint directory.
MODEL_STATE_DICT_FILE = "model_state_dict.pt"
#: Wrapper keys under which trainers store the model's state dict, tried in order.
_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
#: Prefixes added by DDP/DataParallel and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")
#: Buffers that may be absent from a checkpoint; filled from the freshly built model.
_OPTIONAL_SUFFIXES = (".w_q_mask",)
#: At most this many keys are spelled out per category in error messages.
_MAX_LISTED = 25
#: Why each superseded head layout cannot be mapped onto the current one.
_LEGACY_HEADS = {
    "bare": (
        "bare 'head_upsample_layer.{weight,bias}' ConvTranspose2d (num_classes -> num_classes) "
        "that replaces the bilinear x4 upsample, from upstream carbonscott/peaknet before commit "
        "03513c0"
    ),
    "final_conv": (
        "ConvTranspose2d + GroupNorm + GELU learned upsample and/or 'final_conv' 3x3 refinement, "
        "from upstream carbonscott/peaknet commits 03513c0..addd7f6"
    ),
    "logits_convt": (
        "'head_upsample_layer.0' ConvTranspose2d on the logits (num_classes -> num_classes), "
        "written by peaknet-pva before its head followed upstream (no upstream commit has it)"
    ),
}


def clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Strip leading ``module.`` / ``_orig_mod.`` (in any nesting) from every key."""
    cleaned: dict[str, Any] = {}
    for key, value in state_dict.items():
        k = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if k.startswith(prefix):
                    k, changed = k[len(prefix) :], True
        if k in cleaned:
            raise CheckpointError(
                f"state dict has key {key!r} twice after prefix stripping ({k!r})"
            )
        cleaned[k] = value
    return cleaned


def _resolve_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        candidate = p / MODEL_STATE_DICT_FILE
        if not candidate.is_file():
            raise CheckpointError(
                f"checkpoint directory {str(p)!r} has no {MODEL_STATE_DICT_FILE!r}"
            )
        return candidate
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {str(p)!r}")
    return p


def load_state_dict_file(
    path: str | os.PathLike[str], *, map_location: Any = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read a checkpoint file/directory → (clean state dict, embedded config dict or None)."""
    file = _resolve_path(path)
    try:
        obj = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, ...)
        raise CheckpointError(f"cannot read checkpoint {str(file)!r}: {exc}") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {str(file)!r} holds a {type(obj).__name__}, not a state dict"
        )
    embedded = obj.get("config") if isinstance(obj.get("config"), Mapping) else None
    state = obj
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            state = inner
            break
    non_tensor = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise CheckpointError(
            f"checkpoint {str(file)!r} is not a state dict: non-tensor entries "
            f"{_fmt_keys(non_tensor)} (expected a plain state dict or one under "
            f"{list(_WRAPPER_KEYS)})"
        )
    if not state:
        raise CheckpointError(f"checkpoint {str(file)!r} holds an empty state dict")
    return clean_state_dict(state), dict(embedded) if embedded is not None else None


def _count_indices(keys: list[str], pattern: str) -> int:
    """Number of distinct integers captured by ``pattern`` over ``keys``."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    if found and found != set(range(len(found))):
        raise CheckpointError(f"non-contiguous indices {sorted(found)} for {pattern!r}")
    return len(found)


def legacy_head_layout(state_dict: Mapping[str, Any]) -> str | None:
    """Name of the superseded head layout ``state_dict`` has (a key of ``_LEGACY_HEADS``), or None.

    Only the head changed between these upstream layouts, so keys and shapes identify them:
    today's learned upsample is ``head_upsample_layer.0.weight`` of shape (seg, classes, 6, 6).
    """
    keys = set(state_dict)
    if keys & {"head_upsample_layer.weight", "head_upsample_layer.bias"}:
        return "bare"
    if any(k.startswith(("final_conv.", "head_upsample_layer.1.")) for k in keys):
        return "final_conv"
    convt = state_dict.get("head_upsample_layer.0.weight")
    head = state_dict.get("head_segmask.weight")
    if isinstance(convt, torch.Tensor) and isinstance(head, torch.Tensor) and convt.ndim == 4:
        num_classes, seg_out = int(head.shape[0]), int(head.shape[1])
        if convt.shape[0] == num_classes != seg_out:
            return "logits_convt"
    return None


def _refuse_legacy_head(state_dict: Mapping[str, Any], source: str) -> None:
    layout = legacy_head_layout(state_dict)
    if layout is None:
        return
    found = sorted(k for k in state_dict if k.startswith(("head_upsample_layer", "final_conv")))
    raise CheckpointError(
        f"checkpoint {source} has a superseded PeakNet head layout: {_LEGACY_HEADS[layout]} "
        f"(keys {_fmt_keys(found)}). Its forward differs from the current head (bilinear x4 of "
        "the logits + ConvTranspose2d(seg_out_channels -> num_classes) on the seg features) and "
        "has no exact mapping onto it; load it with the upstream code of that commit range, or "
        "retrain/fine-tune the head. See docs/CHECKPOINTS.md."
    )


def _check_masks(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Stored ``w_q_mask`` buffers must be bool or hold only 0/1 (they are loaded as bool)."""
    for key, value in state.items():
        if not key.endswith(_OPTIONAL_SUFFIXES) or value.dtype == torch.bool or value.is_meta:
            continue
        if not value.is_complex():
            v = value.detach().to("cpu", torch.float64)
            if bool(((v == 0) | (v == 1)).all()):
                continue
        raise CheckpointError(
            f"checkpoint {source}: {key} must be a bool (or 0/1) mask, got {value.dtype} "
            f"{value.tolist()}"
        )


def infer_config(state_dict: Mapping[str, Any]) -> PeakNetConfig:
    """Infer the PeakNet architecture from tensor shapes and key counts of a state dict.

    Reads the stage dims from ``backbone.hidden_states_norms``, the depths from the number of
    ``layers.{j}`` per stage, the BiFPN size from ``bifpn.blocks`` and its pointwise convs, the seg
    head from ``head_segmask``, and the learned upsample from ``head_upsample_layer.0``.
    GroupNorm's group count is not stored in a state dict: the default (32) is assumed, or the
    largest divisor of the seg channels below it. A superseded head layout raises
    ``CheckpointError`` naming it.
    """
    sd = clean_state_dict(state_dict)
    _refuse_legacy_head(sd, "state dict")
    keys = list(sd)

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise CheckpointError(
                f"cannot infer the PeakNet architecture: key {key!r} is missing "
                "(not a PeakNet state dict?)"
            )
        return tuple(sd[key].shape)

    stem = shape("backbone.embeddings.patch_embeddings.weight")  # (d0, in_chans, 4, 4)
    dims = tuple(shape(f"backbone.hidden_states_norms.stage{k}.weight")[0] for k in range(1, 5))
    depths = tuple(
        _count_indices(keys, rf"backbone\.encoder\.stages\.{i}\.layers\.(\d+)\.") for i in range(4)
    )
    num_blocks = _count_indices(keys, r"bifpn\.blocks\.(\d+)\.")
    features = shape("backbone_to_bifpn.0.weight")[0]
    head = shape("head_segmask.weight")  # (num_classes, seg_out_channels, 1, 1)
    seg_out = head[1]
    groups = next(g for g in range(min(32, seg_out), 0, -1) if seg_out % g == 0)
    try:
        return PeakNetConfig(
            backbone_dims=dims,
            backbone_depths=depths,
            in_chans=stem[1],
            bifpn_num_blocks=num_blocks,
            bifpn_num_features=features,
            seg_out_channels=seg_out,
            seg_num_groups=groups,
            num_classes=head[0],
            uses_learned_upsample="head_upsample_layer.0.weight" in sd,
        )
    except ConfigError as exc:
        raise CheckpointError(f"cannot infer the PeakNet architecture: {exc}") from exc


def _fmt_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def _check_compatible(
    model: PeakNet, state_dict: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Fill optional buffers, then raise CheckpointError on any key or shape mismatch."""
    expected = model.state_dict()
    state = dict(state_dict)
    filled = []
    for key, value in expected.items():
        if key not in state and key.endswith(_OPTIONAL_SUFFIXES):
            state[key] = value.detach().clone()
            filled.append(key)
    if filled:
        logger.info(
            "checkpoint %s: %d w_q_mask buffer(s) not stored, filled from the model "
            "(upstream default: top node's p_low masked) (%s, ...)",
            source,
            len(filled),
            filled[0],
        )
    _check_masks(state, source)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = [f"checkpoint {source} does not match the PeakNet model"]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_fmt_keys(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_fmt_keys(mismatched)}")
        raise CheckpointError("; ".join(parts))
    return state


def load_checkpoint(
    path: str | os.PathLike[str],
    model: PeakNet | None = None,
    *,
    config: PeakNetConfig | None = None,
    map_location: Any = "cpu",
) -> PeakNet:
    """Load PeakNet weights from ``path`` into ``model`` (or a model built for them).

    Args:
        path: state-dict file, wrapped checkpoint file, or training directory (see module doc).
        model: load into this model; its architecture must match exactly.
        config: build this architecture when ``model`` is None (else use the embedded config,
            or infer one from the tensor shapes).
        map_location: passed to ``torch.load``; a model built here is moved there too.

    Returns:
        The model with every parameter and buffer taken from the checkpoint (``w_q_mask`` aside).

    Raises:
        CheckpointError: missing/unreadable path (named), not a state dict, a superseded head
            layout (named, with its upstream commit range), a ``w_q_mask`` that is not 0/1, or
            missing / unexpected / mis-shaped keys (listed).
    """
    state, embedded = load_state_dict_file(path, map_location=map_location)
    source = repr(str(path))
    _refuse_legacy_head(state, source)
    built_here = model is None
    if model is None:
        if config is None and embedded is not None:
            try:
                config = PeakNetConfig.from_dict(embedded)
            except ConfigError as exc:
                raise CheckpointError(f"checkpoint {source} has an invalid config: {exc}") from exc
        if config is None:
            config = infer_config(state)
            logger.info("checkpoint %s: inferred architecture %s", source, config)
        model = PeakNet(config)
    model = _unwrap_model(model)
    if not isinstance(model, PeakNet):
        raise CheckpointError(
            f"load_checkpoint: model must be a PeakNet, got {type(model).__name__}"
        )
    state = _check_compatible(model, state, source)
    model.load_state_dict(state, strict=True)
    norm = embedded.get("norm") if isinstance(embedded, dict) else None
    if norm is not None and norm != model.config.norm:
        # The input normalisation is part of what the weights mean: the file's own wins.
        try:
            model.config = model.config.replace(norm=norm)
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint {source} has an invalid norm: {exc}") from exc
        logger.info("checkpoint %s: input normalisation %r (from the file)", source, norm)
    if built_here and isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    n = sum(t.numel() for t in state.values())
    logger.info(
        "loaded PeakNet weights from %s (%d tensors, %.2f M values)", source, len(state), n / 1e6
    )
    return model


def _unwrap_model(model: Any) -> Any:
    """The PeakNet inside ``torch.compile`` (``_orig_mod``) and DDP/DataParallel (``module``)."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model


def save_checkpoint(path: str | os.PathLike[str], model: PeakNet) -> Path:
    """Write ``{"model_state_dict": ..., "config": model.config.to_dict()}`` atomically.

    The file loads back with :func:`load_checkpoint` without naming the architecture.
    """
    model = _unwrap_model(model)
    if not isinstance(model, PeakNet):
        raise CheckpointError(
            f"save_checkpoint: model must be a PeakNet, got {type(model).__name__}"
        )
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in clean_state_dict(model.state_dict()).items()}
    payload = {"model_state_dict": state, "config": model.config.to_dict()}
    tmp = p.with_name(p.name + ".tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, p)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {str(p)!r}: {exc}") from exc
    logger.info("saved PeakNet checkpoint %s", p)
    return p
