"""Read PeakNet architectures from the YAML/dict schemas PeakNet users already have.

Two published schemas are accepted (both checked key by key; an unknown key or a value this
implementation cannot build raises ``ConfigError`` naming the dotted key):

1. **Nested** (carbonscott/peaknet training YAML, ``peaknet-673m.yaml``)::

       model:
         backbone: {hf_config: {num_channels, hidden_sizes, depths, drop_path_rate, ...}}
         bifpn:    {num_blocks, block: {num_features, base_level: 4, fusion: {eps}, ...}}
         seg_head: {num_classes, num_groups, out_channels, uses_learned_upsample,
                    up_scale_factor: [4, 8, 16, 32], base_scale_factor: 2}

2. **Flat** (peaknet-pipeline-ray ``model.peaknet_config.model``)::

       backbone_hidden_sizes, backbone_depths, bifpn_num_blocks, bifpn_num_features,
       seg_out_channels, uses_learned_upsample, num_classes, num_channels, image_size, from_scratch

``PeakNetConfig.to_dict()`` output (e.g. the JSON saved next to weights) is accepted as a flat
mapping too. Whole training/pipeline files may be passed: only the model section is read.
Missing keys take the defaults of the schema's own library (nested: peaknet's dataclasses, e.g.
1 BiFPN block; flat: peaknet-pipeline-ray's ``SimplePeakNetConfig``, e.g. 2 BiFPN blocks).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .peaknet import PeakNetConfig

__all__ = ["config_from_mapping", "config_from_yaml"]

logger = logging.getLogger(__name__)

_MISSING = object()

#: Flat (peaknet-pipeline-ray) key -> PeakNetConfig field.
_FLAT_KEYS = {
    "backbone_hidden_sizes": "backbone_dims",
    "backbone_depths": "backbone_depths",
    "num_channels": "in_chans",
    "num_classes": "num_classes",
    "bifpn_num_blocks": "bifpn_num_blocks",
    "bifpn_num_features": "bifpn_num_features",
    "seg_out_channels": "seg_out_channels",
    "uses_learned_upsample": "uses_learned_upsample",
}
#: Flat keys that do not change the architecture.
_FLAT_IGNORED = frozenset({"image_size", "from_scratch"})
#: Nested sections whose presence selects the nested schema.
_NESTED_SECTIONS = frozenset({"backbone", "bifpn", "seg_head"})


def config_from_yaml(path: str | os.PathLike[str]) -> PeakNetConfig:
    """Read a YAML file (either schema, or a whole training/pipeline config) into a config."""
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read PeakNet config {str(p)!r}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"PeakNet config {str(p)!r} is not valid YAML: {exc}") from exc
    try:
        return config_from_mapping(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc


def config_from_mapping(data: Mapping[str, Any]) -> PeakNetConfig:
    """Build a config from a parsed mapping in either schema (see the module docstring)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"PeakNet config: expected a mapping, got {type(data).__name__}")
    section, prefix = _model_section(data)
    if _NESTED_SECTIONS & set(section):
        fields = _read_nested(section, prefix)
    else:
        fields = _read_flat(section, prefix)
    return _build(fields)


# -- locating the model section -----------------------------------------------------------------
def _model_section(data: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """Descend ``model`` / ``peaknet_config`` / ``model`` wrappers to the architecture keys."""
    section, prefix = data, ""
    if isinstance(section.get("model"), Mapping):
        section, prefix = section["model"], "model."
    if "peaknet_config" in section:  # peaknet-pipeline-ray: model.peaknet_config.model.*
        inner = section["peaknet_config"]
        if not isinstance(inner, Mapping):
            raise ConfigError(
                f"{prefix}peaknet_config: expected a mapping with the model architecture, "
                f"got {inner!r}"
            )
        section, prefix = inner, f"{prefix}peaknet_config."
        if isinstance(section.get("model"), Mapping):
            section, prefix = section["model"], f"{prefix}model."
    return section, prefix


# -- value checks --------------------------------------------------------------------------------
def _sub(section: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = section.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}{key}: expected a mapping, got {value!r}")
    return value


def _check_keys(section: Mapping[str, Any], path: str, known: set[str]) -> None:
    for key in section:
        if key not in known:
            raise ConfigError(f"{path}{key}: unknown key (known here: {sorted(known)})")


def _fixed(section: Mapping[str, Any], key: str, path: str, allowed: list[Any]) -> None:
    """Keys whose only buildable value is PeakNet's; anything else is refused, not ignored."""
    value = section.get(key, _MISSING)
    if value is _MISSING:
        return
    norm = list(value) if isinstance(value, (list, tuple)) else value
    if norm not in allowed:
        raise ConfigError(
            f"{path}{key}: only {' or '.join(repr(a) for a in allowed)} is supported, "
            f"got {value!r}"
        )


def _take(
    out: dict[str, tuple[Any, str]],
    section: Mapping[str, Any],
    key: str,
    path: str,
    field: str,
    convert: Callable[[Any], Any] | None = None,
) -> None:
    if key in section:
        value = section[key]
        out[field] = (convert(value) if convert else value, f"{path}{key}")


def _build(fields: dict[str, tuple[Any, str]]) -> PeakNetConfig:
    """Construct the config; a validation error is re-raised under the source key's name."""
    kwargs = {name: value for name, (value, _) in fields.items()}
    try:
        return PeakNetConfig(**kwargs)
    except ConfigError as exc:
        msg = str(exc)
        for name, (_, source) in fields.items():
            if msg.startswith(f"PeakNetConfig.{name}:"):
                raise ConfigError(f"{source}: {msg.split(':', 1)[1].strip()}") from exc
        raise


# -- the two schemas ----------------------------------------------------------------------------
def _read_flat(section: Mapping[str, Any], path: str) -> dict[str, tuple[Any, str]]:
    native = set(PeakNetConfig.field_names())
    fields: dict[str, tuple[Any, str]] = {}
    for key, value in section.items():
        if key in _FLAT_IGNORED:
            continue
        field = _FLAT_KEYS.get(key, key if key in native else None)
        if field is None:
            known = sorted(set(_FLAT_KEYS) | native | _FLAT_IGNORED)
            raise ConfigError(f"{path}{key}: unknown key (known here: {known})")
        if field in fields:
            raise ConfigError(f"{path}{key}: given twice (also as {fields[field][1]})")
        fields[field] = (value, f"{path}{key}")
    return fields


def _read_nested(model: Mapping[str, Any], path: str) -> dict[str, tuple[Any, str]]:
    _check_keys(
        model,
        path,
        {
            "backbone", "bifpn", "seg_head",
            "freezes_backbone", "uses_random_weights", "from_scratch",  # training-only flags
        },
    )  # fmt: skip
    fields: dict[str, tuple[Any, str]] = {
        # peaknet's defaults where the YAML is silent (PeakNetConfig's backbone is 1-channel tiny).
        "bifpn_num_blocks": (1, f"{path}bifpn.num_blocks"),
    }

    backbone = _sub(model, "backbone", path)
    bpath = f"{path}backbone."
    _check_keys(backbone, bpath, {"hf_config", "from_scratch"})
    hf = _sub(backbone, "hf_config", bpath)
    hpath = f"{bpath}hf_config."
    _check_keys(
        hf,
        hpath,
        {
            "num_channels", "patch_size", "num_stages", "hidden_sizes", "depths", "hidden_act",
            "initializer_range", "layer_norm_eps", "drop_path_rate", "image_size",
            "out_features", "out_indices",
        },
    )  # fmt: skip
    _take(fields, hf, "num_channels", hpath, "in_chans")
    _take(fields, hf, "hidden_sizes", hpath, "backbone_dims")
    _take(fields, hf, "depths", hpath, "backbone_depths")
    _take(fields, hf, "drop_path_rate", hpath, "drop_path_rate")
    _fixed(hf, "patch_size", hpath, [4])
    _fixed(hf, "num_stages", hpath, [4])
    _fixed(hf, "hidden_act", hpath, ["gelu"])
    _fixed(hf, "out_features", hpath, [None, ["stage1", "stage2", "stage3", "stage4"]])
    _fixed(hf, "out_indices", hpath, [None, [1, 2, 3, 4]])

    bifpn = _sub(model, "bifpn", path)
    fpath = f"{path}bifpn."
    _check_keys(bifpn, fpath, {"num_blocks", "block"})
    _take(fields, bifpn, "num_blocks", fpath, "bifpn_num_blocks")
    block = _sub(bifpn, "block", fpath)
    kpath = f"{fpath}block."
    _check_keys(
        block,
        kpath,
        {
            "base_level", "num_levels", "num_features", "up_scale_factor", "down_scale_factor",
            "relu_inplace", "bn", "fusion",
        },
    )  # fmt: skip
    _take(fields, block, "num_features", kpath, "bifpn_num_features")
    _fixed(block, "base_level", kpath, [4])
    _fixed(block, "num_levels", kpath, [4])
    _fixed(block, "up_scale_factor", kpath, [2])
    _fixed(block, "down_scale_factor", kpath, [0.5])
    _check_keys(_sub(block, "bn", kpath), f"{kpath}bn.", {"eps", "momentum"})  # BN is legacy
    fusion = _sub(block, "fusion", kpath)
    _check_keys(fusion, f"{kpath}fusion.", {"eps"})
    _take(fields, fusion, "eps", f"{kpath}fusion.", "bifpn_fusion_eps")

    seg = _sub(model, "seg_head", path)
    spath = f"{path}seg_head."
    _check_keys(
        seg,
        spath,
        {
            "up_scale_factor", "num_groups", "out_channels", "num_classes", "base_scale_factor",
            "uses_learned_upsample",
        },
    )  # fmt: skip
    _take(fields, seg, "num_classes", spath, "num_classes")
    _take(fields, seg, "num_groups", spath, "seg_num_groups")
    _take(fields, seg, "out_channels", spath, "seg_out_channels")
    _take(fields, seg, "uses_learned_upsample", spath, "uses_learned_upsample")
    _fixed(seg, "up_scale_factor", spath, [[4, 8, 16, 32]])
    _fixed(seg, "base_scale_factor", spath, [2])
    return fields
