"""One run's output files, decided in one place and written together (torch-free).

    with OutputSet({"--out": out, "--eval_out": eval_out}, inputs=[abstracts], overwrite=args.overwrite) as outs:
        write_staged(outs.stage("--out"), text)       # written beside the target, under a temp name
        ...
        outs.commit()                                 # every staged file renamed into place, in order

Guarantees: the outputs are distinct files, none of them is an input and none is a folder; existing outputs
are replaced only with overwrite; while a run writes, a lock file beside the first output keeps a second
run off the same outputs (a lock left by a killed run is taken over; paperqa_tune/locks.py), and a folder made
for the outputs is removed again when the run ends without writing into it; nothing replaces an existing output
before commit(), so a run that fails or is killed leaves the previous outputs exactly as they were, and
its rerun starts clean (stale temp files of the killed run are removed). commit() first writes a journal of
the renames it is about to make: a run killed in the middle of them is completed by the next run on the
same outputs, so the set is never left half old, half new.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from common import InputError, check_outputs_free, resolve_path
from paperqa_tune.locks import LockFile, make_dirs, pid_alive, remove_empty  # noqa: F401 (pid_alive: for loading.py)

PARTIAL = ".partial"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_staged(path: Path, text) -> None:
    """Write an output's text (a string, or an iterable of strings written one by one: a large JSONL never held
    whole in memory) to its staged path (OutputSet.stage): no second temp file, flushed to disk before
    OutputSet.commit() renames it into place (or abort() removes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        if isinstance(text, str):
            f.write(text)
        else:
            f.writelines(text)
        f.flush()
        os.fsync(f.fileno())


class OutputSet:
    def __init__(self, outputs: dict[str, str | os.PathLike], inputs: Iterable[str | os.PathLike] = (),
                 overwrite: bool = False):
        self.paths = {name: Path(p) for name, p in outputs.items() if p is not None}
        if not self.paths:
            raise ValueError("OutputSet needs at least one output")
        seen: dict[Path, str] = {}
        for name, p in self.paths.items():
            r = resolve_path(p, name)
            if r in seen:
                raise InputError(f"{seen[r]} and {name} are the same file ({p}); give each output its own path")
            seen[r] = name
            if p.is_dir():
                raise InputError(f"{name} {p} is a folder; give a file path")
            for parent in p.parents:
                if parent.exists():
                    if not parent.is_dir():
                        raise InputError(f"{name} {p}: {parent} is a file, not a folder")
                    break
        for i in inputs:
            if i is None:
                continue
            name = seen.get(resolve_path(i, "--input"))
            if name is not None:
                raise InputError(f"{name} {self.paths[name]} is also an input of this run ({i}) and would be "
                                 "overwritten; choose another output path")
        self.overwrite = overwrite
        first = next(iter(self.paths.values()))
        self.lock_path = first.with_name(f".{first.name}.lock")
        self.journal_path = first.with_name(f".{first.name}.commit.json")
        if not self.journal_path.exists():  # (an interrupted commit is completed first, see lock())
            self._check_free()
        self.staged: dict[str, Path] = {}
        self.locked = False
        self._lock = LockFile(self.lock_path, ", ".join(map(str, self.paths.values())))
        self.made: list[Path] = []  # folders stage() created, removed again by unlock() if they stay empty

    def _check_free(self) -> None:
        check_outputs_free(self.paths.values(), self.overwrite)

    # ------------------------------------------------------------------ lock
    def __enter__(self) -> "OutputSet":
        self.lock()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        self.unlock()

    def lock(self) -> None:
        """Take the lock file (paperqa_tune.locks), or raise InputError naming the live run that holds it."""
        self._lock.acquire()
        self.locked = True
        try:
            if self.journal_path.exists():
                self._finish_interrupted_commit()
            self._remove_stale_partials()
            self._check_free()  # again, now that no other run can be writing
        except BaseException:
            self.unlock()  # refused after all: leave no lock (and no folder) behind
            raise

    def unlock(self) -> None:
        """Release the lock; folders this run created and left empty (it failed before writing) go with it."""
        remove_empty(self.made)  # first: one may lie in a folder the lock created
        self.made = []
        if self.locked:
            self._lock.release()
            self.locked = False

    def _remove_stale_partials(self) -> None:
        for p in self.paths.values():
            if p.parent.is_dir():
                # our temp names, and the temp files an atomic writer makes beside them
                for pattern in (f".{p.name}.*{PARTIAL}", f"..{p.name}.*{PARTIAL}.*"):
                    for stale in p.parent.glob(pattern):
                        stale.unlink(missing_ok=True)

    def _finish_interrupted_commit(self) -> None:
        """A run was killed between the renames of its commit: do the renames it did not get to."""
        try:
            moves = json.loads(self.journal_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moves = []  # torn while being written: no rename had started
        for tmp, final in moves:
            if Path(tmp).exists():
                os.replace(tmp, final)
        self.journal_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ staging and commit
    def stage(self, name: str) -> Path:
        """Where to write output `name` now: a temp file beside its final path."""
        final = self.paths[name]
        self.made += make_dirs(final.parent)
        tmp = final.with_name(f".{final.name}.{os.getpid()}{PARTIAL}")
        self.staged[name] = tmp
        return tmp

    def commit(self, order: Iterable[str] | None = None) -> None:
        """Rename every staged file into place, in `order` (default: as declared; put a manifest or other
        'finished' marker last). Outputs not staged are left as they are."""
        names = list(order) if order is not None else list(self.paths)
        names += [n for n in self.staged if n not in names]
        moves = [(str(self.staged[n]), str(self.paths[n])) for n in names
                 if n in self.staged and self.staged[n].exists()]
        tmp_journal = self.journal_path.with_name(self.journal_path.name + PARTIAL)
        with open(tmp_journal, "w", encoding="utf-8") as f:
            json.dump(moves, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_journal, self.journal_path)  # from here on the renames will happen, now or in the next run
        for tmp, final in moves:
            os.replace(tmp, final)
        for d in {Path(final).parent for _, final in moves}:
            _fsync_dir(d)
        self.journal_path.unlink(missing_ok=True)
        self.staged.clear()

    def abort(self) -> None:
        """Drop every staged file; the previous outputs stay untouched."""
        for tmp in self.staged.values():
            tmp.unlink(missing_ok=True)
        self.staged.clear()
