"""Training checkpoints: checkpoints/step-N/ in a run folder, written so a kill leaves either the previous set
or the complete new one, and loaded back only into a run that would take the same steps."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from pathlib import Path

import torch

from common import InputError, write_json_atomic
from paperqa_tune.optim import repage_optimizer_state

STATE_FILE = "trainer_state.json"


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


def save_checkpoint(run_dir, model, optimizer, scheduler, scaler, state: dict, fp: dict, keep: int) -> Path:
    """Adapter, optimizer/scheduler/scaler state and the loop state as checkpoints/step-N; the oldest beyond
    `keep` are removed. Call on the main process only."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{state['step']}", root / f".step-{state['step']}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None}, tmp / "training_state.pt")
    write_json_atomic(tmp / STATE_FILE, {**state, "fingerprint": fp})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a kill leaves either the old set or the complete new checkpoint
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, fp: dict, device) -> dict:
    """Load a checkpoint into the model, optimizer, scheduler and scaler; return the loop state. InputError
    when it was made with other data or settings (`fp` differs) or does not fit the model. The optimizer
    state is read weights-only: a checkpoint file cannot run code."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    saved = state.pop("fingerprint")
    diff = [k for k in fp if saved.get(k) != fp[k]]
    if diff:
        raise InputError(f"{path} was made with different data or settings ({', '.join(diff)} differ); "
                         "--resume needs the same --jsonl, --seed, --epochs/--max_steps, --optim/--flat_optim and "
                         "--batch x --grad_accum x processes; or start over with --overwrite")
    result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors", device=str(device)))
    if getattr(result, "unexpected_keys", None):
        raise InputError(f"{path}: adapter does not match the model ({result.unexpected_keys[:3]}...)")
    ts = torch.load(path / "training_state.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(ts["optimizer"])
    repage_optimizer_state(optimizer)
    scheduler.load_state_dict(ts["scheduler"])
    if scaler is not None and ts.get("scaler"):
        scaler.load_state_dict(ts["scaler"])
    return state
