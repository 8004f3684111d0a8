"""The optimizer side of training: one flat buffer for the LoRA tensors, the optimizer by name, and the fix-up
a paged bitsandbytes optimizer needs after its state is loaded from a checkpoint."""
from __future__ import annotations

import torch

OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adamw_torch_fused")


class FlatParams:
    """LoRA tensors as views into one flat buffer, which the optimizer sees as a single parameter.

    Why: a bitsandbytes optimizer updates one tensor at a time and synchronises the GPU after each; a 7B model
    has ~450 LoRA tensors, so the update cost ~35 ms of host time per step (bench/README.md). Flat, it is one
    kernel and one sync. The update is the same: AdamW is elementwise, each tensor starts on a multiple of ALIGN
    elements (bitsandbytes' 8-bit state is quantised in blocks of 256 elements, so no block straddles two
    tensors), and tensors under MIN_NUMEL elements (which bitsandbytes keeps in 32-bit state) stay separate
    parameters. tests: test_flat_optimizer_update_equals_per_tensor. The tensors' gradients are copied into
    the flat gradient (gather_grads) after the all-reduce, before unscaling, clipping and the update.
    """
    ALIGN, MIN_NUMEL = 4096, 4096

    def __init__(self, params: list):
        self.flat_members = [p for p in params if p.numel() >= self.MIN_NUMEL and p.dtype == params[0].dtype]
        members = {id(p) for p in self.flat_members}
        self.separate = [p for p in params if id(p) not in members]
        self.param = None
        if len(self.flat_members) < 2:
            self.flat_members, self.separate = [], list(params)
            return
        offsets, k = [], 0
        for p in self.flat_members:
            offsets.append(k)
            k += -(-p.numel() // self.ALIGN) * self.ALIGN
        buf = torch.zeros(k, dtype=self.flat_members[0].dtype, device=self.flat_members[0].device)
        grad = torch.zeros_like(buf)
        self.grad_views, self.offsets = [], offsets
        for p, o in zip(self.flat_members, offsets):
            buf[o:o + p.numel()].copy_(p.data.reshape(-1))
            p.data = buf[o:o + p.numel()].view_as(p)  # the model's LoRA tensors now live in the buffer
            self.grad_views.append(grad[o:o + p.numel()].view_as(p))
        self.param = torch.nn.Parameter(buf, requires_grad=False)
        self._grad = grad

    def optimizer_params(self) -> list:
        return ([self.param] if self.param is not None else []) + self.separate

    def compute_copies(self, dtype) -> list[tuple]:
        """[(tensor, its copy in `dtype`)] from one cast of the whole buffer, for FusedLoRA.use_compute_copies
        after each update (instead of two casts per LoRA layer call). [] when there is nothing to cast."""
        if self.param is None or dtype == self.param.dtype:
            return []
        comp = self.param.detach().to(dtype)
        return [(p, comp[o:o + p.numel()].view_as(p)) for p, o in zip(self.flat_members, self.offsets)]

    def gather_grads(self) -> None:
        if self.param is None:
            return
        got = [(v, p.grad) for v, p in zip(self.grad_views, self.flat_members) if p.grad is not None]
        missing = [v for v, p in zip(self.grad_views, self.flat_members) if p.grad is None]
        if got:
            torch._foreach_copy_([v for v, _ in got], [g.to(v.dtype) for v, g in got])
        if missing:
            torch._foreach_zero_(missing)
        self.param.grad = self._grad


def make_optimizer(params, name: str, lr: float, weight_decay: float):
    """AdamW by name (OPTIMIZERS): torch's, or bitsandbytes' 8-bit / paged variants."""
    kw = {"lr": lr, "weight_decay": weight_decay}
    if name in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(params, fused=name == "adamw_torch_fused" or None, **kw)
    import bitsandbytes as bnb

    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    return cls(params, **kw)  # on CPU bitsandbytes warns that paging falls back to plain memory: harmless


def zero_grads(optimizer, params) -> None:
    """Drop every gradient: the optimizer's parameters' and the model's own LoRA tensors' (with a flat buffer
    they are different tensors)."""
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None


def repage_optimizer_state(optimizer) -> None:
    """A paged bitsandbytes optimizer keeps large state tensors in CUDA managed memory, marked `is_paged`. Saved
    and loaded, they come back as ordinary GPU tensors that still carry the mark, and the optimizer's prefetch of
    them fails ("Error invalid argument ... pythonInterface.cpp"; found by bench/gpu_smoke.sh's resume). Put them
    back into paged memory (on CPU, where nothing is paged, just drop the mark)."""
    for st in optimizer.state.values():
        for k, v in list(st.items()):
            if not (torch.is_tensor(v) and getattr(v, "is_paged", False)):
                continue
            if v.device.type == "cuda" and hasattr(optimizer, "page_mng"):
                import bitsandbytes.functional as bnbF

                buf = bnbF.get_paged(*v.shape, dtype=v.dtype, device=v.device)
                buf.copy_(v)
                optimizer.page_mng.paged_tensors.append(buf)
                st[k] = buf
            else:
                v.is_paged = False
