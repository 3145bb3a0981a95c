"""Start, watch and stop pvapy processes on loopback: shared by tests, the demo and benchmarks.

Every process gets the loopback environment (``peaknet_pva.loopback.loopback_env``), writes its
output to a log file, and is stopped by PID: consumers with SIGINT (their forked children ignore
it and are stopped by the parent; SIGTERM kills a ``-nc > 1`` parent at once, and our processors in
the children then stop themselves, see ``lifecycle``), then SIGKILL for the process and the
children found under it in ``/proc`` if it does not exit in time. ::

    with start_consumer("peaknet_pva.PeakNetImageProcessor", "test:image",
                        output_channel="t:*:output", status_channel="t:*:status",
                        n_consumers=2, processor_args={...}, log_path=tmp / "c.log") as c:
        wait_for_status(c.status_channels, timeout_s=120)
        ...
    # leaving the block stops it (SIGINT, bounded wait)

``OutputMonitor`` subscribes to output channels and keeps every decoded update by uniqueId.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pvaccess as pva

from ..loopback import apply_loopback_env, loopback_env

#: Seconds a consumer gets to drain after SIGINT before it is killed.
DEFAULT_STOP_TIMEOUT_S = 60.0


def _children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; empty where /proc is not available)."""
    out: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses
        try:
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """All processes under ``pid`` (children first, then theirs)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = _children_of(todo.pop())
        found.extend(kids)
        todo.extend(kids)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


@dataclass
class ManagedProcess:
    """A process we started: its Popen, its log file, and how to stop it (by PID only)."""

    name: str
    popen: subprocess.Popen
    log_path: Path | None = None
    status_channels: list[str] = field(default_factory=list)
    control_channels: list[str] = field(default_factory=list)
    output_channels: list[str] = field(default_factory=list)
    _children_seen: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def poll(self) -> int | None:
        return self.popen.poll()

    def children(self) -> list[int]:
        """Current descendants (remembered, so they can still be killed if the parent dies)."""
        kids = descendants(self.pid)
        self._children_seen.update(kids)
        return kids

    def log_text(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def send_signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the process and every descendant we know of, by PID."""
        kids = set(self.children()) | self._children_seen
        self.send_signal(signal.SIGKILL)
        for pid in kids:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S, sig: int = signal.SIGINT) -> int | None:
        """Send ``sig`` (SIGINT), wait up to ``timeout_s`` for it and its children; then kill.

        Returns the exit code (None if it had to be killed and did not report one).
        """
        self.children()
        if self.popen.poll() is None:
            self.send_signal(sig)
        deadline = time.monotonic() + timeout_s
        try:
            self.popen.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            return self.popen.poll()
        # The parent is gone; give orphaned children the rest of the time, then kill them.
        for pid in list(self._children_seen):
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return self.popen.poll()

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(name: str, cmd: Sequence[str], log_path: str | Path | None, env: dict[str, str] | None, cwd: str | Path | None) -> ManagedProcess:
    full_env = loopback_env(env)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    stdout: Any = subprocess.DEVNULL
    fh = None
    if log_path is not None:
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log_path, "ab")
        stdout = fh
    try:
        popen = subprocess.Popen(
            list(cmd), stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
            cwd=None if cwd is None else str(cwd),
        )
    finally:
        if fh is not None:
            fh.close()
    return ManagedProcess(name=name, popen=popen, log_path=None if log_path is None else Path(log_path))


def _expand(pattern: str | None, ids: Iterable[int]) -> list[str]:
    if not pattern:
        return []
    return [pattern.replace("*", str(i)) for i in ids]


def consumer_command(
    processor_class: str,
    input_channel: str,
    *,
    output_channel: str | None = None,
    status_channel: str | None = None,
    control_channel: str | None = None,
    n_consumers: int = 1,
    consumer_id: int = 1,
    distributor_updates: int | None = None,
    server_queue_size: int = 100,
    processor_args: dict[str, Any] | None = None,
    processor_file: str | Path | None = None,
    report_period_s: float = 1.0,
    log_level: str | None = "warning",
    runtime_s: float | None = None,
    skip_initial_updates: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``pvapy-hpc-consumer`` command line (``-dc``, no curses), run as ``python -m``."""
    cmd = [sys.executable, "-m", "pvapy.cli.hpcConsumer", "-dc", "-ic", input_channel, "-id", str(consumer_id),
           "-nc", str(n_consumers), "-sqs", str(server_queue_size)]
    if processor_file is not None:
        cmd += ["-pf", str(processor_file)]
    cmd += ["-pc", processor_class]
    if processor_args is not None:
        cmd += ["-pa", json.dumps(processor_args)]
    if output_channel:
        cmd += ["-oc", output_channel]
    if status_channel:
        cmd += ["-sc", status_channel]
    if control_channel:
        cmd += ["-cc", control_channel]
    if distributor_updates:
        cmd += ["-du", str(distributor_updates)]
    if report_period_s:
        cmd += ["-rp", str(report_period_s)]
    if log_level:
        cmd += ["-ll", log_level]
    if runtime_s:
        cmd += ["-rt", str(runtime_s)]
    if skip_initial_updates is not None:
        cmd += ["-siu", str(skip_initial_updates)]
    cmd += list(extra)
    return cmd


def start_consumer(
    processor_class: str,
    input_channel: str,
    *,
    log_path: str | Path | None = None,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    name: str = "consumer",
    wrap: Sequence[str] = (),
    **kwargs: Any,
) -> ManagedProcess:
    """Start ``pvapy-hpc-consumer`` (see ``consumer_command`` for the keyword arguments).

    ``wrap``: interpreter arguments put before ``-m pvapy.cli.hpcConsumer`` (e.g. ``-c CODE`` that
    sets resource limits and then ``os.execv``s the rest; tests use it for a full disk).
    """
    cmd = consumer_command(processor_class, input_channel, **kwargs)
    cmd = [cmd[0], *wrap, *cmd[1:]]
    proc = _spawn(name, cmd, log_path, env, cwd)
    ids = range(int(kwargs.get("consumer_id", 1)), int(kwargs.get("consumer_id", 1)) + int(kwargs.get("n_consumers", 1)))
    proc.status_channels = _expand(kwargs.get("status_channel"), ids)
    proc.control_channels = _expand(kwargs.get("control_channel"), ids)
    proc.output_channels = _expand(kwargs.get("output_channel"), ids)
    return proc


def start_replay(
    source: str | Path,
    channel: str,
    *,
    fps: float = 10.0,
    n_frames: int | None = None,
    runtime_s: float | None = None,
    wait_for: Sequence[str] = (),
    wait_connected: Sequence[str] = (),
    photon_energy_ev: float | None = None,
    bad_every: int = 0,
    three_d: bool = False,
    codec: str | None = None,
    hdf5_framed: bool = False,
    extra: Sequence[str] = (),
    log_path: str | Path | None = None,
    env: dict[str, str] | None = None,
    name: str = "replay",
) -> ManagedProcess:
    """Start our replay server (``python -m peaknet_pva.pva.replay``).

    ``codec`` (``lz4``, ``bslz4``, ``blosc``, ``zlib``, ``lz4hdf5``; None/``"none"`` =
    uncompressed) is its ``--codec``: frames sent compressed as ADCore's NDPluginCodec does;
    ``hdf5_framed`` its ``--hdf5-framed`` (lz4/bslz4 as HDF5 chunks). A codec whose package is
    missing makes the process exit 2 at once with a one-line error in its log."""
    cmd = [sys.executable, "-m", "peaknet_pva.pva.replay", str(source), "-c", channel, "--fps", str(fps)]
    if n_frames is not None:
        cmd += ["-n", str(n_frames)]
    if runtime_s is not None:
        cmd += ["-rt", str(runtime_s)]
    for ch in wait_for:
        cmd += ["--wait-for", ch]
    for ch in wait_connected:
        cmd += ["--wait-connected", ch]
    if photon_energy_ev is not None:
        cmd += ["--photon-energy-ev", str(photon_energy_ev)]
    if bad_every:
        cmd += ["--bad-every", str(bad_every)]
    if three_d:
        cmd += ["--three-d"]
    if codec and codec != "none":
        cmd += ["--codec", str(codec)]
    if hdf5_framed:
        cmd += ["--hdf5-framed"]
    cmd += list(extra)
    return _spawn(name, cmd, log_path, env, None)


def start_monitor(
    channels: str,
    *,
    status: str = "",
    n_consumers: int = 8,
    port: int = 8080,
    min_peaks: int = 10,
    runtime_s: float = 0.0,
    log_path: str | Path,
    env: dict[str, str] | None = None,
    start_timeout_s: float = 30.0,
    name: str = "monitor",
) -> tuple[ManagedProcess, str]:
    """Start ``peaknet-pva monitor`` and wait until it prints its URL (read from ``log_path``);
    returns (process, url).

    ``port`` 0 takes any free port. A monitor that exits or stays silent raises RuntimeError with
    its log (and is stopped).
    """
    cmd = [sys.executable, "-m", "peaknet_pva.cli", "monitor", "--channels", channels, "--status", status,
           "--consumers", str(n_consumers), "--port", str(port), "--min-peaks", str(min_peaks),
           "--runtime", str(runtime_s)]
    proc = _spawn(name, cmd, log_path, env, None)
    deadline = time.monotonic() + start_timeout_s
    while time.monotonic() < deadline:
        m = re.search(r"peaknet-pva monitor: (http://\S+/)", proc.log_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.stop(5)
    raise RuntimeError(f"monitor did not start:\n{proc.log_text()[-3000:]}")


def start_ad_sim_server(
    channel: str,
    *,
    input_file: str | Path | None = None,
    fps: float = 100.0,
    runtime_s: float = 30.0,
    n_x: int = 64,
    n_y: int = 64,
    datatype: str = "float32",
    n_frames: int = 0,
    start_delay_s: float = 3.0,
    shutdown_delay_s: float = 0.0,
    extra: Sequence[str] = (),
    log_path: str | Path | None = None,
    env: dict[str, str] | None = None,
    name: str = "ad-sim-server",
) -> ManagedProcess:
    """Start ``pvapy-ad-sim-server`` (``-dc``, reporting off).

    ``start_delay_s`` > 0 matters: in pvapy 5.6.0 the publisher thread starts after ``-std``
    seconds whether or not the producer thread has cached frame 0, and dies with ``KeyError: 0``
    in ``getFrameFromCache`` when it has not (seen here on a loaded 2-core machine).
    """
    cmd = [sys.executable, "-m", "pvapy.cli.adSimServer", "-dc", "-cn", channel, "-fps", str(fps), "-rt", str(runtime_s),
           "-std", str(start_delay_s), "-shd", str(shutdown_delay_s), "-rp", "0"]
    if input_file is not None:
        cmd += ["-if", str(input_file)]
    else:
        cmd += ["-nx", str(n_x), "-ny", str(n_y), "-dt", datatype]
    if n_frames:
        cmd += ["-nf", str(n_frames)]
    cmd += list(extra)
    return _spawn(name, cmd, log_path, env, None)


# ---------------------------------------------------------------------------------------------
# channels


def get_channel(name: str, timeout_s: float = 2.0) -> Any:
    """One ``get`` of ``name`` (raises on timeout)."""
    apply_loopback_env()
    ch = pva.Channel(name)
    ch.setTimeout(timeout_s)
    return ch.get("field()")


def read_status(name: str, timeout_s: float = 2.0) -> dict[str, Any]:
    """A consumer's status channel as a dict (``userStats``, ``processorStats``, ...)."""
    return get_channel(name, timeout_s).toDict()


def wait_for_status(
    channels: Sequence[str],
    *,
    timeout_s: float = 120.0,
    proc: ManagedProcess | None = None,
    min_received: int | None = None,
    poll_s: float = 0.5,
) -> dict[str, dict[str, Any]]:
    """Wait until every status channel answers (and, with ``min_received``, until its
    ``receiverStats.nReceived`` reached it, e.g. 1 = the input monitor got its initial update).

    Raises TimeoutError (with the log tail of ``proc``) or RuntimeError if ``proc`` exited.
    """
    deadline = time.monotonic() + timeout_s
    out: dict[str, dict[str, Any]] = {}
    for name in channels:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.poll()} while waiting for {name}:\n{proc.log_text()[-3000:]}")
            try:
                status = read_status(name, timeout_s=1.0)
                if min_received is None or int(status.get("receiverStats", {}).get("nReceived", 0)) >= min_received:
                    out[name] = status
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                tail = proc.log_text()[-3000:] if proc is not None else ""
                raise TimeoutError(f"status channel {name} not ready within {timeout_s:.0f} s\n{tail}")
            time.sleep(poll_s)
    return out


def send_control(channel: str, command: str, args: dict[str, Any] | str | None = None, timeout_s: float = 5.0) -> None:
    """Send a pvapy-hpc control command (``configure``, ``reset_stats``, ``get_stats``, ``stop``)."""
    apply_loopback_env()
    ch = pva.Channel(channel)
    ch.setTimeout(timeout_s)
    if isinstance(args, dict):
        args = json.dumps(args)
    value = {"command": command, "args": args or ""}
    ch.put(pva.PvObject({"command": pva.STRING, "args": pva.STRING}, value), "field(command,args)")


class OutputMonitor:
    """Subscribes to output channels and keeps ``uniqueId -> [(channel, peaks, meta), ...]``.

    Updates with uniqueId 0 (the initial value before the first publish) are ignored.
    ``decode`` = False keeps only the uniqueId (cheaper; works on any NtNdArray channel), with
    ``(channel, None, None)`` entries.
    """

    def __init__(self, channels: Sequence[str], *, decode: bool = True, queue_size: int = 1000) -> None:
        apply_loopback_env()
        self.channels = list(channels)
        self.decode = decode
        self.queue_size = int(queue_size)
        self._lock = threading.Lock()
        self.updates: dict[int, list[tuple[str, Any, Any]]] = {}
        self.n_updates = 0
        self.n_errors = 0
        self.errors: list[str] = []
        self._chans: list[Any] = []
        #: Channels that delivered at least one update (the initial value counts).
        self.connected: set[str] = set()
        #: time.monotonic() of the first and the last published update received.
        self.t_first: float | None = None
        self.t_last: float | None = None

    def _callback(self, name: str) -> Any:
        from .codec import decode_output

        def cb(pv: Any) -> None:
            try:
                if self.decode:
                    peaks, meta = decode_output(pv)
                    uid = meta.unique_id
                else:
                    uid = int(pv["uniqueId"])
                    peaks, meta = None, None
            except Exception as exc:
                with self._lock:
                    self.n_errors += 1
                    if len(self.errors) < 20:
                        self.errors.append(f"{name}: {exc!r}")
                return
            with self._lock:
                self.connected.add(name)
            if uid == 0:
                return  # initial (never published) value
            now = time.monotonic()
            with self._lock:
                self.updates.setdefault(uid, []).append((name, peaks, meta))
                self.n_updates += 1
                if self.t_first is None:
                    self.t_first = now
                self.t_last = now

        return cb

    def start(self) -> OutputMonitor:
        for name in self.channels:
            ch = pva.Channel(name)
            ch.monitor(self._callback(name), f"record[queueSize={self.queue_size}]field()")
            self._chans.append(ch)
        return self

    def stop(self) -> None:
        for ch in self._chans:
            try:
                ch.stopMonitor()
            except Exception:
                pass
        self._chans = []

    def wait_connected(self, timeout_s: float = 30.0) -> None:
        """Wait until every channel delivered its initial value; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                missing = set(self.channels) - self.connected
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no initial update from {sorted(missing)} within {timeout_s:.0f} s")
            time.sleep(0.1)

    def wait_for(self, unique_ids: Iterable[int], timeout_s: float = 60.0, poll_s: float = 0.2) -> set[int]:
        """Wait until every id has arrived; return the ids still missing (empty on success)."""
        want = set(unique_ids)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                missing = want - set(self.updates)
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(poll_s)

    def snapshot(self) -> dict[int, list[tuple[str, Any, Any]]]:
        with self._lock:
            return {k: list(v) for k, v in self.updates.items()}

    def __enter__(self) -> OutputMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
