"""Fused replacements for a few Hugging Face modules during training: RMSNorm as one op, and Liger's kernels.

Both patch module instances (the model's own classes are left alone), so they touch only the model they
are applied to.
"""
from __future__ import annotations

import argparse
import inspect
from types import MethodType

import torch

LIGER_PARTS = ("flce", "rope", "swiglu", "rmsnorm")
LIGER_AUTO = ("flce",)  # what `--liger auto` applies: the part measured to pay on an H100 (bench/README.md)
_LIGER_NAMES = {"rope": "RoPE", "rmsnorm": "RMSNorm", "swiglu": "SwiGLU", "flce": "fused linear cross-entropy"}


def rms_norm_forward(self, x):
    """RMSNorm as one fused op instead of Hugging Face's ~8 (cast, pow, mean, rsqrt, mul, cast, mul)."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.variance_epsilon)


def fuse_rms_norms(model) -> int:
    """Route every Hugging Face *RMSNorm module (with a weight and variance_epsilon) through rms_norm_forward.
    Returns how many were patched; Liger's own RMSNorm is left alone."""
    n = 0
    for m in model.modules():
        name = type(m).__name__
        if name.endswith("RMSNorm") and not name.startswith("Liger") and hasattr(m, "variance_epsilon") \
                and getattr(m, "weight", None) is not None:
            m.forward = MethodType(rms_norm_forward, m)
            n += 1
    return n


def parse_liger(value: str) -> str:
    """argparse type of --liger: auto, all, off or a comma list of LIGER_PARTS."""
    v = value.strip().lower()
    if v in ("auto", "all", "off"):
        return v
    parts = [x.strip() for x in v.split(",") if x.strip()]
    if not parts or any(x not in LIGER_PARTS for x in parts):
        raise argparse.ArgumentTypeError(f"{value!r}: use auto, all, off or a comma list of {', '.join(LIGER_PARTS)}")
    return ",".join(dict.fromkeys(parts))


def apply_liger(model, mode: str, device) -> str:
    """The Liger kernels `mode` names, applied to this model instance; returns what was applied.
    Raises ImportError when a part was asked for explicitly and liger-kernel is not installed."""
    if mode == "off":
        return "off"
    if device.type != "cuda":
        return f"skipped (--liger {mode}: Liger's Triton kernels need CUDA)"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        if mode != "auto":
            raise
        return "skipped (liger-kernel not installed: pip install -r requirements-gpu.txt)"
    model_type = getattr(model.config, "model_type", None)
    apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply_fn is None:
        return f"skipped (Liger has no kernels for model type {model_type!r})"
    parts = set(LIGER_PARTS if mode == "all" else LIGER_AUTO if mode == "auto" else mode.split(","))
    wanted = {"rope": "rope" in parts, "rms_norm": "rmsnorm" in parts, "swiglu": "swiglu" in parts,
              "cross_entropy": False, "fused_linear_cross_entropy": "flce" in parts, "model": model}
    accepted = inspect.signature(apply_fn).parameters  # the per-model functions take different switches
    apply_fn(**{k: v for k, v in wanted.items() if k in accepted})
    return ", ".join(_LIGER_NAMES[p] for p in LIGER_PARTS[1:] + LIGER_PARTS[:1] if p in parts)
