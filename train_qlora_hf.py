"""QLoRA fine-tuning on the chat JSONL that generate_qa.py writes: correct labels, resumable, one GPU or many.

Run as:
    python train_qlora_hf.py --jsonl ./data/synthetic_qa.jsonl --model HuggingFaceH4/zephyr-7b-beta \\
        --out ./models/zephyr-7b-qlora --epochs 2 --batch 8 --grad_accum 2 --lr 2e-4 --bf16 --max_seq_len 4096
    python train_qlora_hf.py --jsonl ./data/synthetic_qa.jsonl --inspect      # what is trained on; no weights
    python train_qlora_hf.py ... --resume                  # continue an interrupted run from its last checkpoint
    torchrun --nproc_per_node 4 train_qlora_hf.py ...      # data parallel: one 4-bit copy per GPU
    accelerate launch --num_processes 4 train_qlora_hf.py ...
    python train_qlora_hf.py ... --gpu_mem_budget 20      # spend up to 20 GB on speed (less checkpointing)
    python train_qlora_hf.py ... --lora_dropout 0.05 --kbit_upcast --no-packing --no-fused_lora --liger off
                                                           # the seed recipe (slow path), e.g. to compare
    pip install -r requirements-gpu.txt                    # optional: Liger's fused cross-entropy on CUDA

What it does: base model in 4-bit NF4 with double quantisation, bf16 compute (TF32 on where the GPU has it),
LoRA on every linear layer. Each record's `messages` (or `text`, in Zephyr's form
or the seed's flat form) is rendered with the model's own chat template and the loss covers only assistant
tokens, each turn's closing `</s>` included. Writes a PEFT adapter, the tokenizer, run_config.json,
metrics.json and loss.png to --out; checkpoints/ while training.

The training loop is plain PyTorch, not HF Trainer: OOM back-off (halve the micro-batch, double the
accumulation, redo the same step), exact resume and the data-parallel gradient exchange need control over
each step. Every optimizer step is a fixed set of samples (from --seed and the epoch), its loss is
normalised by the trained tokens of the whole step, and its dropout RNG is seeded from (seed, step, rank):
so a step gives the same update whatever the micro-batch size, whether it is retried after an OOM, and
whether the run was resumed.

Speed (issue 5, measured in bench/README.md: 3.3-4.3x the seed recipe's tokens/s on an H100 at no more memory;
each piece has a flag): the frozen base stays in bf16 (no fp32 upcast, no autocast; --kbit_upcast restores
it); each micro-batch is packed into one row without padding, with attention per sample (flash varlen on
CUDA, one SDPA call per sample on CPU) (--packing); the 4-bit base and its LoRA run as one autograd node
(--fused_lora) with the LoRA delta added in the base GEMM's fp32 accumulator (--lora_fp32_sum); the optimizer
updates all LoRA tensors as one flat buffer (--flat_optim); RMSNorm is one fused op (--fused_norm);
Liger's fused linear cross-entropy never builds the logits (--liger, CUDA, optional dependency); Python's
garbage collector does not scan the model during the steps; --gpu_mem_budget turns checkpointing off on the
last layers that fit, or offloads checkpoints to host memory when even full checkpointing does not fit.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from array import array
from pathlib import Path
from types import MethodType

import torch
import torch.distributed as dist

from common import (HELDOUT_QUESTIONS_FILE, InputError, chat_text, encode_text, ensure_chat_template,
                    eval_questions_path, nf4_config, read_jsonl, record_messages, sha256_file, write_json_atomic,
                    write_jsonl_atomic)

IGNORE = -100
OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adamw_torch_fused")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
              "inverse_sqrt")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
RUN_FILES = ADAPTER_FILES + ("run_config.json", "metrics.json", "loss.png", "README.md", HELDOUT_QUESTIONS_FILE)


class TrainingError(RuntimeError):
    """A failure at run time (non-finite loss, out of memory at micro-batch 1): exit code 1."""


# --------------------------------------------------------------------------- arguments
LIGER_PARTS = ("flce", "rope", "swiglu", "rmsnorm")
LIGER_AUTO = ("flce",)  # measured on an H100 (bench/README.md)


def _liger_arg(value: str) -> str:
    v = value.strip().lower()
    if v in ("auto", "all", "off"):
        return v
    parts = [x.strip() for x in v.split(",") if x.strip()]
    if not parts or any(x not in LIGER_PARTS for x in parts):
        raise argparse.ArgumentTypeError(f"{value!r}: use auto, all, off or a comma list of {', '.join(LIGER_PARTS)}")
    return ",".join(dict.fromkeys(parts))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = "(default: %(default)s)"
    io = p.add_argument_group("data and output")
    io.add_argument("--jsonl", default="./data/synthetic_qa.jsonl", help=f"training chats, one JSON object a line {d}")
    io.add_argument("--model", default="HuggingFaceH4/zephyr-7b-beta", help=f"base model: hub id or local folder {d}")
    io.add_argument("--out", default="./models/zephyr-7b-qlora", help=f"run folder for adapter, metrics, checkpoints {d}")
    io.add_argument("--max_seq_len", type=int, default=4096,
                    help=f"longest sample in tokens; longer chats lose whole earlier turns or are dropped, never cut {d}")
    io.add_argument("--val_fraction", type=float, default=0.05,
                    help=f"share of samples held out for validation loss, split by paper when meta.paper_id exists {d}")
    io.add_argument("--system_prompt", default=None,
                    help="system prompt to add to records that have none (default: leave them as they are)")
    io.add_argument("--inspect", type=int, nargs="?", const=3, default=0, metavar="N",
                    help="print N rendered samples (3 if N is omitted) with trained tokens marked, token counts "
                         "and a length histogram, then exit without loading weights")
    io.add_argument("--overwrite", action="store_true", help="replace a finished run (or an unfinished one) in --out")
    io.add_argument("--resume", action="store_true", help="continue the unfinished run in --out from its latest checkpoint")
    io.add_argument("--save_steps", type=int, default=50, help=f"checkpoint every N optimizer steps {d}")
    io.add_argument("--save_total_limit", type=int, default=2, help=f"checkpoints kept while training {d}")
    io.add_argument("--keep_checkpoints", action="store_true", help="keep checkpoints/ after the run finishes")
    io.add_argument("--eval_steps", type=int, default=None, help="validation loss every N steps (default: a tenth of the run, at most --save_steps)")
    io.add_argument("--logging_steps", type=int, default=10, help=f"log a line every N steps {d}")
    io.add_argument("--seed", type=int, default=42, help=f"seed for the split, data order, LoRA init and dropout {d}")

    tr = p.add_argument_group("optimisation")
    tr.add_argument("--epochs", type=int, default=2, help=f"passes over the training samples {d}")
    tr.add_argument("--max_steps", type=int, default=None, help="stop after N optimizer steps (overrides --epochs)")
    tr.add_argument("--batch", type=int, default=8, help=f"micro-batch per GPU/process {d}")
    tr.add_argument("--grad_accum", type=int, default=2,
                    help=f"micro-batches per optimizer step; effective batch = batch x grad_accum x processes {d}")
    tr.add_argument("--lr", type=float, default=2e-4, help=f"peak learning rate {d}")
    tr.add_argument("--lr_scheduler", choices=SCHEDULERS, default="cosine", help=f"learning-rate schedule {d}")
    tr.add_argument("--warmup_ratio", type=float, default=0.03, help=f"share of steps spent warming up {d}")
    tr.add_argument("--weight_decay", type=float, default=0.0, help=f"AdamW weight decay {d}")
    tr.add_argument("--max_grad_norm", type=float, default=1.0, help=f"gradient clipping; 0 turns it off {d}")
    tr.add_argument("--optim", choices=OPTIMIZERS, default="paged_adamw_8bit", help=f"optimizer {d}")
    tr.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 compute (the default; falls back to fp16 on GPUs without bf16); --no-bf16 = fp32")
    tr.add_argument("--fp16", action="store_true", help="fp16 compute with loss scaling (V100, T4)")

    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora_r", type=int, default=16, help=f"adapter rank {d}")
    lo.add_argument("--lora_alpha", type=float, default=32, help=f"adapter scale numerator {d}")
    lo.add_argument("--lora_dropout", type=float, default=0.0,
                    help=f"dropout on the adapter input; 0 is ~10%% faster, pass 0.05 for the seed recipe's "
                         f"regularisation {d}")
    lo.add_argument("--target_modules", default="all-linear",
                    help=f"'all-linear' or comma-separated module names, e.g. q_proj,v_proj {d}")

    sp = p.add_argument_group("speed and memory")
    sp.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help=f"recompute activations in backward to save memory {d}")
    sp.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=True,
                    help=f"micro-batches of neighbours in length (less padding), steps in random order {d}")
    sp.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                    help=f"shuffle the data every epoch; --no-shuffle keeps file order (benchmarks) {d}")
    sp.add_argument("--attn_implementation", default="sdpa",
                    help=f"attention kernel (sdpa, eager, flash_attention_2); --packing replaces it in training {d}")
    sp.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                    help="each micro-batch as one row without padding, attention per sample (flash varlen on "
                         f"CUDA, one SDPA call per sample elsewhere) {d}")
    sp.add_argument("--fused_lora", action=argparse.BooleanOptionalAction, default=True,
                    help=f"4-bit base + LoRA of each layer as one autograd node (same math as PEFT's) {d}")
    sp.add_argument("--lora_fp32_sum", action=argparse.BooleanOptionalAction, default=True,
                    help="fused LoRA: the base GEMM accumulates onto the LoRA delta in fp32 and rounds once to bf16 "
                         "(small adapter updates are not rounded away; matches the fp32-upcast seed recipe's "
                         f"learning; costs nothing) {d}")
    sp.add_argument("--flat_optim", action=argparse.BooleanOptionalAction, default=True,
                    help="the optimizer updates all LoRA tensors as one flat buffer (one kernel per step instead "
                         f"of one per tensor; the same update) {d}")
    sp.add_argument("--fused_norm", action=argparse.BooleanOptionalAction, default=True,
                    help=f"RMSNorm modules as one torch.nn.functional.rms_norm call {d}")
    sp.add_argument("--liger", type=_liger_arg, default="auto",
                    help="Liger kernels (optional: pip install -r requirements-gpu.txt): a comma list of flce (fused "
                         "linear cross-entropy: never builds the logits), rope, swiglu, rmsnorm; or all, off, or "
                         f"auto = {','.join(LIGER_AUTO)} when CUDA and liger-kernel are there {d}")
    sp.add_argument("--kbit_upcast", action="store_true",
                    help="the seed recipe's peft.prepare_model_for_kbit_training (norms, embeddings and lm_head "
                         "in fp32, autocast); slower, more memory; turns --fused_lora/--fused_norm off")
    sp.add_argument("--gpu_mem_budget", type=float, default=None, metavar="GB",
                    help="spend up to GB of GPU memory on speed: leave gradient checkpointing off on as many of "
                         "the last layers as fit, or keep checkpoints in host memory if even full "
                         "checkpointing does not fit (default: checkpoint every layer, no offload)")
    sp.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub (off: safer)")
    return p


def validate_args(args) -> None:
    """Collect every problem with the flags and report them together (exit 2)."""
    bad = []
    for name, low in (("epochs", 1), ("batch", 1), ("grad_accum", 1), ("max_seq_len", 8), ("lora_r", 1),
                      ("save_steps", 1), ("save_total_limit", 1), ("logging_steps", 1)):
        if getattr(args, name) < low:
            bad.append(f"--{name} must be >= {low}")
    for name in ("max_steps", "eval_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            bad.append(f"--{name} must be >= 1")
    if not args.lr > 0:
        bad.append("--lr must be > 0")
    if not args.lora_alpha > 0:
        bad.append("--lora_alpha must be > 0")
    for name, hi in (("lora_dropout", 1), ("val_fraction", 1), ("warmup_ratio", 1)):
        if not 0 <= getattr(args, name) < hi:
            bad.append(f"--{name} must be in [0, {hi})")
    if args.max_grad_norm < 0 or args.weight_decay < 0:
        bad.append("--max_grad_norm and --weight_decay must be >= 0")
    if args.fp16 and args.bf16:
        bad.append("--bf16 and --fp16 exclude each other")
    if args.resume and args.overwrite:
        bad.append("--resume continues a run and --overwrite starts it over: pick one")
    if not args.target_modules.strip(" ,"):
        bad.append("--target_modules is empty")
    if args.gpu_mem_budget is not None and not args.gpu_mem_budget > 0:
        bad.append("--gpu_mem_budget must be > 0 (GB)")
    if args.inspect < 0:
        bad.append("--inspect N needs N >= 1")
    if not Path(args.jsonl).is_file():
        bad.append(f"--jsonl {args.jsonl}: file not found")
    if Path(args.out).is_file():
        bad.append(f"--out {args.out} is a file; give a folder")
    if bad:
        raise InputError("; ".join(bad))


# --------------------------------------------------------------------------- data: chats -> tokens + label masks
def load_chats(path, system_prompt: str | None = None) -> list[dict]:
    """Read the training file into [{"line", "messages", "group"}]; bad records raise InputError with file:line."""
    chats = []
    for lineno, rec in read_jsonl(path):
        try:
            messages = record_messages(rec)
            _check_turn_order(messages)
        except ValueError as e:
            raise InputError(f"{path}:{lineno}: {e}; each record needs 'messages' or a 'text' with "
                             "<|system|>/<|user|>/<|assistant|> markers and at least one assistant answer") from None
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
        chats.append({"line": lineno, "messages": messages, "group": str(meta.get("paper_id", f"line{lineno}")),
                      "type": str(meta.get("type") or "unknown")})
    if not chats:
        raise InputError(f"{path}: no records (the file is empty); generate data with generate_qa.py first")
    return chats


def _check_turn_order(messages: list[dict]) -> None:
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        raise ValueError("a system turn may only come first")
    turns = roles[1:] if roles[0] == "system" else roles
    for i, role in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(f"turns must alternate user/assistant starting with user, got {'/'.join(turns)}")


def _assistant_char_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of the text to train on: each assistant answer plus the end-of-turn token after it.

    The prompt up to an answer is the chat before it rendered with the generation prompt, and the answer
    ends where the chat up to it ends: so the spans are right for whatever template the tokenizer has.
    Whitespace the template writes after the end-of-turn token is glue, not part of the answer.
    """
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = chat_text(tokenizer, messages[:i], add_generation_prompt=True)
        upto = chat_text(tokenizer, messages[: i + 1])
        if len(upto) > len(before) and text.startswith(before) and text.startswith(upto):
            start, end = len(before), len(before) + len(upto[len(before):].rstrip())
        else:  # a template that renders earlier turns differently once more follow: find the answer itself
            start = text.find(m["content"], cursor)
            if start < 0:
                raise ValueError(f"cannot locate assistant turn {i} in the rendered chat")
            end = start + len(m["content"])
            eos = tokenizer.eos_token or ""
            if eos and text.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return spans


def _token_offsets(tokenizer, text: str, ids: list[int], spans) -> list[tuple[int, int]]:
    """Character span of each of `ids` (encode_text's output) in `text`; (0, 0) for tokens added outside it."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        inner, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):
        # A slow tokenizer has no offsets: tokenize prompt and answer pieces apart, which is exact when
        # the pieces add up to the whole (each token then gets its piece's span).
        inner = tokenizer(text, add_special_tokens=False)["input_ids"]
        cuts = sorted({0, len(text), *[x for span in spans for x in span]})
        pieced, offsets = [], []
        for a, b in zip(cuts, cuts[1:]):
            toks = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            pieced += toks
            offsets += [(a, b)] * len(toks)
        if pieced != inner:
            raise ValueError("cannot align answer tokens with this slow tokenizer; use a fast tokenizer")
    for k in range(len(ids) - len(inner) + 1):
        if ids[k:k + len(inner)] == inner:
            return [(0, 0)] * k + offsets + [(0, 0)] * (len(ids) - k - len(inner))
    raise ValueError("tokenizer output with special tokens does not contain the plain tokenization")


def _tokenize_detail(tokenizer, messages: list[dict], max_seq_len: int | None = None) -> dict | None:
    text = chat_text(tokenizer, messages)
    ids = encode_text(tokenizer, text)
    if max_seq_len is not None and len(ids) > max_seq_len:
        return None
    spans = _assistant_char_spans(tokenizer, messages, text)
    offsets = _token_offsets(tokenizer, text, ids, spans)
    # A token is trained when it overlaps an answer span: a token straddling the prompt/answer boundary
    # carries answer text the model must produce.
    labels = [t if a < b and any(a < e and b > s for s, e in spans) else IGNORE for t, (a, b) in zip(ids, offsets)]
    return {"text": text, "input_ids": ids, "labels": labels, "offsets": offsets}


def tokenize_chat(tokenizer, messages: list[dict], max_seq_len: int) -> dict | None:
    """input_ids (exactly one BOS) and labels (-100 except each assistant answer and its </s>); None if too long."""
    d = _tokenize_detail(tokenizer, messages, max_seq_len)
    return None if d is None else {"input_ids": d["input_ids"], "labels": d["labels"]}


def fit_chat(tokenizer, messages: list[dict], max_seq_len: int) -> tuple[dict | None, int]:
    """tokenize_chat, dropping whole earlier user/assistant exchanges until the chat fits.

    Returns (sample or None, exchanges dropped). An answer is never cut: a last exchange that does not fit
    alone drops the sample.
    """
    dropped = 0
    while True:
        sample = tokenize_chat(tokenizer, messages, max_seq_len)
        if sample is not None or sum(m["role"] == "assistant" for m in messages) < 2:
            return sample, dropped
        first = 1 if messages[0]["role"] == "system" else 0
        messages = messages[:first] + messages[first + 2:]
        dropped += 1


def build_samples(tokenizer, chats: list[dict], max_seq_len: int, path) -> tuple[list[dict], dict]:
    samples, too_long, trimmed, longest = [], [], 0, 0
    for c in chats:
        try:
            s, n_dropped = fit_chat(tokenizer, c["messages"], max_seq_len)
        except ValueError as e:
            raise InputError(f"{path}:{c['line']}: {e}") from None
        if s is None:
            too_long.append(c["line"])
            longest = max(longest, len(encode_text(tokenizer, chat_text(tokenizer, c["messages"]))))
            continue
        if not any(l != IGNORE for l in s["labels"]):
            raise InputError(f"{path}:{c['line']}: no assistant token to train on after rendering")
        trimmed += n_dropped > 0
        samples.append({**s, "line": c["line"], "group": c["group"], "type": c["type"], "messages": c["messages"]})
    report = {"n_records": len(chats), "dropped_too_long": len(too_long), "dropped_lines": too_long[:20],
              "longest_dropped": longest, "trimmed_earlier_turns": trimmed}
    if not samples:
        raise InputError(f"{path}: every sample is longer than --max_seq_len={max_seq_len} tokens "
                         f"(longest {longest}); raise --max_seq_len")
    return samples, report


def split_train_val(samples: list[dict], val_fraction: float, seed: int,
                    min_val: int = 0) -> tuple[list[dict], list[dict]]:
    """Hold out whole papers (meta.paper_id) where known, so validation loss is on unseen papers.
    min_val: hold out at least this many samples (capped at a quarter of the data) when val_fraction > 0."""
    n_val = round(len(samples) * val_fraction)
    if val_fraction > 0:
        n_val = max(n_val, min(min_val, len(samples) // 4))
    if val_fraction > 0 and n_val == 0 and len(samples) >= 10:
        n_val = 1
    if n_val == 0:
        return samples, []
    groups = sorted({s["group"] for s in samples})
    random.Random(seed).shuffle(groups)
    size = {}
    for s in samples:
        size[s["group"]] = size.get(s["group"], 0) + 1
    val_groups, count = set(), 0
    for g in groups:
        if count >= n_val:
            break
        val_groups.add(g)
        count += size[g]
    if count > 2 * n_val or count == len(samples):  # too few papers to hold out whole ones: split records
        val_groups = {id(s) for s in random.Random(seed).sample(samples, n_val)}
        return [s for s in samples if id(s) not in val_groups], [s for s in samples if id(s) in val_groups]
    return [s for s in samples if s["group"] not in val_groups], [s for s in samples if s["group"] in val_groups]


def system_prompts(samples: list[dict]) -> list[dict]:
    """The system prompts the training data used, most frequent first ({"prompt": None} = no system turn).
    Evaluation and inference read this from run_config.json so they prompt the way training did."""
    counts = Counter(s["messages"][0]["content"] if s["messages"][0]["role"] == "system" else None for s in samples)
    return [{"prompt": p, "count": n} for p, n in counts.most_common()]


def heldout_questions(val_samples: list[dict]) -> list[dict]:
    """Validation samples as evaluation questions (the format of data/eval_questions.jsonl): the first
    exchange of each chat, with its own system prompt. They come from papers (or samples) never trained on."""
    out = []
    for i, s in enumerate(val_samples, 1):
        msgs = s["messages"]
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        turns = msgs[1:] if system is not None else msgs
        out.append({"id": f"val-{i}", "question": turns[0]["content"], "reference": turns[1]["content"],
                    "type": s["type"], "paper_id": s["group"], "context": "", "system": system,
                    "source": f"training data line {s['line']}"})
    return out


# --------------------------------------------------------------------------- --inspect
def _marked(text: str, ids: list[int], labels: list[int], offsets, bos_id) -> str:
    trained = [False] * len(text)
    for lab, (a, b) in zip(labels, offsets):
        if lab != IGNORE:
            trained[a:b] = [True] * (b - a)
    out, on = ["<s>" if ids and ids[0] == bos_id and offsets[0] == (0, 0) else ""], False
    for ch, t in zip(text, trained):
        if t != on:
            out.append("⟦" if t else "⟧")
            on = t
        out.append(ch)
    return "".join(out) + ("⟧" if on else "")


def _padding_share(lengths: list[int], micro: int, per_step: int, seed: int, group: bool) -> float:
    padded = 0
    for step in epoch_plan(lengths, per_step, seed, 0, group, True):
        step = sorted(step, key=lambda i: -lengths[i])
        for k in range(0, len(step), micro):
            chunk = step[k:k + micro]
            padded += max(lengths[i] for i in chunk) * len(chunk)
    return 1 - sum(lengths) / padded


def print_inspect(tokenizer, samples: list[dict], report: dict, args) -> None:
    n = min(args.inspect, len(samples))
    print(f"{n} of {len(samples)} samples as the model sees them; ⟦trained⟧ tokens are marked "
          "(everything else has label -100)\n")
    for s in samples[:n]:
        d = _tokenize_detail(tokenizer, s["messages"])
        n_tr = sum(l != IGNORE for l in d["labels"])
        print(f"--- line {s['line']}: {len(d['input_ids'])} tokens, {n_tr} trained "
              f"({sum(m['role'] == 'assistant' for m in s['messages'])} assistant turn(s))")
        print(_marked(d["text"], d["input_ids"], d["labels"], d["offsets"], tokenizer.bos_token_id))
    lengths = [len(s["input_ids"]) for s in samples]
    trained = sum(sum(l != IGNORE for l in s["labels"]) for s in samples)
    print(f"samples: {len(samples)} kept of {report['n_records']} records; {report['dropped_too_long']} dropped "
          f"as longer than --max_seq_len={args.max_seq_len}; {report['trimmed_earlier_turns']} lost earlier turns")
    print(f"tokens: {sum(lengths):,} in, {trained:,} trained ({trained / sum(lengths):.1%}); "
          f"length min {min(lengths)}, median {sorted(lengths)[len(lengths) // 2]}, max {max(lengths)}")
    top = max(lengths)
    width = max(1, math.ceil(top / 10))
    counts = [0] * 10
    for L in lengths:
        counts[min(9, (L - 1) // width)] += 1
    print("length histogram (tokens):")
    for k, c in enumerate(counts):
        print(f"  {k * width + 1:>6}-{(k + 1) * width:<6} {c:>6} {'#' * math.ceil(40 * c / max(counts))}")
    per_step = args.batch * args.grad_accum
    print(f"padding with --batch {args.batch} --grad_accum {args.grad_accum}: "
          f"{_padding_share(lengths, args.batch, per_step, args.seed, True):.1%} length-grouped, "
          f"{_padding_share(lengths, args.batch, per_step, args.seed, False):.1%} without")


# --------------------------------------------------------------------------- model
def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _device() -> torch.device:
    return torch.device(f"cuda:{_local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(args, device: torch.device) -> tuple[torch.dtype, str]:
    """Compute dtype from the flags and what the device can do, with a line saying what was chosen."""
    if args.fp16:
        return torch.float16, "fp16 compute with loss scaling"
    if args.bf16 is False:
        return torch.float32, "fp32 compute (--no-bf16)"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16, ("bf16 requested but this GPU has none: falling back to fp16 compute with loss "
                               "scaling (pass --fp16 to choose it explicitly)")
    if device.type == "cpu":
        return torch.bfloat16, "bf16 compute on CPU (bitsandbytes 4-bit supports it; slow, for tests and demos)"
    return torch.bfloat16, "bf16 compute"


def load_tokenizer(args):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    ensure_chat_template(tok)
    _ensure_pad(tok)
    tok.padding_side = "right"
    return tok


def _ensure_pad(tok) -> None:
    # Padding is masked out of attention and labels by length (collate), so the pad id only has to exist;
    # unk keeps it distinct from the </s> that is trained on.
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token


def load_model(args):
    """The 4-bit base + LoRA model exactly as training uses it (NF4, double quant, LoRA) with the speed flags.

    Default: the frozen base stays in the compute dtype (no fp32 upcast of norms, embeddings and lm_head;
    non-reentrant gradient checkpointing needs no input grads); --kbit_upcast is the seed recipe's
    prepare_model_for_kbit_training instead.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    device = _device()
    d = _Dist()
    dtype, _ = resolve_precision(args, device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls (LoRA, lm_head) on Ampere+
    quant = nf4_config(dtype)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, quantization_config=quant, device_map={"": str(device)}, dtype=dtype,
        attn_implementation=args.attn_implementation, trust_remote_code=args.trust_remote_code)
    model.config.use_cache = False
    if args.kbit_upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fast = not args.kbit_upcast  # the fused pieces assume one compute dtype throughout
    liger = _apply_liger(model, args.liger, device) if fast else "off (--kbit_upcast)"
    n_norm = 0
    if args.fused_norm and fast and "RMSNorm" not in liger:  # Liger's own RMSNorm when --liger all applied
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm") and not type(m).__name__.startswith("Liger") \
                    and hasattr(m, "variance_epsilon") and getattr(m, "weight", None) is not None:
                m.forward = MethodType(_torch_rmsnorm_forward, m)
                n_norm += 1
    packed = "off"
    if args.packing:
        info = choose_packed_impl(device)
        _set_attn(model, register_packed_attention())
        packed = ("flash varlen_attn" if info["impl"] == "varlen" else
                  "one SDPA call per sample" + (" (varlen_attn failed its self-test: "
                                                f"{info.get('varlen_error') or info.get('varlen_rel_err')})"
                                                if device.type == "cuda" else ""))
    targets = args.target_modules if args.target_modules == "all-linear" else \
        [t.strip() for t in args.target_modules.split(",") if t.strip()]
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    n_lean = 0
    if args.fused_lora and fast:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        absmax_bytes = 0
        for m in model.modules():
            if isinstance(m, LoraLinear4bit):
                m.forward = MethodType(_lean_lora4bit_forward, m)
                m.lora_fp32_sum = bool(args.lora_fp32_sum)
                absmax_bytes += _expand_absmax(m.base_layer.weight.quant_state)
                n_lean += 1
    _log(f"speed: {'fp32 upcast + autocast (--kbit_upcast)' if args.kbit_upcast else 'no fp32 upcast'}; "
         f"packing: {packed}; fused LoRA: {n_lean} layers"
         f"{' (fp32 sum)' if n_lean and args.lora_fp32_sum else ''}"
         f"{f', 4-bit scales expanded once ({absmax_bytes / 2**20:,.1f} MiB)' if n_lean and absmax_bytes else ''}; "
         f"fused RMSNorm: {n_norm} modules; Liger: {liger}", d)
    return model


def load_model_and_tokenizer(args):
    return load_model(args), load_tokenizer(args)


# --------------------------------------------------------------------------- speed (issue 5; bench/README.md)
# Measured on an H100 with a 7B shape: the seed recipe spends its time on padding, fp32 round trips and
# host-side Python ops, not on matmuls. Each piece below is a flag; all but Liger and varlen run on CPU too.
PACKED_ATTN = "qlora_packed"
_VARLEN = {"impl": None}  # "varlen" (torch.nn.attention.varlen) or "loop" (one SDPA call per document)


def _torch_rmsnorm_forward(self, x):
    """RMSNorm as one fused op instead of HF's ~8 (cast, pow, mean, rsqrt, mul, cast, mul)."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.variance_epsilon)


def _fused_lora4bit_forward(self, x, *args, **kwargs):
    """bnb 4-bit base + LoRA as addmm(base_out, dropout(x) A^T, B^T, alpha=scaling) in the compute dtype.
    The fallback of the lean path for layers it does not handle (bias, several adapters, merged)."""
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters or self.merged:
        return result
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        a = self.lora_A[name].weight.to(x.dtype)
        b = self.lora_B[name].weight.to(x.dtype)
        h = torch.nn.functional.linear(self.lora_dropout[name](x), a)
        out2d = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(),
                            alpha=self.scaling[name])
        result = out2d.view(result.shape)
    return result


def _dequant(weight, quant_state):
    """bitsandbytes' dequantize_4bit; with the fp32 block scales that _expand_absmax cached, one kernel instead of
    three (the double-quantised scales are not expanded again at every call). The same weights bit for bit."""
    absmax = getattr(quant_state, "qlora_absmax32", None)
    if absmax is None or weight.shape[0] == 1:  # (a [1, n] weight is bnb's transposed legacy layout)
        import bitsandbytes.functional as bnbF

        return bnbF.dequantize_4bit(weight, quant_state)
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight, absmax, quant_state.blocksize,
                                                          quant_state.quant_type, quant_state.shape, quant_state.dtype)


def _expand_absmax(quant_state) -> int:
    """Cache the fp32 block scales of a double-quantised 4-bit weight on its quant state, computed exactly as
    bitsandbytes does at each dequantisation. Costs 4 bytes per 64 weights (~0.44 GB for a 7B model); saves two
    kernels and bitsandbytes' Python per dequantisation (~1,200 per training step of a 7B model). Returns bytes."""
    import bitsandbytes.functional as bnbF

    if not getattr(quant_state, "nested", False) or not hasattr(torch.ops.bitsandbytes, "dequantize_4bit"):
        return 0
    absmax = bnbF.dequantize_blockwise(quant_state.absmax, quant_state.state2)
    absmax += quant_state.offset
    quant_state.qlora_absmax32 = absmax.float()
    return quant_state.qlora_absmax32.numel() * 4


def _compute_copy(p, dtype):
    """p in the compute dtype: the copy FlatParams.refresh_compute made for this optimizer step if p has not
    changed since (its version counter), else a cast. Saves two cast kernels per LoRA layer call."""
    c = getattr(p, "qlora_compute", None)
    if c is not None and c[1] == dtype and c[0] == p._version:
        return c[2]
    return p.to(dtype)


def _generator(device):
    return torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else torch.default_generator


class _LoRA4bit(torch.autograd.Function):
    """y = x W^T + s * dropout(x) A^T B^T with W the 4-bit base weight, as ONE autograd node.

    PEFT + bitsandbytes build this from ~6 autograd nodes and a dozen Python-level ops per layer; at a few
    thousand tokens per step the step is bound by that host-side work. Forward = dequant, 2 GEMMs, one addmm;
    backward = dequant + 4 small GEMMs. W is never saved (dequantized again in backward). LoRA master weights
    stay fp32: cast to the compute dtype for the GEMMs, gradients come back in fp32.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weight, quant_state, scaling, p, fp32_sum=False):
        x2 = x.reshape(-1, x.shape[-1])
        a, b = _compute_copy(lora_a, x.dtype), _compute_copy(lora_b, x.dtype)
        rng = None
        if p > 0:
            # keep the generator state, not the mask: backward draws the same mask again (the way activation
            # checkpointing replays dropout), so dropout adds no saved activations
            gen = _generator(x2.device)
            rng = gen.get_state()
            xd, _ = torch.native_dropout(x2, p, True)
        else:
            xd = x2
        h = torch.mm(xd, a.t())
        w = _dequant(weight, quant_state).to(x.dtype)
        if fp32_sum:
            # LoRA delta first, then the base GEMM accumulates onto it in place (beta = scaling): the GEMM adds C
            # to its fp32 accumulator and rounds once, so a delta under half a bf16 step of the base output is not
            # rounded away. Same kernels and memory traffic as the order below, which rounds the base output to
            # bf16 before adding the delta: that order memorised slower than the fp32-upcast seed recipe on a
            # second pass (+0.12/+0.17 loss, bench/README.md). tests: test_lora_sum_keeps_small_deltas.
            out = torch.mm(h, b.t()).addmm_(x2, w.t(), beta=scaling)
        else:
            out = torch.mm(x2, w.t()).addmm_(h, b.t(), alpha=scaling)
        del w, xd
        ctx.save_for_backward(x2, h, a, b)
        ctx.weight, ctx.quant_state, ctx.scaling, ctx.p, ctx.rng = weight, quant_state, scaling, p, rng
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
            w = _dequant(ctx.weight, ctx.quant_state).to(g.dtype)
            grad_x = torch.mm(g, w)
            del w
            if mask is None:
                grad_x.addmm_(gh, a)
            else:
                grad_x.addcmul_(torch.mm(gh, a), mask, value=1.0 / (1.0 - p))
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_a.to(ctx.dtypes[0]), grad_b.to(ctx.dtypes[1]), None, None, None, None, None


def _lean_lora4bit_forward(self, x, *args, **kwargs):
    """Forward of peft.tuners.lora.bnb.Linear4bit through _LoRA4bit; PEFT's own path where it does not apply."""
    if kwargs.get("adapter_names") is not None:
        return type(self).forward(self, x, *args, **kwargs)
    if self.disable_adapters or self.merged or len(self.active_adapters) != 1 or self.base_layer.bias is not None \
            or self.active_adapters[0] not in self.lora_A:
        return _fused_lora4bit_forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    drop = self.lora_dropout[name]
    p = drop.p if (self.training and isinstance(drop, torch.nn.Dropout)) else 0.0
    w = self.base_layer.weight
    # --lora_fp32_sum travels on the module (set where load_model patches it), not in a process-wide switch
    return _LoRA4bit.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, w.data, w.quant_state,
                           self.scaling[name], p, getattr(self, "lora_fp32_sum", False))


def _offloaded_checkpoint(function, *args, **kwargs):
    """Non-reentrant checkpoint whose saved layer inputs live in pinned host memory."""
    from torch.utils.checkpoint import checkpoint

    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


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


def _varlen_call(q, k, v, cu, max_len, scaling):
    """q: (T, Hq, D), k/v: (T, Hkv, D) -> (T, Hq, D), whatever this torch's varlen_attn signature is."""
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
                             sliding_window=None, **kwargs):
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
    if _VARLEN["impl"] == "varlen":
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        return _varlen_call(q, k, v, cu, max_len, scaling).unsqueeze(0), None
    bounds = cu.tolist()  # CPU, or a GPU whose varlen kernel failed its self-test: one SDPA call per document
    outs = [_sdpa(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], scaling)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1), None


def choose_packed_impl(device) -> dict:
    """Self-test varlen_attn (forward and backward, GQA) against a float64 per-document reference; use it only
    if it agrees, else one SDPA call per document."""
    info = {"impl": "loop"}
    if device.type != "cuda":
        _VARLEN["impl"] = "loop"
        return info
    try:
        torch.manual_seed(0)
        lens = [37, 300, 129, 511, 1]
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
        T, Hq, Hkv, D = sum(lens), 32, 8, 128
        q = torch.randn(T, Hq, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(T, Hkv, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(T, Hkv, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        go = torch.randn(T, Hq, D, device=device, dtype=torch.bfloat16)
        out = _varlen_call(q, k, v, cu, max(lens), D ** -0.5)
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
    except Exception as e:  # noqa: BLE001 - any failure means: use the per-document loop
        info["varlen_error"] = f"{type(e).__name__}: {e}"[:300]
    _VARLEN["impl"] = info["impl"]
    return info


def register_packed_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTN, packed_attention_forward)
    return PACKED_ATTN


def uses_packed_attention(model) -> bool:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_attn_implementation", None) == PACKED_ATTN


def _set_attn(model, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except Exception:  # noqa: BLE001 - a transformers without the setter: the config field is what is read
        model.config._attn_implementation = name


def _apply_liger(model, mode: str, device) -> str:
    """The Liger kernels --liger names (see LIGER_PARTS / LIGER_AUTO); returns what was applied."""
    if mode == "off":
        return "off"
    if device.type != "cuda":
        return f"skipped (--liger {mode}: Liger's Triton kernels need CUDA)"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except ImportError:
        if mode != "auto":
            raise InputError(f"--liger {mode}: liger-kernel is not installed; pip install -r requirements-gpu.txt "
                             "or pass --liger off") from None
        return "skipped (liger-kernel not installed: pip install -r requirements-gpu.txt)"
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"skipped (Liger has no kernels for model type {model_type!r})"
    parts = set(LIGER_PARTS if mode == "all" else LIGER_AUTO if mode == "auto" else mode.split(","))
    _apply_liger_kernel_to_instance(model, rope="rope" in parts, rms_norm="rmsnorm" in parts,
                                    swiglu="swiglu" in parts, cross_entropy=False,
                                    fused_linear_cross_entropy="flce" in parts)
    names = {"rope": "RoPE", "rmsnorm": "RMSNorm", "swiglu": "SwiGLU", "flce": "fused linear cross-entropy"}
    return ", ".join(names[p] for p in LIGER_PARTS[1:] + LIGER_PARTS[:1] if p in parts)


def _decoder_layers(model) -> list:
    """The decoder layers whose gradient checkpointing can be switched one by one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    best = []
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > len(best) and \
                all(isinstance(x, GradientCheckpointingLayer) for x in m):
            best = list(m)
    return best


def activation_bytes_per_token_layer(hidden: int, intermediate: int, dropout: float) -> float:
    """Activations one decoder layer keeps per token when it is not checkpointed (bf16). Measured on a 7B
    shape (hidden 4096, MLP 14336): ~145 KB without LoRA dropout, ~166 KB with PEFT's dropout (a mask and a
    dropped copy per LoRA layer; the fused LoRA node keeps neither, so pass dropout=0 for it); scaled by the
    tensors a Mistral/Llama layer saves (~6 of width hidden, ~4 of width intermediate) for other shapes."""
    per_7b = 166e3 if dropout > 0 else 145e3
    return per_7b * (6 * hidden + 4 * intermediate) / (6 * 4096 + 4 * 14336)


def plan_checkpointing(budget_gb: float, static_bytes: float, n_lora: int, optim: str, max_tokens: int,
                       hidden: int, intermediate: int, n_layers: int, dropout: float) -> dict:
    """Spend a GPU memory budget on speed. Estimate (bytes) for k layers without checkpointing:
    static + 4·n_lora (fp32 grads) + (8 | 2)·n_lora (AdamW state, fp32 | 8-bit) + T·2·hidden·n_layers
    (checkpointed layer inputs, bf16) + (k+1)·T·c (k full layers + the one being recomputed) + 0.35 GB
    (workspace), T = largest micro-batch in tokens. If k = 0 does not fit, the checkpoints go to pinned host
    memory ("offload"); otherwise the largest k that fits ("skip": the last k layers keep their activations).
    """
    c = activation_bytes_per_token_layer(hidden, intermediate, dropout)
    opt_bytes = 2 if "8bit" in optim else 8
    fixed = static_bytes + (4 + opt_bytes) * n_lora + 0.35e9
    ckpt = max_tokens * 2 * hidden * n_layers
    budget = budget_gb * 1e9

    def estimate(k):
        return fixed + ckpt + (k + 1) * max_tokens * c

    if estimate(0) > budget:
        est = fixed + max_tokens * c
        return {"mode": "offload", "skip_layers": 0, "estimate_gb": est / 1e9, "budget_gb": budget_gb,
                "fits": est <= budget, "act_bytes_per_token_layer": c}
    k = 0
    while k < n_layers and estimate(k + 1) <= budget:
        k += 1
    return {"mode": "skip", "skip_layers": k, "estimate_gb": estimate(k) / 1e9, "budget_gb": budget_gb,
            "fits": True, "act_bytes_per_token_layer": c}


def _uses_fused_lora(model) -> bool:
    return any(getattr(m.forward, "__func__", None) is _lean_lora4bit_forward for m in model.modules())


def _apply_checkpoint_plan(layers: list, plan: dict) -> None:
    for i, layer in enumerate(layers):
        if plan["mode"] == "offload":
            layer._gradient_checkpointing_func = _offloaded_checkpoint
        elif i >= len(layers) - plan["skip_layers"]:
            layer.gradient_checkpointing = False


def _max_micro_tokens(lengths: list[int], per_step: int, micro: int, seed: int, epochs: int, group: bool,
                      shuffle: bool, rank: int, world: int, packed: bool) -> int:
    """Largest micro-batch of the whole run in computed tokens (packed: the sum; padded: rows x longest)."""
    top = 0
    for epoch in range(epochs):
        for step in epoch_plan(lengths, per_step, seed, epoch, group, shuffle):
            mine = sorted(step, key=lambda i: -lengths[i])[rank::world]
            for j in range(0, len(mine), micro):
                part = [lengths[i] for i in mine[j:j + micro]]
                top = max(top, sum(part) if packed else len(part) * max(part))
    return top


@contextlib.contextmanager
def _frozen_gc():
    """Move every object alive now (model, optimizer, data) out of the collector's reach while training:
    full collections over them cost ~10% of a fast step."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# --------------------------------------------------------------------------- data order and batches
def epoch_plan(lengths: list[int], per_step: int, seed: int, epoch: int, group_by_length: bool,
               shuffle: bool) -> list[list[int]]:
    """Sample indices of each optimizer step of one epoch, a function of (seed, epoch) only.

    Length grouping sorts chunks of 64 steps' worth of samples by length, so neighbours (which share
    micro-batches) have similar lengths, then shuffles the order of the steps.
    """
    rng = random.Random(f"{seed}/{epoch}")
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        mega = per_step * 64
        order = [i for k in range(0, len(order), mega)
                 for i in sorted(order[k:k + mega], key=lambda j: -lengths[j])]
    steps = [order[k:k + per_step] for k in range(0, len(order), per_step)]
    if group_by_length and shuffle:
        rng.shuffle(steps)
    return steps


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


def _micro_loss(model, batch: dict, n_items, amp) -> torch.Tensor:
    """Sum of token losses of one micro-batch divided by n_items (the trained tokens of the whole step)."""
    packed = {k: batch[k] for k in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
              if k in batch}
    with amp:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    num_items_in_batch=n_items, use_cache=False, **packed)
    return out.loss


def _n_trained(sample: dict) -> int:
    return sum(1 for l in sample["labels"][1:] if l != IGNORE)  # position 0 is never predicted


# --------------------------------------------------------------------------- distributed
class _Dist:
    def __init__(self):
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.main = self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            dist.all_reduce(t)
        return t

    def barrier(self):
        if self.on:
            dist.barrier()


def _init_distributed() -> None:
    """torchrun / accelerate launch set WORLD_SIZE>1: one process per GPU (gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(_local_rank())
            dist.init_process_group("nccl", device_id=torch.device(f"cuda:{_local_rank()}"))
        else:
            dist.init_process_group("gloo")


def _all_reduce_grads(params, d: _Dist) -> None:
    """Sum LoRA gradients over processes in one flat buffer (tens of MB for a 7B model: cheap)."""
    if not d.on:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    k = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[k:k + n].view_as(p).to(p.dtype)
        k += n


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

    def refresh_compute(self, dtype) -> None:
        """One cast of the whole buffer to the compute dtype after each update, instead of two casts per LoRA
        layer call (see _compute_copy). The copy is used only while a tensor's version counter is unchanged."""
        if self.param is None or dtype == self.param.dtype:
            return
        comp = self.param.detach().to(dtype)
        for p, o in zip(self.flat_members, self.offsets):
            p.qlora_compute = (p._version, dtype, comp[o:o + p.numel()].view_as(p))

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


# --------------------------------------------------------------------------- checkpoints
def _make_optimizer(params, args, device):
    kw = {"lr": args.lr, "weight_decay": args.weight_decay}
    if args.optim in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(params, fused=args.optim == "adamw_torch_fused" or None, **kw)
    import bitsandbytes as bnb

    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[args.optim]
    return cls(params, **kw)  # on CPU bitsandbytes warns that paging falls back to plain memory: harmless


def _zero_grads(optimizer, params) -> None:
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None


def _fingerprint(samples: list[dict], per_step: int, total: int, args) -> dict:
    """What fixes the data order and the schedule: a resumed run must match it."""
    h = hashlib.sha256()
    for s in samples:
        h.update(array("q", s["input_ids"]).tobytes() + b"|" + array("q", s["labels"]).tobytes() + b"\n")
    return {"samples_sha256": h.hexdigest(), "samples_per_step": per_step, "total_steps": total,
            "seed": args.seed, "group_by_length": args.group_by_length, "shuffle": args.shuffle,
            "optimizer": f"{args.optim}{' flat' if getattr(args, 'flat_optim', False) else ''}"}


def checkpoints(out_dir) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _last_checkpoint(out_dir) -> Path | None:
    found = checkpoints(out_dir) if out_dir is not None else []
    return found[-1] if found else None


def _save_checkpoint(model, optimizer, scheduler, scaler, state: dict, fp: dict, out_dir, keep: int, d: _Dist):
    if d.main:
        root = Path(out_dir) / "checkpoints"
        final, tmp = root / f"step-{state['step']}", root / f".step-{state['step']}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None}, tmp / "training_state.pt")
        write_json_atomic(tmp / "trainer_state.json", {**state, "fingerprint": fp})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a kill leaves either the old set or the complete new checkpoint
        for old in checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()


def _repage_optimizer_state(optimizer) -> None:
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


def _load_checkpoint(path: Path, model, optimizer, scheduler, scaler, fp: dict, device) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    saved = state.pop("fingerprint")
    diff = [k for k in fp if saved.get(k) != fp[k]]
    if diff:
        raise InputError(f"{path} was made with different data or settings ({', '.join(diff)} differ); "
                         "--resume needs the same --jsonl, --seed, --epochs/--max_steps, --optim/--flat_optim and "
                         "--batch x --grad_accum x processes; or start over with --overwrite")
    result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors", device=str(device)))
    if getattr(result, "unexpected_keys", None):
        raise InputError(f"{path}: adapter does not match the model ({result.unexpected_keys[:3]}...)")
    ts = torch.load(path / "training_state.pt", map_location=device, weights_only=False)
    optimizer.load_state_dict(ts["optimizer"])
    _repage_optimizer_state(optimizer)
    scheduler.load_state_dict(ts["scheduler"])
    if scaler is not None and ts.get("scaler"):
        scaler.load_state_dict(ts["scaler"])
    return state


# --------------------------------------------------------------------------- training loop
def _peak_memory(device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "cuda_max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "cpu_max_rss"


def _evaluate(model, samples: list[dict], micro: int, amp, pad_id: int, device, d: _Dist, packed: bool) -> float:
    mine = sorted(samples[d.rank::d.world], key=lambda s: -len(s["input_ids"]))
    total = torch.zeros(2, dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad():
        for k in range(0, len(mine), micro):
            batch = collate_packed(mine[k:k + micro], device) if packed else collate(mine[k:k + micro], pad_id, device)
            total[0] += _micro_loss(model, batch, 1, amp).double()
            total[1] += sum(_n_trained(s) for s in mine[k:k + micro])
    model.train()
    d.all_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


def _log(msg: str, d: _Dist, bar=None) -> None:
    if d.main:
        (bar.write if bar is not None else print)(msg)
        sys.stdout.flush()


def _plan_memory(model, args, device, lengths, per_step, steps_per_epoch, total, packed, d: _Dist) -> dict | None:
    """--gpu_mem_budget: choose which layers skip checkpointing (or offload the checkpoints) and log it."""
    budget = getattr(args, "gpu_mem_budget", None)
    if budget is None:
        return None
    if device.type != "cuda":
        _log(f"--gpu_mem_budget {budget}: ignored on {device.type} (it plans GPU memory)", d)
        return None
    layers = [l for l in _decoder_layers(model) if getattr(l, "gradient_checkpointing", False)]
    if not layers:
        _log(f"--gpu_mem_budget {budget}: ignored (gradient checkpointing is off)", d)
        return None
    cfg = model.config
    epochs = min(math.ceil(total / steps_per_epoch), 64)  # the plans repeat their length mix; bound the scan
    top = _max_micro_tokens(lengths, per_step, args.batch, args.seed, epochs, args.group_by_length, args.shuffle,
                            d.rank, d.world, packed)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = plan_checkpointing(budget, torch.cuda.memory_allocated(device), n_lora, args.optim, top,
                              cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size), len(layers),
                              0.0 if _uses_fused_lora(model) else args.lora_dropout)
    _apply_checkpoint_plan(layers, plan)
    what = ("checkpoints offloaded to pinned host memory (full checkpointing would not fit)"
            if plan["mode"] == "offload" else f"gradient checkpointing off on the last {plan['skip_layers']} of {len(layers)} layers")
    _log(f"--gpu_mem_budget {budget} GB: largest micro-batch {top:,} tokens -> {what}; estimated peak "
         f"{plan['estimate_gb']:.2f} GB" + ("" if plan["fits"] else " (over the budget: lower --batch)"), d)
    return plan


def train(model, tokenizer, train_samples, val_samples, args, out_dir=None, on_step=None) -> dict:
    """Train the LoRA parameters of `model` on pre-tokenized samples; return metrics.

    samples: [{"input_ids": [...], "labels": [...]}], labels -100 where not trained. on_step(step, loss,
    n_trained_tokens, n_input_tokens) runs after each optimizer step (tokens of the whole step, all
    processes). out_dir None: no checkpoints and no files (benchmarks).
    """
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    t_start = time.perf_counter()
    d = _Dist()
    device = next(p for p in model.parameters() if p.requires_grad).device
    dtype, _ = resolve_precision(args, device)
    # Autocast only for the seed's fp32-upcast model (--kbit_upcast); otherwise the model already computes in
    # `dtype` and autocast would only add casts.
    upcast = getattr(args, "kbit_upcast", False)
    amp = torch.autocast(device.type, dtype=dtype) if upcast and dtype != torch.float32 else contextlib.nullcontext()
    packed = getattr(args, "packing", False) and uses_packed_attention(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if not train_samples:
        raise InputError("no training samples")

    per_step = args.batch * args.grad_accum * d.world
    lengths = [len(s["input_ids"]) for s in train_samples]
    trained = [_n_trained(s) for s in train_samples]
    steps_per_epoch = math.ceil(len(train_samples) / per_step)
    total = args.max_steps or steps_per_epoch * args.epochs
    # ~10 validation points per run by default, so short runs get a curve too (never rarer than checkpoints)
    eval_every = args.eval_steps or min(args.save_steps, max(1, total // 10))

    params = [p for p in model.parameters() if p.requires_grad]
    if d.on:  # identical start on every process whatever each one's RNG did
        for p in params:
            dist.broadcast(p.data, 0)
    flat = FlatParams(params) if args.flat_optim else None
    optimizer = _make_optimizer(flat.optimizer_params() if flat else params, args, device)
    if flat is not None and flat.param is not None:
        _log(f"optimizer: {args.optim}, {len(flat.flat_members)} LoRA tensors as one flat buffer"
             f"{f' + {len(flat.separate)} small ones separately' if flat.separate else ''}", d)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * total),
                              num_training_steps=total)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    _plan_memory(model, args, device, lengths, per_step, steps_per_epoch, total, packed, d)
    fp = _fingerprint(train_samples, per_step, total, args)
    state = {"step": 0, "micro": args.batch, "train": [], "val": [], "oom_backoffs": [], "train_seconds": 0.0,
             "trained_tokens": 0, "input_tokens": 0, "padded_tokens": 0}
    resumed_from = None
    if out_dir is not None and args.resume:
        if checkpoints(out_dir):
            latest = checkpoints(out_dir)[-1]
            state = _load_checkpoint(latest, model, optimizer, scheduler, scaler, fp, device)
            resumed_from = state["step"]
            _log(f"resumed from {latest} (step {resumed_from}/{total}, micro-batch {state['micro']})", d)
        else:
            _log(f"--resume: no checkpoint in {Path(out_dir) / 'checkpoints'}; starting from step 0", d)
    if flat is not None and not upcast:
        flat.refresh_compute(dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    _log(f"training {len(train_samples)} samples ({sum(trained):,} trained tokens), {len(val_samples)} validation; "
         f"{total} steps of {per_step} samples ({args.batch} x {args.grad_accum} accumulation x {d.world} "
         f"process(es)), {steps_per_epoch} steps/epoch", d)
    model.train()
    bar = tqdm(total=total, initial=state["step"], disable=None if d.main else True, dynamic_ncols=True,
               desc="train")
    plans: dict[int, list] = {}
    with _frozen_gc():  # bar.close() and the metrics stay outside
        while state["step"] < total:
            step = state["step"]
            epoch, k = divmod(step, steps_per_epoch)
            if epoch not in plans:
                plans = {epoch: epoch_plan(lengths, per_step, args.seed, epoch, args.group_by_length, args.shuffle)}
            ids = sorted(plans[epoch][k], key=lambda i: -lengths[i])
            mine = [train_samples[i] for i in ids[d.rank::d.world]]  # round robin: ranks get similar lengths
            n_items = max(1, sum(trained[i] for i in ids))
            t0 = time.perf_counter()
            while True:
                torch.manual_seed((args.seed * 1_000_003 + step) * 1009 + d.rank)  # dropout: same on a retry or resume
                stats = torch.zeros(4, dtype=torch.float64, device=device)  # oom, loss, tokens, padded tokens
                try:
                    for j in range(0, len(mine), state["micro"]):
                        part = mine[j:j + state["micro"]]
                        batch = collate_packed(part, device) if packed else collate(part, pad_id, device)
                        loss = _micro_loss(model, batch, n_items, amp)
                        (scaler.scale(loss) if scaler else loss).backward()
                        stats[1] += loss.detach().double()
                        stats[2] += batch["n_tokens"]
                        stats[3] += batch["n_padded"]
                except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or an allocator error from a library kernel
                    if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e).lower():
                        raise
                    stats[0] = 1
                batch = loss = None
                d.all_sum(stats)  # every process learns of an OOM anywhere before gradients are exchanged
                if stats[0] == 0:
                    break
                _zero_grads(optimizer, params)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if state["micro"] == 1:
                    raise TrainingError(
                        f"out of memory at step {step + 1} even with micro-batch 1: the longest sample in this "
                        f"step has {lengths[ids[0]]} tokens; lower --max_seq_len, or keep --gradient_checkpointing on")
                new = state["micro"] // 2
                _log(f"out of memory at step {step + 1} with micro-batch {state['micro']}: retrying with micro-batch "
                     f"{new} x {math.ceil(args.batch * args.grad_accum / new)} accumulation (same effective batch)",
                     d, bar)
                state["oom_backoffs"].append({"step": step + 1, "from": state["micro"], "to": new})
                state["micro"] = new

            _, loss_value, n_in, n_pad = stats.tolist()  # one host sync for the three counters
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"loss is {loss_value} at step {step + 1}; stopped before the update. Last good checkpoint: "
                    f"{_last_checkpoint(out_dir) or 'none'}. Lower --lr (now {args.lr}), use --bf16 instead of --fp16, "
                    "or check the data; then rerun with --resume")
            _all_reduce_grads(params, d)
            if flat is not None:  # from here on the optimizer's own parameters carry the gradients
                flat.gather_grads()
            if scaler:
                scaler.unscale_(optimizer)
            clip = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(flat.optimizer_params() if flat else params, clip)
            if scaler is None and not math.isfinite(norm.item()):  # fp16's scaler skips such steps itself
                raise TrainingError(f"gradient norm is {norm.item()} at step {step + 1}; stopped before the update. "
                                    f"Last good checkpoint: {_last_checkpoint(out_dir) or 'none'}. Lower --lr and "
                                    "rerun with --resume")
            lr = scheduler.get_last_lr()[0]
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            _zero_grads(optimizer, params)
            if flat is not None and not upcast:
                flat.refresh_compute(dtype)

            dt = time.perf_counter() - t0
            n_tr = sum(trained[i] for i in ids)
            n_in, n_pad = int(n_in), int(n_pad)
            state["step"] = step + 1
            state["train_seconds"] += dt
            state["trained_tokens"] += n_tr
            state["input_tokens"] += n_in
            state["padded_tokens"] += n_pad
            state["train"].append({"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4),
                                   "loss": loss_value, "lr": lr, "grad_norm": float(norm), "trained_tokens": n_tr,
                                   "input_tokens": n_in, "padded_tokens": n_pad, "seconds": dt, "tokens_per_s": n_in / dt,
                                   "micro_batch": state["micro"]})
            if on_step is not None:
                on_step(step + 1, loss_value, n_tr, n_in)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{n_in / dt:,.0f}", micro=state["micro"])
            if (step + 1) % args.logging_steps == 0:
                _log(f"step {step + 1}/{total} | epoch {(step + 1) / steps_per_epoch:.2f} | loss {loss_value:.4f} | "
                     f"lr {lr:.2e} | {n_in / dt:,.0f} tok/s | micro-batch {state['micro']}", d, bar)
            done = state["step"] == total
            if val_samples and (state["step"] % eval_every == 0 or done):
                vl = _evaluate(model, val_samples, state["micro"], amp, pad_id, device, d, packed)
                state["val"].append({"step": state["step"], "loss": vl})
                _log(f"step {state['step']}: validation loss {vl:.4f}", d, bar)
            if out_dir is not None and state["step"] % args.save_steps == 0 and not done:
                _save_checkpoint(model, optimizer, scheduler, scaler, state, fp, out_dir, args.save_total_limit, d)
                if d.main:
                    write_metrics(out_dir, _metrics(state, t_start, device, d, resumed_from, finished=False))
    bar.close()
    return _metrics(state, t_start, device, d, resumed_from, finished=True)


def _metrics(state: dict, t_start: float, device, d: _Dist, resumed_from, finished: bool) -> dict:
    peak, kind = _peak_memory(device)
    secs = max(state["train_seconds"], 1e-9)
    return {"finished": finished, "steps": state["step"], "train": state["train"], "val": state["val"],
            "final_train_loss": state["train"][-1]["loss"] if state["train"] else None,
            "final_val_loss": state["val"][-1]["loss"] if state["val"] else None,
            "trained_tokens": state["trained_tokens"], "input_tokens": state["input_tokens"],
            "padded_tokens": state["padded_tokens"],
            "padding_share": 1 - state["input_tokens"] / max(state["padded_tokens"], 1),
            "tokens_per_s": state["input_tokens"] / secs, "trained_tokens_per_s": state["trained_tokens"] / secs,
            "train_seconds": state["train_seconds"], "wall_seconds": time.perf_counter() - t_start,
            "peak_memory_gb": peak, "peak_memory_kind": kind, "oom_backoffs": state["oom_backoffs"],
            "final_micro_batch": state["micro"], "world_size": d.world, "device": str(device),
            "resumed_from_step": resumed_from}


# --------------------------------------------------------------------------- outputs
def write_metrics(out_dir, metrics: dict) -> None:
    write_json_atomic(Path(out_dir) / "metrics.json", metrics)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train_l = [r["loss"] for r in metrics["train"]]
    val_l = [r["loss"] for r in metrics["val"]]
    if train_l:
        ax.plot([r["step"] for r in metrics["train"]], train_l, label="train", lw=1)
    if val_l:
        ax.plot([r["step"] for r in metrics["val"]], val_l, "o-", label="validation")
        last = metrics["val"][-1]
        ax.annotate(f"{last['loss']:.3f}", (last["step"], last["loss"]), textcoords="offset points", xytext=(4, 6),
                    fontsize=8)
    # The first steps' losses can be many times the rest: scale to what follows them so the descent is visible.
    settled = train_l[len(train_l) // 10:] + val_l
    if settled:
        lo, hi = min(settled), max(settled)
        pad = max(0.05 * (hi - lo), 0.01)
        ax.set_ylim(lo - pad, hi + pad * 3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.set_title("QLoRA training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(out_dir) / ".loss.png.tmp"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, Path(out_dir) / "loss.png")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return out


def _run_config(args, tokenizer, report, n_train, n_val, precision_note, world, prompts: list[dict]) -> dict:
    return {"base_model": args.model, "system_prompt": prompts[0]["prompt"], "system_prompts": prompts,
            "args": vars(args), "versions": _versions(),
            "data_sha256": sha256_file(args.jsonl), "n_train": n_train, "n_val": n_val,
            "dropped_too_long": report["dropped_too_long"], "trimmed_earlier_turns": report["trimmed_earlier_turns"],
            "chat_template": tokenizer.chat_template, "precision": precision_note, "world_size": world}


def _check_out_dir(out: Path, args) -> None:
    finished = (out / "adapter_model.safetensors").exists()
    if finished and not args.overwrite:
        raise InputError(f"{out} holds a finished run; pass --overwrite to replace it or choose another --out")
    if not finished and checkpoints(out) and not (args.resume or args.overwrite):
        raise InputError(f"{out} holds an unfinished run (checkpoints/{checkpoints(out)[-1].name}); "
                         "pass --resume to continue it or --overwrite to start over")


def _clear_out_dir(out: Path) -> None:
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def _save_final(model, tokenizer, out: Path, metrics: dict, run_config: dict, keep_checkpoints: bool) -> None:
    tokenizer.save_pretrained(out)
    write_json_atomic(out / "run_config.json", run_config)
    write_metrics(out, metrics)
    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "adapter_model.safetensors"):  # weights last: done marker
        os.replace(f, out / f.name)
    tmp.rmdir()
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)


# --------------------------------------------------------------------------- main
def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    validate_args(args)
    out = Path(args.out)
    if not args.inspect:
        _check_out_dir(out, args)
    _init_distributed()
    d = _Dist()
    from transformers import set_seed

    set_seed(args.seed)  # before anything random is built: LoRA init is reproducible

    chats = load_chats(args.jsonl, args.system_prompt)
    tokenizer = load_tokenizer(args)
    samples, report = build_samples(tokenizer, chats, args.max_seq_len, args.jsonl)
    if args.inspect:
        if d.main:
            print_inspect(tokenizer, samples, report, args)
        return 0
    # Without a questions file beside the data (the seed's workflow: own data, no generate_qa.py), the
    # held-out samples are the evaluation set: hold out at least the seed's 10 questions.
    own_questions = eval_questions_path(args.jsonl).is_file()
    train_s, val_s = split_train_val(samples, args.val_fraction, args.seed, min_val=0 if own_questions else 10)
    device = _device()
    dtype, precision = resolve_precision(args, device)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") or \
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        _log("note: this script does data parallel (one 4-bit copy per GPU); the FSDP/DeepSpeed settings of "
             "your accelerate config are ignored", d)
    _log(f"{args.jsonl}: {len(samples)} samples from {report['n_records']} records -> {len(train_s)} train, "
         f"{len(val_s)} validation; {report['dropped_too_long']} dropped as longer than --max_seq_len="
         f"{args.max_seq_len}" + (f" (lines {report['dropped_lines']}, longest {report['longest_dropped']} tokens)"
                                  if report["dropped_too_long"] else "")
         + f"; {report['trimmed_earlier_turns']} lost earlier turns to fit", d)
    _log("flags: " + " ".join(f"--{k} {v}" for k, v in vars(args).items()), d)
    _log(f"model {args.model} in 4-bit NF4, {precision}, device {device}, {d.world} process(es)", d)
    prompts = system_prompts(samples)
    run_config = _run_config(args, tokenizer, report, len(train_s), len(val_s), precision, d.world, prompts)
    if len(prompts) > 1:
        _log(f"note: the data uses {len(prompts)} different system prompts; evaluation defaults to the most "
             f"frequent ({prompts[0]['count']} of {len(samples)} samples)", d)
    if d.main:
        if args.overwrite:
            _clear_out_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "run_config.json", run_config)
        if val_s:
            write_jsonl_atomic(out / HELDOUT_QUESTIONS_FILE, heldout_questions(val_s))
    d.barrier()

    model = load_model(args)
    metrics = train(model, tokenizer, train_s, val_s, args, out_dir=out)
    if d.main:
        _save_final(model, tokenizer, out, metrics, run_config, args.keep_checkpoints)
        val = f", validation loss {metrics['final_val_loss']:.4f}" if metrics["final_val_loss"] is not None else ""
        print(f"done: {metrics['steps']} steps, train loss {metrics['final_train_loss']:.4f}{val}, "
              f"{metrics['tokens_per_s']:,.0f} tok/s, peak memory {metrics['peak_memory_gb']:.2f} GB "
              f"({metrics['peak_memory_kind']}); adapter in {out}")
    d.barrier()
    return 0


def main(argv=None) -> int:
    try:
        return _main(argv)
    except InputError as e:
        if _Dist().main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        if _Dist().main:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
