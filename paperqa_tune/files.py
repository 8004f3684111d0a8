"""Files as the stages read and write them: JSONL (file:line in every error), writes that are never seen
half-done, user-given paths resolved, the run folder's fixed file names, and OSErrors in words."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from paperqa_tune.errors import InputError


# --------------------------------------------------------------------------- JSONL and files
def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-blank line; InputError names file:line on bad input."""
    path = Path(path)
    resolve_path(path, "")  # a looping link: said so (is_file() below would call it missing)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a .jsonl file")
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        f = open(path, "rb")
    except OSError as e:  # PermissionError and the like
        raise InputError(f"{path}: cannot read it ({e.strerror}); check its permissions") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM, as some editors save
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                                 "re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                                 "fix or delete that line") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so readers never see it half-written: temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, output_mode())  # mkstemp creates 0600 files; outputs get what a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_mode() -> int:
    """The permissions a plain open() gives a new file under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def share_like_outputs(folder: str | os.PathLike) -> None:
    """Give the files a library wrote into `folder` the permissions of our other outputs: safetensors writes
    weights 0600, which another user or a serving process cannot read."""
    mode = output_mode()
    for f in Path(folder).rglob("*"):
        if f.is_file() and (f.stat().st_mode & 0o777) != mode:
            os.chmod(f, mode)


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(_dumps(r) + "\n" for r in records))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record and flush it to disk, so a kill loses at most the line being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(_dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_tolerant(path: str | os.PathLike) -> list[dict]:
    """Read an append-only log (cache, checkpoint) skipping a torn last line left by a kill."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


DEFAULT_RUN_DIR = "models/zephyr-7b-qlora"  # the run folder evaluation and inference read by default
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # a run folder's LoRA weights (then metrics.json says finished)
HELDOUT_QUESTIONS_FILE = "eval_questions.jsonl"  # a run folder's held-out samples, as evaluation questions


def eval_questions_path(train_jsonl: str | os.PathLike) -> Path:
    """Where generate_qa.py writes the held-out questions of a training file: beside it, so a run's questions
    are found from the training file alone (data/synthetic_qa.jsonl -> data/eval_questions.jsonl,
    runs/x.jsonl -> runs/x_eval_questions.jsonl)."""
    train = Path(train_jsonl)
    name = "eval_questions.jsonl" if train.stem == "synthetic_qa" else f"{train.stem}_eval_questions.jsonl"
    return train.with_name(name)


def check_outputs_free(paths: Iterable[str | os.PathLike], overwrite: bool) -> None:
    """Refuse to clobber finished outputs unless --overwrite was given."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise InputError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace, "
                         "or choose another output path")


def resolve_path(path: str | os.PathLike, what: str) -> Path:
    """`path` (a user-given path, named `what` in messages: "--out", "--input") made absolute with its symbolic
    links followed; a link that loops is InputError naming the path, never a traceback. Every user-given path is
    resolved through here."""
    try:
        resolved = Path(path).resolve()
        os.stat(resolved)  # Python 3.13 resolves a loop without complaint: stat still reports it (ELOOP)
    except RuntimeError:  # Python < 3.13: "Symlink loop from ..."
        raise InputError(link_loop_text(path, what)) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(link_loop_text(path, what)) from None
        # missing (an output not written yet) or not readable: resolved as far as it goes, for the caller to judge
    return resolved


def link_loop_text(path, what: str = "") -> str:
    """The message for a looping link at `path` (given as option `what`, if any)."""
    return (f"{what + ' ' if what else ''}{path}: a symbolic link that loops (it points back to itself, directly "
            "or through other links); fix the link or remove it")


def os_error_text(e: OSError) -> str:
    """An OSError in words, with what to do about a full disk."""
    text = f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        text += "; the disk is full: free some space and rerun"
    return text


def jsonl_lines(records: Iterable[dict]) -> Iterator[str]:
    """JSONL lines, one at a time (20,000 abstracts' records joined into one string doubled a run's peak)."""
    return (json.dumps(r, ensure_ascii=False) + "\n" for r in records)
