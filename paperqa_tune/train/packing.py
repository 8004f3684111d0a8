"""Micro-batches without padding: every sample of a micro-batch in one row, attention within each sample.

`collate_packed` lays the samples end to end with positions restarting per sample and hands the attention
kernel the sample boundaries (cu_seq_lens); `register_packed_attention(impl)` gives transformers an attention
function that honours them: flash varlen attention on CUDA (after `varlen_self_test` agrees with a float64
reference), else one SDPA call per sample. The implementation is part of the registered name, so nothing
process-wide decides which kernel a model uses. `collate` is the padded layout, for comparison and for
models without packed attention.
"""
from __future__ import annotations

import functools
import inspect

import torch

IGNORE = -100  # label of a token that is not trained on
PACKED_ATTN = {"varlen": "paperqa_packed_varlen", "loop": "paperqa_packed_loop"}


def collate(samples: list[dict], pad_id: int, device) -> dict:
    """Right-padded tensors. The attention mask and labels come from the lengths, never from `ids != pad`."""
    lengths = [len(s["input_ids"]) for s in samples]
    L = max(lengths)
    ids = torch.full((len(samples), L), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), L), dtype=torch.long)
    for r, s in enumerate(samples):
        n = lengths[r]
        ids[r, :n] = torch.tensor(s["input_ids"])
        labels[r, :n] = torch.tensor(s["labels"])
        mask[r, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            # without padding, no mask lets SDPA take its plain causal path
            "attention_mask": None if min(lengths) == L else mask.to(device),
            "n_samples": len(samples), "n_tokens": sum(lengths), "n_padded": L * len(samples)}


def collate_packed(samples: list[dict], device) -> dict:
    """All samples of a micro-batch in one row, no padding. Positions restart per sample, the attention kernel
    gets the sample boundaries (cu_seq_lens), and the first label of each sample is -100: no token attends to
    or predicts across a boundary. Trained tokens are those of the padded layout (label 0 is never a target)."""
    ids, labels, pos, cu = [], [], [], [0]
    for s in samples:
        n = len(s["input_ids"])
        ids += s["input_ids"]
        labels += [IGNORE] + list(s["labels"][1:])
        pos += list(range(n))
        cu.append(cu[-1] + n)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    max_len = max(len(s["input_ids"]) for s in samples)
    return {"input_ids": torch.tensor([ids], device=device), "labels": torch.tensor([labels], device=device),
            "attention_mask": None, "position_ids": torch.tensor([pos], device=device),
            "cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t, "max_length_q": max_len, "max_length_k": max_len,
            "n_samples": len(samples), "n_tokens": cu[-1], "n_padded": cu[-1]}


def _sdpa(module, q, k, v, scaling):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, q, k, v, None, dropout=0.0, scaling=scaling, is_causal=True)[0]


@functools.lru_cache(maxsize=None)
def _varlen_params() -> frozenset:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)  # once: this runs for every layer of every step


def varlen_call(q, k, v, cu, max_len, scaling):
    """q: (T, Hq, D), k/v: (T, Hkv, D) -> (T, Hq, D), causal within each sample, whatever this torch's
    varlen_attn signature is."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    kw = {}
    if "scale" in params:
        kw["scale"] = scaling
    if "enable_gqa" in params and q.shape[1] != k.shape[1]:
        kw["enable_gqa"] = True
    if "is_causal" in params:
        kw["is_causal"] = True
    elif "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        raise RuntimeError("varlen_attn has neither is_causal nor window_size")
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             sliding_window=None, *, impl: str = "loop", **kwargs):
    """AttentionInterface function: query (1, Hq, T, D), key/value (1, Hkv, T, D) -> (1, T, Hq, D).

    Transformers builds no mask for a custom attention function, so a right-padded batch (no cu_seq_lens)
    gets plain causal attention: exact for its real tokens, which only see earlier (real) tokens.
    """
    if attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return _sdpa(module, query, key, value, scaling), None
    max_len = int(kwargs["max_length_q"])
    if sliding_window is not None and max_len > sliding_window:
        raise ValueError(f"a sample of {max_len} tokens exceeds the model's sliding window {sliding_window}")
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one packed row per micro-batch")
    if impl == "varlen" and query.dtype in (torch.float16, torch.bfloat16):  # the flash kernel: half precision only
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        return varlen_call(q, k, v, cu, max_len, scaling).unsqueeze(0), None
    bounds = cu.tolist()  # CPU, fp32, or a GPU whose varlen kernel failed its self-test: one SDPA call per sample
    outs = [_sdpa(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], scaling)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1), None


def varlen_self_test(device) -> dict:
    """Check varlen_attn (forward and backward, GQA) against a float64 per-sample reference on `device`.
    Returns {"impl": "varlen" | "loop", ...}: "varlen" only if it agrees; a failure (CPU: no kernel) is kept
    as "varlen_error". Uses its own random generator: the caller's seeds are untouched."""
    info = {"impl": "loop"}
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        lens = [37, 300, 129, 511, 1]
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
        T, Hq, Hkv, D = sum(lens), 32, 8, 128

        def randn(*shape, grad=True):
            return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_(grad)

        q, k, v = randn(T, Hq, D), randn(T, Hkv, D), randn(T, Hkv, D)
        go = randn(T, Hq, D, grad=False)
        out = varlen_call(q, k, v, cu, max(lens), D ** -0.5)
        grads = torch.autograd.grad(out, (q, k, v), go)
        qr, kr, vr = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        outs = []
        for s, e in zip(cu.tolist()[:-1], cu.tolist()[1:]):
            qq = qr[s:e].transpose(0, 1)
            kk = kr[s:e].transpose(0, 1).repeat_interleave(Hq // Hkv, 0)
            vv = vr[s:e].transpose(0, 1).repeat_interleave(Hq // Hkv, 0)
            outs.append(torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True).transpose(0, 1))
        ref = torch.cat(outs)
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), go.double())
        errs = [float((a.detach().double() - b.detach()).norm() / b.detach().norm())
                for a, b in zip((out, *grads), (ref, *ref_grads))]
        info.update(varlen_rel_err={"out": errs[0], "dq": errs[1], "dk": errs[2], "dv": errs[3]})
        if all(e < 2e-2 for e in errs):
            info["impl"] = "varlen"
    except Exception as e:  # noqa: BLE001 - any failure means: use the per-sample loop
        info["varlen_error"] = f"{type(e).__name__}: {e}"[:300]
    return info


def register_packed_attention(impl: str) -> str:
    """Register the packed attention function for `impl` ("varlen" or "loop") with transformers; returns the
    name to pass to model.set_attn_implementation."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTN[impl], functools.partial(packed_attention_forward, impl=impl))
    return PACKED_ATTN[impl]


def uses_packed_attention(model) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in PACKED_ATTN.values()
