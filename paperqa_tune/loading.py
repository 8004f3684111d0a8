"""Loading models and tokenizers, one way for every stage: the compute precision, the pad token, the 4-bit
base exactly as training quantised it, and the dense/merged forms evaluation and inference use. Custom model
code from the hub never runs unless the caller passes trust_remote_code=True."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

from paperqa_tune.errors import InputError, RunFailure

from paperqa_tune.files import ADAPTER_WEIGHTS, os_error_text

from paperqa_tune.messages import ensure_chat_template
from paperqa_tune.outputs import pid_alive


# --------------------------------------------------------------------------- precision, tokenizer, base model
def requested_precision(bf16: bool | None, fp16: bool) -> str:
    """The compute dtype a run's flags ask for: --fp16 wins, --no-bf16 means fp32, otherwise bf16."""
    return "float16" if fp16 else "float32" if bf16 is False else "bfloat16"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX, read from /proc/cpuinfo); False where that
    cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
    if device.type == "cpu" and not cpu_has_native_bf16():
        return torch.bfloat16, ("bf16 compute on CPU, which has no native bf16 here (no AVX512-BF16 or AMX): "
                                "emulated, about 20x slower than fp32 (SmolLM2-135M training: 5 vs 100 tok/s on 2 "
                                "AVX2 cores); pass --no-bf16 for fp32")
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
        with model_file_errors(source, "tokenizer"):
            tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(_custom_code_message(source, e) or f"cannot load the tokenizer from {source}: {e}") from None
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
        with model_file_errors(name):
            model = AutoModelForCausalLM.from_pretrained(str(name), **kw)
            if quantized:  # transformers checks no shapes when it quantises while loading
                check_weight_shapes(model, name)
            return model
    except OSError as e:
        raise InputError(f"cannot load model {name}: {e}") from None
    except ValueError as e:
        msg = _custom_code_message(name, e)
        if msg is None:
            raise
        raise InputError(msg) from None


# --------------------------------------------------------------------------- checks before a model loads
def _custom_code_message(source, e: Exception) -> str | None:
    """The message for transformers' refusal to run a model's own code (trust_remote_code off), else None."""
    if "trust_remote_code" not in str(e):
        return None
    return (f"{source} needs its own Python code to load (config auto_map; custom code from the model's "
            "files), which is off by default because it runs with your permissions; read that code and pass "
            "--trust_remote_code if you trust it")


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub repo id ('name' or 'org/name')."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith("/"))


def model_config(name: str, trust_remote_code: bool = False, what: str = "base model"):
    """The model's config, read before anything heavy: InputError for a local path that does not exist
    ("not found", not a hub repo-id syntax message), for a model that needs its own code while
    trust_remote_code is off (transformers is told False explicitly, so it never asks on stdin), or for a
    config that cannot be read."""
    from transformers import AutoConfig

    name = str(name)
    if not Path(name).expanduser().exists() and _looks_like_path(name):
        raise InputError(f"{what} {name} not found: no such folder; pass --base_model with the model the run "
                         "was trained on (a local folder or a hub id such as HuggingFaceH4/zephyr-7b-beta)")
    if Path(name).is_file():
        raise InputError(f"{what} {name} is a file; pass the model's folder (with config.json)")
    try:
        with model_file_errors(name, "config"):
            return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise InputError(_custom_code_message(name, e) or f"cannot read the config of {what} {name}: "
                         f"{first_line(e)}") from None
    except OSError as e:
        raise InputError(f"cannot read the config of {what} {name}: {first_line(e)}") from None


def max_positions(config) -> int | None:
    """How many tokens (prompt + answer) the model can attend over, from its config; None if it does not say."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --------------------------------------------------------------------------- corrupt or foreign model files
MODEL_FIX = "re-download or re-convert the model, or pass another one"
RUN_FIX = "copy the run folder again or rerun the training, or pass --adapter with another run"


@contextlib.contextmanager
def model_file_errors(source, what: str = "model") -> Iterator[None]:
    """Turn what a corrupt or foreign model folder raises while loading (a safetensors header that is not one, a
    truncated shard, a config.json or tokenizer file that is not JSON, a model_type transformers lacks, weights of
    other shapes than the config gives) into an InputError naming the file and what to do. `what`: "model",
    "tokenizer", "config" or "adapter" (a run folder's LoRA). Anything else (out of memory, a CUDA error) is
    raised as it is."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:
        msg = bad_model_files(source, e, what)
        if msg is None:
            raise
        raise InputError(msg) from None


def _local_folder(source) -> Path | None:
    """The folder holding a model's files: a local path, or a hub id's snapshot in the local cache; else None."""
    p = Path(str(source)).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        return p.parent
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), local_files_only=True))
    except Exception:
        return None


def _bad_safetensors(folder: Path | None, source) -> tuple[Path | str, str]:
    """(the first .safetensors file under `folder` that safetensors cannot open, why) -- or (source, '') when
    every file opens (or there is no local folder)."""
    if folder is not None:
        from safetensors import safe_open

        for f in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt") as h:
                    h.keys()
            except Exception as e:
                return f, _safetensors_reason(e)
    return source, ""


def _safetensors_reason(e: Exception) -> str:
    text = first_line(e).replace("Error while deserializing header: ", "")
    if "not fully covered" in text or "incomplete metadata" in text:
        return f"truncated: the file is shorter than its header says ({text})"
    return f"not a valid safetensors file ({text})"


def _bad_json(folder: Path | None, names=None) -> tuple[Path, str] | None:
    """(the first JSON file under `folder` (or of `names`) that does not parse, why), else None."""
    if folder is None:
        return None
    for f in sorted(folder.glob("*.json")) if names is None else [folder / n for n in names]:
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            return f, first_line(e)
    return None


def _is_safetensors_error(e: Exception) -> bool:
    return type(e).__name__ == "SafetensorError" or "while deserializing header" in str(e)


def bad_model_files(source, e: Exception, what: str = "model") -> str | None:
    """The message for an error `e` raised while loading `source` that says its files are corrupt or foreign,
    naming the file where it can be found; None for any other error."""
    fix = RUN_FIX if what == "adapter" else MODEL_FIX
    kind = "run's adapter" if what == "adapter" else "model's"
    text = str(e)
    if _is_safetensors_error(e):
        folder = _local_folder(source)
        f, why = _bad_safetensors(folder, source)
        return f"{f}: {why or _safetensors_reason(e)}; the {kind} weights are corrupt or incomplete; {fix}"
    if isinstance(e, json.JSONDecodeError) or "not a valid JSON file" in text:
        bad = _bad_json(_local_folder(source))
        where, why = bad if bad else (source, first_line(e))
        return f"{where}: not valid JSON ({why}); the {kind} files are corrupt or incomplete; {fix}"
    if "did not match any variant" in text or "untagged enum" in text:  # tokenizers: tokenizer.json of a foreign shape
        folder = _local_folder(source)
        where = folder / "tokenizer.json" if folder is not None else source
        return f"{where}: not a tokenizer file this version of tokenizers reads ({first_line(e)}); {fix}"
    if isinstance(e, ValueError) and ("Unrecognized model" in text or "does not recognize this architecture" in text
                                      or "Unrecognized configuration class" in text):
        folder = _local_folder(source)
        where = folder / "config.json" if folder is not None else source
        return (f"{where}: transformers cannot build this model ({first_line(e)}); a config.json of another kind "
                f"of model, or one for a newer transformers (pip install -U transformers); {fix}")
    if isinstance(e, RuntimeError) and ("size mismatch" in text or "ignore_mismatched_sizes" in text):
        folder = _local_folder(source)
        where = folder / "config.json" if folder is not None else source
        detail = ("the layers marked MISMATCH in the report above" if "ignore_mismatched_sizes" in text
                  else first_line(e))
        return (f"{source}: its weights do not have the shapes {where} gives (a config.json of another model, or "
                f"weights converted wrongly): {detail}; {fix}")
    if "PytorchStreamReader" in text or type(e).__name__ == "UnpicklingError":
        folder = _local_folder(source)
        bins = sorted(folder.glob("*.bin")) if folder is not None else []
        where = bins[0] if len(bins) == 1 else source
        return f"{where}: unreadable PyTorch weights ({first_line(e)}); the {kind} weights are corrupt; {fix}"
    return None


def _weight_shapes(folder: Path) -> dict[str, tuple[Path, list[int]]]:
    """Every floating-point 2-D tensor in the folder's .safetensors files -> (file, shape), from the headers."""
    from safetensors import safe_open

    shapes = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                sl = h.get_slice(key)
                if sl.get_dtype() in ("F32", "F16", "BF16") and len(sl.get_shape()) == 2:
                    shapes[key] = (f, sl.get_shape())
    return shapes


def check_weight_shapes(model, source) -> None:
    """InputError when a linear layer's weights in a local model folder have other sizes than the loaded model's
    layer (built from config.json): 4-bit loading checks no shapes, and would quantise them anyway. Reads only the
    safetensors headers; keys it cannot map to a layer (a renamed checkpoint, packed 4-bit weights) are skipped."""
    folder = Path(str(source)).expanduser()
    if not folder.is_dir():
        return
    modules = dict(model.named_modules())
    for key, (f, shape) in _weight_shapes(folder).items():
        if not key.endswith(".weight"):
            continue
        mod = modules.get(key[:-len(".weight")])
        want = (getattr(mod, "out_features", None), getattr(mod, "in_features", None))
        if None in want or list(want) == list(shape):
            continue
        raise InputError(f"{f}: its weights do not have the shapes {folder / 'config.json'} gives ({key} is "
                         f"{list(shape)}, the config makes that layer {list(want)}: a config.json of another model, "
                         f"or weights converted wrongly); {MODEL_FIX}")


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$")


def adapter_mismatch(model, adapter: Path) -> str | None:
    """Why the LoRA weights in `adapter` do not fit `model` (a layer it targets is missing, or has other
    in/out sizes: an adapter trained on a different base model), or None when they fit. Reads only the
    safetensors header."""
    weights = Path(adapter) / ADAPTER_WEIGHTS
    if not weights.is_file():
        return None
    from safetensors import safe_open

    modules = dict(model.named_modules())
    with model_file_errors(adapter, "adapter"), safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            m = _LORA_KEY.match(key)
            if not m:
                continue
            name, ab = m.groups()
            mod = modules.get(name)
            if mod is None:
                return f"it has LoRA weights for the layer {name}, which the base model does not have"
            shape = f.get_slice(key).get_shape()
            dim, want = (shape[1], getattr(mod, "in_features", None)) if ab == "A" else \
                (shape[0], getattr(mod, "out_features", None))
            if want is not None and dim != want:
                side = "input" if ab == "A" else "output"
                return f"layer {name} has {side} size {want} in the base model but {dim} in the adapter"
    return None


def check_adapter_fits(model, adapter: Path) -> None:
    """InputError naming the adapter, the base model and the model the adapter was trained on, when the
    adapter does not fit the loaded base model."""
    why = adapter_mismatch(model, adapter)
    if why is None:
        return
    raise InputError(_mismatch_message(model, adapter, why))


def _mismatch_message(model, adapter: Path, why: str) -> str:
    import json

    base = getattr(model, "name_or_path", None) or "the base model"
    trained_on = None
    try:
        trained_on = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path")
    except (OSError, ValueError):
        pass
    return (f"the adapter {adapter} does not fit the base model {base}: {why}"
            + (f"; the adapter was trained on {trained_on}" if trained_on else "")
            + "; pass --base_model with the model the run was trained on")


def generation_defaults(source) -> dict:
    """The model's own generation_config.json (a local folder's, or the hub cache's: never a download), {} when
    it has none or it cannot be read: decoding takes the settings it names (generation.resolve_repetition_penalty)."""
    folder = _local_folder(source)
    path = folder / "generation_config.json" if folder is not None else None
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- a run's models
def run_tokenizer(run, trust_remote_code: bool = False):
    """The run's saved tokenizer (the base model's if the run has none), left-padded for generation."""
    src = run.adapter if (run.adapter / "tokenizer_config.json").is_file() else run.base_model
    return load_tokenizer(src, padding_side="left", trust_remote_code=trust_remote_code)


def require_adapter_weights(run) -> None:
    """InputError unless the run folder holds its adapter's weights (written last: a run that did not finish
    has none)."""
    if not (run.adapter / ADAPTER_WEIGHTS).is_file():
        raise InputError(f"{run.adapter}: no adapter_model.safetensors here, so the run did not finish "
                         "(train_qlora_hf.py writes the weights last); resume or rerun the training, or pass "
                         "--adapter with a finished run")


def load_run_base(run, trust_remote_code: bool = False):
    """The run's base model as training loaded it: NF4, double quant, training's compute dtype (resolved on
    this device the way training resolves it), in eval mode."""
    from paperqa_tune.distributed import default_device

    device = default_device()
    dtype, note = resolve_precision(run.args.get("bf16"), bool(run.args.get("fp16")), device)
    if "falling back" in note:
        print(f"warning: {note}", file=sys.stderr)
    try:
        model = load_causal_lm(run.base_model, dtype, device, trust_remote_code=trust_remote_code)
    except InputError as e:
        msg = str(e)
        raise InputError(msg.replace(MODEL_FIX, f"{MODEL_FIX} with --base_model") if MODEL_FIX in msg
                         else f"{msg}; pass --base_model") from None
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
    """The model with the LoRA adapter on top (not trainable); InputError naming both when it does not fit."""
    from peft import PeftModel

    check_adapter_fits(model, adapter)
    try:
        with model_file_errors(adapter, "adapter"):
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=False).eval()
    except RuntimeError as e:  # what the header check cannot see (e.g. an adapter saved as .bin)
        if "size mismatch" not in str(e):
            raise
        raise InputError(_mismatch_message(model, adapter, first_line(e))) from None


def merged_model(run, model=None, trust_remote_code: bool = False):
    """Dense model with the LoRA merged in: base (dequantised if it was 4-bit) + merge_and_unload."""
    model = model if model is not None else load_run_base(run, trust_remote_code)
    dequantize_(model)
    return attach_adapter(model, run.adapter).merge_and_unload()


# --------------------------------------------------------------------------- writing a model folder
def _stale(path: Path, prefix: str) -> bool:
    """A temp folder `prefix<pid>.<suffix>` whose process is gone (a killed run's)."""
    pid = path.name[len(prefix):].split(".", 1)[0]
    return pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))


def _write_error_text(e: BaseException) -> str | None:
    """A write failure in words: an OSError, or safetensors' SafetensorError wrapping one (what save_file raises
    on a full disk: 'Error while serializing: I/O error: No space left on device (os error 28)'); else None."""
    if isinstance(e, OSError):
        return os_error_text(e)
    text = str(e)
    if type(e).__name__ == "SafetensorError" and "I/O error" in text:
        m = re.search(r"\(os error (\d+)\)", text)
        code = int(m.group(1)) if m else None
        return os_error_text(OSError(code, os.strerror(code))) if code else first_line(e)
    return None


def _free_space(path: Path) -> str:
    for p in (path, *path.parents):
        try:
            free = shutil.disk_usage(p).free
        except OSError:
            continue
        return f"{free / 2**30:.2f} GiB free there" if free >= 2**30 else f"{free / 2**20:.1f} MiB free there"
    return "free space unknown"


def write_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Build a folder under a temp name beside `out` (`write(tmp)` fills it), then rename it into place,
    replacing `out` (an empty folder, or one the caller has checked may be replaced). A failure removes
    the temp folder and leaves `out` as it was; a kill leaves at most a hidden temp folder, removed by the
    next call. OSError or safetensors' I/O error (a full disk) becomes RunFailure naming `out` and the free
    space."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}."
    for stale in out.parent.glob(f"{prefix}*"):
        if stale.is_dir() and _stale(stale, prefix):
            if stale.name.endswith(".old") and not out.exists():
                os.replace(stale, out)  # killed between the two renames: put the previous folder back
            else:
                shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f"{prefix}{os.getpid()}.partial")
    old = out.with_name(f"{prefix}{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        if out.exists() and any(out.iterdir()):
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)  # the second rename failed: put the previous folder back
        text = _write_error_text(e) if isinstance(e, Exception) else None
        if text is None:
            raise
        raise RunFailure(f"cannot write {out} ({_free_space(out.parent)}): {text}; nothing was written there "
                         "(it is as it was)") from None


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
