"""What two code paths that run different kernels may be asked to agree on, on any machine.

Bit-equality holds only where the same kernels run on the same shapes. Two correct paths that compute the same
function with other kernels (a 4-bit matmul vs the dequantised weight's, a merged W + BA vs W then BA, AVX-512
vs AVX2, one thread vs several) round differently, so their logits agree to a tolerance and their greedy
tokens agree except where the reference itself nearly tied between its two best tokens."""
from __future__ import annotations

import contextlib
import math

import torch


def logit_tolerance(model, dtype: torch.dtype, scale: float, margin: float = 4.0) -> float:
    """How far apart two correct kernels may put the same logits. Each of the model's layers (and the LM head)
    rounds its outputs to `dtype` (half a unit in the last place, eps/2, relative) after summing up to `width`
    products in fp32 in some order (about sqrt(width) fp32 units); that error, over layers + 1 stages, relative to
    the logits' scale, times a safety margin. bf16: one rounding per layer dominates; fp32: the summation order."""
    cfg = model.config
    width = max(cfg.hidden_size, getattr(cfg, "intermediate_size", 0) or 0)
    per_stage = torch.finfo(dtype).eps / 2 + math.sqrt(width) * torch.finfo(torch.float32).eps
    return margin * (cfg.num_hidden_layers + 1) * per_stage * scale


def four_bit_dtype(model, dtype: torch.dtype) -> torch.dtype:
    """The precision a bitsandbytes 4-bit matmul of `model` really computes in. On a CPU with AVX512-BF16 its
    fused 4-bit kernel casts the activations and the scales to bf16 whatever the model's dtype
    (bitsandbytes/backends/cpu/ops.py: "cpu fused op only support bf16"): measured on such a Xeon, the 4-bit path
    and the dequantised fp32 path differ by 2.2e-3 in the logits (bf16's level), where AVX2 CPUs agree to 1e-6."""
    if next(model.parameters()).device.type == "cpu" and dtype == torch.float32:
        from bitsandbytes.functional import has_avx512bf16

        if has_avx512bf16():
            return torch.bfloat16
    return dtype


def teacher_forced_logits(model, prompt: list[int], ids: list[int], ctx=None) -> torch.Tensor:
    """Logits that predict each token of `ids` after `prompt` (one forward, no padding)."""
    device = next(model.parameters()).device
    with (ctx() if ctx else contextlib.nullcontext()), torch.no_grad():
        out = model(input_ids=torch.tensor([prompt + ids], device=device)).logits[0].float().cpu()
    return out[len(prompt) - 1: len(prompt) - 1 + len(ids)]


def first_split(a: list[int], b: list[int]) -> int | None:
    """The first position where two token sequences differ (one ending earlier counts), or None if equal."""
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if k is None and len(a) != len(b):
        k = min(len(a), len(b))
    return k


def assert_greedy_agrees(ref_model, prompts: list[list[int]], ours: list[list[int]], ref: list[list[int]],
                         tol: float, ref_ctx=None) -> int:
    """Greedy tokens `ours` equal the reference's `ref` row by row, or leave them only at a position where the
    reference's own top-2 logits (teacher-forced on its tokens) are within 2 * tol: a near-tie that rounding
    within tol may flip. Returns how many rows split (at such ties)."""
    split = 0
    for p, a, b in zip(prompts, ours, ref, strict=True):
        k = first_split(a, b)
        if k is None:
            continue
        assert k < len(b), f"ours continues past the reference's end at {k}: {a} vs {b}"
        top = teacher_forced_logits(ref_model, p, b, ref_ctx)[k].topk(2).values
        margin = (top[0] - top[1]).item()
        assert margin <= 2 * tol, f"greedy split at token {k} where the reference's choice was clear by {margin:.4g} " \
                                  f"(tolerance {tol:.4g}): {a} vs {b}"
        split += 1
    return split
