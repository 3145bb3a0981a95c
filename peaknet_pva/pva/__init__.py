"""The PVA adapters: the only package that imports ``pvaccess``/``pvapy``.

``PeakNetImageProcessor`` and ``CxiFileProcessor`` are pvapy-hpc processors (DESIGN 1); ``codec``
parses and builds NtNdArrays; ``replay`` streams frames from files; ``procs`` starts and stops
pvapy processes on loopback (tests, demo, benchmarks).
"""

from __future__ import annotations

from .cxi_processor import CxiFileProcessor
from .peaknet_processor import PeakNetImageProcessor

__all__ = ["CxiFileProcessor", "PeakNetImageProcessor"]
