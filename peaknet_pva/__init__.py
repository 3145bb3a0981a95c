"""peaknet-pva: real-time Bragg-peak finding with PeakNet on EPICS PVA detector streams."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import CheckpointError, ConfigError, FrameError, PeakNetPvaError
from .frames import PanelLayout, PeakTable
