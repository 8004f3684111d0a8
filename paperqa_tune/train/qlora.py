"""The model training fine-tunes: the 4-bit NF4 base with LoRA adapters, plus the speed pieces that change how
it computes but not what (fused LoRA node, fused RMSNorm, Liger, packed attention)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from paperqa_tune.errors import InputError
from paperqa_tune.train import kernels, packing
from paperqa_tune.loading import load_causal_lm
from paperqa_tune.train.lora4bit import FusedLoRA


@dataclass(frozen=True)
class LoRASettings:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: str = "all-linear"  # or comma-separated module names
    init_seed: int = 42                 # the adapters' random init is a function of this alone


@dataclass(frozen=True)
class SpeedSettings:
    gradient_checkpointing: bool = True
    kbit_upcast: bool = False           # the seed recipe's prepare_model_for_kbit_training (fp32 norms etc.)
    packing: bool = True
    fused_lora: bool = True
    lora_fp32_sum: bool = True
    fused_norm: bool = True
    liger: str = "auto"
    attn_implementation: str = "sdpa"


@dataclass
class TrainableModel:
    model: object                       # the PEFT model
    fused: FusedLoRA | None             # the fused LoRA layers' state (None: PEFT's own forward)
    packed: bool                        # attention honours packed micro-batches
    description: str                    # one line saying which speed pieces are on


def check_model_code(name, trust_remote_code: bool) -> list[str]:
    """Model code from a model folder never runs without trust_remote_code (loading passes it explicitly to every
    from_pretrained). A local folder whose config.json or tokenizer_config.json maps to its own Python code
    (auto_map) and whose model_type transformers lacks is refused up front (InputError naming the flag); with a
    model_type transformers has, its built-in code is used (returned as a note). Hub ids: transformers checks."""
    folder = Path(str(name))
    if trust_remote_code or not folder.is_dir():
        return []
    cfgs = {}
    for f in ("config.json", "tokenizer_config.json"):
        try:
            cfgs[f] = json.loads((folder / f).read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise InputError(f"{folder / f}: unreadable ({e}); --model needs a model folder saved by "
                             "save_pretrained") from None
    own = [f for f, c in cfgs.items() if isinstance(c, dict) and c.get("auto_map")]
    if not own:
        return []
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = cfgs.get("config.json")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type in CONFIG_MAPPING_NAMES:
        return [f"{folder} ships its own model code (auto_map in {', '.join(own)}); transformers' built-in "
                f"'{model_type}' code is used instead (pass --trust_remote_code to run theirs, if you trust it)"]
    raise InputError(f"--model {folder}: {', '.join(own)} map(s) to the folder's own Python code (auto_map, model_type "
                     f"{model_type!r} unknown to transformers), which never runs by default; pass --trust_remote_code "
                     "if you trust that code")


def build_qlora_model(name, device, dtype, lora: LoRASettings, speed: SpeedSettings,
                      trust_remote_code: bool = False) -> TrainableModel:
    """Load `name` in 4-bit NF4 on `device` with `dtype` compute and wrap it with fresh LoRA adapters.

    Default: the frozen base stays in the compute dtype (no fp32 upcast of norms, embeddings and lm_head;
    non-reentrant gradient checkpointing needs no input grads); speed.kbit_upcast is the seed recipe's
    prepare_model_for_kbit_training instead, and turns the fused pieces off (they assume one dtype).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load_causal_lm(name, dtype, device, attn_implementation=speed.attn_implementation,
                           trust_remote_code=trust_remote_code)
    model.config.use_cache = False
    if speed.kbit_upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=speed.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if speed.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fast = not speed.kbit_upcast
    try:
        liger = kernels.apply_liger(model, speed.liger, device) if fast else "off (--kbit_upcast)"
    except ImportError:
        raise InputError(f"--liger {speed.liger}: liger-kernel is not installed; pip install -r "
                         "requirements-gpu.txt or pass --liger off") from None
    n_norm = kernels.fuse_rms_norms(model) if speed.fused_norm and fast and "RMSNorm" not in liger else 0
    packed = "off"
    if speed.packing:
        # the self-test runs everywhere (on CPU it fails at once: no flash kernel); varlen only where it passed
        info = packing.varlen_self_test(device)
        impl = info["impl"] if device.type == "cuda" else "loop"
        model.set_attn_implementation(packing.register_packed_attention(impl))
        packed = ("flash varlen_attn" if impl == "varlen" else
                  "one SDPA call per sample" + (" (varlen_attn failed its self-test: "
                                                f"{info.get('varlen_error') or info.get('varlen_rel_err')})"
                                                if device.type == "cuda" else ""))
    targets = lora.target_modules if lora.target_modules == "all-linear" else \
        [t.strip() for t in lora.target_modules.split(",") if t.strip()]
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    # The adapters' init depends on init_seed only, whatever drew random numbers before (model loading, a
    # kernel self-test); the caller's random state is restored afterwards.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(lora.init_seed)
        model = get_peft_model(model, config)
    fused, n_fused, absmax_bytes = None, 0, 0
    if speed.fused_lora and fast:
        fused = FusedLoRA(speed.lora_fp32_sum)
        absmax_bytes = fused.patch(model)
        n_fused = len(fused.layers)
    description = (
        f"speed: {'fp32 upcast + autocast (--kbit_upcast)' if speed.kbit_upcast else 'no fp32 upcast'}; "
        f"packing: {packed}; fused LoRA: {n_fused} layers{' (fp32 sum)' if n_fused and speed.lora_fp32_sum else ''}"
        f"{f', 4-bit scales expanded once ({absmax_bytes / 2**20:,.1f} MiB)' if absmax_bytes else ''}; "
        f"fused RMSNorm: {n_norm} modules; Liger: {liger}")
    return TrainableModel(model, fused, speed.packing, description)
