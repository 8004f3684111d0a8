"""GPU check: the fused 4-bit LoRA node against PEFT + bitsandbytes' own layers on CUDA in bf16 (the CPU tests run
fp32 and never take the CUDA-only branches: fp32 gradients straight out of the GEMM, cached scales, bf16 copies).

    python bench/checks/lean_lora_cuda.py MODEL_DIR     (CUDA; e.g. the tiny model from tools/make_tiny_model.py)

Relative errors of output, input gradient and LoRA gradients must be at bf16 level (< 2e-2).
"""
import sys

import torch

sys.path.insert(0, ".")
import train_qlora_hf as T  # noqa: E402
from peft.tuners.lora.bnb import Linear4bit  # noqa: E402

args = T.build_parser().parse_args(["--model", sys.argv[1], "--no-packing", "--lora_r", "64"])
model = T.load_model(args)
params = [p for p in model.parameters() if p.requires_grad]
flat = T.FlatParams(params)
g = torch.Generator(device="cuda").manual_seed(0)
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.copy_(torch.randn(p.shape, device="cuda", generator=g) * 0.05)
flat.refresh_compute(torch.bfloat16)
layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
worst = 0.0
for m in layers[:7]:
    x = torch.randn(3, 50, m.in_features, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(3, 50, m.out_features, device="cuda", generator=g, dtype=torch.bfloat16)
    a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
    outs = []
    for fwd in (lambda t: Linear4bit.forward(m, t), lambda t: m(t)):  # PEFT's own forward, then the fused one
        y = fwd(x)
        y.backward(go)
        outs.append((y.detach().float(), x.grad.float(), a.grad.clone(), b.grad.clone()))
        x.grad = a.grad = b.grad = None
    cached = getattr(a, "qlora_compute", None) is not None and a.qlora_compute[0] == a._version
    for ref, got, what in zip(outs[0], outs[1], ("output", "grad x", "grad A", "grad B")):
        rel = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
        worst = max(worst, rel)
        print(f"{m.in_features}->{m.out_features} {what}: rel err {rel:.2e}" + (" (bf16 copy of A used)" if cached and what == "output" else ""))
        assert got.dtype == ref.dtype, what
print("worst relative error", worst)
assert worst < 2e-2
print("ok")
