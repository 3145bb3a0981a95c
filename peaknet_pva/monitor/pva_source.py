"""The monitor's PVA side: pvaccess Channel monitors on every consumer's output and status channel.

PVA has no wildcard search, so a pattern such as ``peaknet:*:output`` is expanded to consumer ids
``1..N`` (:func:`expand_channels`); channels that are not (yet) served cost one periodic search and
connect by themselves when their consumer starts, and a consumer that stops and comes back is
picked up again (pvaccess re-subscribes a monitor on reconnection).

Costs are kept off the consumers: the output monitor asks only for the small fields
(``uniqueId, nPeaks, peaks, photonEnergy, panelShape, timeStamp``: the server sends nothing else),
and a sampler thread ``get``s a whole object (the image) at most ``image_hz`` times a second from
the channel that published the newest hit. The callbacks do O(nPeaks) work and never block.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..loopback import apply_loopback_env
from .state import HitImage, MonitorState, PeakUpdate

log = logging.getLogger(__name__)

#: Fields the per-frame output monitor requests (everything but the pixels).
PEAK_FIELDS = "uniqueId,timeStamp,nPeaks,photonEnergy,panelShape,peaks"
#: Updates pvAccess may queue per output monitor before it squashes (client side).
QUEUE_SIZE = 1000


def expand_channels(spec: str | None, n_consumers: int, first_id: int = 1) -> list[str]:
    """``'a:*:output'`` -> ``['a:1:output', ..., 'a:N:output']``; ``'x,y'`` -> ``['x', 'y']``.

    A comma-separated list is taken as it is (each item expanded if it holds ``*``).
    """
    if not spec:
        return []
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if "*" in item:
            out.extend(item.replace("*", str(i)) for i in range(first_id, first_id + int(n_consumers)))
        else:
            out.append(item)
    return out


def _peak_update(channel: str, pv: Any) -> PeakUpdate:
    pk = pv["peaks"]
    shape = [int(v) for v in np.asarray(pv["panelShape"]).tolist()]
    ts = pv["timeStamp"]
    return PeakUpdate(
        channel=channel,
        unique_id=int(pv["uniqueId"]),
        n_peaks=int(pv["nPeaks"]),
        panel=np.asarray(pk["panel"], dtype=np.int64),
        y=np.asarray(pk["y"], dtype=np.float32),
        x=np.asarray(pk["x"], dtype=np.float32),
        intensity=np.asarray(pk["intensity"], dtype=np.float32),
        photon_energy_ev=float(pv["photonEnergy"]),
        panel_shape=(shape[0], shape[1]) if len(shape) == 2 else (0, 0),
        timestamp_ns=int(ts["secondsPastEpoch"]) * 1_000_000_000 + int(ts["nanoseconds"]),
    )


class PvaSource:
    """Feeds a :class:`MonitorState` from PVA until :meth:`stop`.

    Args:
        state: where updates go.
        output_channels: the consumers' output channels (expanded names).
        status_channels: their status channels (same order), may be empty.
        image_hz: most whole objects (images) fetched per second, all channels together.
        get_timeout_s: bound on one image ``get``.
    """

    def __init__(self, state: MonitorState, output_channels: Sequence[str], status_channels: Sequence[str] = (),
                 *, image_hz: float = 2.0, get_timeout_s: float = 2.0) -> None:
        apply_loopback_env()
        self.state = state
        self.output_channels = list(output_channels)
        self.status_channels = list(status_channels)
        self.image_hz = float(image_hz)
        self.get_timeout_s = float(get_timeout_s)
        self._chans: list[Any] = []
        self._image_chans: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._newest_hit: tuple[str, int] | None = None  # (channel, uniqueId) of the newest hit seen
        self._sampled: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.n_gets = 0

    def _on_output(self, name: str) -> Any:
        state = self.state

        def cb(pv: Any) -> None:
            try:
                update = _peak_update(name, pv)
            except Exception as exc:  # a foreign structure: counted, never raised into pvAccess
                state.count_error()
                log.debug("%s: not a peaknet output (%s)", name, exc)
                return
            if update.unique_id == 0:
                state.mark_output_connected(name)
                return  # the initial value of a consumer that has published nothing yet
            state.add_peaks(update)
            if update.n_peaks > 0 and update.n_peaks >= state.config.min_peaks:
                with self._lock:
                    self._newest_hit = (name, update.unique_id)

        return cb

    def _on_status(self, name: str) -> Any:
        state = self.state

        def cb(pv: Any) -> None:
            try:
                state.add_status(name, pv.toDict())
            except Exception as exc:
                state.count_error()
                log.debug("%s: bad status object (%s)", name, exc)

        return cb

    def start(self) -> PvaSource:
        import pvaccess as pva

        for name in self.output_channels:
            ch = pva.Channel(name)
            ch.monitor(self._on_output(name), f"record[queueSize={QUEUE_SIZE}]field({PEAK_FIELDS})")
            self._chans.append(ch)
            img = pva.Channel(name)
            img.setTimeout(self.get_timeout_s)
            self._image_chans[name] = img
        for name in self.status_channels:
            ch = pva.Channel(name)
            ch.monitor(self._on_status(name), "field()")
            self._chans.append(ch)
        self._thread = threading.Thread(target=self._sampler, name="monitor-images", daemon=True)
        self._thread.start()
        log.info("monitoring %d output and %d status channels", len(self.output_channels), len(self.status_channels))
        return self

    def _sampler(self) -> None:
        """Fetch the newest hit's whole object, at most ``image_hz`` times a second."""
        from ..pva.codec import decode_output

        period = 1.0 / self.image_hz
        while not self._stop.wait(period):
            with self._lock:
                newest = self._newest_hit
            if newest is None or newest in self._sampled:
                continue
            name = newest[0]
            try:
                pv = self._image_chans[name].get("field()")
                self.n_gets += 1
                peaks, meta = decode_output(pv)
            except Exception as exc:
                log.debug("image get from %s failed: %s", name, exc)
                continue
            self._sampled = {newest}
            if meta.image is None or meta.unique_id == 0:
                continue  # the latest update of that channel carries no image (e.g. a non-hit)
            try:
                self.state.set_hit(HitImage(
                    channel=name, unique_id=meta.unique_id, pixels=meta.image, panel=peaks.panel.astype(np.int64),
                    y=peaks.y, x=peaks.x, intensity=peaks.intensity, photon_energy_ev=meta.photon_energy_ev,
                ))
            except Exception:
                log.exception("cannot render the hit %s from %s", meta.unique_id, name)
                self.state.count_error()

    def stop(self) -> None:
        self._stop.set()
        for ch in self._chans:
            try:
                ch.stopMonitor()
            except Exception:
                pass
        self._chans = []
        if self._thread is not None:
            self._thread.join(timeout=self.get_timeout_s + 1.0)

    def __enter__(self) -> PvaSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
