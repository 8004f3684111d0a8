"""QLoRA fine-tuning on the chat JSONL that generate_qa.py writes: correct labels, resumable, one GPU or many.

Run as:
    python train_qlora_hf.py --jsonl ./data/synthetic_qa.jsonl --model HuggingFaceH4/zephyr-7b-beta \\
        --out ./models/zephyr-7b-qlora --epochs 2 --batch 8 --grad_accum 2 --lr 2e-4 --bf16 --max_seq_len 4096
    python train_qlora_hf.py --jsonl ./data/synthetic_qa.jsonl --inspect      # what is trained on; no weights
    python train_qlora_hf.py ... --resume                  # continue an interrupted run from its last checkpoint
    torchrun --nproc_per_node 4 train_qlora_hf.py ...      # data parallel (one 4-bit copy per GPU) when it pays
    accelerate launch --num_processes 4 train_qlora_hf.py ...
    python train_qlora_hf.py ... --gpu_mem_budget 20      # spend at most 20 GB on speed (default: auto, what is free)
    python train_qlora_hf.py ... --lora_dropout 0.05 --kbit_upcast --no-packing --no-fused_lora --liger off
                                                           # the seed recipe (slow path), e.g. to compare
    pip install -r requirements-gpu.txt                    # optional: Liger's fused cross-entropy on CUDA

What it does: base model in 4-bit NF4 with double quantisation, bf16 compute (TF32 on where the GPU has it),
LoRA on every linear layer. Each record's `messages` (or `text`, in Zephyr's form or the seed's flat form) is
rendered with the model's own chat template and the loss covers only assistant tokens, each turn's closing
`</s>` included. Writes a PEFT adapter, the tokenizer, run_config.json, metrics.json and loss.png to --out;
checkpoints/ while training.

The training loop is plain PyTorch, not HF Trainer: OOM back-off (halve the micro-batch, double the
accumulation, redo the same step), exact resume and the data-parallel gradient exchange need control over
each step. Every optimizer step is a fixed set of samples (from --seed and the epoch), its loss is
normalised by the trained tokens of the whole step, and its dropout RNG is seeded from (seed, step, rank):
so a step gives the same update whatever the micro-batch size, whether it is retried after an OOM, and
whether the run was resumed.

Speed, each piece behind a flag (the machinery is in paperqa_tune/, measurements in bench/README.md): no fp32
upcast of the frozen base (--kbit_upcast), packed micro-batches (--packing), the 4-bit base and its LoRA as one
autograd node (--fused_lora), one flat optimizer buffer (--flat_optim), fused RMSNorm (--fused_norm), Liger
(--liger), and --gpu_mem_budget to spend GPU memory on less checkpointing.

Safety: one run per --out (a lock beside it); --overwrite replaces the old run only once the new one is saved
(--resume continues a cut-short one); --resume refuses flags that change the run (named old -> new) and unreadable
checkpoint files (exit 2); a full disk is exit 1 naming the file; records whose text holds a role marker or special
token are refused (exit 2, file:line); model code never runs without --trust_remote_code. inf/nan float flags are
exit 2; a non-finite loss, gradient norm or LoRA weight stops the run (exit 1) with the last good checkpoint kept and
no adapter saved. metrics.json's "finished": true is written last: readers refuse a folder without it.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from common import (HELDOUT_QUESTIONS_FILE, HelpFormatter, InputError, RunFailure, eval_questions_path, finite_float,
                    run_main, sha256_file, write_json_atomic, write_jsonl_atomic)
from paperqa_tune.train.chats import build_samples, load_chats, print_inspect
from paperqa_tune.checkpoints import (Trainables, check_checkpoint, fingerprint, last_checkpoint, load_checkpoint,
                                      resume_flags, save_checkpoint)
from paperqa_tune.distributed import (Dist, all_reduce_grads, default_device, init_distributed, launched_rank,
                                      settle_data_parallel, shutdown_distributed, tokens_per_rank_step)
from paperqa_tune.train.kernels import LIGER_AUTO, parse_liger
from paperqa_tune.loading import load_tokenizer, requested_precision, resolve_precision
from paperqa_tune.train.memory import BudgetSettings, frozen_gc, parse_mem_budget, plan_for_budget
from paperqa_tune.train.optim import OPTIMIZERS, FlatParams, make_optimizer, zero_grads
from paperqa_tune.train.packing import IGNORE, collate, collate_packed
from paperqa_tune.train.qlora import LoRASettings, SpeedSettings, TrainableModel, build_qlora_model, check_model_code
from paperqa_tune.runs import (RESUME_HINT, STAGE_DIR, RunLock, chat_format_record, chat_template_source,
                               memorisation_warning,
                               check_finite_weights, check_out_dir, commit_staged, discard_failed_stage, disk_errors,
                               finish_commit, heldout_questions, out_dir_problems, run_metrics,
                               same_command_unfinished, save_outputs, system_prompts, versions, write_metrics)
from paperqa_tune.safety import chat_structure
from paperqa_tune.train.samples import epoch_plan, padding_share
from paperqa_tune.train.split import TrainingData, split_train_val
from paperqa_tune.train.state import Saving, Schedule, StepStats, TrainState

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
              "inverse_sqrt")


# --------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    io = p.add_argument_group("data and output")
    io.add_argument("--jsonl", default="./data/synthetic_qa.jsonl",
                    help="training chats, one JSON object a line; a record whose text holds a role marker or special "
                         "token is refused (exit 2)")
    io.add_argument("--model", default="HuggingFaceH4/zephyr-7b-beta", help="base model: hub id or local folder")
    io.add_argument("--out", default="./models/zephyr-7b-qlora", help="run folder for adapter, metrics, checkpoints")
    io.add_argument("--max_seq_len", type=int, default=4096,
                    help="longest sample in tokens; longer chats lose whole earlier turns or are dropped, never cut")
    io.add_argument("--val_fraction", type=finite_float, default=0.05,
                    help="share of samples held out for validation loss, split by paper when meta.paper_id exists")
    io.add_argument("--system_prompt", default=None,
                    help="system prompt to add to records that have none (default: the project's own research-"
                         "assistant prompt, so no template's built-in default stands in; run_config.json records it)")
    io.add_argument("--inspect", type=int, nargs="?", const=3, default=0, metavar="N",
                    help="print N rendered samples (3 if N is omitted) with trained tokens marked, token counts "
                         "and a length histogram, then exit without loading weights")
    io.add_argument("--overwrite", action="store_true",
                    help=f"replace the run in --out (finished or not): trains in --out/{STAGE_DIR}, swapped in once "
                         "saved")
    io.add_argument("--resume", action="store_true",
                    help="continue the unfinished run (or cut-short --overwrite) in --out from its latest checkpoint")
    io.add_argument("--save_steps", type=int, default=50, help="checkpoint every N optimizer steps")
    io.add_argument("--save_total_limit", type=int, default=2, help="checkpoints kept while training")
    io.add_argument("--keep_checkpoints", action="store_true", help="keep checkpoints/ after the run finishes")
    io.add_argument("--eval_steps", type=int, default=None,
                    help="validation loss every N steps (default: a tenth of the run, at most --save_steps)")
    io.add_argument("--logging_steps", type=int, default=10, help="log a line every N steps")
    io.add_argument("--seed", type=int, default=42, help="seed for the split, data order, LoRA init and dropout")

    tr = p.add_argument_group("optimisation")
    tr.add_argument("--epochs", type=int, default=2, help="passes over the training samples")
    tr.add_argument("--max_steps", type=int, default=None, help="stop after N optimizer steps (overrides --epochs)")
    tr.add_argument("--batch", type=int, default=8, help="micro-batch per GPU/process")
    tr.add_argument("--grad_accum", type=int, default=2,
                    help="micro-batches per optimizer step; effective batch = batch x grad_accum x processes")
    tr.add_argument("--lr", type=finite_float, default=2e-4, help="peak learning rate")
    tr.add_argument("--lr_scheduler", choices=SCHEDULERS, default="cosine", help="learning-rate schedule")
    tr.add_argument("--warmup_ratio", type=finite_float, default=0.03, help="share of steps spent warming up")
    tr.add_argument("--weight_decay", type=finite_float, default=0.0, help="AdamW weight decay")
    tr.add_argument("--max_grad_norm", type=finite_float, default=1.0, help="gradient clipping; 0 turns it off")
    tr.add_argument("--optim", choices=OPTIMIZERS, default="paged_adamw_8bit", help="optimizer")
    tr.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 compute (the default; falls back to fp16 on GPUs without bf16); --no-bf16 = fp32")
    tr.add_argument("--fp16", action="store_true", help="fp16 compute with loss scaling (V100, T4)")

    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora_r", type=int, default=16, help="adapter rank")
    lo.add_argument("--lora_alpha", type=finite_float, default=32, help="adapter scale numerator")
    lo.add_argument("--lora_dropout", type=finite_float, default=0.0,
                    help="dropout on the adapter input; 0 is ~10%% faster, pass 0.05 for the seed recipe's "
                         "regularisation")
    lo.add_argument("--target_modules", default="all-linear",
                    help="'all-linear' or comma-separated module names, e.g. q_proj,v_proj")

    sp = p.add_argument_group("speed and memory")
    sp.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="recompute activations in backward to save memory")
    sp.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=True,
                    help="micro-batches of neighbours in length (less padding), steps in random order")
    sp.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                    help="shuffle the data every epoch; --no-shuffle keeps file order (benchmarks)")
    sp.add_argument("--attn_implementation", default="sdpa",
                    help="attention kernel (sdpa, eager, flash_attention_2); --packing replaces it in training")
    sp.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                    help="each micro-batch as one row without padding, attention per sample (flash varlen on "
                         "CUDA, one SDPA call per sample elsewhere)")
    sp.add_argument("--fused_lora", action=argparse.BooleanOptionalAction, default=True,
                    help="4-bit base + LoRA of each layer as one autograd node (same math as PEFT's)")
    sp.add_argument("--lora_fp32_sum", action=argparse.BooleanOptionalAction, default=True,
                    help="fused LoRA: the base GEMM accumulates onto the LoRA delta in fp32 and rounds once to bf16 "
                         "(small adapter updates are not rounded away, as in the fp32-upcast seed recipe; "
                         "costs nothing)")
    sp.add_argument("--dense_base", choices=("auto", "on", "off"), default="off",
                    help="fused LoRA: keep base weights dequantised, not dequantised at every layer call (same "
                         "numbers, less work; not yet measured on a GPU); auto: what fits in the budget's headroom")
    sp.add_argument("--flat_optim", action=argparse.BooleanOptionalAction, default=True,
                    help="the optimizer updates all LoRA tensors as one flat buffer (one kernel per step instead "
                         "of one per tensor; the same update)")
    sp.add_argument("--fused_norm", action=argparse.BooleanOptionalAction, default=True,
                    help="RMSNorm modules as one torch.nn.functional.rms_norm call")
    sp.add_argument("--liger", type=parse_liger, default="auto",
                    help="Liger kernels (optional: pip install -r requirements-gpu.txt): a comma list of flce (fused "
                         "linear cross-entropy: never builds the logits), rope, swiglu, rmsnorm; or all, off, or "
                         f"auto = {','.join(LIGER_AUTO)} when CUDA and liger-kernel are there")
    sp.add_argument("--kbit_upcast", action="store_true",
                    help="the seed recipe's peft.prepare_model_for_kbit_training (norms, embeddings and lm_head "
                         "in fp32, autocast); slower, more memory; turns --fused_lora/--fused_norm off")
    sp.add_argument("--gpu_mem_budget", type=parse_mem_budget, default="auto", metavar="GB|auto|off",
                    help="GPU memory to spend on speed: leave gradient checkpointing off on as many of the last "
                         "layers as fit (or keep checkpoints in host memory if even full checkpointing does not "
                         "fit), and with --merge_micro_batches run larger micro-batches; auto = what the GPU has "
                         "free at the start less 15%%; off = checkpoint every layer, micro-batches of --batch. "
                         "The OOM back-off stays the net either way")
    sp.add_argument("--merge_micro_batches", action=argparse.BooleanOptionalAction, default=True,
                    help="with a memory budget and --packing: run an optimizer step's --batch x --grad_accum samples "
                         "as one packed micro-batch when that needs no more checkpointing than --batch does (the "
                         "same update: each step's loss is already divided by its trained tokens)")
    sp.add_argument("--data_parallel", choices=("auto", "on", "off"), default="auto",
                    help="under torchrun / accelerate launch: on = every process trains its share of each step; "
                         "off = rank 0 trains alone on one GPU, the other processes exit; auto = on only when a step "
                         "gives each process enough tokens to pay for the exchange (README: Several GPUs)")
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
    if isinstance(args.gpu_mem_budget, float) and not args.gpu_mem_budget > 0:
        bad.append("--gpu_mem_budget must be > 0 (GB), auto or off")
    if args.inspect < 0:
        bad.append("--inspect N needs N >= 1")
    if args.system_prompt and chat_structure(args.system_prompt):
        bad.append(f"--system_prompt holds {chat_structure(args.system_prompt)!r}: it would render as chat structure")
    jsonl = Path(args.jsonl)
    if not jsonl.is_file():
        bad.append(f"--jsonl {jsonl}: " + ("a folder; give the JSONL file" if jsonl.is_dir() else "file not found"))
    elif not os.access(jsonl, os.R_OK):
        bad.append(f"--jsonl {jsonl}: cannot read it; fix its permissions")
    bad += out_dir_problems(Path(args.out))
    if bad:
        raise InputError("; ".join(bad))


# --------------------------------------------------------------------------- data: chats -> samples -> split
def load_data(args, d: Dist) -> tuple[object, TrainingData]:
    """(tokenizer, data): the chats rendered with the model's chat template, labels on assistant tokens only, split
    into train and validation (no split for --inspect)."""
    chats = load_chats(args.jsonl, args.system_prompt)
    for note in check_model_code(args.model, args.trust_remote_code):
        log(f"note: {note}", d)
    tokenizer = load_tokenizer(args.model, "right", args.trust_remote_code)
    template_source = chat_template_source(tokenizer)
    if template_source != "model":
        log(f"note: {args.model} has no chat template; training renders the chats with the project's default "
            "(Zephyr's), saved with the run (run_config.json chat_template_source), so evaluation and inference "
            "use it too", d)
    samples, report = build_samples(tokenizer, chats, args.max_seq_len, args.jsonl)
    if args.inspect:
        return tokenizer, TrainingData(samples, report, samples, [], template_source)
    # Without a questions file beside the data (the seed's workflow: own data, no generate_qa.py), the
    # held-out samples are the evaluation set: hold out at least the seed's 10 questions.
    own_questions = eval_questions_path(args.jsonl).is_file()
    train_s, val_s = split_train_val(samples, args.val_fraction, args.seed, min_val=0 if own_questions else 10)
    log(f"{args.jsonl}: {len(samples)} samples from {report['n_records']} records -> {len(train_s)} train, "
        f"{len(val_s)} validation; {report['dropped_too_long']} dropped as longer than --max_seq_len="
        f"{args.max_seq_len}" + (f" (lines {report['dropped_lines']}, longest {report['longest_dropped']} tokens)"
                                 if report["dropped_too_long"] else "")
        + f"; {report['trimmed_earlier_turns']} lost earlier turns to fit", d)
    return tokenizer, TrainingData(samples, report, train_s, val_s, template_source)


# --------------------------------------------------------------------------- plan: data order and schedule
def schedule(args, n_train: int, world: int) -> Schedule:
    per_step = args.batch * args.grad_accum * world
    steps_per_epoch = math.ceil(n_train / per_step)
    total = args.max_steps or steps_per_epoch * args.epochs
    # ~10 validation points per run by default, so short runs get a curve too (never rarer than checkpoints)
    return Schedule(per_step, steps_per_epoch, total, args.eval_steps or min(args.save_steps, max(1, total // 10)))


def print_padding(lengths: list[int], args) -> None:
    """--inspect's last line: the padding micro-batches of --batch cost, length-grouped and not."""
    per_step = args.batch * args.grad_accum
    grouped, plain = (padding_share(epoch_plan(lengths, per_step, args.seed, 0, g, True), lengths, args.batch)
                      for g in (True, False))
    print(f"padding with --batch {args.batch} --grad_accum {args.grad_accum}: {grouped:.1%} length-grouped, "
          f"{plain:.1%} without")


def plan_run(args, tokenizer, data: TrainingData, device, work: Path) -> tuple[dict, dict]:
    """(run_config.json's content, the flags each checkpoint records), logged; nothing is written. A --resume
    checkpoint is checked against the flags here, before minutes of model loading."""
    d = Dist()
    _, precision = resolve_precision(args.bf16, args.fp16, device)
    if any(os.environ.get(f"ACCELERATE_USE_{k}", "").lower() in ("1", "true") for k in ("FSDP", "DEEPSPEED")):
        log("note: this script does data parallel (one 4-bit copy per GPU); the FSDP/DeepSpeed settings of "
            "your accelerate config are ignored", d)
    log("flags: " + " ".join(f"--{k} {v}" for k, v in vars(args).items()), d)
    log(f"model {args.model} in 4-bit NF4, {precision}, device {device}, {d.world} process(es)", d)
    config = run_config(args, tokenizer, data, precision, d.world)
    prompts = config["system_prompts"]
    if len(prompts) > 1:
        log(f"note: the data uses {len(prompts)} different system prompts; evaluation defaults to the most "
            f"frequent ({prompts[0]['count']} of {len(data.samples)} samples)", d)
    flags = resume_flags(vars(args), requested_precision(args.bf16, args.fp16), config["data_sha256"],
                         args.batch * args.grad_accum * d.world)
    latest = last_checkpoint(work) if args.resume else None
    for note in check_checkpoint(latest, flags) if latest else []:
        log(f"note: {note}", d)
    return config, flags


# --------------------------------------------------------------------------- model
def load_model(args, device=None) -> TrainableModel:
    """The 4-bit base + LoRA model exactly as training uses it (NF4, double quant, LoRA), with the speed flags."""
    device = device or default_device()
    dtype, _ = resolve_precision(args.bf16, args.fp16, device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls (LoRA, lm_head) on Ampere+
    lora = LoRASettings(args.lora_r, args.lora_alpha, args.lora_dropout, args.target_modules, init_seed=args.seed)
    speed = SpeedSettings(args.gradient_checkpointing, args.kbit_upcast, args.packing, args.fused_lora,
                          args.lora_fp32_sum, args.fused_norm, args.liger, args.attn_implementation)
    tm = build_qlora_model(args.model, device, dtype, lora, speed, args.trust_remote_code)
    log(tm.description, Dist())
    return tm


def load_model_and_tokenizer(args) -> tuple[TrainableModel, object]:
    return load_model(args), load_tokenizer(args.model, "right", args.trust_remote_code)


# --------------------------------------------------------------------------- the loss of one micro-batch
def micro_loss(model, batch: dict, n_items, amp) -> torch.Tensor:
    """Sum of token losses of one micro-batch divided by n_items (the trained tokens of the whole step), so
    a step's gradient does not depend on how its samples are split into micro-batches."""
    packed = {k: batch[k] for k in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
              if k in batch}
    with amp:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    num_items_in_batch=n_items, use_cache=False, **packed)
    return out.loss


def n_trained(sample: dict) -> int:
    return sum(1 for l in sample["labels"][1:] if l != IGNORE)  # position 0 is never predicted


# --------------------------------------------------------------------------- training loop
class Loop:
    """What every step of one run shares: the model, optimizer, schedule, precision and processes."""

    def __init__(self, tm: TrainableModel, tokenizer, args, total: int):
        from transformers import get_scheduler

        self.tm, self.model, self.args, self.d = tm, tm.model, args, Dist()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.dtype, _ = resolve_precision(args.bf16, args.fp16, self.device)
        # Autocast only for the seed's fp32-upcast model (--kbit_upcast); otherwise the model already computes in
        # `dtype` and autocast would only add casts.
        self.upcast = args.kbit_upcast
        self.amp = torch.autocast(self.device.type, dtype=self.dtype) \
            if self.upcast and self.dtype != torch.float32 else contextlib.nullcontext()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.d.broadcast_(p.data for p in self.params)  # identical start on every process
        self.flat = FlatParams(self.params) if args.flat_optim else None
        self.optimizer = make_optimizer(self.flat.optimizer_params() if self.flat else self.params, args.optim,
                                        args.lr, args.weight_decay)
        self.scheduler = get_scheduler(args.lr_scheduler, self.optimizer, num_training_steps=total,
                                       num_warmup_steps=math.ceil(args.warmup_ratio * total))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None

    def collate(self, samples: list[dict]) -> dict:
        return collate_packed(samples, self.device) if self.tm.packed else collate(samples, self.pad_id, self.device)

    def refresh_compute_copies(self) -> None:
        """After an update: the fused LoRA layers use one cast of the flat buffer instead of casting per call."""
        if self.flat is not None and self.tm.fused is not None and not self.upcast:
            self.tm.fused.use_compute_copies(self.flat.compute_copies(self.dtype), self.dtype)

    @property
    def parts(self) -> Trainables:
        """What a checkpoint saves besides the loop state."""
        return Trainables(self.model, self.optimizer, self.scheduler, self.scaler)


def log(msg: str, d: Dist, bar=None) -> None:
    if d.main:
        (bar.write if bar is not None else print)(msg)
        sys.stdout.flush()


def plan_memory(loop: Loop, lengths: list[int], sched: Schedule) -> tuple[dict | None, int]:
    """--gpu_mem_budget: the micro-batch, and which layers skip checkpointing (or offload the checkpoints), logged.
    Returns (plan or None, micro-batch in samples)."""
    args = loop.args
    if args.gpu_mem_budget is None or loop.device.type != "cuda":
        if isinstance(args.gpu_mem_budget, float):
            log(f"--gpu_mem_budget {args.gpu_mem_budget}: ignored on {loop.device.type} (it plans GPU memory)",
                loop.d)
        keep_dense(loop, None)
        return None, args.batch
    epochs = min(math.ceil(sched.total / sched.steps_per_epoch), 64)  # the plans repeat their length mix; bound it
    plans = [s for e in range(epochs) for s in epoch_plan(lengths, sched.per_step, args.seed, e, args.group_by_length,
                                                           args.shuffle)]
    whole_step = math.ceil(sched.per_step / loop.d.world)  # one packed row per step, with --merge_micro_batches
    settings = BudgetSettings(args.gpu_mem_budget, args.optim, 0.0 if loop.tm.fused is not None else args.lora_dropout,
                              loop.tm.packed, loop.d.rank, loop.d.world)
    plan, micro, line = plan_for_budget(loop.model, loop.device, settings, plans, lengths,
                                        [whole_step, args.batch] if args.merge_micro_batches else [args.batch])
    log(line, loop.d)
    keep_dense(loop, plan)
    return plan, micro


def keep_dense(loop: Loop, plan: dict | None) -> None:
    """--dense_base (FusedLoRA.keep_dense_for says what it keeps)."""
    if loop.tm.fused is not None and (line := loop.tm.fused.keep_dense_for(loop.args.dense_base, plan)):
        log(line, loop.d)


def validation_loss(loop: Loop, samples: list[dict], micro: int) -> float:
    d = loop.d
    mine = sorted(samples[d.rank::d.world], key=lambda s: -len(s["input_ids"]))
    total = torch.zeros(2, dtype=torch.float64, device=loop.device)
    loop.model.eval()
    with torch.no_grad():
        for k in range(0, len(mine), micro):
            total[0] += micro_loss(loop.model, loop.collate(mine[k:k + micro]), 1, loop.amp).double()
            total[1] += sum(n_trained(s) for s in mine[k:k + micro])
    loop.model.train()
    d.all_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


def forward_backward(loop: Loop, state: TrainState, step: int, mine: list[dict], n_items: int, longest: int, bar):
    """Gradients of one optimizer step's samples (this process's share) in micro-batches of state.micro.
    On out-of-memory anywhere: halve the micro-batch (same effective batch) and redo the step. Returns
    [loss, input tokens, padded tokens] summed over processes."""
    args, d = loop.args, loop.d
    while True:
        torch.manual_seed((args.seed * 1_000_003 + step) * 1009 + d.rank)  # dropout: same on a retry or resume
        stats = torch.zeros(4, dtype=torch.float64, device=loop.device)  # oom, loss, tokens, padded tokens
        try:
            for j in range(0, len(mine), state.micro):
                batch = loop.collate(mine[j:j + state.micro])
                loss = micro_loss(loop.model, batch, n_items, loop.amp)
                (loop.scaler.scale(loss) if loop.scaler else loss).backward()
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
            return stats[1:].tolist()  # one host sync for the three counters
        zero_grads(loop.optimizer, loop.params)
        gc.collect()
        if loop.device.type == "cuda":
            torch.cuda.empty_cache()
        if state.micro == 1:
            raise RunFailure(f"out of memory at step {step + 1} even with micro-batch 1: the longest sample in this "
                             f"step has {longest} tokens; lower --max_seq_len, or keep --gradient_checkpointing on")
        old, new = state.micro, state.halve_micro(step + 1)
        log(f"out of memory at step {step + 1} with micro-batch {old}: retrying with micro-batch "
            f"{new} x {math.ceil(args.batch * args.grad_accum / new)} accumulation (same effective batch)", d, bar)


def _nonfinite_hint(args, out_dir) -> str:
    """What to do after a non-finite loss or gradient: nothing of the step was applied or saved."""
    return (f"Last good checkpoint: {last_checkpoint(out_dir) or 'none'}. Rerun with --resume to retry from it "
            f"(same flags), or start over with a lower --lr (now {args.lr}) and --overwrite; use --bf16 instead of "
            "--fp16, or check the data")


def update(loop: Loop, step: int, loss_value: float, out_dir) -> tuple[float, float]:
    """Exchange gradients, clip, step the optimizer and schedule; stop before a non-finite update.
    Returns (learning rate used, gradient norm)."""
    args = loop.args
    if not math.isfinite(loss_value):
        raise RunFailure(f"loss is {loss_value} at step {step + 1}; stopped before the update. "
                         + _nonfinite_hint(args, out_dir))
    all_reduce_grads(loop.params, loop.d)
    if loop.flat is not None:  # from here on the optimizer's own parameters carry the gradients
        loop.flat.gather_grads()
    if loop.scaler:
        loop.scaler.unscale_(loop.optimizer)
    clip = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(loop.flat.optimizer_params() if loop.flat else loop.params, clip).item()
    if loop.scaler is None and not math.isfinite(norm):  # fp16's scaler skips such steps itself
        raise RunFailure(f"gradient norm is {norm} at step {step + 1}; stopped before the update. "
                         + _nonfinite_hint(args, out_dir))
    lr = loop.scheduler.get_last_lr()[0]
    if loop.scaler:
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
    else:
        loop.optimizer.step()
    loop.scheduler.step()
    zero_grads(loop.optimizer, loop.params)
    loop.refresh_compute_copies()
    return lr, norm



def resume(loop: Loop, out_dir, fp: dict, total: int, micro: int) -> tuple[TrainState, int | None]:
    """(state, step resumed from) from the run's latest checkpoint when --resume asks for it. micro: the micro-batch
    planned for this run (--batch, or more with --merge_micro_batches)."""
    state = TrainState(micro)
    if out_dir is None or not loop.args.resume:
        return state, None
    latest = last_checkpoint(out_dir)
    if latest is None:
        log(f"--resume: no checkpoint in {Path(out_dir) / 'checkpoints'}; starting from step 0", loop.d)
        return state, None
    state = load_checkpoint(latest, loop.parts, fp, loop.device)
    state.micro = min(state.micro, micro)  # a lower --batch on resume takes effect (same updates)
    log(f"resumed from {latest} (step {state.step}/{total}, micro-batch {state.micro})", loop.d)
    return state, state.step


def train(tm: TrainableModel, tokenizer, train_samples, val_samples, args, out_dir=None, on_step=None,
          flags: dict | None = None) -> dict:
    """Train the LoRA parameters of `tm.model` on pre-tokenized samples; return metrics.

    samples: [{"input_ids": [...], "labels": [...]}], labels -100 where not trained. on_step(step, loss,
    n_trained_tokens, n_input_tokens) runs after each optimizer step (tokens of the whole step, all
    processes). out_dir None: no checkpoints and no files (benchmarks). flags: the run's resume_flags, kept in
    each checkpoint for --resume to compare.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    if not train_samples:
        raise InputError("no training samples")
    sched = schedule(args, len(train_samples), Dist().world)
    lengths = [len(s["input_ids"]) for s in train_samples]
    trained = [n_trained(s) for s in train_samples]
    loop = Loop(tm, tokenizer, args, sched.total)
    d = loop.d
    if loop.flat is not None and loop.flat.param is not None:
        log(f"optimizer: {args.optim}, {len(loop.flat.flat_members)} LoRA tensors as one flat buffer"
            f"{f' + {len(loop.flat.separate)} small ones separately' if loop.flat.separate else ''}", d)
    _, micro = plan_memory(loop, lengths, sched)
    fp = fingerprint(train_samples, sched.per_step, sched.total, args.seed, args.group_by_length, args.shuffle,
                     f"{args.optim}{' flat' if args.flat_optim else ''}")
    state, resumed_from = resume(loop, out_dir, fp, sched.total, micro)
    saving = Saving(out_dir, fp, flags, resumed_from, t_start)
    loop.refresh_compute_copies()
    if loop.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loop.device)
    log(f"training {len(train_samples)} samples ({sum(trained):,} trained tokens), {len(val_samples)} validation; "
        f"{sched.total} steps of {sched.per_step} samples ({args.batch} x {args.grad_accum} accumulation x "
        f"{d.world} process(es)), {sched.steps_per_epoch} steps/epoch", d)
    loop.model.train()
    bar = tqdm(total=sched.total, initial=state.step, disable=None if d.main else True, dynamic_ncols=True,
               desc="train")
    plans: dict[int, list] = {}
    with frozen_gc():  # bar.close() and the metrics stay outside
        while state.step < sched.total:
            step = state.step
            epoch, k = divmod(step, sched.steps_per_epoch)
            if epoch not in plans:
                plans = {epoch: epoch_plan(lengths, sched.per_step, args.seed, epoch, args.group_by_length,
                                           args.shuffle)}
            ids = sorted(plans[epoch][k], key=lambda i: -lengths[i])
            mine = [train_samples[i] for i in ids[d.rank::d.world]]  # round robin: ranks get similar lengths
            n_tr = sum(trained[i] for i in ids)  # the step's trained tokens: every micro-batch's loss divides by it
            t0 = time.perf_counter()
            loss, n_in, n_pad = forward_backward(loop, state, step, mine, max(1, n_tr), lengths[ids[0]], bar)
            lr, norm = update(loop, step, loss, out_dir)
            state.record(StepStats(loss, lr, norm, n_tr, int(n_in), int(n_pad), time.perf_counter() - t0),
                         sched.steps_per_epoch)
            if on_step is not None:
                on_step(step + 1, loss, n_tr, int(n_in))
            after_step(loop, state, sched, val_samples, saving, bar)
    bar.close()
    return loop_metrics(loop, state, saving, finished=True)


def after_step(loop: Loop, state: TrainState, sched: Schedule, val_samples, saving: Saving, bar) -> None:
    """Progress, the log line, validation loss and checkpoints after an optimizer step."""
    args, d, row, step = loop.args, loop.d, state.train[-1], state.step
    bar.update(1)
    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}", micro=state.micro)
    if step % args.logging_steps == 0:
        log(f"step {step}/{sched.total} | epoch {step / sched.steps_per_epoch:.2f} | loss {row['loss']:.4f} | "
            f"lr {row['lr']:.2e} | {row['tokens_per_s']:,.0f} tok/s | micro-batch {state.micro}", d, bar)
    done = step == sched.total
    if val_samples and (step % sched.eval_every == 0 or done):
        vl = validation_loss(loop, val_samples, state.micro)
        state.val.append({"step": step, "loss": vl})
        log(f"step {step}: validation loss {vl:.4f}", d, bar)
    if saving.out_dir is not None and step % args.save_steps == 0 and not done:
        # a finite loss and gradient can still give inf/nan weights (a huge --lr): never checkpoint those
        check_finite_weights(loop.model, f"after the update of step {step}", last_checkpoint(saving.out_dir))
        if d.main:
            with disk_errors(Path(saving.out_dir) / "checkpoints" / f"step-{step}", RESUME_HINT):
                save_checkpoint(saving.out_dir, loop.parts, state, saving.fingerprint, args.save_total_limit,
                                saving.flags)
            write_metrics(saving.out_dir, loop_metrics(loop, state, saving, finished=False))
        d.barrier()


# --------------------------------------------------------------------------- outputs
def loop_metrics(loop: Loop, state: TrainState, saving: Saving, finished: bool) -> dict:
    """metrics.json's content; "finished": true only for the run's last write."""
    return run_metrics(state.state_dict(), saving.t_start, loop.device, loop.d.world, saving.resumed_from, finished)


def run_config(args, tokenizer, data: TrainingData, precision_note: str, world: int) -> dict:
    prompts = system_prompts(data.samples)
    return {"base_model": args.model, "system_prompt": prompts[0]["prompt"], "system_prompts": prompts,
            "args": vars(args), "versions": versions(),
            "data_sha256": sha256_file(args.jsonl), "n_train": len(data.train), "n_val": len(data.val),
            "dropped_too_long": data.report["dropped_too_long"],
            "trimmed_earlier_turns": data.report["trimmed_earlier_turns"],
            **chat_format_record(tokenizer), "chat_template_source": data.template_source,
            "precision": precision_note, "world_size": world}


def start_run_folder(args, out: Path, work: Path, config: dict, val_samples: list[dict]) -> None:
    """run_config.json and the held-out questions, once the model has loaded (a failed load replaces nothing)."""
    if Dist().main:
        if args.overwrite and work != out:
            shutil.rmtree(work, ignore_errors=True)  # an earlier --overwrite attempt's leftovers
        with disk_errors(work / "run_config.json", "rerun"):
            work.mkdir(parents=True, exist_ok=True)
            write_json_atomic(work / "run_config.json", config)
            if val_samples:
                write_jsonl_atomic(work / HELDOUT_QUESTIONS_FILE, heldout_questions(val_samples))
    Dist().barrier()


# --------------------------------------------------------------------------- main
def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    validate_args(args)
    out, first = Path(args.out), launched_rank() == 0
    if args.inspect:
        return _run(args, out, None)
    init_distributed()
    with RunLock(out) if first else contextlib.nullcontext():  # one writer per run folder
        swapped = first and finish_commit(out)
        if swapped:
            print(f"finished replacing the run in {out} (an --overwrite that a kill cut short)")
        if Dist().from_main(int(swapped and args.resume)):  # every process, after rank 0 has finished the swap
            return 0  # that run was saved: only its swap was left
        if not (args.resume or args.overwrite) and (last := same_command_unfinished(out, vars(args))):
            args.resume = True  # the same command after a kill: continue, as the other scripts do
            log(f"note: {out} holds an unfinished run of this same command; continuing it from {last} (as --resume)",
                Dist())
        work = check_out_dir(out, args.overwrite, args.resume)  # out, or out/.overwrite for --overwrite
        try:
            return _run(args, out, work)
        except BaseException:
            if first:
                discard_failed_stage(out, work)
            raise


def _run(args, out: Path, work: Path | None) -> int:
    init_distributed()
    d = Dist()
    tokenizer, data = load_data(args, d)  # chats -> tokens with label masks -> train / validation
    if args.inspect:
        if d.main:
            print_inspect(tokenizer, data.samples, data.report, args.inspect, args.max_seq_len)
            print_padding([len(s["input_ids"]) for s in data.samples], args)
        return 0
    parallel = settle_data_parallel(args.data_parallel, tokens_per_rank_step(
        [len(s["input_ids"]) for s in data.train], args.batch, args.grad_accum))
    if parallel is None:
        return 0  # a launched process that sits this run out (--data_parallel): it writes nothing
    d, device = Dist(), default_device()  # rank 0 alone, when data parallel is off
    config, flags = plan_run(args, tokenizer, data, device, work)  # and a --resume checkpoint checked
    config["data_parallel"] = parallel
    tm = load_model(args, device)  # nothing is written (or replaced) before the model has loaded
    start_run_folder(args, out, work, config, data.val)
    metrics = train(tm, tokenizer, data.train, data.val, args, out_dir=work, flags=flags)
    if d.main:  # the outputs, then the swap over the run an --overwrite replaces
        save_outputs(tm.model, tokenizer, work, metrics, config, last_checkpoint(work))
        if work != out:
            with disk_errors(out, "rerun with --resume to complete the swap"):
                commit_staged(out)  # the finished run it replaces goes only now
        if not args.keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        val = f", validation loss {metrics['final_val_loss']:.4f}" if metrics["final_val_loss"] is not None else ""
        print(f"done: {metrics['steps']} steps, train loss {metrics['final_train_loss']:.4f}{val}, "
              f"{metrics['tokens_per_s']:,.0f} tok/s, peak memory {metrics['peak_memory_gb']:.2f} GB "
              f"({metrics['peak_memory_kind']}); adapter in {out}")
        if warning := memorisation_warning(metrics):
            print(warning)
    d.barrier()
    return 0


def main(argv=None) -> int:
    precision = torch.get_float32_matmul_precision()  # load_model turns TF32 on; a caller's process gets it back
    try:
        return run_main(_main, argv, interrupted="rerun with --resume (in place of --overwrite, if given) to continue "
                                                 "from the last checkpoint", show_errors=launched_rank() == 0)
    finally:
        torch.set_float32_matmul_precision(precision)
        shutdown_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
