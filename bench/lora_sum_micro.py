"""Micro-benchmark (CUDA): cost of adding the LoRA delta in fp32 inside the fused 4-bit LoRA forward.

    python bench/lora_sum_micro.py

Compares, for Mistral-7B projection shapes at ~3,200 tokens, the bf16 sum (base GEMM rounded to bf16, then
the LoRA GEMM added onto it: two roundings), the first fp32 sum (mm with fp32 output + fp32 addmm_ + cast), a
two-kernel form (small GEMM to fp32, then addmm with out_dtype=fp32 accumulating into it, then one cast) and the
epilogue form (LoRA GEMM first, in bf16; then the base GEMM accumulates onto it in place with beta=scaling:
cuBLAS adds C in its fp32 epilogue and rounds once). Prints ms per call, the max and mean error against fp64,
and, for deltas 1000x smaller than usual (a fresh adapter), how much of the delta survives in the output on
average (1 = all of it, 0 = rounded away).
"""
import json
import sys
import time

import torch


def bench(fn, n=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def main() -> int:
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    rows = []
    for (k, n) in [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]:
        x = torch.randn(3200, k, device=dev, dtype=bf)
        w = torch.randn(n, k, device=dev, dtype=bf) * 0.02
        a = torch.randn(16, k, device=dev, dtype=bf) * 0.02
        b = torch.randn(n, 16, device=dev, dtype=bf) * 0.02
        s = 2.0
        h = torch.mm(x, a.t())
        bf16_sum = lambda: torch.mm(x, w.t()).addmm_(h, b.t(), alpha=s)
        cur = lambda: torch.mm(x, w.t(), out_dtype=torch.float32).addmm_(h.float(), b.t().float(), alpha=s).to(bf)
        two = lambda: torch.addmm(torch.mm(h, b.t(), out_dtype=torch.float32), x, w.t(), beta=s,
                                  out_dtype=torch.float32).to(bf)
        epi = lambda: torch.mm(h, b.t()).addmm_(x, w.t(), beta=s)
        ref = (x.double() @ w.double().t() + s * (h.double() @ b.double().t()))
        forms = (("bf16_sum", bf16_sum), ("current", cur), ("two", two), ("epilogue", epi))
        row = {"shape": f"{k}->{n}", "ms_bf16_sum": bench(bf16_sum), "ms_fp32_sum_current": bench(cur),
               "ms_fp32_sum_two_kernels": bench(two), "ms_epilogue": bench(epi)}
        for name, fn in forms:
            err = fn().double() - ref
            row[f"maxerr_{name}"] = float(err.abs().max())
            row[f"meanerr_{name}"] = float(err.abs().mean())
        b_real = b
        b = b_real * 1e-3  # a tiny delta (fresh adapter): does it survive the rounding?
        base = (x.double() @ w.double().t()).to(bf).double()  # base rounded once, no delta
        delta = s * (h.double() @ b.double().t())
        for name, fn in forms:
            kept = ((fn().double() - base) * delta).sum() / (delta * delta).sum()
            row[f"delta_kept_{name}"] = round(float(kept), 4)
        b = b_real
        rows.append(row)
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
