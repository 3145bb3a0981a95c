"""Live monitor web page for the peaknet pipeline (``peaknet-pva monitor``; docs/MONITOR.md).

``state`` (aggregation and pictures, no PVA, no web), ``pva_source`` (pvaccess monitors feeding
the state), ``server`` (Starlette + uvicorn), ``app`` (wires them together). Nothing heavy is
imported here, so ``peaknet-pva --help`` stays fast.
"""

from __future__ import annotations

__all__ = ["MISSING_EXTRA"]

#: What to tell a user who lacks the web dependencies.
MISSING_EXTRA = 'the monitor needs the "monitor" extra: pip install "peaknet-pva[monitor]"'
