"""Talk to a fine-tuned run: one answer, an interactive session, or a merged model for other tools.

    python quick_infer.py --prompt "What does the paper propose?"          # one answer, then exit
    python quick_infer.py --adapter models/my-run --prompt "..." --answer_with both
    python quick_infer.py                                                  # interactive, tokens streamed
    python quick_infer.py --merge_out models/zephyr-7b-merged              # dense bf16 model (transformers, vLLM)

Interactive commands: /base, /ft, /both (which model answers), /system TEXT, /help, /quit (or Ctrl-D).
The base model comes from the run folder (run_config.json), and every prompt is rendered with the
training chat template and the run's system prompt unless --system says otherwise. On a CUDA GPU with
room the 4-bit base is dequantised to bf16 first (eval_compare.py's fast path); the adapter stays
unmerged so /base and /ft switch instantly. --merge_out writes the base dequantised exactly as training
saw it, with the LoRA merged in (PEFT merge_and_unload), as a plain bf16 checkpoint plus tokenizer.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from common import DEFAULT_RUN_DIR, HelpFormatter, InputError, ensure_chat_template, run_main, write_json_atomic
from paperqa_tune.generation import Decoding, generate_batch, prompt_ids
from paperqa_tune.loading import (attach_adapter, choose_mode, dequantize_, load_run_base, merged_model,
                                  run_tokenizer)
from paperqa_tune.runs import read_run

HELP = "commands: /base  /ft  /both  /system TEXT  /help  /quit"
LABELS = {"base": "base", "ft": "fine-tuned"}


WHO = ("ft", "base", "both")


class DeprecatedAlias(argparse.Action):
    """An old flag spelling that still works, with a warning naming the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use --{self.dest}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--adapter", default=DEFAULT_RUN_DIR, help="run folder from train_qlora_hf.py")
    a("--base_model", default=None, help="base model (default: run_config.json base_model, else the adapter's)")
    a("--prompt", default=None, help="answer this question once and exit (default: interactive session)")
    a("--answer_with", choices=WHO, default="ft", help="which model answers: the fine-tuned run, the base, or both")
    a("--model", choices=WHO, dest="answer_with", action=DeprecatedAlias, default=argparse.SUPPRESS,
      help=argparse.SUPPRESS)
    a("--system", default=None,
      help="system prompt; '' for none (default: the one the run's training data used, from run_config.json)")
    a("--max_new_tokens", type=int, default=256, help="answer length limit")
    a("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    a("--top_p", type=float, default=0.9, help="nucleus sampling when --temperature > 0")
    a("--seed", type=int, default=0, help="random seed")
    a("--mode", choices=("auto", "fast", "reference"), default="auto",
      help="fast: dequantised bf16 base; reference: 4-bit; auto: fast when a CUDA GPU has room")
    a("--merge_out", default=None, help="write the merged bf16 model here and exit (default: off)")
    a("--overwrite", action="store_true", help="allow --merge_out into a non-empty folder")
    return p


def write_merged(run, tokenizer, out: Path, overwrite: bool) -> None:
    """Dequantised base + merged LoRA, saved as a plain checkpoint any transformers/vLLM loads."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} is not empty; pass --overwrite or choose another --merge_out")
    model = merged_model(run)
    model.config.use_cache = True
    model.save_pretrained(out)
    ensure_chat_template(tokenizer)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out)
    write_json_atomic(out / "merge_info.json", {"base_model": run.base_model, "adapter": str(run.adapter),
                                               "adapter_sha256": run.adapter_sha, "dtype": str(model.dtype),
                                               "how": "bnb 4-bit base dequantised (dequantize_4bit) + "
                                                      "PEFT merge_and_unload"})
    print(f"merged model written to {out}")


def answer(model, tokenizer, question: str, system: str, dec: Decoding, side: str, stream: bool = True) -> str:
    """One answer from the base (adapter disabled) or the fine-tuned model, streamed to stdout."""
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with model.disable_adapter() if side == "base" else contextlib.nullcontext():
        return generate_batch(model, tokenizer, [prompt_ids(tokenizer, question, system)], dec, streamer)[0][0]


def respond(model, tokenizer, question: str, system: str, dec: Decoding, who: str) -> dict:
    sides = ("base", "ft") if who == "both" else (who,)
    out = {}
    for side in sides:
        if len(sides) > 1:
            print(f"--- {LABELS[side]} ---", flush=True)
        out[side] = answer(model, tokenizer, question, system, dec, side)
    return out


def interactive(model, tokenizer, system: str, dec: Decoding, who: str) -> None:
    print(HELP, flush=True)
    while True:
        try:
            line = input(f"[{who}] > ").strip()
        except EOFError:
            print()
            break
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/quit", "/exit", "/q"):
                break
            if cmd in ("/base", "/ft", "/both"):
                who = cmd[1:]
                print(f"now answering: {who}", flush=True)
            elif cmd == "/system" and rest.strip():
                system = rest.strip()
                print("system prompt set", flush=True)
            else:
                print(HELP, flush=True)
            continue
        respond(model, tokenizer, line, system, dec, who)


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise InputError("--max_new_tokens must be >= 1, --temperature >= 0, --top_p in (0, 1]")
    if args.prompt is not None and not args.prompt.strip():
        raise InputError("--prompt is empty")
    run = read_run(args.adapter, args.base_model)
    from transformers import set_seed

    set_seed(args.seed)
    tokenizer = run_tokenizer(run)
    if args.merge_out:
        write_merged(run, tokenizer, Path(args.merge_out), args.overwrite)
        return 0

    # the prompt the run's training data used (run_config.json) unless --system says otherwise; '' = none
    system = (args.system or None) if args.system is not None else run.system_prompt
    print(f"system prompt: {system if system is not None else '(none: the training data had no system turn)'}",
          file=sys.stderr, flush=True)
    dec = Decoding(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    model = load_run_base(run)
    if choose_mode(args.mode, model, 1, 2048 + args.max_new_tokens) == "fast":
        dequantize_(model)
    model = attach_adapter(model, run.adapter)
    print(f"loaded {run.base_model} + {run.adapter}", file=sys.stderr, flush=True)
    if args.prompt is not None:
        respond(model, tokenizer, args.prompt.strip(), system, dec, args.answer_with)
    else:
        interactive(model, tokenizer, system, dec, args.answer_with)
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
