"""One run per output directory: a lock file that names the run holding the folder.

Two runs writing checkpoints into one folder overwrite each other silently (and rotation deletes the
other run's checkpoints). ``train()`` therefore takes ``<output_dir>/cpt-plugin.lock`` (JSON: pid, host,
start time, command) before the first step and removes it when training ends, on an exception, and at
interpreter exit. A second run into the same folder refuses with ``OutputDirInUseError`` naming the
first. A lock whose process is gone (same host, dead pid or a pid reused by a newer process) is stale:
it is taken over with a warning. A lock from another host cannot be checked and is respected.

The lock is created atomically: the content goes to a temporary file that is then hard-linked to the
lock name (``link`` fails when the name exists), so no reader sees a half-written lock. Filesystems
without hard links fall back to an exclusive create.

Only one process per run takes the lock: the Trainer hooks (``hooks.py``) let the world's main process
take it and stop every process when it cannot. ``overwrite_output_dir`` does not exist in transformers 5 (checked: 5.17 and 5.24), and the
Trainer itself never refused a folder with content: a finished run's checkpoints do not block a new run,
only a live run does, whatever ``overwrite_output_dir`` says (two live writers are never safe).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

from cpt_plugin.config import CPTConfigError

logger = logging.getLogger(__name__)

LOCK_NAME = "cpt-plugin.lock"
_HELD: dict[str, RunLock] = {}  # lock path -> the lock this process holds


class OutputDirInUseError(CPTConfigError):
    """Another live run holds the output directory."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _process_start_epoch(pid: int) -> float | None:
    """When ``pid`` started (Linux /proc), to tell a reused pid from the locking process; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat", encoding="ascii") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    except OSError:
        return True
    process_start = _process_start_epoch(pid)
    if process_start is not None and started:
        try:
            locked_at = dt.datetime.fromisoformat(started).timestamp()
        except ValueError:
            return True
        if process_start > locked_at + 2.0:  # the pid now belongs to a process born after the lock
            return False
    return True


def describe(info: dict[str, Any]) -> str:
    """'pid 123 on host h, started 2026-12-01T10:00:00+00:00 (python train.py)'."""
    if not info:
        return "an unreadable lock file (being written this instant, or damaged)"
    command = f" ({info['command']})" if info.get("command") else ""
    return (
        f"pid {info.get('pid', '?')} on host {info.get('host', '?')!r}, started {info.get('started', '?')}"
        f"{command}"
    )


class RunLock:
    """The lock file of one run; ``release`` removes it only while it is still this run's."""

    def __init__(self, path: str, info: dict[str, Any]) -> None:
        self.path = path
        self.info = info

    def release(self) -> None:
        _HELD.pop(self.path, None)
        with contextlib.suppress(Exception):
            atexit.unregister(self.release)
        if _read(self.path).get("token") == self.info["token"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _create(path: str, info: dict[str, Any]) -> bool:
    """Creates the lock with its full content at once; False when a lock is there already."""
    folder = os.path.dirname(path)
    fd, temp = tempfile.mkstemp(dir=folder, prefix=".cpt-plugin-lock-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=1)
        try:
            os.link(temp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here: exclusive create
            try:
                with open(path, "x", encoding="utf-8") as handle:
                    json.dump(info, handle, indent=1)
                return True
            except FileExistsError:
                return False
    finally:
        with contextlib.suppress(OSError):
            os.remove(temp)


def acquire(output_dir: str) -> RunLock:
    """Takes the output directory for this run, or raises OutputDirInUseError naming the run that has it."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    host = socket.gethostname()
    info = {
        "pid": os.getpid(),
        "host": host,
        "started": _now(),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
        "token": uuid.uuid4().hex,
    }
    for _ in range(5):
        if _create(path, info):
            lock = RunLock(path, info)
            _HELD[path] = lock
            atexit.register(lock.release)
            return lock
        holder = _read(path)
        if path in _HELD or not _stale(holder, host):
            raise OutputDirInUseError(
                f"cpt-plugin: the output directory {output_dir!r} is in use by another run: "
                f"{describe(holder)}. Two runs in one folder overwrite each other's checkpoints. Give this "
                f"run another output_dir, or wait until that run has finished. If it is no longer running "
                f"(e.g. it was on another machine), delete {path}."
            )
        if _read(path) == holder:  # still the same stale lock: take it over
            logger.warning(
                "cpt-plugin: taking over the stale lock %s of a run that is no longer running (%s).",
                path,
                describe(holder),
            )
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    raise OutputDirInUseError(
        f"cpt-plugin: could not take the lock {path}: other processes keep creating it. Give this run "
        "another output_dir."
    )


def _stale(holder: dict[str, Any], host: str) -> bool:
    """A lock whose run is gone: same host and its process is dead, or this process's own leftover."""
    if not holder or holder.get("host") != host or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():
        return True  # left by an earlier train() of this process that is no longer running
    return not _alive(holder["pid"], holder.get("started"))


@contextlib.contextmanager
def hold_output_dir(output_dir: str | None, enabled: bool = True) -> Iterator[RunLock | None]:
    """The lock held for the duration of the block (released on exceptions too)."""
    if not enabled or not output_dir:
        yield None
        return
    lock = acquire(output_dir)
    try:
        yield lock
    finally:
        lock.release()
