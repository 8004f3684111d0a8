"""Shared, pure helpers for the four scripts: the chat format, JSONL I/O, small utilities.

Nothing here runs at import time and nothing here imports torch or transformers, so every script
(and its tests) can import it cheaply.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

# The chat template shipped with HuggingFaceH4/zephyr-7b-beta (tokenizer_config.json), verbatim.
# transformers renders it with trim_blocks/lstrip_blocks, which gives
#   <|system|>\n{sys}</s>\n<|user|>\n{q}</s>\n<|assistant|>\n{a}</s>\n
# Used when a tokenizer carries no template of its own.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful research assistant. Answer questions about scientific papers accurately "
    "and concisely, using only what the paper states. If the paper does not say, answer that it "
    "does not; if a question rests on a false premise, correct it."
)

ROLES = ("system", "user", "assistant")
EOS = "</s>"
_MARKER_RE = re.compile(r"<\|(system|user|assistant)\|>")


class InputError(Exception):
    """Bad usage or bad input: the scripts print the message and exit with code 2."""


class RunFailure(Exception):
    """A failure at run time that is not the input's fault (non-finite loss, out of memory at the smallest
    batch): the scripts print the message and exit with code 1."""


# --------------------------------------------------------------------------- chat format
def render_zephyr(messages: list[dict], add_generation_prompt: bool = False, eos: str = EOS) -> str:
    """Render messages exactly as the Zephyr template does (the pure-Python twin of the Jinja)."""
    out = []
    for m in messages:
        if m["role"] in ROLES:
            out.append(f"<|{m['role']}|>\n{m['content']}{eos}\n")
    if add_generation_prompt:
        out.append("<|assistant|>\n")
    return "".join(out)


def parse_chat(text: str, eos: str = EOS) -> list[dict]:
    """Parse a rendered chat back into messages.

    Accepts both the Zephyr form (`<|user|>\\nq</s>\\n`) and the seed's flat form
    (`<|system|>sys<|user|>q<|assistant|>a`, no newlines, no `</s>`). Raises ValueError when the
    text carries no role marker or a turn is empty.
    """
    parts = _MARKER_RE.split(text)
    if len(parts) < 3:
        raise ValueError("no <|system|>/<|user|>/<|assistant|> marker found")
    if parts[0].strip() and parts[0].strip() != "<s>":
        raise ValueError(f"text before the first role marker: {parts[0].strip()[:40]!r}")
    messages = []
    for role, body in zip(parts[1::2], parts[2::2]):
        if body.startswith("\n"):
            body = body[1:]
        body = body.rstrip("\n")
        if body.endswith(eos):
            body = body[: -len(eos)]
        body = body.strip()
        if not body:
            raise ValueError(f"empty <|{role}|> turn")
        messages.append({"role": role, "content": body})
    return messages


def validate_messages(messages: Any) -> list[dict]:
    """Check a `messages` value from a data file; return it normalised or raise ValueError."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] needs a role of {'/'.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"messages[{i}] ({m['role']}) has empty content")
        out.append({"role": m["role"], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant turn")
    return out


def record_messages(record: dict) -> list[dict]:
    """Messages of one training record: `messages` if present, else parsed from `text`."""
    if "messages" in record:
        return validate_messages(record["messages"])
    if isinstance(record.get("text"), str):
        return validate_messages(parse_chat(record["text"]))
    raise ValueError("record has neither 'messages' nor 'text'")


def chat_record(messages: list[dict], meta: dict | None = None) -> dict:
    """A `data/synthetic_qa.jsonl` record as DESIGN.md defines it."""
    return {"text": render_zephyr(messages), "messages": messages, "meta": meta or {}}


def qa_messages(question: str, answer: str | None = None, system: str | None = DEFAULT_SYSTEM_PROMPT,
                history: list[dict] = ()) -> list[dict]:
    """One exchange, after the earlier user/assistant turns of its conversation (`history`); `system` None or
    empty means no system turn (data that had none is evaluated without)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + list(history)
    msgs.append({"role": "user", "content": question})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template Zephyr's. Returns True if one was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
    return True


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


def run_main(fn, argv=None, interrupted: str = "work done so far is saved, rerun the same command to resume",
             show_errors: bool = True) -> int:
    """Call a script body with the documented exit codes: InputError -> 2, RunFailure -> 1, Ctrl-C -> 130, and
    a file-system error no step converted: permissions or a looping link -> 2, anything else (a full disk) -> 1;
    each with a one-line message on stderr, never a traceback (show_errors False: no message, e.g. on all but one
    process)."""
    try:
        return fn(argv)
    except InputError as e:
        code, msg = 2, f"error: {e}"
    except RunFailure as e:
        code, msg = 1, f"error: {e}"
    except PermissionError as e:  # a file-system error no step converted: the setup's problem
        code, msg = 2, f"error: {os_error_text(e)}: check the permissions there, or choose another path"
    except OSError as e:  # e.g. a full disk while appending to a cache, stdout closed under a pipe
        if e.errno == errno.ELOOP:  # a looping link no check caught (Python 3.13 raises it on open): the input's fault
            code, msg = 2, f"error: {link_loop_text(e.filename or '(a path)')}"
        else:
            code, msg = 1, f"error: {os_error_text(e)}"
    except KeyboardInterrupt:
        code, msg = 130, f"interrupted; {interrupted}"
    if show_errors:
        print(msg, file=sys.stderr)
    return code


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: the module docstring as written, and every flag's default after its help unless
    the help already says what the default is ("default:" in the text)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d == [] or d is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_flag(group, name: str, **kw):
    """group.add_argument(name, **kw), also accepting the dashed spelling of an underscored flag
    (--max-tokens for --max_tokens) without listing it in --help: commands written before the flags took
    the seed's underscores keep working."""
    action = group.add_argument(name, **kw)
    if "_" in name:
        hidden = {k: v for k, v in kw.items() if k not in ("help", "default", "dest")}
        group.add_argument(name.replace("_", "-"), dest=action.dest, help=argparse.SUPPRESS,
                           default=argparse.SUPPRESS, **hidden)
    return action


# --------------------------------------------------------------------------- tokenizer glue
def chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render with the tokenizer's own chat template (Zephyr's when it has none).

    Training, evaluation and inference all go through here so they see the same format.
    """
    ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of rendered chat text with exactly one BOS in front (templates like Zephyr's write
    none and the tokenizer adds it; templates that write it themselves must not get a second)."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def finite_float(text: str) -> float:
    """argparse type for a float flag: a finite number. inf and nan (any spelling float() takes) are refused at parse
    time, so argparse exits 2 naming the flag ("argument --lr: ..."), before anything is read or written."""
    import math

    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a finite value")
    return value
