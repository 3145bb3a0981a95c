"""peaknet-pva: real-time Bragg-peak finding with PeakNet on EPICS PVA detector streams.

Library (no PVA): ``PeakFinder`` (frames → peak tables), ``find_peaks`` (masks → peak tables),
``Pipeline``, ``CxiWriter``. PVA processors for ``pvapy-hpc-consumer --processor-class``:
``peaknet_pva.PeakNetImageProcessor`` and ``peaknet_pva.CxiFileProcessor``.
"""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os
import sys as _sys

from .errors import CheckpointError, ConfigError, FrameError, PeakNetPvaError

# The library's heavy names (torch, scipy) load on first use (PEP 562), so ``peaknet-pva --help``
# and other light imports stay fast.
_LAZY = {
    "PanelLayout": ".frames",
    "PeakTable": ".frames",
    "find_peaks": ".peaks",
    "PeakFinder": ".finder",
    "Pipeline": ".pipeline",
    "CxiFileProcessor": ".pva",
    "PeakNetImageProcessor": ".pva",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_cli() -> bool:
    """True in the ``peaknet-pva`` console script (or ``PEAKNET_PVA_LAZY=1``)."""
    if _os.environ.get("PEAKNET_PVA_LAZY") == "1":
        return True
    argv0 = _sys.argv[0] if _sys.argv else ""
    return _os.path.basename(argv0) in ("peaknet-pva", "peaknet-pva.exe")


# pvapy loads processor classes with module.__dict__.get(name): they must be real attributes here,
# not lazy ones (except in our own CLI, which never hands this module to pvapy). Without pvapy
# installed the library still imports.
_PROCESSORS = ["CxiFileProcessor", "PeakNetImageProcessor"]
if not _is_cli():
    try:
        from .pva import CxiFileProcessor, PeakNetImageProcessor
    except ModuleNotFoundError as _exc:  # pragma: no cover - depends on the install
        if _exc.name is None or not (_exc.name.startswith("pva") or _exc.name.startswith("peaknet_pva.pva")):
            raise
        _PROCESSORS = []

__all__ = _PROCESSORS + [
    "CheckpointError",
    "ConfigError",
    "FrameError",
    "PanelLayout",
    "PeakFinder",
    "PeakNetPvaError",
    "PeakTable",
    "Pipeline",
    "find_peaks",
]
