"""Shared fixtures. PVA stays on loopback for every test (users' own settings win)."""

from __future__ import annotations

import os

from peaknet_pva.loopback import apply_loopback_env

apply_loopback_env()
# Two cores in CI: keep torch from oversubscribing them when several processes run.
os.environ.setdefault("OMP_NUM_THREADS", "1")
