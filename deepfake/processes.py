"""The processes below this one, read from /proc: which are running, and stopping those that outlive the Ray
they belonged to (its agents poll for their dead raylet for 30-120 s; an actor whose shutdown hangs stays for
good once its raylet is gone). Linux /proc only; elsewhere every helper finds nothing."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def stat_fields(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command name (state, ppid, ...); [] when it cannot be read."""
    stat = proc_text(pid, "stat")
    return stat[stat.rindex(")") + 2 :].split() if ")" in stat else []


def alive(pid: int | str) -> bool:
    """Running, not a zombie (an orphan's zombie stays in /proc until its new parent reaps it)."""
    fields = stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def parent_pid(pid: int | str) -> int:
    """The parent of `pid` (0 when it cannot be read: gone, or no /proc)."""
    fields = stat_fields(pid)
    return int(fields[1]) if fields else 0


def proc_text(pid: int | str, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first, then theirs), read from /proc; [] where there is no /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        children.setdefault(parent_pid(stat.parent.name), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


def process_ids(pids: list[int]) -> dict[int, str]:
    """pid -> its start time (/proc/PID/stat field 22), so a pid the kernel reuses later is never mistaken."""
    out = {}
    for pid in pids:
        fields = stat_fields(pid)
        if len(fields) > 19:
            out[pid] = fields[19]
    return out


def still_running(processes: dict[int, str]) -> list[int]:
    """The pids of `process_ids` that still run as the same processes (same start time, not zombies)."""
    return [p for p, started in processes.items() if alive(p) and process_ids([p]).get(p) == started]


def stop_processes(processes: dict[int, str], wait_s: float = 5.0) -> None:
    """SIGTERM to those of `process_ids` still running as the same processes, then SIGKILL to any still there
    after `wait_s` (matched by start time, so a reused pid is never signalled)."""
    import os
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in still_running(processes):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while still_running(processes) and time.monotonic() < deadline:
            time.sleep(0.1)


def stop_survivors(processes: dict[int, str], wait_s: float = 5.0) -> list[int]:
    """The processes of `process_ids` still running after Ray's shutdown (its dashboard and runtime-env agents,
    reparented to init when the raylet exits, poll for their parent and linger 30-120 s): given `wait_s` to
    exit on their own, then terminated. Returns the pids it had to stop."""
    deadline = time.monotonic() + wait_s
    while (left := still_running(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    stop_processes(processes, wait_s)
    if left:
        log.info("stopped %d of Ray's processes that outlived its shutdown: %s", len(left), left)
    return left
