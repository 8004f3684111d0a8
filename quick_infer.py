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
saw it, with the LoRA merged in (PEFT merge_and_unload), as a plain bf16 checkpoint plus tokenizer; it is
built in a hidden folder beside --merge_out and renamed into place at the end (a full disk: exit 1, nothing
left behind), and --overwrite replaces only a folder that an earlier --merge_out wrote (merge_info.json).
A base model that needs its own Python code is refused without --trust_remote_code.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from common import (DEFAULT_RUN_DIR, HelpFormatter, InputError, ensure_chat_template, finite_float, resolve_path,
                    run_main, share_like_outputs)
from paperqa_tune.generation import (Decoding, add_repetition_penalty_flag, generate_batch, prompt_ids,
                                     repetition_penalty_problem, run_decoding, too_long, undecodable)
from paperqa_tune.loading import (attach_adapter, choose_mode, dequantize_, load_run_base, max_positions, merged_model,
                                  model_config, require_adapter_weights, run_tokenizer,
                                  write_folder)
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
    a("--temperature", type=finite_float, default=0.0, help="0 = greedy; > 0 samples")
    a("--top_p", type=finite_float, default=0.9, help="nucleus sampling when --temperature > 0")
    a("--seed", type=int, default=0, help="random seed")
    add_repetition_penalty_flag(a)
    a("--mode", choices=("auto", "fast", "reference"), default="auto",
      help="fast: dequantised bf16 base; reference: 4-bit; auto: fast when a CUDA GPU has room")
    a("--merge_out", default=None, help="write the merged bf16 model here and exit (default: off)")
    a("--overwrite", action="store_true", help="let --merge_out replace a merged model written there before")
    a("--trust_remote_code", action="store_true",
      help="allow a base model that needs its own Python code from its folder or the hub to run it (off: such "
           "a model is refused; read its code first)")
    return p


MERGE_INFO = "merge_info.json"  # written last into a merged folder: what it is, and that --overwrite may replace it


def check_merge_out(out: Path, overwrite: bool, protected: dict[str, str]) -> None:
    """Before anything loads: --merge_out must be a new or empty folder, or (with --overwrite) a merged model
    this script wrote, and never the run or base model folder nor a folder holding them (`protected`)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--merge_out {out} is a file; give a folder")
    target = resolve_path(out, "--merge_out")
    for what, path in protected.items():
        p = Path(path).expanduser()
        if p.exists() and (target == (r := resolve_path(p, what)) or target in r.parents):
            raise InputError(f"--merge_out {out} is or holds {what} {path}, which this run reads; choose another "
                             "folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"{out} is not empty; pass --overwrite or choose another --merge_out")
        if not (out / MERGE_INFO).is_file():
            raise InputError(f"{out} is not empty and holds no {MERGE_INFO}, so it is not a merged model written by "
                             "quick_infer.py; --overwrite only replaces one of those: choose another --merge_out")


def write_merged(run, tokenizer, out: Path, overwrite: bool, trust_remote_code: bool = False) -> None:
    """Dequantised base + merged LoRA, saved as a plain checkpoint any transformers/vLLM loads. Written into a
    temp folder beside `out` and renamed into place at the end: a failure (a full disk: exit 1) or a kill leaves
    no half-written folder."""
    check_merge_out(out, overwrite, {"the run folder": str(run.adapter), "the base model": run.base_model})
    model = merged_model(run, trust_remote_code=trust_remote_code)
    model.config.use_cache = True
    ensure_chat_template(tokenizer)
    tokenizer.padding_side = "left"
    info = {"base_model": run.base_model, "adapter": str(run.adapter), "adapter_sha256": run.adapter_sha,
            "dtype": str(model.dtype), "how": "bnb 4-bit base dequantised (dequantize_4bit) + PEFT merge_and_unload"}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        share_like_outputs(tmp)  # safetensors writes the weights 0600: a serving process must read them

    write_folder(out, write)
    print(f"merged model written to {out}")


def answer(model, tokenizer, prompt: list[int], dec: Decoding, side: str, stream: bool = True) -> str:
    """One answer to prompt ids from the base (adapter disabled) or the fine-tuned model, streamed to stdout."""
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with model.disable_adapter() if side == "base" else contextlib.nullcontext():
        return generate_batch(model, tokenizer, [prompt], dec, streamer)[0][0]


def respond(model, tokenizer, question: str, system: str, dec: Decoding, who: str, limit: int | None = None) -> dict:
    """Answer with one model or both; InputError (not answered) when the prompt does not fit the model."""
    prompt = prompt_ids(tokenizer, question, system)  # the training format, tokenised once for every side
    why = too_long(len(prompt), dec.max_new_tokens, limit)
    if why:
        raise InputError(f"the question is {why}; shorten it or lower --max_new_tokens")
    sides = ("base", "ft") if who == "both" else (who,)
    out = {}
    for side in sides:
        if len(sides) > 1:
            print(f"--- {LABELS[side]} ---", flush=True)
        out[side] = answer(model, tokenizer, prompt, dec, side)
    return out


def tolerant_stdin() -> None:
    """Let stdin hand over bytes that are not UTF-8 (as lone surrogates, which undecodable() finds) instead of
    raising on them -- which would end the session and lose the rest of the buffered input. Python allows no
    change back once a line is read; the session is the last thing this process reads stdin for."""
    if hasattr(sys.stdin, "reconfigure") and getattr(sys.stdin, "errors", None) not in (None, "surrogateescape"):
        sys.stdin.reconfigure(errors="surrogateescape")


def interactive(model, tokenizer, system: str, dec: Decoding, who: str, limit: int | None = None) -> None:
    print(HELP, flush=True)
    tolerant_stdin()
    while True:
        try:
            line = input(f"[{who}] > ").strip()
        except EOFError:
            print()
            break
        if not line:
            continue
        bad = undecodable(line)
        if bad:
            print(f"that line is not valid UTF-8 ({bad}); set your terminal to UTF-8 and type it again", flush=True)
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
        try:
            respond(model, tokenizer, line, system, dec, who, limit)
        except InputError as e:
            print(f"{e}", flush=True)


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise InputError("--max_new_tokens must be >= 1, --temperature >= 0, --top_p in (0, 1]")
    if repetition_penalty_problem(args.repetition_penalty):
        raise InputError(repetition_penalty_problem(args.repetition_penalty))
    if args.prompt is not None and not args.prompt.strip():
        raise InputError("--prompt is empty")
    for flag, text in (("--prompt", args.prompt), ("--system", args.system)):
        if text and undecodable(text):
            raise InputError(f"{flag} holds bytes that are not UTF-8 ({undecodable(text)}); pass UTF-8 text")
    run = read_run(args.adapter, args.base_model)
    require_adapter_weights(run)
    # the base model is found, and needs no custom code without the flag; how many positions it has
    limit = max_positions(model_config(run.base_model, args.trust_remote_code))
    from transformers import set_seed

    set_seed(args.seed)
    tokenizer = run_tokenizer(run, args.trust_remote_code)
    if args.merge_out:
        write_merged(run, tokenizer, Path(args.merge_out), args.overwrite, args.trust_remote_code)
        return 0

    # the prompt the run's training data used (run_config.json) unless --system says otherwise; '' = none
    system = (args.system or None) if args.system is not None else run.system_prompt
    print(f"system prompt: {system if system is not None else '(none: the training data had no system turn)'}",
          file=sys.stderr, flush=True)
    dec = run_decoding(run, tokenizer, args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                       do_sample=args.temperature > 0, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(f"decoding: repetition penalty {dec.repetition_penalty:g} ({dec.penalty_from}); stops at "
          + (", ".join(dec.stop_strings) + " or " if dec.stop_strings else "") + "the end-of-turn token",
          file=sys.stderr, flush=True)
    if args.prompt is not None:  # a prompt that does not fit fails before the model loads
        why = too_long(len(prompt_ids(tokenizer, args.prompt.strip(), system)), args.max_new_tokens, limit)
        if why:
            raise InputError(f"--prompt is {why}; shorten it or lower --max_new_tokens")
    model = load_run_base(run, args.trust_remote_code)
    if choose_mode(args.mode, model, 1, 2048 + args.max_new_tokens) == "fast":
        dequantize_(model)
    model = attach_adapter(model, run.adapter)
    print(f"loaded {run.base_model} + {run.adapter}", file=sys.stderr, flush=True)
    if args.prompt is not None:
        respond(model, tokenizer, args.prompt.strip(), system, dec, args.answer_with, limit)
    else:
        interactive(model, tokenizer, system, dec, args.answer_with, limit)
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
