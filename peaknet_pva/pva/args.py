"""Processor arguments: pvapy's own keys, value checks, and one parser for every params class.

Each processor parses its ``configDict`` once into a frozen dataclass (``from_config``); a bad
key or value is a ConfigError that names it, at start-up.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import numpy as np

from ..errors import ConfigError

#: Keys pvapy adds to every processor's configDict (systemController.createDataProcessorConfig)
#: or sends to ``configure`` for itself (dataConsumer / dataProcessingController).
PVAPY_KEYS = frozenset(
    {
        "processorId",
        "inputChannel",
        "inputMode",
        "inputArgs",
        "outputChannel",
        "outputMode",
        "outputArgs",
        "objectIdField",
        "skipInitialUpdates",
        "objectIdOffset",
        "nSequentialUpdates",
        "fieldRequest",
        "receiverQueueSize",
    }
)

T = TypeVar("T")


def parse_processor_args(cls: type[T], config: dict[str, Any] | None, what: str) -> T:
    """Build ``cls`` (a params dataclass) from a pvapy configDict: pvapy's own keys are ignored,
    unknown keys rejected with the list of known ones."""
    config = dict(config or {})
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    ours = {k: v for k, v in config.items() if k not in PVAPY_KEYS}
    unknown = sorted(set(ours) - names)
    if unknown:
        raise ConfigError(f"unknown {what} argument(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**ours)


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ConfigError(f"{key} must be true or false, got {value!r}")


#: Every integer argument fits a 32-bit signed int: what pvapy's status types (UINT/INT) and C
#: callers hold. A control-channel put of 2**32 is refused, not a crash at the next status report.
INT_MAX = 2**31 - 1
#: Floats stay below what ``threading`` timeouts accept (``threading.TIMEOUT_MAX`` is ~9.2e9 s).
FLOAT_MAX = 1.0e9


def _as_int(key: str, value: Any, minimum: int | None = None, maximum: int = INT_MAX) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    try:
        out = int(value)
        if isinstance(value, float) and out != value:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {out}")
    if out > maximum:
        raise ConfigError(f"{key} must be <= {maximum}, got {out}")
    return out


def _as_float(key: str, value: Any, minimum: float | None = None, maximum: float = FLOAT_MAX) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if not np.isfinite(out) or (minimum is not None and out < minimum):
        raise ConfigError(f"{key} must be a finite number >= {minimum}, got {value!r}")
    if out > maximum:
        raise ConfigError(f"{key} must be <= {maximum:g}, got {value!r}")
    return out


def _as_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _as_panel_shape(key: str, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, str) or not hasattr(value, "__len__") or len(value) != 2:
        raise ConfigError(f"{key} must be [H, W] or null, got {value!r}")
    h, w = (_as_int(key, v, 1) for v in value)
    return (h, w)
