"""The 4-bit base layer and its LoRA adapter as one autograd node (train_qlora_hf.py --fused_lora).

PEFT + bitsandbytes build y = x W^T + s * dropout(x) A^T B^T from ~6 autograd nodes and a dozen Python-level
ops per layer; at a few thousand tokens per step a training step is bound by that host-side work. Here it is
one node: forward = dequantise, 2 GEMMs, one addmm; backward = dequantise + 4 small GEMMs. W is never saved
(dequantised again in backward) and dropout keeps no mask (drawn again in backward from the same generator
state, the way activation checkpointing replays it). The math is PEFT's: tests/test_train_fast.py compares
outputs and gradients.

`FusedLoRA.patch(model)` routes every peft `lora.bnb.Linear4bit` of a model through the node. The state the
node uses (fp32 block scales expanded once, compute-dtype copies of the LoRA weights made once per optimizer
step, base weights kept dequantised where memory allows: `keep_dense`) lives on the FusedLoRA object, not on
bitsandbytes' or torch's objects.
"""
from __future__ import annotations

import functools

import torch


def _generator(device):
    return torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else torch.default_generator


def dequantize(weight, quant_state, absmax32=None):
    """bitsandbytes' dequantize_4bit; with `absmax32` (the expanded fp32 block scales) one kernel instead of three.
    The same weights bit for bit."""
    if absmax32 is None or weight.shape[0] == 1:  # (a [1, n] weight is bnb's transposed legacy layout)
        import bitsandbytes.functional as bnbF

        return bnbF.dequantize_4bit(weight, quant_state)
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight, absmax32, quant_state.blocksize,
                                                          quant_state.quant_type, quant_state.shape, quant_state.dtype)


def expand_absmax(quant_state):
    """The fp32 block scales of a double-quantised 4-bit weight, computed exactly as bitsandbytes does at each
    dequantisation; None where there is nothing to expand. Costs 4 bytes per 64 weights (~0.44 GB for a 7B
    model); saves two kernels and bitsandbytes' Python per dequantisation (~1,200 per step of a 7B model)."""
    import bitsandbytes.functional as bnbF

    if not getattr(quant_state, "nested", False) or not hasattr(torch.ops.bitsandbytes, "dequantize_4bit"):
        return None
    absmax = bnbF.dequantize_blockwise(quant_state.absmax, quant_state.state2)
    absmax += quant_state.offset
    return absmax.float()


def _weight(dense, weight, quant_state, absmax32, dtype):
    """The base weight in `dtype`: the kept dequantised copy when there is one of that dtype (the same bits a
    dequantisation gives), else dequantised now."""
    if dense is not None and dense.dtype == dtype:
        return dense
    return dequantize(weight, quant_state, absmax32).to(dtype)


class LoRA4bitFunction(torch.autograd.Function):
    """y = x W^T + s * dropout(x) A^T B^T with W the 4-bit base weight, as ONE autograd node.
    LoRA master weights stay fp32: cast(t, dtype) gives their compute-dtype copies, gradients come back in fp32."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weight, quant_state, absmax32, scaling, p, fp32_sum=False, cast=None,
                dense=None):
        x2 = x.reshape(-1, x.shape[-1])
        cast = cast or (lambda t, dtype: t.to(dtype))
        a, b = cast(lora_a, x.dtype), cast(lora_b, x.dtype)  # inside forward: no autograd node for the casts
        rng = None
        if p > 0:
            gen = _generator(x2.device)
            rng = gen.get_state()
            xd, _ = torch.native_dropout(x2, p, True)
        else:
            xd = x2
        h = torch.mm(xd, a.t())
        w = _weight(dense, weight, quant_state, absmax32, x.dtype)
        if fp32_sum:
            # LoRA delta first, then the base GEMM accumulates onto it in place (beta = scaling): the GEMM adds C
            # to its fp32 accumulator and rounds once, so a delta under half a bf16 step of the base output is not
            # rounded away. The other order rounds the base output to bf16 before adding the delta and learned
            # slower than the fp32-upcast seed recipe (bench/README.md; test_lora_sum_keeps_small_deltas).
            out = torch.mm(h, b.t()).addmm_(x2, w.t(), beta=scaling)
        else:
            out = torch.mm(x2, w.t()).addmm_(h, b.t(), alpha=scaling)
        del w, xd
        ctx.save_for_backward(x2, h, a, b)
        ctx.weight, ctx.quant_state, ctx.absmax32, ctx.scaling, ctx.p, ctx.rng, ctx.dense = \
            weight, quant_state, absmax32, scaling, p, rng, dense
        ctx.x_shape, ctx.dtypes = x.shape, (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, h, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        s, p = ctx.scaling, ctx.p
        xd, mask = x2, None
        if ctx.rng is not None:  # the forward's dropout mask, drawn again from the same generator state
            gen = _generator(x2.device)
            now = gen.get_state()
            gen.set_state(ctx.rng)
            xd, mask = torch.native_dropout(x2, p, True)
            gen.set_state(now)
        gh = torch.mm(g, b).mul_(s)                      # d loss / d h, (tokens, r)
        if g.is_cuda and g.dtype != torch.float32 and ctx.dtypes == (torch.float32, torch.float32):
            # the fp32 masters' gradients straight out of the GEMM: no bf16 rounding, no cast kernels
            grad_b = torch.mm(g.t(), h, out_dtype=torch.float32).mul_(s)  # (out, r)
            grad_a = torch.mm(gh.t(), xd, out_dtype=torch.float32)        # (r, in)
        else:
            grad_b = torch.mm(g.t(), h).mul_(s)
            grad_a = torch.mm(gh.t(), xd)
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = _weight(ctx.dense, ctx.weight, ctx.quant_state, ctx.absmax32, g.dtype)
            grad_x = torch.mm(g, w)
            del w
            if mask is None:
                grad_x.addmm_(gh, a)
            else:
                grad_x.addcmul_(torch.mm(gh, a), mask, value=1.0 / (1.0 - p))
            grad_x = grad_x.view(ctx.x_shape)
        return (grad_x, grad_a.to(ctx.dtypes[0]), grad_b.to(ctx.dtypes[1]),
                None, None, None, None, None, None, None, None)


def addmm_lora_forward(layer, x, *args, **kwargs):
    """bnb 4-bit base + LoRA as addmm(base_out, dropout(x) A^T, B^T, alpha=scaling) in the compute dtype
    (several adapters, bias, merged weights: the cases the one-node path does not take)."""
    result = layer.base_layer(x, *args, **kwargs)
    if layer.disable_adapters or layer.merged:
        return result
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        a = layer.lora_A[name].weight.to(x.dtype)
        b = layer.lora_B[name].weight.to(x.dtype)
        h = torch.nn.functional.linear(layer.lora_dropout[name](x), a)
        out2d = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(),
                            alpha=layer.scaling[name])
        result = out2d.view(result.shape)
    return result


class FusedLoRA:
    """Routes peft's bnb Linear4bit layers through LoRA4bitFunction and holds what the node caches.

    fp32_sum: the base GEMM accumulates onto the LoRA delta in fp32 (--lora_fp32_sum).
    """

    def __init__(self, fp32_sum: bool = True):
        self.fp32_sum = fp32_sum
        self.layers: list = []
        self._absmax: dict[int, torch.Tensor] = {}      # id(quant_state) -> expanded fp32 scales
        self._compute: dict[int, tuple] = {}            # id(LoRA weight) -> (version, dtype, compute copy)
        self._dense: dict[int, torch.Tensor] = {}       # id(quant_state) -> the base weight kept dequantised

    def patch(self, model) -> int:
        """Patch every peft bnb Linear4bit of `model`; returns the bytes of fp32 scales expanded."""
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        extra = 0
        for m in model.modules():
            if isinstance(m, LoraLinear4bit):
                m.forward = functools.partial(self.forward, m)
                self.layers.append(m)
                qs = m.base_layer.weight.quant_state
                absmax = expand_absmax(qs)
                if absmax is not None:
                    self._absmax[id(qs)] = absmax
                    extra += absmax.numel() * 4
        return extra

    def keep_dense(self, max_bytes: float | None = None) -> tuple[int, int]:
        """Keep the base weights dequantised in their compute dtype, layer by layer in model order while they fit
        in `max_bytes` (None: all): a layer call then skips its two dequantisations (forward, backward) and their
        host work, with the same numbers (the copy holds the bits a dequantisation gives). Returns (layers kept,
        bytes)."""
        kept = 0
        for m in self.layers:
            w = m.base_layer.weight
            qs = w.quant_state
            n = qs.shape.numel() * torch.finfo(qs.dtype).bits // 8
            if max_bytes is not None and kept + n > max_bytes:
                break
            self._dense[id(qs)] = dequantize(w.data, qs, self.absmax32(qs)).to(qs.dtype)
            kept += n
        return len(self._dense), kept

    def keep_dense_for(self, mode: str, plan: dict | None) -> str | None:
        """train_qlora_hf --dense_base: `on` keeps every base weight dequantised; `auto` what fits in the memory
        plan's budget less its estimate and 10 % of the budget (an estimate can be short; no plan: nothing).
        Returns the log line, or None when nothing was asked."""
        if mode == "off" or (mode == "auto" and plan is None):
            return None
        n, size = self.keep_dense(None if mode == "on" else (0.9 * plan["budget_gb"] - plan["estimate_gb"]) * 1e9)
        return f"--dense_base {mode}: {n} of {len(self.layers)} layers' base weights kept dequantised ({size / 1e9:.2f} GB)"

    def absmax32(self, quant_state):
        return self._absmax.get(id(quant_state))

    def use_compute_copies(self, copies: list[tuple], dtype) -> None:
        """[(LoRA weight, its copy in `dtype`)] made after an optimizer step (FlatParams.compute_copies): used
        only while the weight's version counter is unchanged."""
        self._compute = {id(p): (p._version, dtype, c) for p, c in copies}

    def compute_copy(self, p, dtype):
        c = self._compute.get(id(p))
        if c is not None and c[1] == dtype and c[0] == p._version:
            return c[2]
        return p.to(dtype)

    def forward(self, layer, x, *args, **kwargs):
        """peft Linear4bit.forward through the one node; PEFT's own path where it does not apply."""
        if kwargs.get("adapter_names") is not None:
            return type(layer).forward(layer, x, *args, **kwargs)
        active = layer.active_adapters  # a PEFT property that builds a list: read it once per call (hot path)
        if layer.disable_adapters or layer.merged or len(active) != 1 \
                or layer.base_layer.bias is not None or active[0] not in layer.lora_A:
            return addmm_lora_forward(layer, x, *args, **kwargs)
        name = active[0]
        drop = layer.lora_dropout[name]
        p = drop.p if (layer.training and isinstance(drop, torch.nn.Dropout)) else 0.0
        w = layer.base_layer.weight
        return LoRA4bitFunction.apply(x, layer.lora_A[name].weight, layer.lora_B[name].weight, w.data, w.quant_state,
                                      self.absmax32(w.quant_state), layer.scaling[name], p, self.fp32_sum,
                                      self.compute_copy, self._dense.get(id(w.quant_state)))
