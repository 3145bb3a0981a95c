"""Live monitor web page for the peaknet pipeline (``peaknet-pva monitor``; docs/MONITOR.md).

``state`` (aggregation and pictures, no PVA, no web), ``pva_source`` (pvaccess monitors feeding
the state), ``server`` (Starlette + uvicorn), ``app`` (wires them together). Nothing heavy is
imported here, so ``peaknet-pva --help`` stays fast.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MISSING_EXTRA", "read_snapshot"]

#: What to tell a user who lacks the web dependencies.
MISSING_EXTRA = 'the monitor needs the "monitor" extra: pip install "peaknet-pva[monitor]"'


def read_snapshot(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """One ``/api/snapshot`` of a running monitor at ``url`` (its page URL, ending in ``/``)."""
    import urllib.request

    with urllib.request.urlopen(url + "api/snapshot", timeout=timeout_s) as resp:
        return json.loads(resp.read())
