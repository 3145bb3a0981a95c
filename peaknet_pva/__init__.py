"""peaknet-pva: real-time Bragg-peak finding with PeakNet on EPICS PVA detector streams.

Library (no PVA): ``PeakFinder`` (frames → peak tables), ``find_peaks`` (masks → peak tables),
``Pipeline``, ``CxiWriter``. PVA processors for ``pvapy-hpc-consumer --processor-class``:
``peaknet_pva.PeakNetImageProcessor`` and ``peaknet_pva.CxiFileProcessor``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import CheckpointError, ConfigError, FrameError, PeakNetPvaError
from .frames import PanelLayout, PeakTable
from .peaks import find_peaks
from .finder import PeakFinder
from .pipeline import Pipeline

# pvapy loads processor classes with module.__dict__.get(name): they must be real attributes here,
# not lazy ones. Without pvapy installed the library still imports.
_PROCESSORS = ["CxiFileProcessor", "PeakNetImageProcessor"]
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
