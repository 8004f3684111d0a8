"""Run a script in a real subprocess and kill it with SIGKILL at a chosen write (issue 24's kill tests).

    events = killpoints.count(["generate_qa.py", *argv], cwd=ROOT)   # every write event of an uninterrupted run
    proc = killpoints.run(["generate_qa.py", *argv], kill_at=3, cwd=ROOT)  # killed just before the 3rd one

A write event is a call, in the script's process, of os.replace / os.rename, os.unlink / os.remove, or open() of a
file for writing (modes w, a, x, +); the process kills itself (SIGKILL: no cleanup, no finally, no atexit) just
before the event numbered `kill_at` (from 1) happens. Writes under the Python installation and caches
(matplotlib's font cache, .pyc files) are not counted: they are not the script's outputs. `count` runs the
script uninterrupted and returns the events as (operation, path) pairs, in order.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# The wrapper: `python killpoints.py KILL_AT EVENTS_LOG SCRIPT ARGS...` patches the write calls, then runs SCRIPT
# as __main__ (sys.argv as the script sees it: SCRIPT ARGS...).
_IGNORED = (sys.prefix, sys.base_prefix, os.path.expanduser("~/.cache"), os.path.expanduser("~/.config"))


def _install(kill_at: int, log: str | None) -> None:
    import builtins
    import signal

    state = {"n": 0}
    logf = open(log, "a", encoding="utf-8") if log else None  # opened before the patch: not an event

    def event(op: str, path) -> None:
        try:
            p = os.path.abspath(os.fsdecode(path))
        except TypeError:  # a file descriptor
            return
        if p.startswith(_IGNORED) or "__pycache__" in p:
            return
        state["n"] += 1
        if logf:
            logf.write(json.dumps([op, p]) + "\n")
            logf.flush()
        if state["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(name: str, op: str, fn):
        def patched(src, *a, **k):
            event(op, src)
            return fn(src, *a, **k)
        patched.__wrapped__ = fn
        return patched

    os.replace = wrap("replace", "replace", os.replace)
    os.rename = wrap("rename", "rename", os.rename)
    os.unlink = wrap("unlink", "unlink", os.unlink)
    os.remove = wrap("remove", "unlink", os.remove)
    real_open = builtins.open

    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            event("open", file)
        return real_open(file, mode, *a, **k)

    builtins.open = open_


def _command(script: str, args: list, kill_at: int, log: str | None) -> list[str]:
    return [sys.executable, __file__, str(kill_at), log or "-", script, *map(str, args)]


def run(cmd: list, kill_at: int, cwd, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS...` (cmd = [SCRIPT, *ARGS]) killed just before its write event number `kill_at`."""
    return subprocess.run(_command(cmd[0], cmd[1:], kill_at, None), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def count(cmd: list, cwd, env: dict | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess,
                                                                                   list[tuple[str, str]]]:
    """Run `python SCRIPT ARGS...` uninterrupted; (its result, its write events in order)."""
    with tempfile.TemporaryDirectory() as d:
        log = os.path.join(d, "events.jsonl")
        proc = subprocess.run(_command(cmd[0], cmd[1:], 0, log), cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
        lines = Path(log).read_text(encoding="utf-8").splitlines() if os.path.exists(log) else []
    return proc, [tuple(json.loads(line)) for line in lines]


if __name__ == "__main__":
    import runpy

    kill_at, log, script = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    sys.argv = [script, *sys.argv[4:]]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` has it (not this folder)
    _install(kill_at, None if log == "-" else log)
    runpy.run_path(script, run_name="__main__")
