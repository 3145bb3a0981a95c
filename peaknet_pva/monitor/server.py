"""The monitor's web side: a Starlette app served by uvicorn (no hand-written HTTP).

``GET /`` is the page (static HTML + JS, no external resources); ``GET /api/snapshot`` is one
:meth:`MonitorState.snapshot` as JSON; ``/ws`` is a WebSocket pushing a snapshot ``push_hz``
times a second (the latest hit's PNG only when it changed for that connection). Snapshots are
built in a worker thread so the event loop never waits on NumPy or PNG encoding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
from importlib import resources
from typing import Any

from .state import MonitorState

log = logging.getLogger(__name__)


def _clean(obj: Any) -> Any:
    """JSON has no NaN/Inf: they become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def to_json(snapshot: dict[str, Any]) -> str:
    """A snapshot as strict JSON text (non-finite floats -> null)."""
    try:
        return json.dumps(snapshot, allow_nan=False, separators=(",", ":"))
    except ValueError:
        return json.dumps(_clean(snapshot), allow_nan=False, separators=(",", ":"))


def page_html() -> str:
    return resources.files("peaknet_pva.monitor").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(state: MonitorState, *, push_hz: float = 4.0) -> Any:
    """The ASGI app for ``state``: the page, a JSON snapshot and a WebSocket of snapshots."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import HTMLResponse, Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    if not push_hz > 0:
        raise ValueError(f"push_hz must be > 0, got {push_hz}")
    html = page_html()
    period = 1.0 / push_hz

    async def index(request: Any) -> HTMLResponse:
        return HTMLResponse(html)

    async def snapshot(request: Any) -> Response:
        text = await run_in_threadpool(lambda: to_json(state.snapshot()))
        return Response(text, media_type="application/json")

    async def stream(websocket: WebSocket) -> None:
        await websocket.accept()
        sent = -1
        loop = asyncio.get_running_loop()
        try:
            while True:
                t0 = loop.time()
                snap = await run_in_threadpool(state.snapshot, hit_version=sent)
                hit = snap.get("latestHit")
                if hit and "png" in hit:
                    sent = hit["version"]
                await websocket.send_text(await run_in_threadpool(to_json, snap))
                await asyncio.sleep(max(period - (loop.time() - t0), 0.01))
        except (WebSocketDisconnect, RuntimeError, ConnectionError, asyncio.CancelledError):
            return  # the page went away, or the server is shutting down

    return Starlette(routes=[Route("/", index), Route("/api/snapshot", snapshot), WebSocketRoute("/ws", stream)])


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0 = any free port); see ``getsockname``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def make_server(app: Any, sock: socket.socket) -> Any:
    """A uvicorn server for ``app`` on the bound ``sock`` (quiet access log, WebSockets on)."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, ws="auto",
                            lifespan="off", timeout_graceful_shutdown=2)
    return uvicorn.Server(config)
