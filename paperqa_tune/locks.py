"""The one lock file every script takes before it writes (torch-free): OutputSet's beside its first output, and
training's beside its run folder (runs.RunLock).

    with LockFile(path, "models/run", "choose another --out"):
        ...   # no second run writes the same outputs meanwhile

The file holds "pid host" (and a word a run adds with note(): OutputSet's "committed:<command>"). A second run
is refused (InputError naming the lock and who holds it); a lock whose process is gone (killed on this host), or
whose text is not ours (garbage), is taken over (its text kept in `taken_over`); an empty one is left alone for
EMPTY_GRACE_S (a run that has just created it is about to write its pid). Folders the lock had to create
for itself are removed again on release when nothing else was put in them: a run refused or failed on bad input
leaves no folder behind.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

from paperqa_tune.errors import InputError, RunFailure

EMPTY_GRACE_S = 10  # an empty lock younger than this is a run starting now, not a crash's leftover


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a lock it holds is live)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def make_dirs(folder: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders this call created, outermost first (for remove_empty)."""
    missing = []
    for d in [Path(folder), *Path(folder).parents]:
        if d.exists() or d.is_symlink():
            break
        missing.append(d)
    created = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:  # made by another process at the same moment: not ours to remove
                continue
            created.append(d)
    except BaseException:  # refused half-way (permissions, a full disk): leave none of ours behind
        remove_empty(created)
        raise
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders of make_dirs that are still empty, innermost first (one in use stays)."""
    for d in reversed(folders):
        with contextlib.suppress(OSError):
            d.rmdir()


class LockFile:
    """`with LockFile(path, what, instead):` holds the lock file `path` while this run writes `what` (words for
    messages: the outputs); `instead` is the other way out a refused user is offered ("choose another --out")."""

    def __init__(self, path: str | os.PathLike, what: str, instead: str = "choose other output paths"):
        self.path, self.what, self.instead = Path(path), what, instead
        self.held, self.created = False, []
        self.taken_over: str | None = None  # the text of a stale lock this one replaced (see note())

    def holder(self) -> str | None:
        """Who may still hold the lock ('process P', 'process P on host H'), or None when it is stale."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError as e:
            return f"unknown ({e.strerror})"
        parts = text.split()
        if not parts:  # being written by a run starting this instant, or left empty by a crash
            with contextlib.suppress(OSError):
                return "a run starting now" if time.time() - self.path.stat().st_mtime < EMPTY_GRACE_S else None
            return None
        if not parts[0].isdigit():
            return None  # not a lock this code wrote: nobody to wait for
        pid = int(parts[0])
        host = parts[1] if len(parts) > 1 else socket.gethostname()  # "pid" alone: an older lock, of this host
        if host != socket.gethostname():
            return f"process {pid} on {host}"  # cannot tell whether it still runs
        return f"process {pid}" if pid and pid != os.getpid() and pid_alive(pid) else None

    def acquire(self) -> "LockFile":
        """Take the lock, or raise InputError naming the live run that holds it (leaving no folder it made)."""
        self.created = make_dirs(self.path.parent)
        try:
            self._take()
        except BaseException:
            self.release()
            raise
        return self

    def _take(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                who = self.holder()
                if who:
                    raise InputError(f"another run ({who}) is writing {self.what}: it holds the lock {self.path}; "
                                     f"wait for it to finish or {self.instead} (delete the lock only if no such run "
                                     "exists)") from None
                with contextlib.suppress(OSError):
                    self.taken_over = self.path.read_text(encoding="utf-8", errors="replace")
                self.path.unlink(missing_ok=True)  # left by a killed run: take it over
                continue
            self.held = True  # the file is ours from here on: release() removes it whatever happens next
            self._write_owner(fd)
            return
        raise InputError(f"cannot take the lock {self.path}; delete it if no run is writing {self.what}")

    def _write_owner(self, fd: int) -> None:
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
        except OSError as e:  # a full disk: exit 1 naming the lock, not a traceback
            raise RunFailure(f"cannot write the lock {self.path}: {e.strerror or e}; free space on that disk (or fix "
                             "its permissions), then rerun") from None

    def note(self, word: str) -> None:
        """Add `word` to the held lock's text ("pid host word"), atomically (renamed over it: never an empty or
        half-written lock): what a run that takes this lock over after a kill reads in `taken_over`."""
        tmp = self.path.with_name(self.path.name + ".partial")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {socket.gethostname()} {word}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def release(self) -> None:
        """Drop the lock (if held) and the folders acquire() created, when nothing else went into them."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        remove_empty(self.created)
        self.created = []

    def __enter__(self) -> "LockFile":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
