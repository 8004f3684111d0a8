"""One run's output files, decided in one place and written together (torch-free).

    with OutputSet({"--out": out, "--eval_out": eval_out}, inputs=[abstracts], overwrite=args.overwrite) as outs:
        write_staged(outs.stage("--out"), text)       # written beside the target, under a temp name
        ...
        outs.commit()                                 # every staged file renamed into place, in order

Guarantees: the outputs are distinct files, none of them is an input and none is a folder; existing outputs
are replaced only with overwrite; while a run writes, a lock file beside the first output keeps a second
run off the same outputs (a lock left by a killed run is taken over; paperqa_tune/locks.py), and a folder made
for the outputs is removed again when the run ends without writing into it; nothing replaces an existing output
before commit(), so a run that fails or is killed before it leaves the previous outputs exactly as they were, and
its rerun starts clean (stale temp files of the killed run are removed).

commit() first writes a journal (beside the first output) of every rename and removal it is about to make, and
of the command that made the set (`command`: the run's arguments, --overwrite aside); then it removes the old
'finished' marker (the last output of its order: a manifest, summary.json), so while the journal exists the set
reads as unfinished; then the renames; the journal goes last. A run killed before the journal changed nothing;
one killed after it is rolled forward by the next run on the same outputs, before that run does anything else;
once the set is whole the lock says so ("committed:<command>", locks.LockFile.note), so a run killed between
its commit and the release of its lock counts as finished too.
What the next run does then (the rule for reruns):
  - the same command (same arguments in the same folder, with or without --overwrite): its outputs are whole now
    and are what it would write; `finished_earlier` is True and the script says so and exits 0, redoing nothing;
  - another command: the completed set is a finished one like any other: replaced only with overwrite.
A staged output that was not written (a chart without matplotlib) is removed at commit, so no output of an older
run stays beside the new ones.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from paperqa_tune.errors import InputError

from paperqa_tune.files import check_outputs_free, resolve_path
from paperqa_tune.locks import LockFile, make_dirs, pid_alive, remove_empty  # noqa: F401 (pid_alive: for loading.py)

PARTIAL = ".partial"


COMMITTED = "committed:"  # the word commit() adds to the lock once the set is whole (locks.LockFile.note)


def _committed(lock_text: str) -> str | None:
    """The command digest a stale lock says was committed ("pid host committed:<digest>"), else None."""
    for word in lock_text.split()[2:]:
        if word.startswith(COMMITTED):
            return word[len(COMMITTED):] or None
    return None


def command_digest(command) -> str | None:
    """A short fingerprint of `command` (anything JSON can write: the run's arguments), or None."""
    if command is None:
        return None
    text = json.dumps(command, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def run_command(script: str, args, leave_out: Iterable[str] = ("overwrite",)) -> dict:
    """The identity of a run for OutputSet(command=...): the script, the folder it ran in (relative paths) and its
    parsed arguments but --overwrite (and secrets): a rerun of the same command matches, with or without it."""
    skip = set(leave_out) | {"api_key"}
    return {"script": script, "cwd": os.getcwd(), "args": {k: v for k, v in vars(args).items() if k not in skip}}


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
                 overwrite: bool = False, command=None):
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
        self.command = command_digest(command)
        self.finished_earlier = False  # lock() completed an interrupted commit of this same command (see above)
        self.completed: str | None = None  # lock() completed one of another command: why a refusal follows
        first = next(iter(self.paths.values()))
        self.lock_path = first.with_name(f".{first.name}.lock")
        self.journal_path = first.with_name(f".{first.name}.commit.json")
        if not self.journal_path.exists() and not self.lock_path.exists():
            self._check_free()  # (else lock() decides: it completes an interrupted commit, reads a stale lock)
        self.staged: dict[str, Path] = {}
        self.locked = False
        self._lock = LockFile(self.lock_path, ", ".join(map(str, self.paths.values())))
        self.made: list[Path] = []  # folders stage() created, removed again by unlock() if they stay empty

    def _check_free(self) -> None:
        if self.completed and not self.overwrite:
            existing = [str(p) for p in self.paths.values() if p.exists()]
            if existing:
                raise InputError(f"{', '.join(existing)} already exist(s): {self.completed} was stopped "
                                 "while putting them in place, and they are now whole, as that run wrote them; "
                                 "pass --overwrite to replace them with this command's, or choose another "
                                 "output path")
        check_outputs_free(self.paths.values(), self.overwrite)

    def finished_note(self) -> str:
        """What a script prints when `finished_earlier`, before it exits 0 without redoing the work."""
        return (f"note: an earlier run of this same command was stopped while putting its finished outputs in "
                f"place; that is done now, so {', '.join(str(p) for p in self.paths.values() if p.exists())} are "
                "complete and nothing was redone (pass --overwrite to produce them again)")

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
                theirs = self._finish_interrupted_commit()
                if self.command is not None and theirs == self.command:
                    self.finished_earlier = True  # whole, and what this command writes: nothing to check or redo
                else:
                    self.completed = "a run of another command" if theirs else "an earlier run"
            elif self._lock.taken_over:  # killed after its commit, before it let go of the lock: whole already
                theirs = _committed(self._lock.taken_over)
                if theirs and theirs == self.command:
                    self.finished_earlier = True
                elif theirs:
                    self.completed = "a run of another command"
            self._remove_stale_partials()
            if not self.finished_earlier:
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

    def _finish_interrupted_commit(self) -> str | None:
        """A run was killed between its journal and the end of its commit: do the renames (and removals) it did
        not get to. Returns the command digest the journal names (None for a journal without one)."""
        try:
            journal = json.loads(self.journal_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            journal = []  # torn while being written (the journal is renamed into place, so not by this code)
        if isinstance(journal, list):
            journal = {"moves": journal}  # an older journal: renames only, no command
        self._apply(journal.get("moves") or [])
        self.journal_path.unlink(missing_ok=True)
        command = journal.get("command")
        return command if isinstance(command, str) else None

    @staticmethod
    def _apply(moves: list) -> None:
        """The commit proper, also its replay: removals first, then the old 'finished' marker (the last rename's
        target) while its new file still waits, then the renames in order. Each step is idempotent."""
        for tmp, final in moves:
            if tmp is None:
                Path(final).unlink(missing_ok=True)
        renames = [(tmp, final) for tmp, final in moves if tmp is not None]
        if renames and Path(renames[-1][0]).exists():
            Path(renames[-1][1]).unlink(missing_ok=True)
        for tmp, final in renames:
            if Path(tmp).exists():
                os.replace(tmp, final)
        for d in {Path(final).parent for _, final in moves}:
            _fsync_dir(d)

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
        'finished' marker last: it is removed first, so the set reads as unfinished until the last rename).
        A staged output whose file was not written is removed (no older one stays beside the new set); outputs
        never staged are left as they are."""
        names = list(order) if order is not None else list(self.paths)
        names += [n for n in self.staged if n not in names]
        names = [n for n in names if n in self.staged]
        moves = [(os.path.abspath(self.staged[n]) if self.staged[n].exists() else None,
                  os.path.abspath(self.paths[n])) for n in names]
        tmp_journal = self.journal_path.with_name(self.journal_path.name + PARTIAL)
        with open(tmp_journal, "w", encoding="utf-8") as f:
            json.dump({"command": self.command, "moves": moves}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_journal, self.journal_path)  # from here on the renames will happen, now or in the next run
        _fsync_dir(self.journal_path.parent)
        self._apply(moves)
        if self.locked:  # the set is whole: a run killed from here on has finished its work (see lock())
            self._lock.note(f"{COMMITTED}{self.command or ''}")
        self.journal_path.unlink(missing_ok=True)
        self.staged.clear()

    def abort(self) -> None:
        """Drop every staged file; the previous outputs stay untouched."""
        for tmp in self.staged.values():
            tmp.unlink(missing_ok=True)
        self.staged.clear()
