"""Spending GPU memory on speed: which decoder layers skip gradient checkpointing, or whether checkpoints go
to host memory; plus the peak-memory reading and the garbage-collector freeze used around the steps."""
from __future__ import annotations

import argparse
import contextlib
import gc
from dataclasses import dataclass

import torch

from paperqa_tune.cli import finite_float


def decoder_layers(model) -> tuple[str, list]:
    """(name of the ModuleList, its layers): the decoder layers whose gradient checkpointing can be switched
    one by one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    best_name, best = "", []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > len(best) and \
                all(isinstance(x, GradientCheckpointingLayer) for x in m):
            best_name, best = name, list(m)
    return best_name, best


def activation_bytes_per_token_layer(hidden: int, intermediate: int, dropout: float) -> float:
    """Activations one decoder layer keeps per token when it is not checkpointed (bf16). Measured on a 7B
    shape (hidden 4096, MLP 14336): ~145 KB without LoRA dropout, ~166 KB with PEFT's dropout (a mask and a
    dropped copy per LoRA layer; the fused LoRA node keeps neither, so pass dropout=0 for it); scaled by the
    tensors a Mistral/Llama layer saves (~6 of width hidden, ~4 of width intermediate) for other shapes."""
    per_7b = 166e3 if dropout > 0 else 145e3
    return per_7b * (6 * hidden + 4 * intermediate) / (6 * 4096 + 4 * 14336)


@dataclass(frozen=True)
class ModelFootprint:
    """What the memory plan needs to know of the loaded model."""
    static_bytes: float                 # GPU memory held before training: 4-bit weights, LoRA fp32 masters
    n_lora: int                         # trainable (LoRA) parameters
    hidden: int                         # hidden size
    intermediate: int                   # MLP width
    n_layers: int                       # decoder layers that checkpoint (0: checkpointing is off)


@dataclass(frozen=True)
class BudgetSettings:
    """--gpu_mem_budget's inputs besides the model and the data."""
    budget_gb: float | str              # GB, or "auto": what the GPU has free now (auto_budget_gb)
    optim: str                          # optimizer name: 8-bit ("8bit" in it) or fp32 AdamW state
    lora_dropout: float                 # the dropout whose masks the LoRA layers store (0 for the fused LoRA node)
    packed: bool                        # micro-batches are packed rows (tokens: sum of lengths) or padded
    rank: int = 0                       # this process and the number of processes: which samples it gets
    world: int = 1


def plan_checkpointing(budget_gb: float, model: ModelFootprint, optim: str, max_tokens: int, dropout: float) -> dict:
    """Spend a GPU memory budget on speed. Estimate (bytes) for k layers without checkpointing:
    static + 4·n_lora (fp32 grads) + (8 | 2)·n_lora (AdamW state, fp32 | 8-bit) + T·2·hidden·n_layers
    (checkpointed layer inputs, bf16) + (k+1)·T·c (k full layers + the one being recomputed) + 0.35 GB
    (workspace), T = largest micro-batch in tokens. If k = 0 does not fit, the checkpoints go to pinned host
    memory ("offload"); otherwise the largest k that fits ("skip": the last k layers keep their activations).
    """
    c = activation_bytes_per_token_layer(model.hidden, model.intermediate, dropout)
    opt_bytes = 2 if "8bit" in optim else 8
    fixed = model.static_bytes + (4 + opt_bytes) * model.n_lora + 0.35e9
    ckpt = max_tokens * 2 * model.hidden * model.n_layers
    budget = budget_gb * 1e9

    def estimate(k):
        return fixed + ckpt + (k + 1) * max_tokens * c

    if estimate(0) > budget:
        est = fixed + max_tokens * c
        return {"mode": "offload", "skip_layers": 0, "estimate_gb": est / 1e9, "budget_gb": budget_gb,
                "fits": est <= budget, "act_bytes_per_token_layer": c}
    k = 0
    while k < model.n_layers and estimate(k + 1) <= budget:
        k += 1
    return {"mode": "skip", "skip_layers": k, "estimate_gb": estimate(k) / 1e9, "budget_gb": budget_gb,
            "fits": True, "act_bytes_per_token_layer": c}


def offload_checkpoints(model, pin_memory: bool = True) -> list:
    """Keep what the checkpointed decoder layers save for backward (their inputs) in host memory: the decoder
    stack's forward runs inside torch.autograd.graph.save_on_cpu. Inside a checkpointed layer the checkpoint's
    own hooks come first, so activations are still recomputed, not copied. Returns the hook handles."""
    name, _ = decoder_layers(model)
    stack = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    active: list = []

    def enter(module, args):
        ctx = torch.autograd.graph.save_on_cpu(pin_memory=pin_memory)
        ctx.__enter__()
        active.append(ctx)

    def leave(module, args, output):
        if active:  # always_call: also after an exception (an OOM the loop retries), so no hook is left behind
            active.pop().__exit__(None, None, None)

    return [stack.register_forward_pre_hook(enter), stack.register_forward_hook(leave, always_call=True)]


def apply_checkpoint_plan(model, plan: dict, pin_memory: bool = True) -> list:
    """Checkpointing off on the last plan["skip_layers"] layers, or (mode "offload") checkpoints in host
    memory. Returns hook handles (offload) to remove to undo it."""
    _, layers = decoder_layers(model)
    if plan["mode"] == "offload":
        return offload_checkpoints(model, pin_memory)
    for layer in layers[len(layers) - plan["skip_layers"]:]:
        layer.gradient_checkpointing = False
    return []


def parse_mem_budget(text: str) -> float | str | None:
    """argparse type of --gpu_mem_budget: GB (a finite number; the script checks it is > 0), "auto" or "off"
    (None)."""
    low = text.strip().lower()
    if low in ("auto", "off"):
        return None if low == "off" else "auto"
    try:
        return finite_float(low)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: give GB (e.g. 20), auto or off") from None


def auto_budget_gb(device, margin: float = 0.15) -> float:
    """--gpu_mem_budget auto: the memory this process can still use on `device` (free now + what it already holds,
    within a per-process cap such as torch.cuda.set_per_process_memory_fraction), less `margin` of it for the
    allocator's fragmentation and other users of the GPU."""
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)  # torch >= 2.9
    usable = min(free + torch.cuda.memory_reserved(device), total * fraction)
    return round(usable * (1 - margin) / 1e9, 2)


def pick_micro_batch(options: list[tuple[int, int, dict]]) -> tuple[int, int, dict]:
    """Of (micro-batch, its largest tokens, its plan) options, largest micro-batch first and the user's --batch
    last: the first that fits the budget with no more checkpointing than the user's needs, else the user's."""
    user = options[-1][2]
    for m, t, p in options[:-1]:
        if p["fits"] and (p["mode"] == "none" or (p["mode"] == "skip" and user["mode"] == "skip"
                                                  and p["skip_layers"] >= user["skip_layers"])):
            return m, t, p
    return options[-1]


def plan_for_budget(model, device, settings: BudgetSettings, step_plans, lengths: list[int], micros: list[int]
                    ) -> tuple[dict | None, int, str]:
    """--gpu_mem_budget: pick the micro-batch (samples per forward) among `micros` (the user's --batch last; a
    larger one first, a whole step's samples as one row, considered only for packed micro-batches) and plan which
    checkpointed layers of `model` keep their activations (or offload the checkpoints) for its largest micro-batch
    over `step_plans`; apply the plan and say what was done. A larger micro-batch is taken only when it needs no more
    checkpointing than --batch does: fewer, larger kernels on the same maths, never extra recompute. Returns (plan or
    None, micro-batch, a line for the log). CUDA only: the caller says why there is no plan on other devices."""
    s, user = settings, micros[-1]
    micros = [m for m in micros[:-1] if s.packed and m > user] + [user]
    budget_gb = auto_budget_gb(device) if s.budget_gb == "auto" else s.budget_gb
    label = "--gpu_mem_budget auto:" if s.budget_gb == "auto" else "--gpu_mem_budget"
    step_plans = list(step_plans)
    _, all_layers = decoder_layers(model)
    layers = [l for l in all_layers if getattr(l, "gradient_checkpointing", False)]
    cfg = model.config
    footprint = ModelFootprint(torch.cuda.memory_allocated(device),
                               sum(p.numel() for p in model.parameters() if p.requires_grad), cfg.hidden_size,
                               getattr(cfg, "intermediate_size", 4 * cfg.hidden_size), len(layers))
    options = []
    for micro in micros:
        top = max_micro_tokens(step_plans, lengths, micro, s.rank, s.world, s.packed)
        plan = plan_checkpointing(budget_gb, footprint, s.optim, top, s.lora_dropout)
        if not layers:  # checkpointing is off: every layer keeps its activations
            est = plan["estimate_gb"] + top * len(all_layers) * plan["act_bytes_per_token_layer"] / 1e9
            plan = {**plan, "mode": "none", "estimate_gb": est, "fits": est <= budget_gb}
        options.append((micro, top, plan))
    micro, top, plan = pick_micro_batch(options)
    plan = {**plan, "budget_gb": budget_gb}
    head = f"{label} {budget_gb} GB: " + (f"micro-batch {micro} (a whole step in one packed row), "
                                          if micro != user else "")
    over = "" if plan["fits"] else " (over the budget: lower --batch)"
    if not layers:
        return None, micro, (f"{head}largest micro-batch {top:,} tokens; estimated peak {plan['estimate_gb']:.2f} GB "
                             f"(gradient checkpointing is off){over}")
    apply_checkpoint_plan(model, plan)
    what = ("checkpoints offloaded to pinned host memory (full checkpointing would not fit)"
            if plan["mode"] == "offload" else
            f"gradient checkpointing off on the last {plan['skip_layers']} of {len(layers)} layers")
    return plan, micro, (f"{head}largest micro-batch {top:,} tokens -> {what}; "
                         f"estimated peak {plan['estimate_gb']:.2f} GB{over}")


def max_micro_tokens(step_plans, lengths: list[int], micro: int, rank: int, world: int, packed: bool) -> int:
    """Largest micro-batch over `step_plans` (the sample indices of each optimizer step) in computed tokens
    (packed: the sum of lengths; padded: rows x longest), for the samples this rank gets (round robin of the
    step sorted longest first, as the training loop deals them)."""
    top = 0
    for step in step_plans:
        mine = sorted(step, key=lambda i: -lengths[i])[rank::world]
        for j in range(0, len(mine), micro):
            part = [lengths[i] for i in mine[j:j + micro]]
            top = max(top, sum(part) if packed else len(part) * max(part))
    return top


def peak_memory(device) -> tuple[float, str]:
    """Peak memory in GB and what was measured (allocated CUDA memory, or the process's max RSS on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "cuda_max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "cpu_max_rss"


@contextlib.contextmanager
def frozen_gc():
    """Move every object alive now (model, optimizer, data) out of the collector's reach while training:
    full collections over them cost ~10% of a fast step."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
