"""GPU check: --lora_fp32_sum reaches the patched LoRA modules, and on CUDA (cuBLAS) the one-rounding form keeps a
LoRA delta far under half a bf16 step of the base output, while the two-rounding order loses it (the CPU twin is
tests/test_train_fast.py::test_lora_sum_keeps_small_deltas).

    python bench/checks/fp32_sum_flag.py MODEL_DIR     (CUDA; e.g. the tiny model from tools/make_tiny_model.py)
"""
import sys

import torch

sys.path.insert(0, ".")
import train_qlora_hf as T  # noqa: E402
from peft.tuners.lora.bnb import Linear4bit as L4  # noqa: E402

from paperqa_tune.train.lora4bit import dequantize  # noqa: E402

args = T.build_parser().parse_args(["--model", sys.argv[1], "--max_steps", "1"])
tm = T.load_model(args)
mods = [m for m in tm.model.modules() if isinstance(m, L4)]
assert mods and tm.fused is not None and tm.fused.layers == mods and tm.fused.fp32_sum is True, "flag not applied"
g = torch.Generator(device="cuda").manual_seed(3)
for m in (mods[0], mods[5]):
    x = torch.randn(512, m.in_features, device="cuda", generator=g).to(torch.bfloat16)
    a = m.lora_A["default"].weight.to(torch.bfloat16).double()
    w = dequantize(m.base_layer.weight.data, m.base_layer.weight.quant_state).double()
    base64 = x.double() @ w.t()
    with torch.no_grad():
        b = torch.randn(m.lora_B["default"].weight.shape, device="cuda", generator=g)
        h = (x.double() @ a.t()).to(torch.bfloat16).double()
        delta = m.scaling["default"] * h @ b.double().t()
        m.lora_B["default"].weight.copy_(b * ((base64.abs().mean() * 2.0 ** -8) / 20 / delta.std()).float())
        b16 = m.lora_B["default"].weight.to(torch.bfloat16).double()
        delta = m.scaling["default"] * h @ b16.t()
        base_rounded = base64.to(torch.bfloat16).double()
        kept, err = {}, {}
        for on in (True, False):
            tm.fused.fp32_sum = on
            y = m(x).double()
            kept[on] = float(((y - base_rounded) * delta).sum() / (delta * delta).sum())
            err[on] = float((y - base64 - delta).abs().mean())
        tm.fused.fp32_sum = True
    print(f"{m.in_features}->{m.out_features}: delta kept {kept[True]:.3f} (one rounding) vs {kept[False]:.3f} "
          f"(two roundings); mean error vs fp64 {err[True]:.3e} vs {err[False]:.3e}")
    assert kept[True] > 0.8 and kept[False] < 0.3, kept
print("ok")
