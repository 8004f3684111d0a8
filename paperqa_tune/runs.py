"""A run folder (models/<run>/): what train_qlora_hf.py writes into it, safely, and what evaluation and
inference read back from it."""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common import DEFAULT_SYSTEM_PROMPT, HELDOUT_QUESTIONS_FILE, InputError, sha256_file
from paperqa_tune.checkpoints import list_checkpoints
from paperqa_tune.loading import requested_precision

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
RUN_FILES = ADAPTER_FILES + ("run_config.json", "metrics.json", "loss.png", "README.md", HELDOUT_QUESTIONS_FILE)


# --------------------------------------------------------------------------- writing (training)
def check_out_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to replace a finished run, or to restart an unfinished one, unless the flags say so."""
    finished = (out / "adapter_model.safetensors").exists()
    if finished and not overwrite:
        raise InputError(f"{out} holds a finished run; pass --overwrite to replace it or choose another --out")
    if not finished and list_checkpoints(out) and not (resume or overwrite):
        raise InputError(f"{out} holds an unfinished run (checkpoints/{list_checkpoints(out)[-1].name}); "
                         "pass --resume to continue it or --overwrite to start over")


def clear_out_dir(out: Path) -> None:
    """Remove what a run writes (and only that) from the folder."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def save_adapter(model, out: Path) -> None:
    """The PEFT adapter into `out`, weights last: adapter_model.safetensors appearing marks a finished run."""
    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "adapter_model.safetensors"):
        os.replace(f, out / f.name)
    tmp.rmdir()


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
@dataclass
class Run:
    """What later stages need from a run folder (models/<run>/) that train_qlora_hf.py wrote."""
    adapter: Path
    base_model: str
    args: dict = field(default_factory=dict)
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT  # None: the training data had no system turn
    dtype: str = "bfloat16"         # compute dtype training asked for (requested_precision)
    adapter_sha: str = ""


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
    if not (adapter / "adapter_config.json").is_file():
        raise InputError(f"{adapter}: no adapter_config.json here; --adapter must be a run folder "
                         "written by train_qlora_hf.py (PEFT save_pretrained)")
    cfg, acfg = _load_json(adapter / "run_config.json"), _load_json(adapter / "adapter_config.json")
    args = cfg.get("args") or {}
    base = base_model or cfg.get("base_model") or acfg.get("base_model_name_or_path")
    if not base:
        raise InputError(f"{adapter}: cannot tell the base model (no run_config.json base_model, no "
                         "adapter_config.json base_model_name_or_path); pass --base_model")
    weights = adapter / "adapter_model.safetensors"
    # run_config.json records the prompt the data used (None = no system turn); runs from before it did
    # only know --system_prompt
    system = cfg["system_prompt"] if "system_prompt" in cfg else args.get("system_prompt") or DEFAULT_SYSTEM_PROMPT
    return Run(adapter=adapter, base_model=str(base), args=args, system_prompt=system,
               dtype=requested_precision(args.get("bf16"), bool(args.get("fp16"))),
               adapter_sha=sha256_file(weights) if weights.is_file() else "")


