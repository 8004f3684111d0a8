"""GPU check: --lora_fp32_sum reaches the patched LoRA modules and selects the fp32-sum formula.

    python bench/checks/fp32_sum_flag.py MODEL_DIR     (CUDA; e.g. the tiny model from tools/make_tiny_model.py)
"""
import sys, torch
sys.path.insert(0, ".")
import train_qlora_hf as T
from peft.tuners.lora.bnb import Linear4bit as L4
args = T.build_parser().parse_args(["--model", sys.argv[1], "--max_steps", "1"])
model = T.load_model(args)
mods = [m for m in model.modules() if isinstance(m, L4)]
assert mods and all(m.lora_fp32_sum is True for m in mods), "flag not on the modules"
m = mods[0]
torch.nn.init.normal_(m.lora_B["default"].weight, std=0.02)
x = torch.randn(64, m.in_features, device="cuda", dtype=torch.bfloat16)
y_on = T._lean_lora4bit_forward(m, x)
w = T._dequant(m.base_layer.weight.data, m.base_layer.weight.quant_state).to(x.dtype)
a, b = m.lora_A["default"].weight.to(x.dtype), m.lora_B["default"].weight.to(x.dtype)
ref = (torch.mm(x, w.t(), out_dtype=torch.float32) + m.scaling["default"] * (torch.mm(x, a.t()).float() @ b.t().float())).to(x.dtype)
m.lora_fp32_sum = False
y_off = T._lean_lora4bit_forward(m, x)
print("fp32-sum path == fp32 formula:", torch.equal(y_on, ref), "| differs from bf16 sum:", not torch.equal(y_on, y_off))
assert torch.equal(y_on, ref)
