"""Training-speed benchmark for issue 5: the seed QLoRA recipe vs the project's training path.

In one invocation on one GPU it builds a random-init Mistral-7B-shaped model once (in /dev/shm), loads it in
4-bit, runs the seed recipe and the project's path (and any research variants) on the workloads defined in
shared/PERF.md, checks that they learn the same thing, prints a table with ratios and writes JSON.

    # the issue's table: seed recipe vs train_qlora_hf.py's own path, both workloads (~6 min on an H100)
    python bench/bench_train.py --workloads qa,long --variants seed --project auto
    # research: recipes composed from switches (see RECIPES and MODIFIERS below)
    python bench/bench_train.py --variants seed,bf16,bf16_pack,fast,fast+nodrop,fast+gc8 --project off
    # CPU smoke test of every code path on a tiny model (seconds; no speed meaning)
    python bench/bench_train.py --smoke

Workloads (PERF.md): "qa" = 96 samples, lengths max(96, min(1500, int(lognormvariate(log 350, 0.45)))) from
random.Random(0), drawn in order then shuffled with the same Random, random token ids, micro-batches of 8 in that
order, first 2 batches are warm-up; "long" = 6 samples of 4096 tokens, batch 1, first 2 warm-up.
Useful tokens = sum of sample lengths (padding excluded). Labels are on every token of a sample.

Workload "real" (issue 13: the seed's command as a user runs it, on the pipeline's own data): the train records that
generate_qa.py writes offline from data/sample_abstracts.jsonl (seed 0, default flags; 396 single-turn records),
rendered with Zephyr's template, token counts modelled (no Zephyr tokenizer on the GPU machine; see
bench/real_workload.py): text pieces ceil(chars / 4.5) tokens (4.5 = measured with Mistral-7B-v0.1's own
SentencePiece model on these records), template markers at their real counts (29 tokens per record), random ids,
labels only on each answer and its </s>; mean ~138 tokens/sample (the real tokenizer: 136.5).
--real-answer-scale X lengthens the extractive answers by X to model LLM-written ones (default 1.0 = as generated).
  * seed recipe on "real": the seed's HF Trainer run of `--epochs 2 --batch 8 --grad_accum 2 --lr 2e-4`: a new
    random order every epoch, micro-batches of 8 padded to the longest, an optimizer step every 2 micro-batches
    (the last step of an epoch takes what is left), each micro-batch's loss = its token-loss sum / the step's
    trained tokens (HF Trainer's num_items_in_batch), lr 2e-4 linear decay to 0 without warm-up and gradient
    clipping at 1.0 (HF Trainer's defaults), paged AdamW 8-bit, train mode (dropout 0.05), gradient checkpointing.
  * project path on "real": train_qlora_hf's parser given exactly the seed's flags `--epochs 2 --batch 8
    --grad_accum 2 --lr 2e-4 --bf16 --max_seq_len 4096` plus --model and --seed 0: every other flag at its default
    (none of the overrides that qa/long get), the same samples passed to its train() (no validation split).
  * memory: --mem-cap-gb (default 40 for "real": an A100-40GB) caps both runs with
    torch.cuda.set_per_process_memory_fraction; an OOM under the cap is a FAILED row, not a crash.
  * timing: optimizer steps after the first 2; tokens = non-padding input tokens. Equivalence: trained tokens per
    epoch equal (and equal to the data's), token-weighted mean loss per epoch within --real-loss-tol (the order,
    dropout and schedule differ, so steps cannot be compared one by one).

    # issue 13's table: the seed's command on real data, next to the usual workloads (~8 min on an H200)
    python bench/bench_train.py --workloads real,qa,long --variants seed --project auto

Equivalence, two checks per variant against the seed recipe:
  * function check (batch 0 of "qa", before training, LoRA B set to the same seeded random values, dropout off):
    relative error of the final hidden states of the real tokens, |loss difference|, and relative error of the
    full LoRA gradient. A packed variant also runs a negative control (documents allowed to see each other) to
    show the check would catch a packing bug.
  * trajectory: per-step losses. When the variant keeps the seed's batches (padded or packed per batch, no
    re-ordering) they are compared step by step; otherwise the token-weighted mean loss over the epoch (same data)
    is compared. Trained tokens (label != -100 after the shift) must be equal.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import math
import platform
import random
import sys
import time
import traceback
from pathlib import Path
from types import MethodType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from paperqa_tune.train import packing  # noqa: E402  (the speed machinery the project path uses)
from paperqa_tune.train.kernels import fuse_rms_norms  # noqa: E402
from paperqa_tune.train.lora4bit import FusedLoRA, addmm_lora_forward  # noqa: E402
from paperqa_tune.train.memory import apply_checkpoint_plan  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_workload  # noqa: E402  (workload "real": generate_qa.py's records, token counts modelled)

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 2e-4
MICRO_BATCH = {"qa": 8, "long": 1, "real": 8}
WARMUP_STEPS = 2
# The seed's command as a user runs it (issue 13); the project path of workload "real" gets exactly these flags
SEED_COMMAND = ["--epochs", "2", "--batch", "8", "--grad_accum", "2", "--lr", "2e-4", "--bf16", "--max_seq_len", "4096"]
MEM_CAP_DEFAULT = {"real": 40.0}  # GB (1e9 bytes): an A100-40GB's memory


@dataclasses.dataclass
class Schedule:
    """How the seed recipe steps through a workload's samples."""
    accum: int = 1                # micro-batches per optimizer step
    epochs: int = 1               # passes (each with its own order when order="random")
    lr: str = "constant"          # constant | linear (HF Trainer's default: linear decay to 0, no warm-up)
    max_grad_norm: float = 0.0    # 0: no clipping; HF Trainer's default is 1.0
    order: str = "file"           # file (the workload's order) | random (a new permutation each epoch, HF Trainer)


# qa/long: the bench's fixed batches (losses compare step by step with the project run in file order); real: the
# seed's HF Trainer run of --epochs 2 --batch 8 --grad_accum 2 --lr 2e-4 with every other TrainingArguments default
SCHEDULES = {"qa": Schedule(), "long": Schedule(),
             "real": Schedule(accum=2, epochs=2, lr="linear", max_grad_norm=1.0, order="random")}

# --------------------------------------------------------------------------------------------------------------
# Workloads


def qa_mix_lengths(n: int = 96) -> list[int]:
    r = random.Random(0)
    lengths = [max(96, min(1500, int(r.lognormvariate(math.log(350), 0.45)))) for _ in range(n)]
    r.shuffle(lengths)
    return lengths


def make_samples(lengths: list[int], vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def workload(name: str, vocab: int, smoke: bool = False) -> list[dict]:
    if name == "qa":
        lengths = qa_mix_lengths()
        if smoke:
            lengths = [max(8, n // 20) for n in lengths[:24]]
        return make_samples(lengths, vocab, seed=1)
    if name == "long":
        return make_samples([64 if smoke else 4096] * 6, vocab, seed=2)
    raise ValueError(f"unknown workload {name!r} (known: qa, long, real)")


def chunk(samples: list[dict], size: int) -> list[list[dict]]:
    return [samples[i:i + size] for i in range(0, len(samples), size)]


def length_grouped(samples: list[dict], size: int, seed: int) -> list[list[dict]]:
    """Neighbours of similar length in one micro-batch, micro-batches in random order (PERF.md's 'grouped')."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]))
    batches = [[samples[i] for i in order[j:j + size]] for j in range(0, len(order), size)]
    random.Random(seed).shuffle(batches)
    return batches


def trained_tokens(batch: list[dict]) -> int:
    # labels are shifted by one inside the loss: the first label of each sample is never a target
    return sum(sum(1 for t in s["labels"][1:] if t != -100) for s in batch)


def collate_padded(batch: list[dict], device, pad_id: int = 0) -> dict:
    width = max(len(s["input_ids"]) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, s in enumerate(batch):  # right padding: real tokens keep positions 0..n-1, as in the packed layout
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def collate_packed(batch: list[dict], device) -> dict:
    """packing.collate_packed without its bookkeeping keys (model(**inputs) takes the rest)."""
    out = packing.collate_packed(batch, device)
    for k in ("n_samples", "n_tokens", "n_padded", "attention_mask"):
        out.pop(k)
    return out


# The packed attention (per-document flash varlen_attn, or one SDPA call per document), the lean LoRA kernel,
# the fused RMSNorm and checkpoint offload live in paperqa_tune/ (the path users run); the research recipes
# below reuse them.


# --------------------------------------------------------------------------------------------------------------
# Recipes


@dataclasses.dataclass
class Recipe:
    name: str
    upcast: bool = False          # prepare_model_for_kbit_training: fp32 norms/embeddings/lm_head (the seed)
    batching: str = "pad"         # pad | pack | group (padded, length-grouped)
    lora_impl: str = "peft"       # peft | fused (one addmm: base + scale * (x A^T) B^T, bf16 compute)
    #                               | lean (one autograd node per layer: dequant + GEMM + LoRA, hand-written backward)
    lora_dtype: str = "fp32"      # fp32 | bf16 (LoRA parameters)
    optim: str = "adamw_fused"    # paged_adamw_8bit | adamw_8bit | adamw_fused
    dropout: float = 0.05
    liger: str = ""               # Liger kernels: "all" (RoPE, RMSNorm, SwiGLU, fused linear CE) | "flce" | ""
    norm: str = "hf"              # hf (MistralRMSNorm, 8 ops) | torch (F.rms_norm, one fused op)
    gc_skip: int = 0              # decoder layers (the last ones) without gradient checkpointing
    offload: bool = False         # checkpointed layer inputs kept in pinned host memory
    pygc: bool = True             # False: gc.freeze() before the steps (no full collections over the model's objects)
    init_seed: int = 0            # added to --seed for the LoRA init (a noise-floor run of the same recipe)
    fp32_out: bool = False        # lean LoRA with --lora_fp32_sum: one rounding of base + delta (since 06:00 UTC
    #                               2026-11-24 inside the base GEMM's fp32 accumulator; the research rows measured an
    #                               fp32-output GEMM + fp32 add + cast)


SEED = Recipe("seed", upcast=True, batching="pad", lora_impl="peft", optim="paged_adamw_8bit")
RECIPES = {
    "seed": SEED,
    "grouped": dataclasses.replace(SEED, name="grouped", batching="group"),
    "bf16": Recipe("bf16", batching="pad"),
    "bf16_group": Recipe("bf16_group", batching="group"),
    "bf16_pack": Recipe("bf16_pack", batching="pack"),
    "bf16_pack_fused": Recipe("bf16_pack_fused", batching="pack", lora_impl="fused"),
    "fast": Recipe("fast", batching="pack", lora_impl="fused", liger="all"),
    # call-2 candidate: fewer, cheaper host-side ops (the step is CPU-bound)
    "lean": Recipe("lean", batching="pack", lora_impl="lean", liger="flce", norm="torch", optim="adamw_8bit"),
}
MODIFIERS = {
    "nodrop": dict(dropout=0.0), "pad": dict(batching="pad"), "pack": dict(batching="pack"),
    "group": dict(batching="group"), "peftlora": dict(lora_impl="peft"), "fusedlora": dict(lora_impl="fused"),
    "bf16lora": dict(lora_dtype="bf16"), "adam8": dict(optim="adamw_8bit"), "paged8": dict(optim="paged_adamw_8bit"),
    "liger": dict(liger="all"), "flce": dict(liger="flce"), "noliger": dict(liger=""), "offload": dict(offload=True),
    "tnorm": dict(norm="torch"), "hfnorm": dict(norm="hf"), "lean": dict(lora_impl="lean"),
    "adamw": dict(optim="adamw_fused"), "nogc": dict(pygc=False), "f32out": dict(fp32_out=True),
}


# The recommended recipe (see bench/README.md): QA within the seed's memory by skipping checkpointing on 10
# layers; Long within 6.5 GB by offloading the checkpointed layer inputs to pinned host memory.
DEFAULT_STANDIN = "qa=lean+nodrop+adamw+gc10+nogc,long=lean+nodrop+adamw+offload+nogc"
STANDIN = "project(bench stand-in)"


def standin_recipe(spec: str, wl: str) -> Recipe:
    table = dict(kv.split("=", 1) for kv in spec.split(",")) if "=" in spec else {wl: spec}
    chosen = table.get(wl) or table["qa"]  # real: short samples in micro-batches of 8, as qa, unless given
    return dataclasses.replace(parse_recipe(chosen), name=f"{STANDIN} {chosen}")


def parse_recipe(spec: str) -> Recipe:
    base, *mods = spec.split("+")
    if base not in RECIPES:
        raise ValueError(f"unknown recipe {base!r}; known: {sorted(RECIPES)}")
    r = dataclasses.replace(RECIPES[base], name=spec)
    for m in mods:
        if m.startswith("gc") and m[2:].isdigit():
            r = dataclasses.replace(r, gc_skip=int(m[2:]))
        elif m.startswith("s") and m[1:].isdigit():
            r = dataclasses.replace(r, init_seed=int(m[1:]))
        elif m in MODIFIERS:
            r = dataclasses.replace(r, **MODIFIERS[m])
        else:
            raise ValueError(f"unknown modifier {m!r}; known: {sorted(MODIFIERS)} and gcN")
    return r


# --------------------------------------------------------------------------------------------------------------
# Model


def build_model(model_dir: Path, device, smoke: bool) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    if smoke:
        from tools.make_tiny_model import build
        build(model_dir)
        return
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 32000)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     model_max_length=4096)
    try:
        from paperqa_tune.messages import ZEPHYR_CHAT_TEMPLATE
        hf_tok.chat_template = ZEPHYR_CHAT_TEMPLATE
    except ImportError:
        pass
    cfg = MistralConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2)  # sliding_window keeps Mistral's default (4096), as Zephyr
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    hf_tok.save_pretrained(model_dir)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def load_4bit(model_dir: Path, device):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    kw = {"device_map": {"": device.index or 0}} if device.type == "cuda" else {}
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.bfloat16,
                                                attn_implementation="sdpa", **kw)


class Liger:
    """apply_liger_kernel_to_mistral on a loaded model, and its undo (the bench reuses one loaded model)."""

    def __init__(self):
        from transformers.models.mistral import modeling_mistral as mm
        self.mm = mm
        self.saved = {k: getattr(mm, k) for k in ("apply_rotary_pos_emb", "MistralRMSNorm", "MistralMLP")}
        self.saved_cls_forward = mm.MistralForCausalLM.forward

    def apply(self, model, which: str):
        from liger_kernel.transformers import apply_liger_kernel_to_mistral
        every = which == "all"
        apply_liger_kernel_to_mistral(rope=every, rms_norm=every, swiglu=every, cross_entropy=False,
                                      fused_linear_cross_entropy=True, model=model)

    def undo(self, model):
        for k, v in self.saved.items():
            setattr(self.mm, k, v)
        self.mm.MistralForCausalLM.forward = self.saved_cls_forward
        for m in [model, *model.modules()]:
            if type(m).__name__ in ("MistralRMSNorm", "MistralMLP", "MistralForCausalLM"):
                for attr in ("forward", "_get_name", "extra_repr"):
                    m.__dict__.pop(attr, None)


class Session:
    """One loaded 4-bit base model, set up and torn down for each recipe."""

    def __init__(self, base, device, smoke: bool, packed_impl: str):
        self.base, self.device, self.smoke, self.packed_impl = base, device, smoke, packed_impl
        self.liger = None
        self.hooks: list = []

    def setup(self, recipe: Recipe, seed: int):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        base = self.base
        if recipe.upcast:
            prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
        else:
            for p in base.parameters():
                p.requires_grad_(False)
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if recipe.offload:
            self.hooks = apply_checkpoint_plan(base, {"mode": "offload", "skip_layers": 0})
        else:
            apply_checkpoint_plan(base, {"mode": "skip", "skip_layers": recipe.gc_skip})
        if recipe.liger:
            if self.device.type != "cuda":
                raise RuntimeError("Liger kernels need CUDA")
            self.liger = self.liger or Liger()
            self.liger.apply(base, recipe.liger)
        if recipe.norm == "torch" and recipe.liger != "all":
            fuse_rms_norms(base)
        if recipe.batching == "pack":
            base.set_attn_implementation(packing.register_packed_attention(self.packed_impl))
        torch.manual_seed(seed + recipe.init_seed)
        cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=recipe.dropout, target_modules=TARGET_MODULES,
                         bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
        lora_params = [p for n, p in model.named_parameters() if p.requires_grad]
        if recipe.lora_dtype == "bf16":
            for p in lora_params:
                p.data = p.data.to(torch.bfloat16)
        if recipe.lora_impl == "lean":
            FusedLoRA(recipe.fp32_out).patch(model)
        elif recipe.lora_impl == "fused":
            from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
            for m in model.modules():
                if isinstance(m, LoraLinear4bit):
                    m.forward = MethodType(addmm_lora_forward, m)
        model.train()
        return model, make_optimizer(recipe, lora_params, self.device)

    def teardown(self, model, recipe: Recipe):
        """Back to the freshly loaded base model (also after a setup that failed half-way, model=None)."""
        base = self.base
        for h in self.hooks:  # checkpoint offload
            h.remove()
        self.hooks = []
        if model is not None:
            assert model.unload() is base  # LoRA layers out, the original bnb Linear4bit modules back in
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            base.__dict__.pop(attr, None)
        if self.liger is not None:
            self.liger.undo(base)
        for m in base.modules():  # the torch-norm patch (and anything else bound on an instance)
            if type(m).__name__ in ("MistralRMSNorm", "MistralMLP"):
                m.__dict__.pop("forward", None)
        try:
            base.gradient_checkpointing_disable()
        except Exception:  # noqa: BLE001
            pass
        for layer in base.model.layers:
            layer.__dict__.pop("gradient_checkpointing", None)
        try:
            base.disable_input_require_grads()
        except Exception:  # noqa: BLE001 - no hook was registered
            pass
        for p in base.parameters():  # undo the seed's fp32 upcast: the values came from bf16, the round trip is exact
            if p.dtype == torch.float32 and p.__class__.__name__ != "Params4bit":
                p.data = p.data.to(torch.bfloat16)
        if base.config._attn_implementation != "sdpa":
            try:
                base.set_attn_implementation("sdpa")
            except Exception:  # noqa: BLE001
                base.config._attn_implementation = "sdpa"
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def make_optimizer(recipe: Recipe, params, device):
    if recipe.optim == "adamw_fused":
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=device.type == "cuda")
    if device.type != "cuda":  # bitsandbytes' 8-bit optimizers need CUDA; the smoke test stands in torch AdamW
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    import bitsandbytes as bnb
    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit}[recipe.optim]
    return cls(params, lr=LR, weight_decay=0.0)


# --------------------------------------------------------------------------------------------------------------
# Measurement


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_mem_caps(spec: str | None) -> dict[str, float]:
    """--mem-cap-gb: None -> MEM_CAP_DEFAULT; "GB" -> that cap for workload real; "wl=GB,..." -> per workload;
    0 -> no cap."""
    if spec is None or spec == "":
        caps = dict(MEM_CAP_DEFAULT)
    elif "=" in spec:
        caps = {k.strip(): float(v) for k, v in (kv.split("=", 1) for kv in spec.split(",") if kv.strip())}
    else:
        caps = {"real": float(spec)}
    return {k: v for k, v in caps.items() if v > 0}


def apply_mem_cap(device, gb: float | None) -> dict | None:
    """Cap this process's CUDA allocations at gb (1e9 bytes) with set_per_process_memory_fraction; allocations
    beyond it raise torch.cuda.OutOfMemoryError as on a GPU of that size. Returns what was done, for the JSON."""
    if not gb:
        return None
    info = {"mem_cap_gb": gb, "applied": False}
    if device.type != "cuda":
        info["note"] = "not applied: no CUDA device (smoke)"
        return info
    total = torch.cuda.get_device_properties(device).total_memory
    info["gpu_total_gb"] = total / 1e9
    if gb * 1e9 >= total:
        info["note"] = "not applied: the cap is not below the GPU's memory"
        return info
    gc.collect()
    torch.cuda.empty_cache()  # blocks cached by an earlier run would count against the cap
    torch.cuda.set_per_process_memory_fraction(gb * 1e9 / total, device)
    info.update(applied=True, fraction=gb * 1e9 / total)
    return info


def release_mem_cap(device, info: dict | None) -> None:
    if info and info.get("applied"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def batches_for(recipe: Recipe, samples: list[dict], wl: str, seed: int) -> list[list[dict]]:
    if recipe.batching == "group" and MICRO_BATCH[wl] > 1:
        return length_grouped(samples, MICRO_BATCH[wl], seed)
    return chunk(samples, MICRO_BATCH[wl])


def steps_for(recipe: Recipe, samples: list[dict], wl: str, seed: int) -> list[list[list[dict]]]:
    """The optimizer steps of the whole run, each a list of micro-batches. File order: one micro-batch per step.
    Random order (the seed's HF Trainer): per epoch a new permutation (one seeded generator drawn epoch after epoch,
    as RandomSampler does), micro-batches of MICRO_BATCH in that order, grouped by `accum`; an epoch's last step
    takes the micro-batches that are left (HF Trainer steps at the end of each epoch)."""
    sc = SCHEDULES[wl]
    if sc.order == "file":
        return [[b] for b in batches_for(recipe, samples, wl, seed)]
    g = torch.Generator().manual_seed(seed)
    steps = []
    for epoch in range(sc.epochs):
        perm = [samples[i] for i in torch.randperm(len(samples), generator=g).tolist()]
        micro = (length_grouped(perm, MICRO_BATCH[wl], seed + epoch) if recipe.batching == "group"
                 else chunk(perm, MICRO_BATCH[wl]))
        steps += [micro[k:k + sc.accum] for k in range(0, len(micro), sc.accum)]
    return steps


def per_epoch(losses: list[float], tokens: list[int], steps_per_epoch: int) -> tuple[list[float], list[int]]:
    """Token-weighted mean loss and trained tokens of each epoch (losses are per-step token means)."""
    means, toks = [], []
    for k in range(0, len(losses), steps_per_epoch):
        ls, ts = losses[k:k + steps_per_epoch], tokens[k:k + steps_per_epoch]
        toks.append(sum(ts))
        means.append(sum(l * t for l, t in zip(ls, ts)) / max(1, sum(ts)))
    return means, toks


def to_inputs(recipe: Recipe, batch: list[dict], device) -> dict:
    return collate_packed(batch, device) if recipe.batching == "pack" else collate_padded(batch, device)


def function_check(model, recipe: Recipe, batch: list[dict], device, ref: dict | None, leak_control: bool) -> dict:
    """Same inputs, same LoRA weights (B made non-zero), dropout off: hidden states, loss and LoRA grads."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for n, p in named:
            if "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))
    drops = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for m, _ in drops:
        m.p = 0.0
    captured = {}
    norm = model.get_base_model().model.norm
    handle = norm.register_forward_hook(lambda mod, i, o: captured.__setitem__("h", o))

    def run(inputs):
        out = model(**inputs)
        out.loss.backward()
        h = captured["h"]
        if recipe.batching == "pack":
            hs = h[0].float()
        else:
            hs = torch.cat([h[i, :len(s["input_ids"])].float() for i, s in enumerate(batch)])
        grads = torch.cat([p.grad.float().flatten() for _, p in named]).cpu()
        for _, p in named:
            p.grad = None
        # detached: a kept reference's autograd graph would hold the base model's 4-bit weights (via the
        # nodes' ctx) after the session ends, and count them in the project path's memory
        return {"h": hs.detach().cpu(), "loss": float(out.loss), "grad": grads}

    try:
        res = run(to_inputs(recipe, batch, device))
        report = {"loss": res["loss"]}
        if ref is not None:
            report.update(compare_check(res, ref))
        if leak_control and recipe.batching == "pack":
            inputs = to_inputs(recipe, batch, device)
            for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
                inputs.pop(k)  # every token attends to all earlier tokens of the row: across samples
            leak = run(inputs)
            report["negative_control_cross_sample_attention"] = compare_check(leak, ref) if ref else {}
    finally:
        handle.remove()
        for m, p in drops:
            m.p = p
        with torch.no_grad():
            for n, p in named:
                if "lora_B" in n:
                    p.zero_()
                p.grad = None
    return report if ref is not None else {**report, "_ref": res}


def compare_check(res: dict, ref: dict) -> dict:
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return {"hidden_rel_err": rel(res["h"], ref["h"]), "loss_abs_diff": abs(res["loss"] - ref["loss"]),
            "lora_grad_rel_err": rel(res["grad"], ref["grad"])}


def train_loop(model, opt, recipe: Recipe, steps, device, warmup: int, repeat: int = 1,
               sched: Schedule | None = None) -> dict:
    """The workload's optimizer steps (each a list of micro-batches) `repeat` times in the same order (repeat > 1
    only steadies the timing: the first `warmup` steps are excluded once). Step boundaries are timed with CUDA
    events, so no extra host sync. With accumulation each micro-batch's loss is its token-loss sum divided by the
    step's trained tokens (HF Trainer's num_items_in_batch), so the step's loss is the token mean of the step."""
    sched = sched or Schedule()
    run = steps * repeat
    total = len(run)
    params = [p for g in opt.param_groups for p in g["params"]]
    lr_sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (total - s) / total))
                if sched.lr == "linear" else None)  # transformers' get_linear_schedule_with_warmup, 0 warm-up
    losses, per_step_tokens, events = [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        static = torch.cuda.memory_allocated(device)
    if not recipe.pygc:  # move every object alive now (model, optimizer) out of the collector's reach
        gc.collect()
        gc.freeze()
    try:
        t0 = time.perf_counter()
        for step, micro in enumerate(run):
            if step == warmup:
                sync(device)
                t0 = time.perf_counter()
            n_items = sum(trained_tokens(b) for b in micro)
            kw = {"num_items_in_batch": n_items} if sched.accum > 1 else {}
            step_loss = None
            for batch in micro:
                out = model(**to_inputs(recipe, batch, device), **kw)
                out.loss.backward()
                step_loss = out.loss.detach() if step_loss is None else step_loss + out.loss.detach()
                out = None
            if sched.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, sched.max_grad_norm)
            opt.step()
            if lr_sched is not None:
                lr_sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
            per_step_tokens.append(n_items)
            if device.type == "cuda":
                events.append(torch.cuda.Event(enable_timing=True))
                events[-1].record()
        sync(device)
        elapsed = time.perf_counter() - t0
    finally:
        gc.unfreeze()
    timed = [b for st in run[warmup:] for b in st]
    useful = sum(len(s["input_ids"]) for b in timed for s in b)
    computed = useful if recipe.batching == "pack" else sum(len(b) * max(len(s["input_ids"]) for s in b)
                                                            for b in timed)
    n = len(steps)
    losses = [float(x) for x in losses]
    spe = max(1, n // sched.epochs)  # steps per epoch (with repeat, every pass counts as epochs again)
    epoch_means, epoch_tokens = per_epoch(losses, per_step_tokens, spe)
    res = {"steps": len(run), "repeat": repeat, "timed_steps": len(run) - warmup, "time_s": elapsed,
           "useful_tokens": useful, "computed_tokens": computed, "tok_s": useful / elapsed,
           "tok_s_incl_padding": computed / elapsed,
           "losses": losses, "trained_tokens_per_step": per_step_tokens,
           "trained_tokens": epoch_tokens[0], "steps_per_epoch": spe, "epoch_mean_losses": epoch_means,
           "trained_tokens_per_epoch": epoch_tokens, "schedule": dataclasses.asdict(sched),
           "batch_lengths": [[len(s["input_ids"]) for s in b] for st in steps for b in st]}
    if events:
        ms = [events[i - 1].elapsed_time(events[i]) for i in range(warmup + 1, len(events))]
        res["step_ms"] = [round(x, 1) for x in ms]  # steps warmup+1.. (the first timed step has no start event)
        toks = [sum(len(s["input_ids"]) for b in st for s in b) for st in run]
        res["tok_s_by_pass"] = []
        for k in range(repeat):  # each pass's steps after warm-up, from the event times
            idx = [i for i in range(max(warmup + 1, k * n), (k + 1) * n)]
            t = sum(events[i - 1].elapsed_time(events[i]) for i in idx) / 1e3
            res["tok_s_by_pass"].append(round(sum(toks[i] for i in idx) / t, 1) if t else None)
    if device.type == "cuda":
        res.update(peak_gb=torch.cuda.max_memory_allocated(device) / 1e9, static_gb=static / 1e9,
                   peak_reserved_gb=torch.cuda.max_memory_reserved(device) / 1e9)
    return res


def profile_steps(model, opt, recipe: Recipe, batches, device, out_txt: Path) -> dict:
    """torch.profiler over two more steps: where the GPU time goes, and how busy the GPU is."""
    from torch.profiler import ProfilerActivity, profile
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in batches:
            out = model(**to_inputs(recipe, batch, device))
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
    wall = time.perf_counter() - t0
    return summarize_profile(prof, wall, f"{recipe.name}: {len(batches)} steps", out_txt)


def summarize_profile(prof, wall: float, label: str, out_txt: Path) -> dict:
    """GPU kernel time by category against the wall time of the profiled steps, and the top ops by GPU and by
    host (self CPU) time: whether a step is bound by the GPU or by the Python/launch work that feeds it."""
    from torch.autograd import DeviceType
    ka = prof.key_averages()
    key = "self_device_time_total" if hasattr(ka[0], "self_device_time_total") else "self_cuda_time_total"
    kernels = [e for e in ka if e.device_type == DeviceType.CUDA and getattr(e, key) > 0]
    rows = sorted(kernels, key=lambda e: getattr(e, key), reverse=True)
    gpu_us = sum(getattr(e, key) for e in kernels)
    n_launch = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                                   "cuLaunchKernelEx"))
    cats: dict[str, float] = {}
    for e in kernels:
        n = e.key.lower()
        cat = ("attention" if ("flash" in n or "fmha" in n or "attention" in n) else
               "bnb 4-bit dequant/gemm" if ("dequant" in n or "4bit" in n) else
               "optimizer" if ("adam" in n or "koptimizer" in n or "multi_tensor" in n) else
               "dropout" if "dropout" in n else
               "matmul" if ("gemm" in n or "sm90" in n or "nvjet" in n or "cutlass" in n or "xmma" in n) else
               "elementwise/copy/cast/reduce" if any(w in n for w in ("elementwise", "copy", "reduce", "cat",
                                                                      "index", "fill", "unrolled")) else
               "triton (liger etc.)" if ("triton" in n or "_kernel" in n) else "other")
        cats[cat] = cats.get(cat, 0.0) + getattr(e, key)
    with open(out_txt, "w") as f:
        f.write(f"{label}, wall {wall:.3f}s, GPU kernel time {gpu_us / 1e6:.3f}s, kernel launches {n_launch}\n")
        f.write(json.dumps({k: round(v / 1e6, 4) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}) + "\n")
        f.write(ka.table(sort_by=key, row_limit=40, max_name_column_width=90))
        f.write("\n\nby host (self CPU) time:\n")
        f.write(ka.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90))
    return {"wall_s": wall, "gpu_kernel_s": gpu_us / 1e6, "gpu_busy": gpu_us / 1e6 / wall, "kernel_launches": n_launch,
            "categories_s": {k: v / 1e6 for k, v in cats.items()},
            "top": [(e.key[:90], getattr(e, key) / 1e6, e.count) for e in rows[:25]]}


def loss_agreement(run: dict, seed_run: dict, same_order: bool, tol: float, by_epoch: bool = False,
                   expected_tokens: int | None = None) -> dict:
    """by_epoch (workload real: different order, dropout and schedule): the token-weighted mean loss of each epoch,
    and the trained tokens of each epoch equal to each other (and to the data's, expected_tokens)."""
    a, b = run["losses"], seed_run["losses"]
    ta, tb = run["trained_tokens_per_step"], seed_run["trained_tokens_per_step"]
    mean = lambda ls, ts: sum(l * t for l, t in zip(ls, ts)) / sum(ts)  # noqa: E731
    out = {"same_trained_tokens": run["trained_tokens"] == seed_run["trained_tokens"],
           "mean_loss": mean(a, ta), "seed_mean_loss": mean(b, tb),
           "mean_loss_abs_diff": abs(mean(a, ta) - mean(b, tb)), "compared": "token-weighted mean"}
    if by_epoch:
        ea, eb = run["epoch_mean_losses"], seed_run["epoch_mean_losses"]
        ka, kb = run["trained_tokens_per_epoch"], seed_run["trained_tokens_per_epoch"]
        diffs = [abs(x - y) for x, y in zip(ea, eb)]
        same = ka == kb and (expected_tokens is None or all(k == expected_tokens for k in ka))
        out.update(compared="token-weighted mean per epoch", epoch_mean_losses=ea, seed_epoch_mean_losses=eb,
                   epoch_abs_diffs=diffs, max_epoch_abs_diff=max(diffs) if diffs else float("nan"),
                   trained_tokens_per_epoch=ka, seed_trained_tokens_per_epoch=kb,
                   expected_trained_tokens_per_epoch=expected_tokens, same_trained_tokens_per_epoch=same, tol=tol)
        out["same_trained_tokens"] = same
        out["agree"] = same and len(ea) == len(eb) and bool(diffs) and max(diffs) <= tol
        return out
    if same_order and len(a) == len(b) and ta == tb:
        diffs = [abs(x - y) for x, y in zip(a, b)]
        out.update(compared="per step", max_step_abs_diff=max(diffs),
                   mean_step_abs_diff=sum(diffs) / len(diffs))
        out["agree"] = out["same_trained_tokens"] and max(diffs) <= tol
    else:
        out["agree"] = out["same_trained_tokens"] and out["mean_loss_abs_diff"] <= tol
    return out


# --------------------------------------------------------------------------------------------------------------
# The project's path (train_qlora_hf.py) — through its own functions


def project_module():
    try:
        import train_qlora_hf as T
    except Exception as e:  # noqa: BLE001
        return None, f"import train_qlora_hf failed: {type(e).__name__}: {e}"
    missing = [f for f in ("build_parser", "load_model_and_tokenizer", "train") if not hasattr(T, f)]
    return (None, f"train_qlora_hf lacks {missing}") if missing else (T, "")


def project_args(T, model_dir: Path, wl: str, extra: list[str], repeat: int = 1, budget_gb: float | None = None):
    """qa/long: train_qlora_hf's own defaults for everything about speed; the seed recipe's hyper-parameters
    (micro-batch of the workload, no accumulation, one epoch, constant lr 2e-4, no clipping) so that the losses are
    comparable. Only flags the parser knows are passed; --project-args adds or overrides.
    real: exactly SEED_COMMAND + --model + --seed 0 (+ --project-args), every other flag at its default."""
    parser = T.build_parser()
    if wl == "real":  # the seed's command as a user types it: nothing else but the model and the seed
        return parser.parse_args(SEED_COMMAND + ["--model", str(model_dir), "--seed", "0"] + extra)
    known = {o for a in parser._actions for o in a.option_strings}
    wanted = [("--model", str(model_dir)), ("--batch", str(MICRO_BATCH[wl])), ("--grad_accum", "1"),
              ("--epochs", str(repeat)), ("--lr", str(LR)), ("--lr_scheduler", "constant"), ("--warmup_ratio", "0"),
              ("--max_grad_norm", "0"), ("--seed", "0")]
    if budget_gb is not None:  # the memory goal for this workload, as the project's own budget flag
        wanted.append(("--gpu_mem_budget", f"{budget_gb:.2f}"))
    # file order, no length grouping: the steps are the seed's batches, so losses compare step by step (with
    # packing, grouping only changes which samples share a row, not the padding)
    wanted += [("--no-shuffle", None), ("--no-group_by_length", None)]
    argv = [x for opt, val in wanted if opt in known for x in ((opt,) if val is None else (opt, val))]
    return parser.parse_args(argv + extra)


def run_project_module(T, model_dir: Path, wl: str, samples: list[dict], device, extra: list[str],
                       repeat: int = 1, budget_gb: float | None = None, profile_txt: Path | None = None) -> dict:
    """profile_txt: also run torch.profiler over 2 steps after the warm-up (those two steps are slower and are
    then left out of the timing)."""
    args = project_args(T, model_dir, wl, extra, repeat, budget_gb)
    model, tok = T.load_model_and_tokenizer(args)
    steps = []
    prof, prof_steps = None, (WARMUP_STEPS + 1, WARMUP_STEPS + 3)  # profile steps 4 and 5 (1-based)
    prof_res, skip = {}, set()

    def on_step(step, loss, n_trained, n_input):
        nonlocal prof
        sync(device)
        steps.append((time.perf_counter(), float(loss), int(n_trained), int(n_input)))
        if profile_txt is not None and step == prof_steps[0]:
            from torch.profiler import ProfilerActivity, profile
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.start()
        elif prof is not None and step == prof_steps[1]:
            prof.stop()
            prof_res["wall_s"] = steps[-1][0] - steps[-3][0]
            # the profiled steps, and the next one (it starts late, after the profiler's stop), are not timed
            skip.update(range(prof_steps[0] + 1, prof_steps[1] + 2))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        static = torch.cuda.memory_allocated(device)
    metrics = T.train(model, tok, samples, [], args, out_dir=None, on_step=on_step)
    sync(device)
    if len(steps) <= WARMUP_STEPS + len(skip):
        raise RuntimeError(f"project path made {len(steps)} optimizer steps; need > {WARMUP_STEPS + len(skip)}")
    timed = [i for i in range(WARMUP_STEPS, len(steps)) if i + 1 not in skip]  # 0-based; step i took t[i] - t[i-1]
    elapsed = sum(steps[i][0] - steps[i - 1][0] for i in timed)
    useful = sum(steps[i][3] for i in timed)
    spe = math.ceil(len(samples) / (args.batch * args.grad_accum))  # one process: train()'s steps per epoch
    epoch_means, epoch_tokens = per_epoch([s[1] for s in steps], [s[2] for s in steps], spe)
    res = {"steps": len(steps), "timed_steps": len(timed), "time_s": elapsed,
           "useful_tokens": useful, "tok_s": useful / elapsed, "losses": [s[1] for s in steps],
           "trained_tokens_per_step": [s[2] for s in steps],
           "trained_tokens": sum(s[2] for s in steps) // max(1, args.epochs),
           "steps_per_epoch": spe, "epoch_mean_losses": epoch_means, "trained_tokens_per_epoch": epoch_tokens,
           "input_tokens": sum(s[3] for s in steps), "project_args": {k: (v if isinstance(v, (int, float, str,
           bool, type(None))) else str(v)) for k, v in vars(args).items()},
           "project_argv": (SEED_COMMAND + ["--model", str(model_dir), "--seed", "0"] + extra) if wl == "real" else None,
           "project_metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str, bool))},
           "oom_backoffs": (metrics or {}).get("oom_backoffs", [])}
    share = (metrics or {}).get("padding_share")
    if isinstance(share, (int, float)) and share < 1:
        res["computed_tokens"] = round(useful / (1 - share))  # padding share of the whole run, applied to the timed part
    if device.type == "cuda":
        res.update(peak_gb=torch.cuda.max_memory_allocated(device) / 1e9, static_gb=static / 1e9,
                   peak_reserved_gb=torch.cuda.max_memory_reserved(device) / 1e9)
    if prof_res:
        res["profile"] = summarize_profile(prof, prof_res["wall_s"], f"{wl} {' '.join(extra) or 'defaults'}: steps "
                                           f"{prof_steps[0] + 1}-{prof_steps[1]}", profile_txt)
    res["step_ms"] = [round((steps[i][0] - steps[i - 1][0]) * 1e3, 1) for i in range(1, len(steps))]
    del model, tok
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


# --------------------------------------------------------------------------------------------------------------
# Report


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "peft", "bitsandbytes", "accelerate", "liger_kernel"):
        try:
            from importlib.metadata import version
            out[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001
            out[mod] = None
    out["cuda"] = torch.version.cuda
    return out


def table(results: list[dict], notes: list[str] | None = None) -> str:
    seeds = {r["workload"]: r for r in results if r["variant"] == "seed" and "tok_s" in r}
    head = (f"{'workload':8} {'variant':46} {'tok/s':>8} {'x seed':>7} {'pad%':>5} {'peak GB':>8} {'x seed':>7} "
            f"{'loss agree':>11} {'fn check h/g':>13} {'cap GB':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        cap = (r.get("mem_cap") or {})
        cap_s = (f"{cap['mem_cap_gb']:g}" + ("" if cap.get("applied") else "*")) if cap else "-"
        if "tok_s" not in r:
            oom = "OutOfMemory" in r.get("error", "") or "out of memory" in r.get("error", "")
            why = f"FAILED{f' (OOM under the {cap_s} GB cap)' if cap and oom else ''}: "
            lines.append(f"{r['workload']:8} {r['variant'][:46]:46} {why}{r.get('error', '')[:80]}")
            continue
        s = seeds.get(r["workload"])
        ratio = f"{r['tok_s'] / s['tok_s']:.2f}" if s else "-"
        pad = 100 * (1 - r["useful_tokens"] / r["computed_tokens"]) if r.get("computed_tokens") else float("nan")
        peak = r.get("peak_gb", float("nan"))
        mratio = f"{peak / s['peak_gb']:.2f}" if s and "peak_gb" in s else "-"
        la = r.get("loss_agreement", {})
        diff = la.get("max_step_abs_diff", la.get("max_epoch_abs_diff", la.get("mean_loss_abs_diff", 0.0)))
        agree = "-" if not la else (("ok " if la["agree"] else "NO ") + f"{diff:.3f}")
        fc = r.get("function_check", {})
        fcs = f"{fc['hidden_rel_err']:.3f}/{fc['lora_grad_rel_err']:.3f}" if "hidden_rel_err" in fc else "-"
        backoff = f"  OOM back-offs: {len(r['oom_backoffs'])}" if r.get("oom_backoffs") else ""
        lines.append(f"{r['workload']:8} {r['variant'][:46]:46} {r['tok_s']:8.0f} {ratio:>7} {pad:5.1f} {peak:8.2f} "
                     f"{mratio:>7} {agree:>11} {fcs:>13} {cap_s:>6}{backoff}")
    lines += notes or []
    if any((r.get("mem_cap") or {}) and not r["mem_cap"].get("applied") for r in results):
        lines.append("cap GB *: recorded but not applied (no CUDA device, or not below the GPU's memory)")
    return "\n".join(lines)


def project_run(T, model_dir: Path, wl: str, samples: list[dict], device, extra: list[str], args, results,
                stamp: str, T0: float, cap: dict | None, meta: dict) -> dict:
    """One run of train_qlora_hf on one workload, recorded (a failure too) for the table."""
    name = "project(train_qlora_hf)" + (" seed command" if wl == "real" else "") + (
        " " + " ".join(extra) if extra else "")
    rec = {"workload": wl, "variant": name}
    if cap:
        rec["mem_cap"] = cap
    if args.time_budget and time.perf_counter() - T0 > args.time_budget:
        rec["error"] = "skipped: --time-budget reached"
        return rec
    print(f"== {wl} / {name}  (t={time.perf_counter() - T0:.0f}s)", flush=True)
    try:
        seed_run = next((r for r in results if r["workload"] == wl and r["variant"] == "seed" and "tok_s" in r), None)
        budget = None
        if args.project_budget and wl != "real":  # real: the seed's flags and nothing else
            # qa: the seed's measured peak (the goal: no more memory); long: 6.5 GB
            budget = 6.5 if wl == "long" else (math.floor(seed_run["peak_gb"] * 10) / 10
                                              if seed_run and "peak_gb" in seed_run else None)
        rec["gpu_mem_budget"] = budget
        prof_txt = (args.out_dir / f"profile_{stamp}_{len(results)}.txt"
                    if "project" in args.profile.split(",") else None)
        rec.update(run_project_module(T, model_dir, wl, samples, device, extra, args.repeat, budget, prof_txt))
        if seed_run and wl == "real":
            rec["loss_agreement"] = loss_agreement(rec, seed_run, False, args.real_loss_tol, by_epoch=True,
                                                   expected_tokens=meta["real"]["total_trained_tokens"])
        elif seed_run:
            pa = rec.get("project_args", {})
            same_order = pa.get("shuffle") is False and pa.get("group_by_length") is False
            rec["loss_agreement"] = loss_agreement(rec, seed_run, same_order, args.loss_tol)
    except Exception as e:  # noqa: BLE001 - an OOM under the cap included: a FAILED row, the bench goes on
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc()[-3000:]
        print(rec["traceback"], file=sys.stderr, flush=True)
    short = {k: rec.get(k) for k in ("tok_s", "peak_gb", "static_gb", "time_s", "error")}
    print(json.dumps(short), json.dumps(rec.get("loss_agreement", {})), flush=True)
    return rec


# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="qa,long", help="comma list of qa,long,real (default: %(default)s)")
    p.add_argument("--real-answer-scale", type=float, default=1.0,
                   help="workload real: multiply each answer's modelled token count by this (1.0 = the offline "
                        "generator's extractive answers as generated; ~2 models LLM-written 1-3 sentence answers) "
                        "(default: %(default)s)")
    p.add_argument("--real-chars-per-token", type=float, default=real_workload.CHARS_PER_TOKEN,
                   help="workload real: characters per token of message text (measured with Mistral-7B-v0.1's "
                        "tokenizer on these records; see bench/real_workload.py) (default: %(default)s)")
    p.add_argument("--real-loss-tol", type=float, default=0.05,
                   help="workload real: max |difference| of the per-epoch token-weighted mean loss vs the seed "
                        "(order, dropout and lr schedule differ; see bench/README.md) (default: %(default)s)")
    p.add_argument("--mem-cap-gb", default=None, metavar="GB",
                   help="cap the CUDA memory of a workload's runs (seed and project) with "
                        "torch.cuda.set_per_process_memory_fraction: GB for workload real, or wl=GB,...; 0: none "
                        "(default: real=40, an A100-40GB; none for qa/long)")
    p.add_argument("--variants", default="seed",
                   help="comma list of recipes, each NAME[+MOD...]; 'seed' is the reference (default: %(default)s)")
    p.add_argument("--project", choices=["auto", "module", "bench", "off"], default="auto",
                   help="the project's path: train_qlora_hf's functions (module), the bench's stand-in for the "
                        "recommended recipe (bench), module if importable else bench (auto), or none "
                        "(default: %(default)s)")
    p.add_argument("--project-recipe", default=DEFAULT_STANDIN,
                   help="recipe the 'bench' stand-in runs: one spec, or qa=SPEC,long=SPEC (default: %(default)s)")
    p.add_argument("--project-args", default="",
                   help="extra CLI args for train_qlora_hf's parser; ';' separates several project runs, e.g. "
                        "\";--optim adamw_torch_fused\" = defaults, then fused AdamW (default: none)")
    p.add_argument("--project-budget", action=argparse.BooleanOptionalAction, default=True,
                   help="pass the goal's memory as --gpu_mem_budget (qa: the seed's measured peak, long: 6.5 GB) "
                        "when train_qlora_hf has that flag (default: %(default)s)")
    p.add_argument("--model-dir", type=Path, default=Path("/dev/shm/bench-mistral7b"),
                   help="where the random-init model is built/reused (default: %(default)s)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results",
                   help="JSON output folder (default: %(default)s)")
    p.add_argument("--loss-tol", type=float, default=0.02,
                   help="max |loss difference| vs the seed, per step or of the epoch mean (default: %(default)s)")
    p.add_argument("--no-check", action="store_true", help="skip the function check")
    p.add_argument("--profile", default="",
                   help="comma list of variants to profile (2 extra qa steps); 'project' profiles 2 steps of "
                        "each project run, any workload (left out of its timing; long needs --repeat >= 2)")
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds; variants not started by then are skipped, so the table still prints (0: none)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each workload's batches this many times (same order) for a steadier timing; the "
                        "project path gets --epochs REPEAT; not workload real, which runs the seed's 2 epochs "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="LoRA init / ordering seed (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, tiny workloads: code paths only")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    T0 = time.perf_counter()
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU code-path test", file=sys.stderr)
        return 2
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in MICRO_BATCH]
    if unknown:
        print(f"unknown workload(s) {unknown}; known: {sorted(MICRO_BATCH)}", file=sys.stderr)
        return 2
    caps = parse_mem_caps(args.mem_cap_gb)
    recipes = [parse_recipe(v) for v in args.variants.split(",") if v]
    if any(r.name == "seed" for r in recipes):  # the reference runs first
        recipes.sort(key=lambda r: r.name != "seed")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    meta = {"gpu": gpu, "date_utc": stamp, "versions": versions(), "argv": sys.argv[1:] if argv is None else argv,
            "workloads": workloads, "micro_batch": MICRO_BATCH, "warmup_steps": WARMUP_STEPS, "lr": LR,
            "schedules": {wl: dataclasses.asdict(SCHEDULES[wl]) for wl in workloads},
            "mem_caps_gb": {wl: caps[wl] for wl in workloads if wl in caps}}
    print(json.dumps(meta), flush=True)
    meta["packed_attention"] = packing.varlen_self_test(device)
    if device.type != "cuda":
        meta["packed_attention"]["impl"] = "loop"  # as the project decides: varlen only on CUDA
    print("packed attention:", meta["packed_attention"], flush=True)
    results: list[dict] = []
    out_json = args.out_dir / f"train_{stamp}.json"

    def save():
        tmp = out_json.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        tmp.replace(out_json)

    model_dir = args.model_dir if not args.smoke else Path("/tmp/bench-tiny-model")
    t = time.perf_counter()
    if not (model_dir / "config.json").exists():
        build_model(model_dir, device, args.smoke)
        meta["build_s"] = time.perf_counter() - t
    cfg = json.loads((model_dir / "config.json").read_text())
    vocab = cfg["vocab_size"]
    data = {wl: workload(wl, vocab, args.smoke) for wl in workloads if wl != "real"}
    notes = []
    if "real" in workloads:
        data["real"], meta["real"] = real_workload.build(
            ROOT, vocab, cfg.get("bos_token_id", 1), cfg.get("eos_token_id", 2), args.smoke, args.real_answer_scale,
            args.real_chars_per_token, seed=args.seed)
        notes.append(real_workload.describe(meta["real"]))
        notes.append(f"real: seed recipe = HF Trainer loop of `{' '.join(SEED_COMMAND)}` (random order per epoch, "
                     f"micro-batch 8 x accumulation 2, lr linear decay, clip 1.0, dropout 0.05); project = "
                     f"train_qlora_hf with exactly those flags + --model --seed 0; loss agree = max |d| of the "
                     f"per-epoch token-weighted mean (tol {args.real_loss_tol})")
        print(notes[0], flush=True)
        print(meta["real"]["generate_qa"], flush=True)

    # -- seed recipe and research variants, one loaded model -----------------------------------------------------
    mode, why = args.project, ""
    T = None
    if mode in ("auto", "module"):
        T, why = project_module()
        if T is None:
            if mode == "module":
                print(f"--project module: {why}", file=sys.stderr)
                return 1
            mode = "bench"
        else:
            mode = "module"
    if mode == "bench":
        banner = "!" * 100
        print(f"{banner}\n!! PROJECT PATH = BENCH STAND-IN (--project-impl bench): recipe "
              f"'{args.project_recipe}' implemented inside bench_train.py, NOT train_qlora_hf.py. {why}\n{banner}",
              flush=True)
        meta["project_path"] = f"bench stand-in, recipe {args.project_recipe}: {why}"
        for wl in workloads:
            standin_recipe(args.project_recipe, wl)  # fail early on a bad spec
        recipes.append(Recipe(STANDIN))
    elif mode == "module":
        meta["project_path"] = "train_qlora_hf.py (load_model_and_tokenizer + train)"

    if recipes:
        t = time.perf_counter()
        base = load_4bit(model_dir, device)
        meta["load_s"] = time.perf_counter() - t
        print(f"loaded 4-bit model in {meta['load_s']:.1f}s", flush=True)
        session = Session(base, device, args.smoke, meta["packed_attention"]["impl"])
        check_ref = None
        qa_batch0 = chunk(data["qa"], MICRO_BATCH["qa"])[0] if "qa" in data else None
        leak_done = False
        for wl in workloads:
            seed_run = None
            cap = apply_mem_cap(device, caps.get(wl))  # around every run of this workload
            try:
                for recipe in recipes:
                    if recipe.name == STANDIN:
                        recipe = standin_recipe(args.project_recipe, wl)
                    rec = {"workload": wl, "variant": recipe.name, "recipe": dataclasses.asdict(recipe)}
                    if cap:
                        rec["mem_cap"] = cap
                    if args.time_budget and time.perf_counter() - T0 > args.time_budget:
                        rec["error"] = "skipped: --time-budget reached"
                        results.append(rec)
                        continue
                    print(f"== {wl} / {recipe.name}  (t={time.perf_counter() - T0:.0f}s)", flush=True)
                    t_var = time.perf_counter()
                    model = opt = None
                    try:
                        model, opt = session.setup(recipe, args.seed)
                        if wl == "qa" and not args.no_check:
                            t = time.perf_counter()
                            fc = function_check(model, recipe, qa_batch0, device, check_ref,
                                                leak_control=not leak_done)
                            if check_ref is None and recipe.name == "seed":
                                check_ref = fc.pop("_ref")
                            fc.pop("_ref", None)
                            leak_done = leak_done or "negative_control_cross_sample_attention" in fc
                            rec["function_check"] = fc
                            rec["function_check_s"] = time.perf_counter() - t
                        steps = steps_for(recipe, data[wl], wl, args.seed)
                        rec.update(train_loop(model, opt, recipe, steps, device, WARMUP_STEPS,
                                              1 if wl == "real" else args.repeat, SCHEDULES[wl]))
                        if recipe.name in args.profile.split(",") and wl == "qa":
                            rec["profile"] = profile_steps(model, opt, recipe, [b for st in steps for b in st][2:4],
                                                           device, args.out_dir / f"profile_{stamp}_{len(results)}.txt")
                        if recipe.name == "seed":
                            seed_run = rec
                        elif seed_run is not None and wl == "real":
                            rec["loss_agreement"] = loss_agreement(
                                rec, seed_run, False, args.real_loss_tol, by_epoch=True,
                                expected_tokens=meta["real"]["total_trained_tokens"])
                        elif seed_run is not None:
                            same_order = recipe.batching != "group" or MICRO_BATCH[wl] == 1
                            rec["loss_agreement"] = loss_agreement(rec, seed_run, same_order, args.loss_tol)
                    except Exception as e:  # noqa: BLE001 - record and go on with the next variant
                        rec["error"] = f"{type(e).__name__}: {e}"
                        rec["traceback"] = traceback.format_exc()[-3000:]
                        print(rec["traceback"], file=sys.stderr, flush=True)
                    finally:
                        opt = None
                        try:
                            session.teardown(model, recipe)
                            model = None  # the PEFT wrapper still points at the base: drop it, or it outlives the loop
                        except Exception:  # noqa: BLE001
                            rec["teardown_error"] = traceback.format_exc()[-2000:]
                            print(rec["teardown_error"], file=sys.stderr, flush=True)
                            results.append(rec)
                            save()
                            print("model state unknown after a failed teardown: stopping the variants")
                            raise
                    rec["variant_wall_s"] = time.perf_counter() - t_var
                    results.append(rec)
                    save()
                    short = {k: rec.get(k) for k in ("tok_s", "peak_gb", "static_gb", "time_s", "error")}
                    print(json.dumps(short), json.dumps(rec.get("function_check", {})),
                          json.dumps(rec.get("loss_agreement", {})), flush=True)
            finally:
                release_mem_cap(device, cap)
        del session, base
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the project's own path, its own model load per workload --------------------------------------------------
    if mode == "module":
        runs = [x.split() for x in args.project_args.split(";")]  # one project run per ';'-separated set
        for wl in workloads:
            cap = apply_mem_cap(device, caps.get(wl))  # the project runs of this workload under the same cap
            try:
                for extra in runs:
                    results.append(project_run(T, model_dir, wl, data[wl], device, extra, args, results, stamp, T0,
                                               cap, meta))
                    save()
            finally:
                release_mem_cap(device, cap)

    print()
    print(f"GPU: {gpu} | {stamp} | " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    report = f"GPU: {gpu} | {stamp} | " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    report += "\n" + table(results, notes)
    (args.out_dir / f"train_{stamp}.txt").write_text(report + "\n")
    print(table(results, notes))
    print(f"\nJSON: {out_json}")
    failed = [r for r in results if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
