"""A run folder (models/<run>/): what train_qlora_hf.py writes into it, safely, and what evaluation and
inference read back from it.

Training's output path is checked here too (out_dir_problems).
Writing, in order: a lock file beside the folder while a run writes it (RunLock); where the run trains
(check_out_dir: the folder itself, or out/.overwrite for --overwrite, so that the finished run it replaces
stays whole until the new one is saved); the checkpoints and outputs; then, for --overwrite, the swap
(commit_staged), which a kill may cut short and the next run on the folder finishes (finish_commit).

Finished (run_unfinished): the adapter's weights are there, metrics.json (where there is one) says "finished": true,
and no --overwrite swap is pending. save_outputs writes metrics.json with "finished": false before the weights and
rewrites it with "finished": true as the very last file, so a failure or kill at any point leaves a folder that
says unfinished. A folder without metrics.json (a PEFT adapter saved by hand, or by an older version) counts as
finished when its weights are there. Every reader (read_run: evaluation, inference, --merge_out; check_out_dir:
training) uses that one rule."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from paperqa_tune.errors import InputError, RunFailure

from paperqa_tune.files import ADAPTER_WEIGHTS, HELDOUT_QUESTIONS_FILE, resolve_path, sha256_file, share_like_outputs, write_json_atomic

from paperqa_tune.messages import DEFAULT_SYSTEM_PROMPT
from paperqa_tune.locks import LockFile
from paperqa_tune.loading import requested_precision

ADAPTER_FILES = (ADAPTER_WEIGHTS, "adapter_config.json")
RUN_FILES = ADAPTER_FILES + ("run_config.json", "metrics.json", "loss.png", "README.md", HELDOUT_QUESTIONS_FILE)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
STAGE_DIR = ".overwrite"      # an --overwrite run trains here, beside the finished run it replaces
COMMIT_FILE = "COMMIT.json"   # in STAGE_DIR: the staged run is complete; its files are being moved into place
METRICS_FILE = "metrics.json"  # its "finished": true is the last thing a run writes
RESUME_HINT = "rerun with --resume (in place of --overwrite, if given): it continues from the last checkpoint"


# --------------------------------------------------------------------------- training's input paths
def out_dir_problems(out: Path) -> list[str]:
    """What makes `out` unusable as a run folder (a looping link, a file, or under one)."""
    try:
        resolve_path(out, "--out")
    except InputError as e:  # said so, rather than "a file" below (a loop is neither file nor folder)
        return [str(e)]
    if out.is_file():
        return [f"--out {out} is a file; give a folder"]
    above = next((p for p in out.parents if p.exists() or p.is_symlink()), None)
    if above is not None and not above.is_dir():
        return [f"--out {out}: {above} is a file, not a folder; choose another --out"]
    return []


# --------------------------------------------------------------------------- writing (training)
def lock_path(out: Path) -> Path:
    out = resolve_path(out, "--out")
    return out.parent / f".{out.name}.lock"


def RunLock(out: Path) -> LockFile:  # noqa: N802 (was a class; `with RunLock(out):` reads as before)
    """`with RunLock(out):` holds .<name>.lock beside the run folder while a run writes it (paperqa_tune/locks.py:
    a second run is refused naming the lock, a killed run's lock taken over). Beside, not inside: a run refused
    early leaves no folder behind."""
    return LockFile(lock_path(out), str(out), "choose another --out")


@contextlib.contextmanager
def disk_errors(path, then: str):
    """A failed write inside the block (disk full, permissions) as a RunFailure naming `path`, the reason and the free
    space, never a traceback. torch.save and safetensors report a full disk as RuntimeError/SafetensorError."""
    try:
        yield
    except Exception as e:
        name = type(e).__name__
        if not (isinstance(e, OSError) or name == "SafetensorError" or
                (isinstance(e, RuntimeError) and any(s in str(e) for s in ("inline_container", "PytorchStreamWriter",
                                                                            "file write failed")))):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{name}: {str(e)[:200]}"
        where = next((p for p in [Path(path), *Path(path).parents] if p.exists()), Path("."))
        try:
            free = f"{shutil.disk_usage(where).free / 2**20:,.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        raise RunFailure(f"cannot write {path}: {reason} ({free}); free space on that disk (or fix its permissions), "
                         f"then {then}") from None


def check_out_dir(out: Path, overwrite: bool, resume: bool) -> Path:
    """The folder this run trains in, or InputError: a finished run is never replaced, nor an unfinished one
    restarted, unless the flags say so. Reads only (every process may call it).

    --overwrite trains in out/.overwrite, so the finished run stays whole (and loadable) until the new one is
    saved and commit_staged swaps it in; --resume continues such an --overwrite run that was cut short."""
    from paperqa_tune.checkpoints import list_checkpoints  # imports torch: training's path, not evaluation's

    stage = out / STAGE_DIR
    pending = (stage / COMMIT_FILE).exists()  # saved and being swapped in: as good as finished
    staged = stage.is_dir() and not pending
    if overwrite or (resume and staged):
        return stage
    if pending or run_unfinished(out) is None:
        cut = f"; an --overwrite run into it was cut short ({stage}): --resume continues it" if staged else ""
        raise InputError(f"{out} holds a finished run; pass --overwrite to replace it or choose another --out{cut}")
    unfinished = list_checkpoints(out) or list_checkpoints(stage) or ([stage] if staged else [])
    if unfinished and not resume:
        raise InputError(f"{out} holds an unfinished run ({unfinished[-1]}); pass --resume to continue it or "
                         "--overwrite to start over")
    return out


def same_command_unfinished(out: Path, args: dict) -> Path | None:
    """The last checkpoint of an unfinished run in `out` that this very command started (its run_config.json
    records the same flags, --resume and --overwrite aside), or None. Rerunning the command after a kill then
    continues it, as generate_qa.py and eval_compare.py do; a run started with other flags still needs the user
    to choose --resume or --overwrite. Reads only (every process may call it)."""
    from paperqa_tune.checkpoints import list_checkpoints

    out = Path(out)
    if not out.is_dir() or (out / STAGE_DIR).exists() or run_unfinished(out) is None:
        return None
    checkpoints = list_checkpoints(out)
    recorded = _load_json(out / "run_config.json")
    if not checkpoints or not isinstance(recorded, dict) or not isinstance(recorded.get("args"), dict):
        return None

    def flags(a: dict) -> str:
        return json.dumps({k: v for k, v in a.items() if k not in ("resume", "overwrite")}, sort_keys=True, default=str)

    return checkpoints[-1] if flags(recorded["args"]) == flags(args) else None


def discard_failed_stage(out: Path, work: Path | None) -> None:
    """After a failed --overwrite (or --resume of one) that saved no checkpoint: remove its staging folder, so
    `out` is exactly as before. One with a checkpoint stays for --resume; one being swapped in stays too."""
    from paperqa_tune.checkpoints import list_checkpoints

    if work is not None and work != Path(out) and work.is_dir() and not list_checkpoints(work) \
            and not (work / COMMIT_FILE).exists():
        shutil.rmtree(work, ignore_errors=True)


def commit_staged(out: Path) -> None:
    """Replace the run in `out` by the complete one staged in out/.overwrite. The staged file names go into
    COMMIT_FILE first: a kill halfway leaves a commit the next run finishes (finish_commit), never a mix."""
    stage = Path(out) / STAGE_DIR
    if not (stage / COMMIT_FILE).exists():
        write_json_atomic(stage / COMMIT_FILE, {"files": sorted(p.name for p in stage.iterdir())})
    finish_commit(out)


def finish_commit(out: Path) -> bool:
    """Finish a commit_staged (idempotent); False when none is pending. Call under the run's lock."""
    out = Path(out)
    stage = out / STAGE_DIR
    if not (stage / COMMIT_FILE).exists():
        return False
    names = json.loads((stage / COMMIT_FILE).read_text(encoding="utf-8"))["files"]
    if (stage / ADAPTER_WEIGHTS).exists():
        (out / ADAPTER_WEIGHTS).unlink(missing_ok=True)  # the old run stops being finished before any file changes
    for name in RUN_FILES + TOKENIZER_FILES + ("checkpoints", ".adapter.tmp"):
        if name not in names:  # the old run's, with no counterpart in the new one
            _remove(out / name)
    # the weights, then metrics.json ("finished": true) last; until COMMIT_FILE goes, readers see a pending swap
    for name in sorted(names, key=lambda n: (n == METRICS_FILE, n == ADAPTER_WEIGHTS)):
        if (stage / name).exists() or (stage / name).is_symlink():
            _remove(out / name)
            os.replace(stage / name, out / name)
    shutil.rmtree(stage)
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def chat_template_source(tokenizer) -> str:
    """run_config.json's chat_template_source: "model" when the tokenizer came with its own chat template,
    "project default" when loading.load_tokenizer gave it Zephyr's (messages.ensure_chat_template). transformers
    passes a template it read from the model's files to the tokenizer as init_kwargs["chat_template"]."""
    from paperqa_tune.messages import ZEPHYR_CHAT_TEMPLATE

    if (getattr(tokenizer, "init_kwargs", None) or {}).get("chat_template"):
        return "model"
    return "project default" if tokenizer.chat_template == ZEPHYR_CHAT_TEMPLATE else "model"


def chat_format_record(tokenizer) -> dict:
    """run_config.json's record of the chat format every stage renders and decodes with: the template, where it
    came from, and where an answer ends (messages.chat_stops: end_of_turn, eos_token_ids, stop_strings).
    Evaluation and inference render with the run's saved tokenizer (the same template) and stop at
    stop_strings as recorded here."""
    from paperqa_tune.messages import chat_stops

    return {"chat_template": tokenizer.chat_template, "chat_template_source": chat_template_source(tokenizer),
            **chat_stops(tokenizer)}


def decoding_stop_strings(run, tokenizer) -> tuple:
    """The stop strings a run's answers are decoded with: as run_config.json recorded them, or (a run from
    before they were recorded) worked out from its saved tokenizer's template the same way."""
    from paperqa_tune.messages import chat_stops

    return tuple(run.stop_strings if run.stop_strings is not None else chat_stops(tokenizer)["stop_strings"])


def system_prompts(samples: list[dict]) -> list[dict]:
    """The system prompts the training data used, most frequent first ({"prompt": None} = no system turn).
    Evaluation and inference read this from run_config.json so they prompt the way training did."""
    counts = Counter(s["messages"][0]["content"] if s["messages"][0]["role"] == "system" else None for s in samples)
    return [{"prompt": p, "count": n} for p, n in counts.most_common()]


def heldout_questions(val_samples: list[dict]) -> list[dict]:
    """Validation samples as evaluation questions (the format of data/eval_questions.jsonl): every exchange of
    each chat, a follow-up with the exchanges before it as "history", with the chat's own system prompt. They
    come from papers (or samples) never trained on."""
    out = []
    for i, s in enumerate(val_samples, 1):
        msgs = s["messages"]
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        turns = msgs[1:] if system is not None else msgs
        pairs = [(turns[k], turns[k + 1]) for k in range(0, len(turns) - 1, 2)
                 if turns[k]["role"] == "user" and turns[k + 1]["role"] == "assistant"]
        types = s.get("turn_types") or []  # generate_qa --turns: each turn's own type
        for k, (user, answer) in enumerate(pairs):
            out.append({"id": f"val-{i}" if len(pairs) == 1 else f"val-{i}-t{k + 1}", "question": user["content"],
                        "reference": answer["content"], "type": types[k] if k < len(types) else s["type"],
                        "paper_id": s["group"], "context": "",
                        "system": system, "source": f"training data line {s['line']}",
                        **({"history": turns[: 2 * k]} if k else {})})
    return out


def run_metrics(state: dict, t_start: float, device, world: int, resumed_from, finished: bool) -> dict:
    """metrics.json of a run from the training loop's state."""
    from paperqa_tune.train.memory import peak_memory

    peak, kind = peak_memory(device)
    secs = max(state["train_seconds"], 1e-9)
    return {"finished": finished, "steps": state["step"], "train": state["train"], "val": state["val"],
            "final_train_loss": state["train"][-1]["loss"] if state["train"] else None,
            "final_val_loss": state["val"][-1]["loss"] if state["val"] else None,
            "trained_tokens": state["trained_tokens"], "input_tokens": state["input_tokens"],
            "padded_tokens": state["padded_tokens"],
            "padding_share": 1 - state["input_tokens"] / max(state["padded_tokens"], 1),
            "tokens_per_s": state["input_tokens"] / secs, "trained_tokens_per_s": state["trained_tokens"] / secs,
            "train_seconds": state["train_seconds"], "wall_seconds": time.perf_counter() - t_start,
            "peak_memory_gb": peak, "peak_memory_kind": kind, "oom_backoffs": state["oom_backoffs"],
            "final_micro_batch": state["micro"], "world_size": world, "device": str(device),
            "resumed_from_step": resumed_from}


MEMORISED_VAL_RISE = 1.15  # the last validation loss this much above the best one...
MEMORISED_TRAIN_SHARE = 0.6  # ...while the training loss is below this share of it


def memorisation_warning(metrics: dict) -> str | None:
    """A line for the end of training when the train/validation gap says the adapter memorised its data: the
    validation loss rose MEMORISED_VAL_RISE x above its best while the training loss fell well below it (on
    SmolLM2-135M, 8 epochs at lr 1e-3: train 0.21, validation 4.06 after a best of 2.5). None otherwise."""
    val = [v["loss"] for v in metrics.get("val") or [] if v.get("loss") is not None]
    train = metrics.get("final_train_loss")
    if len(val) < 2 or train is None:
        return None
    best = min(val)
    if val[-1] < best * MEMORISED_VAL_RISE or train > val[-1] * MEMORISED_TRAIN_SHARE:
        return None
    return (f"warning: validation loss rose from {best:.2f} to {val[-1]:.2f} while the training loss fell to "
            f"{train:.2f}: the adapter memorised its training data. For questions about new papers fewer epochs or a "
            "lower --lr generalise better; for knowledge of the trained papers it can be what you want: compare "
            "eval_compare.py's two sets (unseen, knowledge)")


def write_metrics(out_dir, metrics: dict) -> None:
    """metrics.json and loss.png; a failed write is a RunFailure naming the file."""
    from paperqa_tune import charts

    with disk_errors(Path(out_dir) / "metrics.json", RESUME_HINT):
        write_json_atomic(Path(out_dir) / "metrics.json", metrics)
    with disk_errors(Path(out_dir) / "loss.png", RESUME_HINT):
        charts.plot_loss(metrics, Path(out_dir) / "loss.png")


def save_outputs(model, tokenizer, out: Path, metrics: dict, config: dict, last_good=None) -> None:
    """A finished run's outputs into `out`: the tokenizer, run_config.json, metrics.json saying "finished": false and
    loss.png, the adapter's weights, then metrics.json saying "finished": true as the very last write. A failed write is a RunFailure naming the file
    (the checkpoints stay, so --resume continues) and leaves a folder that says unfinished. Non-finite LoRA weights
    are never saved (RunFailure before anything is written; last_good: the checkpoint to name)."""
    check_finite_weights(model, f"after step {metrics.get('steps')}", last_good)
    with disk_errors(out, RESUME_HINT):
        tokenizer.save_pretrained(out)
    with disk_errors(out / "run_config.json", RESUME_HINT):
        write_json_atomic(out / "run_config.json", config)
    write_metrics(out, {**metrics, "finished": False})  # before the weights: until the end, the folder says unfinished
    with disk_errors(out / ADAPTER_WEIGHTS, RESUME_HINT):
        save_adapter(model, out)
    with disk_errors(out / METRICS_FILE, RESUME_HINT):
        write_json_atomic(out / METRICS_FILE, {**metrics, "finished": True})  # last: the run is finished


def nonfinite_tensors(tensors) -> tuple[int, int]:
    """(how many of `tensors` hold an inf or nan, how many there are), with one host sync."""
    import torch

    tensors = list(tensors)
    if not tensors:
        return 0, 0
    ok = torch.stack([torch.isfinite(t.detach()).all() for t in tensors])
    return int((~ok).sum().item()), len(tensors)


def check_finite_weights(model, when: str, last_good=None) -> None:
    """RunFailure when a trainable (LoRA) tensor of `model` holds an inf or nan: such an adapter is never saved."""
    bad, n = nonfinite_tensors(p for p in model.parameters() if p.requires_grad)
    if bad:
        raise RunFailure(f"{bad} of {n} LoRA weight tensors are non-finite (inf/nan) {when}; nothing saved as the "
                         f"result. Last good checkpoint: {last_good or 'none'}. The learning rate is likely too high: "
                         "start over with a lower --lr (--overwrite), or use --bf16 instead of --fp16")


def save_adapter(model, out: Path) -> None:
    """The PEFT adapter into `out`, weights last (save_outputs then writes metrics.json's "finished": true)."""
    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        share_like_outputs(tmp)  # safetensors writes the weights 0600
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == ADAPTER_WEIGHTS):
            os.replace(f, out / f.name)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def versions() -> dict:
    """Library versions and the GPU, for run_config.json."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return out


# --------------------------------------------------------------------------- reading (evaluation, inference)
def run_unfinished(folder) -> str | None:
    """Why the run folder is not a finished run, or None when it is (the rule in the module docstring)."""
    folder = Path(folder)
    if (folder / STAGE_DIR / COMMIT_FILE).exists():
        return (f"an --overwrite run was being swapped in when it stopped ({folder / STAGE_DIR}), so the run did not "
                "finish")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        return f"no {ADAPTER_WEIGHTS} here, so the run did not finish"
    metrics = _load_json(folder / METRICS_FILE)
    said = metrics.get("finished") if isinstance(metrics, dict) else None
    if metrics and said is not True:
        return f'{METRICS_FILE} says "finished": {json.dumps(said)}, so the run did not finish'
    return None


def _unfinished_hint(folder: Path) -> str:
    """What to do about an unfinished run folder."""
    if (folder / STAGE_DIR / COMMIT_FILE).exists():
        return f"rerun the training command on it (train_qlora_hf.py ... --out {folder}) to finish the swap"
    checkpoints = sorted((p for p in (folder / "checkpoints").glob("step-*") if p.name[5:].isdigit()),
                         key=lambda p: int(p.name[5:]))
    resume = f"rerun the training command with --resume to continue from {checkpoints[-1]}, or " if checkpoints else ""
    return (f"{resume}train again (train_qlora_hf.py ... --out {folder} --overwrite); or pass --adapter with a "
            "finished run")


@dataclass
class Run:
    """What later stages need from a run folder (models/<run>/) that train_qlora_hf.py wrote."""
    adapter: Path
    base_model: str
    args: dict = field(default_factory=dict)
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT  # None: the training data had no system turn
    dtype: str = "bfloat16"         # compute dtype training asked for (requested_precision)
    adapter_sha: str = ""
    stop_strings: list | None = None  # run_config.json's (chat_format_record); None: not recorded


def _load_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: malformed JSON ({e.msg} at line {e.lineno})") from None


def read_run(adapter, base_model: str | None = None) -> Run:
    """Read and check a run folder up front; `base_model` overrides the one the run recorded."""
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise InputError(f"{adapter}: adapter folder not found; train one with train_qlora_hf.py "
                         "or pass --adapter models/<run>")
    ours = any((adapter / name).exists() for name in ("adapter_config.json", "run_config.json", METRICS_FILE,
                                                       "checkpoints", STAGE_DIR))
    why = run_unfinished(adapter) if ours else None  # a training run's folder (its adapter files come last)
    if why:
        raise InputError(f"{adapter}: {why}; {_unfinished_hint(adapter)}")
    if not (adapter / "adapter_config.json").is_file():
        raise InputError(f"{adapter}: no adapter_config.json here; --adapter must be a run folder "
                         "written by train_qlora_hf.py (PEFT save_pretrained)")
    cfg, acfg = _load_json(adapter / "run_config.json"), _load_json(adapter / "adapter_config.json")
    args = cfg.get("args") or {}
    base = base_model or cfg.get("base_model") or acfg.get("base_model_name_or_path")
    if not base:
        raise InputError(f"{adapter}: cannot tell the base model (no run_config.json base_model, no "
                         "adapter_config.json base_model_name_or_path); pass --base_model")
    weights = adapter / ADAPTER_WEIGHTS
    # run_config.json records the prompt the data used (None = no system turn); runs from before it did
    # only know --system_prompt
    system = cfg["system_prompt"] if "system_prompt" in cfg else args.get("system_prompt") or DEFAULT_SYSTEM_PROMPT
    stops = cfg.get("stop_strings")
    return Run(adapter=adapter, base_model=str(base), args=args, system_prompt=system,
               dtype=requested_precision(args.get("bf16"), bool(args.get("fp16"))),
               adapter_sha=sha256_file(weights) if weights.is_file() else "",
               stop_strings=[x for x in stops if isinstance(x, str) and x] if isinstance(stops, list) else None)


