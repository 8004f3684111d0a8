"""Loading models and tokenizers, one way for every stage: the compute precision, the pad token, the 4-bit
base exactly as training quantised it, and the dense/merged forms evaluation and inference use. Custom model
code from the hub never runs unless the caller passes trust_remote_code=True."""
from __future__ import annotations

import sys
from pathlib import Path

from common import InputError, ensure_chat_template


# --------------------------------------------------------------------------- precision, tokenizer, base model
def requested_precision(bf16: bool | None, fp16: bool) -> str:
    """The compute dtype a run's flags ask for: --fp16 wins, --no-bf16 means fp32, otherwise bf16."""
    return "float16" if fp16 else "float32" if bf16 is False else "bfloat16"


def resolve_precision(bf16: bool | None, fp16: bool, device) -> tuple:
    """(torch dtype, a line saying what was chosen) for the flags on this device: bf16 falls back to fp16
    on GPUs without native bf16 (one that only emulates it is as slow as fp32)."""
    import torch

    name = requested_precision(bf16, fp16)
    if name == "float16":
        return torch.float16, "fp16 compute with loss scaling"
    if name == "float32":
        return torch.float32, "fp32 compute (--no-bf16)"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16, ("bf16 requested but this GPU has none: falling back to fp16 compute with loss "
                               "scaling (pass --fp16 to choose it explicitly)")
    if device.type == "cpu":
        return torch.bfloat16, "bf16 compute on CPU (bitsandbytes 4-bit supports it; slow, for tests and demos)"
    return torch.bfloat16, "bf16 compute"


def ensure_pad(tok) -> None:
    """Give a tokenizer without a pad token one. Padding is masked out by length everywhere, so the id only has
    to exist; unk keeps it distinct from the </s> that training learns and generation stops on."""
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token


def load_tokenizer(source, padding_side: str, trust_remote_code: bool = False):
    """The tokenizer of a model or run folder with a chat template (Zephyr's when it has none) and a pad token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the tokenizer from {source}: {e}") from None
    ensure_chat_template(tok)
    ensure_pad(tok)
    tok.padding_side = padding_side
    return tok


def nf4_config(compute_dtype):
    """How the frozen base is quantised, in one place: training loads it this way and evaluation/inference
    reload it the same way, so the dequantised weights they use are the very ones training saw.
    QLoRA's recipe: 4-bit NormalFloat with double quantisation of the scales."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_causal_lm(name, dtype, device=None, quantized: bool = True, attn_implementation: str | None = None,
                   trust_remote_code: bool = False, device_map=None):
    """A causal LM on `device` (or spread by `device_map`, e.g. "auto" over several GPUs; neither: the CPU), in
    4-bit NF4 (`quantized`) with `dtype` compute, or plain in `dtype`. InputError when it cannot be loaded."""
    from transformers import AutoModelForCausalLM

    kw: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if quantized:
        kw["quantization_config"] = nf4_config(dtype)
    if device_map is not None:
        kw["device_map"] = device_map
    elif device is not None and device.type == "cuda":
        kw["device_map"] = {"": str(device)}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(str(name), **kw)
    except OSError as e:
        raise InputError(f"cannot load model {name}: {e}") from None


def default_device():
    import torch

    return torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------- a run's models
def run_tokenizer(run):
    """The run's saved tokenizer (the base model's if the run has none), left-padded for generation."""
    src = run.adapter if (run.adapter / "tokenizer_config.json").is_file() else run.base_model
    return load_tokenizer(src, padding_side="left")


def load_run_base(run):
    """The run's base model as training loaded it: NF4, double quant, training's compute dtype (resolved on
    this device the way training resolves it), in eval mode."""
    device = default_device()
    dtype, note = resolve_precision(run.args.get("bf16"), bool(run.args.get("fp16")), device)
    if "falling back" in note:
        print(f"warning: {note}", file=sys.stderr)
    try:
        model = load_causal_lm(run.base_model, dtype, device)
    except InputError as e:
        raise InputError(f"{e}; pass --base_model") from None
    return model.eval()


def dequantize_(model) -> None:
    """Replace every bnb Linear4bit by an nn.Linear holding bnb.functional.dequantize_4bit(weight) in the
    compute dtype: bit for bit the matrix the 4-bit layer multiplies by in training and inference."""
    if getattr(model, "hf_quantizer", None) is None:
        return  # already dense
    import torch

    model.dequantize(dtype=model.dtype)  # transformers' dequantize_and_replace; drops quantization_config
    model.is_loaded_in_4bit = False  # the model's own flag, which PEFT reads to pick 4-bit LoRA layers
    for p in model.parameters():
        p.requires_grad_(False)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attach_adapter(model, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter), is_trainable=False).eval()


def merged_model(run, model=None):
    """Dense model with the LoRA merged in: base (dequantised if it was 4-bit) + merge_and_unload."""
    model = model if model is not None else load_run_base(run)
    dequantize_(model)
    return attach_adapter(model, run.adapter).merge_and_unload()


# --------------------------------------------------------------------------- memory for generation
def bytes_to_dequantize(model) -> int:
    """Extra device memory the dense (fast) path needs: dense weights minus the packed 4-bit ones."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    extra = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            packed = m.weight.data.numel() * m.weight.data.element_size()
            extra += m.in_features * m.out_features * model.dtype.itemsize - packed
    return extra


def kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize


def free_cuda_bytes() -> int:
    import torch

    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def choose_mode(requested: str, model, n_seqs: int, seq_len: int) -> str:
    """"fast" (dequantised dense base) or "reference" (4-bit); "auto": fast when a CUDA GPU has room for the
    dense weights plus the KV cache of a few batches."""
    import torch

    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "reference"
    need = bytes_to_dequantize(model) + kv_bytes_per_token(model) * seq_len * min(n_seqs, 16) + (2 << 30)
    return "fast" if free_cuda_bytes() > need else "reference"


def auto_batch_size(model, n: int, seq_len: int) -> int:
    """Sequences per generate() call: KV cache and activations within half of the free GPU memory."""
    import torch

    if not torch.cuda.is_available():
        return min(n, 8)
    per_seq = kv_bytes_per_token(model) * seq_len * 2
    return max(1, min(n, 256, int(free_cuda_bytes() * 0.5 // per_seq)))
