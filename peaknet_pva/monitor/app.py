"""``peaknet-pva monitor``: PVA monitors + aggregation + web server in one process, bounded.

The web server runs on the main thread (uvicorn handles SIGINT/SIGTERM and shuts down in about two
seconds); pvaccess delivers updates on its own threads; one sampler thread fetches images.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import MISSING_EXTRA

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MonitorOptions:
    """Everything ``run_monitor`` needs (the CLI's arguments, parsed)."""

    output_channels: Sequence[str]
    status_channels: Sequence[str] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    geometry: str | Path | None = None
    window_s: float = 300.0
    min_peaks: int = 10
    image_hz: float = 2.0
    push_hz: float = 4.0
    image_max_px: int = 512
    runtime_s: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)


def check_dependencies() -> None:
    """Raise ModuleNotFoundError naming the extra when starlette/uvicorn/websockets are missing."""
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn", "websockets", "PIL") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"{MISSING_EXTRA} (missing: {', '.join(missing)})")


def run_monitor(opts: MonitorOptions, *, announce: Callable[[str], None] | None = None) -> int:
    """Serve the monitor until SIGINT/SIGTERM or ``opts.runtime_s`` (> 0) seconds; returns 0.

    ``announce`` gets the page URL once the socket is bound (before anything connects).
    """
    check_dependencies()
    from ..geometry import read_geometry
    from .pva_source import PvaSource
    from .server import bind_socket, create_app, make_server
    from .state import MonitorConfig, MonitorState

    if not opts.output_channels:
        raise ValueError("no output channels to monitor")
    geometry = read_geometry(opts.geometry) if opts.geometry else None
    config = MonitorConfig(window_s=opts.window_s, min_peaks=opts.min_peaks, image_hz=opts.image_hz,
                           image_max_px=opts.image_max_px)
    state = MonitorState(config, geometry=geometry, channels=list(opts.output_channels),
                         status_channels=list(opts.status_channels))
    sock = bind_socket(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    server = make_server(create_app(state, push_hz=opts.push_hz), sock)
    source = PvaSource(state, opts.output_channels, opts.status_channels, image_hz=opts.image_hz)
    timer = None
    if opts.runtime_s and opts.runtime_s > 0:
        def _expire() -> None:
            log.info("runtime of %.0f s reached, stopping", opts.runtime_s)
            server.should_exit = True

        timer = threading.Timer(opts.runtime_s, _expire)
        timer.daemon = True
    (announce or log.info)(url)
    t0 = time.monotonic()
    source.start()
    try:
        if timer is not None:
            timer.start()
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # a second Ctrl-C during uvicorn's graceful shutdown
        pass
    finally:
        if timer is not None:
            timer.cancel()
        source.stop()
        sock.close()
        log.info("monitor stopped after %.1f s: %d frames, %d images, %d errors", time.monotonic() - t0,
                 state.n_updates, state.n_images, state.n_errors)
    return 0
