"""Whether a local worker process is alive in fact, not only in the process table: a worker
touches its heartbeat file every few seconds from a thread; a worker whose file has gone silent
past the sweep's ``heartbeat_grace`` is frozen (SIGSTOP, a hung driver call, a stopped
container) and is killed by whoever finds it: its own sweep command, or any process that
recovers stale trials on this host (a later start of the same command, another worker).

Heartbeat files live in ``heartbeats/`` beside the journal (``mlruns/heartbeats/`` for a
database storage), one per worker process, named by host, pid and start time, so a reused pid
is never taken for the process that beat. A process without a file (it has not begun beating)
is never judged by this rule.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from cifar_exp.sweep import sidecar


def machine() -> str:
    """The name of this process's process table, where a pid means something: the host name and,
    where Linux tells them, the boot and the PID namespace (``host~boot~pidns``). Decision: the
    host name alone is not enough on a cluster: two containers with host networking, or two pods
    with one hostname, share a host name but not their pids, and each took the other's workers
    for dead (and failed, or killed, their trials). Only processes of one ``machine`` judge each
    other by pid; across machines only the storage's heartbeats decide."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:  # not Linux, or no /proc: the host name is what there is
        pass
    return "~".join(parts)


def alive(pid: Any, started: Any) -> bool:
    """Whether the process ``pid``, started at ``started`` (psutil's create_time), still runs; the
    start time tells a reused pid from the original process."""
    try:
        return bool(abs(psutil.Process(int(pid)).create_time() - float(started)) < 0.01)
    except (psutil.Error, TypeError, ValueError):
        return False


def folder(storage: str) -> Path:
    """Where the heartbeat files of a sweep on the Optuna storage ``storage`` live."""
    return sidecar.folder(storage) / "heartbeats"


def path(storage: str, pid: int, started: float) -> Path:
    """The heartbeat file of the process ``pid`` started at ``started`` (psutil's create_time)."""
    return folder(storage) / f"{machine()}-{pid}-{started:.2f}"


def interval(grace: float) -> float:
    """How often a worker beats: a quarter of the grace, at most every 10 s."""
    return min(10.0, grace / 4)


@contextmanager
def beating(beat: Path, grace: float) -> Iterator[None]:
    """While the block runs, touch ``beat`` every ``interval(grace)`` from a daemon thread (a frozen
    process freezes it too); the file goes when the block ends."""
    beat.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    done = threading.Event()

    def touch() -> None:
        while True:
            try:
                beat.touch(mode=0o600)
            except OSError:  # a full disk: the next beat retries; silence past the grace is death
                pass
            if done.wait(interval(grace)):
                return

    thread = threading.Thread(target=touch, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        beat.unlink(missing_ok=True)


def silence(beat: Path) -> float | None:
    """Seconds since ``beat`` was last touched; None if there is no such file."""
    try:
        return max(0.0, time.time() - beat.stat().st_mtime)
    except OSError:
        return None


def frozen(storage: str, pid: int, started: float, grace: float) -> float | None:
    """If the process ``pid`` (started at ``started``) has a heartbeat file silent past ``grace``,
    kill it and return how long it was silent; else None."""
    beat = path(storage, pid, started)
    silent = silence(beat)
    if silent is None or silent <= grace:
        return None
    kill(pid, beat)
    return silent


def kill(pid: int, beat: Path) -> None:
    """SIGKILL the frozen process ``pid`` (a stopped process dies of SIGKILL too) and drop its file."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    beat.unlink(missing_ok=True)


def clear_dead(storage: str) -> list[Path]:
    """Delete the heartbeat files of this machine's processes that are gone (a killed worker leaves
    its file: nothing else would ever remove it); the paths deleted. Another machine's files are
    left to that machine (``machine``)."""
    host = machine()
    cleared = []
    for beat in sorted(folder(storage).glob(f"{host}-*")):
        pid, _, started = beat.name.removeprefix(f"{host}-").partition("-")
        if pid.isdigit() and not alive(pid, started) and beat.is_file():
            beat.unlink(missing_ok=True)
            cleared.append(beat)
    return cleared
