"""EPICS PVA/CA on loopback only, unless the user already chose otherwise.

PVA searches and beacons broadcast on every interface by default. Everything this project starts
(tests, demo, benchmarks) applies these defaults first; a variable already set by the user wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

LOOPBACK_ENV: dict[str, str] = {
    "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVA_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CA_ADDR_LIST": "127.0.0.1",
}


def apply_loopback_env(environ: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set the loopback defaults in ``environ`` (default ``os.environ``) where unset; return it."""
    env = os.environ if environ is None else environ
    for key, value in LOOPBACK_ENV.items():
        env.setdefault(key, value)
    return env


def loopback_env(base: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default ``os.environ``) with the loopback defaults, for subprocesses."""
    return dict(apply_loopback_env(dict(os.environ if base is None else base)))
