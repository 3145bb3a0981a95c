"""What our processors add to pvapy's process lifecycle: SIGTERM drains like SIGINT, an orphaned
consumer stops itself, and the output channel exists before the first frame.

pvapy 5.6.0 facts this works around (``pvapy/hpc/systemController.py``,
``mpDataConsumerController.py``, ``dataProcessingController.py``):

- ``pvapy-hpc-consumer`` only handles SIGINT (``KeyboardInterrupt`` in its run loop). SIGTERM (what
  ``kill``, ``timeout``, systemd and docker send) kills the process at once: the ring, the batches in
  flight and the writer's open chunk are lost.
- With ``-nc > 1`` the parent forks one child per consumer with SIGINT ignored and stops them through
  a queue. The parent never imports the processor class, so nothing of ours runs there: a SIGTERM
  to the parent kills it and leaves the children running.
- The output record (``-oc``, pvas mode) is added to the consumer's PvaServer only when the first
  input update arrives, so a client started before that (a writer, c2dv) cannot connect until then
  and misses the first outputs while its channel search backs off.

So each processor calls :func:`install_stop_handlers` from ``__init__`` (pvapy constructs it on the
consumer's main thread, in the child with ``-nc > 1``) and :func:`create_output_channel` from
``start()``. The stop handlers set the consumer controller's ``shouldBeStopped`` flag, which both
pvapy run loops poll: the consumer then stops exactly as after a SIGINT or a ``stop`` command
(``processor.stop()`` drains). A watchdog thread does the same when the parent process goes away.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)

#: Seconds between two checks of the parent process id (orphan watchdog).
WATCHDOG_PERIOD_S = 0.5


def find_controller(max_depth: int = 40) -> Any:
    """The pvapy controller constructing the caller (a ``SystemController``), or None.

    pvapy gives the processor no reference to it; it is the ``self`` of a frame up the stack of
    ``__init__`` (``DataConsumerController.createDataProcessor``).
    """
    try:
        from pvapy.hpc.systemController import SystemController
    except ImportError:  # pragma: no cover
        return None
    frame = inspect.currentframe()
    depth = 0
    try:
        while frame is not None and depth < max_depth:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, SystemController):
                return candidate
            frame = frame.f_back
            depth += 1
    finally:
        del frame
    return None


def find_processing_controller(processor: Any, max_depth: int = 40) -> Any:
    """The pvapy ``DataProcessingController`` whose ``userDataProcessor`` is ``processor``, or None
    (looked up the stack of ``start()``)."""
    try:
        from pvapy.hpc.dataProcessingController import DataProcessingController
    except ImportError:  # pragma: no cover
        return None
    frame = inspect.currentframe()
    depth = 0
    try:
        while frame is not None and depth < max_depth:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, DataProcessingController) and candidate.userDataProcessor is processor:
                return candidate
            frame = frame.f_back
            depth += 1
    finally:
        del frame
    return None


class StopHandlers:
    """SIGTERM → a graceful stop of this consumer; parent gone → the same (see module doc)."""

    def __init__(self, controller: Any, name: str, logger: logging.Logger) -> None:
        self.controller = controller
        self.name = name
        self.logger = logger
        self.requested = False
        self.reason = ""
        self._parent = os.getppid()
        self._stop_watch = threading.Event()
        self._watchdog: threading.Thread | None = None

    def request_stop(self, reason: str) -> None:
        """Ask pvapy's run loop to stop this consumer (it then calls ``processor.stop()``)."""
        if self.requested:
            self.logger.warning("%s: %s while already stopping; still draining", self.name, reason)
            return
        self.requested = True
        self.reason = reason
        self.logger.warning("%s: %s: stopping like SIGINT (draining queued frames)", self.name, reason)
        if self.controller is not None:
            self.controller.shouldBeStopped = True
        elif threading.current_thread() is threading.main_thread():  # pragma: no cover - unknown pvapy
            raise KeyboardInterrupt(reason)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.request_stop("SIGTERM")

    def start_watchdog(self) -> None:
        """Watch the parent process: a forked consumer whose parent died stops itself."""
        if self._watchdog is not None or self._parent <= 1:
            return
        self._watchdog = threading.Thread(target=self._watch, name=f"{self.name}-orphan-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        while not self._stop_watch.wait(WATCHDOG_PERIOD_S):
            if os.getppid() != self._parent:
                self.request_stop(f"parent process {self._parent} is gone")
                return

    def close(self) -> None:
        self._stop_watch.set()


def install_stop_handlers(name: str, logger: logging.Logger) -> StopHandlers | None:
    """Make SIGTERM stop this consumer gracefully; in a forked consumer also watch the parent.

    Call from the processor's ``__init__``. Returns None (and changes nothing) off the main thread
    or outside a pvapy consumer (in-process tests, library use).
    """
    controller = find_controller()
    if controller is None:
        return None
    handlers = StopHandlers(controller, name, logger)
    if threading.current_thread() is threading.main_thread():
        try:
            signal.signal(signal.SIGTERM, handlers._on_sigterm)
        except (ValueError, OSError) as exc:  # pragma: no cover
            logger.warning("%s: cannot handle SIGTERM (%s); SIGTERM will lose queued frames", name, exc)
    try:
        import multiprocessing

        forked = multiprocessing.parent_process() is not None
    except Exception:  # pragma: no cover
        forked = False
    if forked:
        handlers.start_watchdog()
    return handlers


def create_output_channel(processor: Any, output_type: Any) -> bool:
    """Add the output record to the consumer's PvaServer now (from ``start()``), not at the first
    input update, so clients can connect before frames flow. Returns True if it was created.

    Only for pvas output mode with a known structure; hands the publisher to pvapy's
    ``DataProcessingController`` so it does not add the record a second time.
    """
    server = getattr(processor, "pvaServer", None)
    channel = getattr(processor, "outputChannel", None)
    if server is None or not channel or getattr(processor, "dataPublisher", None) is not None:
        return False
    ctrl = find_processing_controller(processor)
    if ctrl is None or ctrl.dataPublisher is not None:
        return False
    from pvapy.hpc.pvasDataPublisher import PvasDataPublisher
    from pvapy.utility.operationMode import OperationMode

    try:
        if OperationMode.fromString(ctrl.outputMode) != OperationMode.PVAS:
            return False
    except Exception:
        return False

    publisher = PvasDataPublisher(outputChannel=channel, pvaServer=server, outputPvObject=output_type)
    publisher.start()
    ctrl.dataPublisher = publisher
    processor.dataPublisher = publisher
    log.info("output channel %s created at start", channel)
    return True
