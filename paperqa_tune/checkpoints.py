"""Training checkpoints: checkpoints/step-N/ in a run folder, written so a kill leaves either the previous set
or the complete new one, and loaded back only into a run that would take the same steps.

Each checkpoint's trainer_state.json holds the loop state, the fingerprint of the data order and schedule,
and the flags that define the run (resume_flags): --resume refuses a flag that changes the model, the samples,
their order or the update (MUST_MATCH, each named old -> new) and notes one that changes only speed, memory,
logging or checkpointing (MAY_CHANGE). A file that cannot be read is named with what to do, never a traceback,
and the optimizer state is read weights-only: a checkpoint file cannot run code."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch

from paperqa_tune.errors import InputError

from paperqa_tune.files import ADAPTER_WEIGHTS, share_like_outputs, write_json_atomic
from paperqa_tune.train.optim import repage_optimizer_state
from paperqa_tune.train.state import TrainState

STATE_FILE = "trainer_state.json"
TRAINING_FILE = "training_state.pt"

# Flags (and values derived from them) a resumed run must share with its checkpoint: they change the model, the
# samples, their order or the update. precision is --bf16/--fp16 as requested; data_sha256 the --jsonl content;
# samples_per_step --batch x --grad_accum x processes.
MUST_MATCH = ("model", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "seed", "data_sha256", "max_seq_len",
              "system_prompt", "val_fraction", "epochs", "max_steps", "samples_per_step", "group_by_length", "shuffle",
              "lr", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "optim", "flat_optim",
              "precision", "kbit_upcast", "lora_fp32_sum")
# Flags that may change on --resume (noted): logging, checkpointing, the split of a step into micro-batches, and
# speed/memory pieces that compute the same update (to kernel rounding).
MAY_CHANGE = ("jsonl", "batch", "grad_accum", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
              "keep_checkpoints", "gpu_mem_budget", "merge_micro_batches", "gradient_checkpointing", "packing",
              "fused_lora", "fused_norm",
              "liger", "attn_implementation", "trust_remote_code")
_DERIVED = {"precision": "precision (--bf16/--fp16/--no-bf16)", "data_sha256": "--jsonl content (sha256)",
            "samples_per_step": "samples per step (--batch x --grad_accum x processes)"}


@dataclass(frozen=True)
class Trainables:
    """What a checkpoint saves the state of besides the loop's: the PEFT model, its optimizer and schedule, and the
    fp16 loss scaler (None in bf16/fp32)."""
    model: object
    optimizer: object
    scheduler: object
    scaler: object = None


def list_checkpoints(run_dir) -> list[Path]:
    """The complete checkpoints of a run folder, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def last_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(run_dir) if run_dir is not None else []
    return found[-1] if found else None


def fingerprint(samples: list[dict], per_step: int, total: int, seed: int, group_by_length: bool, shuffle: bool,
                optimizer: str) -> dict:
    """What fixes the data order and the schedule: a resumed run must match it."""
    h = hashlib.sha256()
    for s in samples:
        h.update(array("q", s["input_ids"]).tobytes() + b"|" + array("q", s["labels"]).tobytes() + b"\n")
    return {"samples_sha256": h.hexdigest(), "samples_per_step": per_step, "total_steps": total,
            "seed": seed, "group_by_length": group_by_length, "shuffle": shuffle, "optimizer": optimizer}


def resume_flags(flag_values: dict, precision: str, data_sha256: str, samples_per_step: int) -> dict:
    """What a checkpoint records of the run's flags (`flag_values`: flag name -> value) for --resume to compare."""
    picked = {k: flag_values[k] for k in MUST_MATCH + MAY_CHANGE if k in flag_values}
    return {**picked, "precision": precision, "data_sha256": data_sha256, "samples_per_step": samples_per_step}


def compare_flags(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(differences that refuse a resume, differences only noted), each as 'flag old -> new'. A flag missing on
    either side (a checkpoint from an older version) is not compared."""
    refuse, note = [], []
    for k in MUST_MATCH + MAY_CHANGE:
        if k in saved and k in now and saved[k] != now[k]:
            old, new = (saved[k][:12], now[k][:12]) if k == "data_sha256" else (saved[k], now[k])
            (refuse if k in MUST_MATCH else note).append(f"{_DERIVED.get(k, '--' + k)} {old} -> {new}")
    return refuse, note


def save_checkpoint(run_dir, parts: Trainables, state: TrainState, fp: dict, keep: int,
                    flags: dict | None = None) -> Path:
    """Adapter, optimizer/scheduler/scaler state and the loop state (with `fp` and the run's `flags`) as
    checkpoints/step-N; the oldest beyond `keep` are removed. Call on the main process only. A failed write
    leaves the previous checkpoints as they were and no partial folder."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{state.step}", root / f".step-{state.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        parts.model.save_pretrained(tmp)
        torch.save({"optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
                    "scaler": parts.scaler.state_dict() if parts.scaler else None}, tmp / TRAINING_FILE)
        write_json_atomic(tmp / STATE_FILE, {**state.state_dict(), "fingerprint": fp, "flags": flags})
        share_like_outputs(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a kill leaves either the old set or the complete new checkpoint
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _unreadable(path: Path, file: str, why: str) -> InputError:
    """InputError for a checkpoint file that cannot be used, saying what to do."""
    found = list_checkpoints(path.parent.parent)
    before = [p for p in found if int(p.name[5:]) < int(path.name[5:])]
    then = f"resume from {before[-1].name}" if before else "start from step 0"
    return InputError(f"{path / file}: {why}; delete {path} to {then} with --resume, or start over with --overwrite")


def read_state(path: Path) -> dict:
    """trainer_state.json of checkpoint `path`, or InputError naming it."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _unreadable(path, STATE_FILE, f"unreadable ({getattr(e, 'msg', None) or e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "fingerprint" not in state:
        raise _unreadable(path, STATE_FILE, "not a checkpoint state (no step/fingerprint)")
    return state


def _train_state(path: Path, saved: dict) -> TrainState:
    """The loop state of checkpoint `path` (its trainer_state.json read as `saved`), or InputError naming it."""
    try:
        return TrainState.from_state_dict(saved)
    except ValueError as e:
        raise _unreadable(path, STATE_FILE, f"not a checkpoint state ({e})") from None


def _read_files(path: Path, device) -> tuple[dict, dict]:
    """(adapter tensors, training state) of checkpoint `path`; InputError naming a file that cannot be read.
    torch.load is weights-only: a crafted pickle fails here instead of running."""
    from safetensors.torch import load_file

    try:
        weights = load_file(path / ADAPTER_WEIGHTS, device=str(device))
    except Exception as e:  # SafetensorError, OSError: truncated, garbage, missing
        raise _unreadable(path, ADAPTER_WEIGHTS, f"unreadable ({str(e)[:200]})") from None
    try:
        ts = torch.load(path / TRAINING_FILE, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # garbage, or a pickle that would run code: never loaded otherwise
        raise _unreadable(path, TRAINING_FILE, "not a weights-only state file (garbage, or a pickle that would run "
                                               "code: refused)") from None
    except Exception as e:  # RuntimeError (truncated zip), EOFError, OSError
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise _unreadable(path, TRAINING_FILE, f"unreadable ({type(e).__name__}{': ' + first if first else ''})") \
            from None
    if not isinstance(ts, dict) or not isinstance(ts.get("optimizer"), dict) or "scheduler" not in ts:
        raise _unreadable(path, TRAINING_FILE, "no optimizer/scheduler state in it")
    return weights, ts


def check_checkpoint(path: Path, flags: dict) -> list[str]:
    """Before any model is loaded: InputError when a file of checkpoint `path` cannot be read, or when the run's
    `flags` (resume_flags) differ from the checkpoint's in one of MUST_MATCH. Returns notes to print."""
    state = read_state(path)
    _train_state(path, state)
    saved = state.get("flags")
    if not isinstance(saved, dict):
        notes = [f"{path} records no flags (an older checkpoint): --resume cannot check that the model, LoRA and "
                 "optimizer flags match the interrupted run's; make sure they do"]
    else:
        refuse, changed = compare_flags(saved, flags)
        if refuse:
            raise InputError(f"{path} was made with other flags that change the run: {'; '.join(refuse)}. Resume with "
                             "the checkpoint's values, or start over with --overwrite")
        notes = [f"--resume with {'; '.join(changed)} (logging, checkpointing or speed only: the same updates)"] \
            if changed else []
    _read_files(path, "cpu")
    return notes


def load_checkpoint(path: Path, parts: Trainables, fp: dict, device) -> TrainState:
    """Load a checkpoint into the model, optimizer, scheduler and scaler; return the loop state. InputError
    naming the file when it was made with other data or settings (`fp` differs), does not fit the model or
    cannot be read."""
    from peft import set_peft_model_state_dict

    saved_state = read_state(path)
    state, saved = _train_state(path, saved_state), saved_state["fingerprint"]
    diff = [f"{k} {saved.get(k)} -> {fp[k]}" if k != "samples_sha256" else "the training samples"
            for k in fp if saved.get(k) != fp[k]]
    if diff:
        raise InputError(f"{path} was made with different data or settings ({'; '.join(diff)}); "
                         "--resume needs the same --jsonl, --seed, --epochs/--max_steps, --optim/--flat_optim and "
                         "--batch x --grad_accum x processes; or start over with --overwrite")
    weights, ts = _read_files(path, device)
    try:
        result = set_peft_model_state_dict(parts.model, weights)
    except RuntimeError as e:  # size mismatch: another --lora_r or base
        raise _unreadable(path, ADAPTER_WEIGHTS, f"does not fit the model ({str(e).strip().splitlines()[-1][:200]})") \
            from None
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if getattr(result, "unexpected_keys", None) or missing:
        keys = (result.unexpected_keys or missing)[:2]
        raise _unreadable(path, ADAPTER_WEIGHTS, f"does not match the model's LoRA layers ({', '.join(keys)}...)")
    try:
        parts.optimizer.load_state_dict(ts["optimizer"])
        repage_optimizer_state(parts.optimizer)
        parts.scheduler.load_state_dict(ts["scheduler"])
        if parts.scaler is not None and ts.get("scaler"):
            parts.scaler.load_state_dict(ts["scaler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise _unreadable(path, TRAINING_FILE, f"does not fit this optimizer ({str(e)[:200]})") from None
    return state
