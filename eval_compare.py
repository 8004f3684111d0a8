"""Did fine-tuning help? Answer held-out questions with the base model and the fine-tuned adapter, score
both, and say plainly whether the fine-tuned model is better, with the evidence.

    python eval_compare.py                                     # models/zephyr-7b-qlora on its held-out questions
    python eval_compare.py --adapter models/my-run --n 20 --out outputs/my-run/evaluation.csv
    python eval_compare.py --judge_model gpt-4o-mini           # + LLM judge: rubric, pairwise, claims (OPENAI_API_KEY)
    python eval_compare.py --rescore outputs/evaluation.csv    # recompute scores/verdict/plots from the CSV, no model
    python eval_compare.py --checkpoints                       # + learning curve over the run's saved checkpoints
    python eval_compare.py --mode reference --batch_size 1     # the seed's way: 4-bit + LoRA, one at a time

Questions (first that exists): --questions; the evaluation questions generate_qa.py wrote beside the run's
training file (data/eval_questions.jsonl); the held-out samples train_qlora_hf.py kept in the run folder (then
only the 'unseen' set exists, and a line says the 'knowledge' set is missing).

Two evaluation sets, each question's `set`: `unseen` (papers held out of training whole: does what fine-tuning
taught carry over to papers it never saw?) and `knowledge` (new questions about papers it trained on: did it
learn them?). They are reported separately: the printed tables, summary.json's "sets" ({unseen: {verdict,
verdict_line, evidence, rates, by_type}, knowledge: {...}}) and the CSV's `set` column. The top-level verdict,
evidence, rates and by_type are over ALL questions, both sets together, as summary.json always held. A question
without a set (an older file) counts as unseen, with a note. Every rate names its n and reads "too few to tell"
below 20 questions; a warning says when refusal (unanswerable) or correction (false premise) did not move between
base and fine-tuned in a set (the 95% interval of the difference includes 0).
Prompts are built exactly as in training: the run's chat template and the system prompt its data used
(run_config.json), unless a question row carries its own or --system overrides both.

Each answer gets a behaviour label (answered, refused, corrected_premise, degenerate, empty), the
specifics it asserts that the source context (and the question) do not support (`*_unsupported`,
`*_hallucinated`), a 0/1 `correct` (the type's expected behaviour, asserting nothing unsupported: a
substantive answer that agrees with the reference for answerable types, a refusal for unanswerable ones,
an explicit correction that does not restate the premise for false premises) and a support-aware score in
[-1, 1] (below 0 for invented specifics). The verdict compares the two models question by question:
win/tie/loss, a paired bootstrap interval of the mean difference and a sign test; it says "fine-tuned
better" or "base better" only when both agree and there are enough questions, else "no clear difference";
never "fine-tuned better" when the fine-tuned model hallucinates significantly more.

One model load serves both sides. The base is loaded in 4-bit exactly as training loaded it. Then:
  fast path (auto on a CUDA GPU with room for bf16 weights): dequantise the 4-bit weights to bf16 -- the
    very values training's forward pass computed with -- answer as the base, merge the LoRA into those
    weights (PEFT merge_and_unload) and answer as the fine-tuned model;
  reference path (CPU, small GPUs): 4-bit + PEFT adapter.
Answers go to an append-only cache beside the output (<out stem>.cache.jsonl, keyed by question, prompt,
model and decoding): an interrupted run resumes where it stopped.

Writes <out> (one row per question), <out stem>_for_marking.csv (empty `winner` column for marking by
hand), summary.json (verdict first) and results_bar.png beside it; with --checkpoints also
learning_curve.csv and learning_curve.png. The CSVs are spreadsheet-safe: UTF-8 with BOM, cells a
spreadsheet would run as a formula get a leading apostrophe. The outputs are written together: staged
beside their final paths and renamed into place at the end, under a lock (.<out name>.lock) that keeps a
second run off them, so a run that fails (a full disk: exit 1) or is killed leaves the previous ones as
they were; none may be an input. A question whose prompt plus --max_new_tokens does not fit the model's
positions is not answered: its row says why in a `skipped` column, summary.json counts skipped_too_long.
A judge that fails on every call is marked "failed" in summary.json and the exit code is 1 (the rest of
the evaluation is written). A base model that needs its own Python code is refused without
--trust_remote_code.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common import (ADAPTER_WEIGHTS, DEFAULT_RUN_DIR, HELDOUT_QUESTIONS_FILE, HelpFormatter, InputError,
                    eval_questions_path, finite_float, read_jsonl, resolve_path, run_main, sha256_file, sha256_text)
from paperqa_tune.evaluate import curve as C, report
from paperqa_tune.cache import JsonlCache
from paperqa_tune.client import FORMAT_STEPS
from paperqa_tune.generation import (Decoding, add_repetition_penalty_flag, generate_batch, prompt_ids,
                                     repetition_penalty_problem, run_decoding, skip_too_long, undecodable)
from paperqa_tune.loading import (attach_adapter, auto_batch_size, check_adapter_fits, choose_mode, dequantize_,
                                  load_run_base, max_positions, model_config, require_adapter_weights,
                                  run_tokenizer)
from paperqa_tune.outputs import OutputSet, run_command
from paperqa_tune.evaluate.report import SIDES, open_outputs, output_paths, source_context
from paperqa_tune.runs import Run, read_run

DEFAULT_OUT = "outputs/evaluation.csv"
NO_SYSTEM = object()  # a question row without a "system" key: use the run's prompt
SKIPPED_QUESTION_CHARS = 2_000  # a skipped (too long) question's cell in the CSV: spreadsheets cap cells at 32,767


# --------------------------------------------------------------------------- questions
def read_questions(path: Path) -> list[dict]:
    """Questions from JSONL ({"id","question","reference","type","paper_id","context","set"}) or CSV
    (header with question[,reference,type,id,context,set]). InputError names file:line on bad input. "set" is
    the evaluation set (unseen / knowledge, see paperqa_tune.evaluate.report), "" when not given."""
    if path.is_dir():
        raise InputError(f"{path} is a folder; --questions takes a file (JSONL, or CSV with a 'question' column)")
    if not path.is_file():
        raise InputError(f"{path}: questions file not found; create it with generate_qa.py or pass --questions")
    try:
        open(path, "rb").close()
    except OSError as e:
        raise InputError(f"{path}: cannot read the questions file ({e.strerror}); check its permissions") from None
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else [(f"{path}:{n}", rec) for n, rec in read_jsonl(path)]
    if not rows:
        raise InputError(f"{path}: no questions in the file")
    out, seen = [], {}
    for i, (where, rec) in enumerate(rows, 1):
        q = rec.get("question")
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"{where}: missing or empty 'question'")
        bad = next(((k, why) for k in ("question", "reference", "context", "system", "id")
                    if isinstance(rec.get(k), str) and (why := undecodable(rec[k]))), None)
        if bad:
            raise InputError(f"{where}: '{bad[0]}' holds text that is not valid Unicode ({bad[1]}); fix that row")
        qid = str(rec.get("id") or "").strip() or f"q{i}"
        if qid in seen:
            if seen[qid] != q:
                raise InputError(f"{where}: id {qid!r} already used by another question; ids must be unique")
            print(f"warning: {where}: question {qid!r} appears twice; asked once", file=sys.stderr)
            continue
        seen[qid] = q
        system = rec.get("system", NO_SYSTEM)
        if system is not NO_SYSTEM and system is not None and not isinstance(system, str):
            raise InputError(f"{where}: 'system' must be a string (or null for no system turn)")
        if path.suffix.lower() == ".csv" and not (rec.get("system") or "").strip():
            system = NO_SYSTEM  # an empty CSV cell means "not given"
        history = read_history(rec.get("history"), where)
        qset = str(rec.get("set") or "").strip().lower()
        if qset and qset not in report.SETS:
            raise InputError(f"{where}: 'set' is {rec.get('set')!r}; use one of {', '.join(report.SETS)} (or leave "
                             "it out: such a question counts as unseen)")
        out.append({"id": qid, "question": q.strip(), "reference": str(rec.get("reference") or "").strip(),
                    "type": str(rec.get("type") or "").strip().lower() or "unknown",
                    "paper_id": str(rec.get("paper_id") or ""), "context": str(rec.get("context") or ""),
                    "system": system, "history": history, "set": qset})
    return out


def read_history(value, where: str) -> list[dict]:
    """A follow-up question's earlier turns: user/assistant messages, alternating, starting with the user (JSONL
    list, or a CSV cell holding that list as JSON). Empty when not given."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: 'history' is not JSON ({e.msg}); give a list of {{\"role\", \"content\"}} "
                             "messages or leave it empty") from None
    ok = isinstance(value, list) and len(value) % 2 == 0 and all(
        isinstance(m, dict) and m.get("role") == ("user", "assistant")[i % 2] and isinstance(m.get("content"), str)
        for i, m in enumerate(value))
    if not ok:
        raise InputError(f"{where}: 'history' must be a list of user/assistant messages, alternating and starting "
                         'with the user, e.g. [{"role": "user", "content": "..."}, {"role": "assistant", '
                         '"content": "..."}]')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _csv_rows(path: Path) -> list[tuple[str, dict]]:
    """(file:line, row) of a questions CSV; InputError for a file that is not UTF-8 or not CSV."""
    rows = []
    limit = csv.field_size_limit()
    csv.field_size_limit(1 << 30)  # a long context cell is capped later, not refused here
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            fields = [(c or "").strip().lower() for c in (reader.fieldnames or [])]
            if "question" not in fields:
                raise InputError(f"{path}: no 'question' column (header: {fields or 'empty'}); the first row "
                                 "must name the columns, e.g. question,reference,type")
            reader.fieldnames = fields
            for rec in reader:
                rows.append((f"{path}:{reader.line_num}", {k: v for k, v in rec.items() if k}))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); save it as 'CSV UTF-8'") from None
    except csv.Error as e:
        raise InputError(f"{path}: not a readable CSV ({e})") from None
    finally:
        csv.field_size_limit(limit)
    return rows


def resolve_questions(given: str | None, run: Run) -> tuple[Path, str]:
    """The questions to ask, and a sentence saying where they came from."""
    if given:
        return Path(given), f"questions: {given}"
    train = run.args.get("jsonl")
    beside = eval_questions_path(train) if train else None
    if beside is not None and beside.is_file():
        return beside, f"questions: {beside} (held-out papers written by generate_qa.py beside {train})"
    heldout = run.adapter / HELDOUT_QUESTIONS_FILE
    if heldout.is_file():
        return heldout, (f"questions: {heldout} (samples train_qlora_hf.py held out of {train or 'the training data'}"
                         " and never trained on; no questions file beside the training data)\nnote: so only the "
                         "'unseen' set is evaluated; the 'knowledge' set (new questions about papers in training) is "
                         "missing: generate_qa.py writes both sets into the questions file beside the training data")
    raise InputError(f"no evaluation questions: {beside or 'no questions file beside the training data'} does not "
                     f"exist and {heldout} was not written (the run held out no samples: --val_fraction 0?); pass "
                     "--questions FILE (JSONL or CSV with a 'question' column)")


def system_for(q: dict, run: Run, override: str | None) -> str | None:
    """--system wins, then the question row's own, then the prompt the run's training data used."""
    if override is not None:
        return override or None
    return run.system_prompt if q["system"] is NO_SYSTEM else q["system"]


# --------------------------------------------------------------------------- answers
def answer_key(q: dict, prompt: list[int], model_name: str, dec: Decoding) -> str:
    return sha256_text(json.dumps({"id": q["id"], "prompt": sha256_text(json.dumps(prompt)), "model": model_name,
                                   "decoding": dec.key()}, sort_keys=True))[:32]


def batches_in_order(planned: list[tuple[str, dict, list[int]]], batch_size: int) -> list[tuple[int, list]]:
    """Every question of a side in fixed batches: longest prompts first (ties in question order), cut every
    batch_size. The batches depend on the questions alone, never on which answers a killed run already cached,
    so a resumed run computes each answer in the same batch (same shapes, same padding, same numerics) as an
    uninterrupted one. Returns (start, batch) pairs; start seeds a sampled batch."""
    order = sorted(range(len(planned)), key=lambda i: (-len(planned[i][2]), i))
    ranked = [planned[i] for i in order]
    return [(s, ranked[s:s + batch_size]) for s in range(0, len(ranked), batch_size)]


def generate_missing(model, tokenizer, planned: list[tuple[str, dict, list[int]]], side: str, dec: Decoding,
                     batch_size: int, cache: JsonlCache) -> dict:
    """Answer the batches (batches_in_order) that hold an answer not yet cached: the whole batch is run again
    as it was planned, and only the missing answers are written, each batch as soon as it is done. Returns
    timing for the summary."""
    from tqdm import tqdm
    from transformers import set_seed

    todo = [(s, b) for s, b in batches_in_order(planned, batch_size) if any(cache.get(k) is None for k, _, _ in b)]
    tokens, asked, t0 = 0, 0, time.perf_counter()
    for start, chunk in tqdm(todo, desc=f"{side} answers", unit="batch", disable=not todo):
        if dec.do_sample:
            set_seed(dec.seed + start)
        for (key, q, _), (text, n, _) in zip(chunk, generate_batch(model, tokenizer, [c[2] for c in chunk], dec)):
            if cache.get(key) is None:
                cache.put({"key": key, "id": q["id"], "model": side, "answer": text, "new_tokens": n,
                           "batch_size": batch_size})
                tokens, asked = tokens + n, asked + 1
    _sync()
    return {"questions": asked, "new_tokens": tokens, "seconds": round(time.perf_counter() - t0, 3)}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()



# --------------------------------------------------------------------------- which adapters answer
@dataclass
class Adapter:
    """One set of LoRA weights to evaluate: the run's final adapter or a saved checkpoint."""
    label: str                      # "finetuned" or "step-N"
    path: Path
    step: int | None
    sha: str = ""


def find_checkpoints(run: Run, given: list[str]) -> list[Adapter]:
    """--checkpoints: the listed folders, or (none listed) every checkpoint the run kept, by step."""
    from paperqa_tune.checkpoints import list_checkpoints  # imports torch: only when asked for

    paths = [Path(p) for p in given] if given else list_checkpoints(run.adapter)
    if not paths:
        raise InputError(f"--checkpoints: no checkpoint in {run.adapter / 'checkpoints'}; train with "
                         "--keep_checkpoints and a --save_total_limit large enough to keep them all (e.g. 100), or "
                         "list checkpoint folders")
    out = []
    for p in paths:
        if not (p / ADAPTER_WEIGHTS).is_file():
            raise InputError(f"--checkpoints: {p} holds no adapter_model.safetensors (a PEFT checkpoint folder "
                             "such as models/<run>/checkpoints/step-50)")
        step = int(p.name[5:]) if p.name.startswith("step-") and p.name[5:].isdigit() else None
        step = report.read_json_or_empty(p / "trainer_state.json", "its step (from the name)").get("step", step)
        if step is None:
            raise InputError(f"--checkpoints: cannot tell the training step of {p} (no trainer_state.json, name "
                             "not step-N)")
        out.append(Adapter(f"step-{step}", p, step, sha256_file(p / ADAPTER_WEIGHTS)))
    return sorted(out, key=lambda a: a.step)


def final_step(run: Run) -> int | None:
    metrics = run.adapter / "metrics.json"
    try:
        return json.loads(metrics.read_text(encoding="utf-8")).get("steps") if metrics.is_file() else None
    except json.JSONDecodeError:
        return None


def cached_batch_size(planned: dict[str, list], cache: JsonlCache) -> int | None:
    """The batch size an interrupted run of these questions answered with (recorded with each answer), if any."""
    return next((r["batch_size"] for side in planned.values() for key, _, _ in side
                 if (r := cache.get(key)) is not None and r.get("batch_size")), None)


def generate_all(run: Run, tokenizer, planned: dict[str, list], adapters: list[Adapter], dec: Decoding, args,
                 n_questions: int, seq_len: int, cache: JsonlCache) -> dict:
    """Answer what is not cached (planned: every answer of each side, in order): base first, then each
    checkpoint, the final adapter last. One base load."""
    import torch

    timing: dict = {}
    t0 = time.perf_counter()
    model = load_run_base(run, args.trust_remote_code)
    for a in adapters:  # an adapter of another base model fails now, not after the base model's answers
        check_adapter_fits(model, a.path)
    _sync()
    timing["load_s"] = round(time.perf_counter() - t0, 3)
    mode = choose_mode(args.mode, model, n_questions, seq_len)
    timing["mode"] = mode
    how = "bf16 dequantised + merged LoRA" if mode == "fast" else "4-bit + adapter"
    print(f"generation: {mode} path ({how}), loaded in {timing['load_s']:.1f}s", flush=True)
    if mode == "fast":
        t0 = time.perf_counter()
        dequantize_(model)
        _sync()
        timing["dequantize_s"] = round(time.perf_counter() - t0, 3)
    # a resumed run keeps the batch size its answers were made with: the batches, and so the answers, stay the same
    bs = args.batch_size or cached_batch_size(planned, cache) or auto_batch_size(model, n_questions, seq_len)
    timing["batch_size"] = bs
    timing["base"] = generate_missing(model, tokenizer, planned["base"], "base", dec, bs, cache)
    for a in adapters:
        if all(cache.get(key) is not None for key, _, _ in planned[a.label]):
            continue
        if a.label != "finetuned":  # a checkpoint: unmerged on top of the base, then removed again
            peft_model = attach_adapter(model, a.path)
            timing[a.label] = generate_missing(peft_model, tokenizer, planned[a.label], a.label, dec, bs, cache)
            model = peft_model.unload()
        elif mode == "fast":
            t0 = time.perf_counter()
            model = attach_adapter(model, a.path).merge_and_unload()
            _sync()
            timing["merge_s"] = round(time.perf_counter() - t0, 3)
            timing["finetuned"] = generate_missing(model, tokenizer, planned["finetuned"], "finetuned", dec, bs, cache)
        else:
            model = attach_adapter(model, a.path)
            timing["finetuned"] = generate_missing(model, tokenizer, planned["finetuned"], "finetuned", dec, bs, cache)
    del model
    if torch.cuda.is_available():
        timing["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return timing


# --------------------------------------------------------------------------- judge
def judge_rubric(args) -> list[tuple[str, str]]:
    """The rubric's criteria (name, description), or [] without a judge or with --judge_rubric none."""
    if not args.judge_model or args.judge_rubric.lower() == "none":
        return []
    from paperqa_tune.evaluate import judge

    return judge.read_rubric(judge.DEFAULT_RUBRIC if args.judge_rubric == "default" else Path(args.judge_rubric))


def run_judges(rows: list[dict], questions: dict, args, cache: JsonlCache) -> tuple[list[str], bool, dict]:
    """Rubric scores per answer (blind), the pairwise verdict in both orders and (--judge_claims) per-claim
    verdicts per answer. Returns (rubric criteria, pairwise ran, stats; "claims" in it when the claims judge ran).
    Failed judge calls are recorded as failures on the row, never as scores, ties or verdicts."""
    if not args.judge_model:
        return [], False, {}
    from paperqa_tune.evaluate import judge

    cfg = judge.JudgeConfig(model=args.judge_model, base_url=args.judge_base_url,
                            api_key=os.environ["OPENAI_API_KEY"], workers=args.judge_workers,
                            timeout=args.judge_timeout, max_retries=args.judge_retries,
                            response_format=args.judge_response_format)
    client = judge.make_client(cfg)
    stats = {}
    criteria: list[str] = []
    rubric = judge_rubric(args)
    if rubric:
        criteria = [name for name, _ in rubric]
        stats["rubric"] = judge.rubric_scores(rows, questions, rubric, cfg, cache, client=client)
    stats["pairwise"] = judge.pairwise(rows, questions, cfg, cache, client=client)
    if args.judge_claims:
        from paperqa_tune.evaluate.claims import judge_claims

        stats["claims"] = judge_claims(rows, questions, cfg, cache, client=client)
    stats["config"] = {**cfg.describe(), "response_format_used": client.format_used,
                       "response_format_note": client.format_note}
    failed = sum(s.get("failed", 0) for k, s in stats.items() if k != "config")
    big = judge.oversized({r["id"]: questions.get(r["id"], {}) for r in rows})
    for name, ids in big.items():
        print(f"note: {len(ids)} question(s) have a {name} longer than {judge.TEXT_LIMITS[name]:,} characters "
              f"({', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}); the judge was shown the first "
              f"{judge.TEXT_LIMITS[name]:,}, marked as cut", file=sys.stderr)
    stats["capped_for_judge"] = {name: {"questions": len(ids), "chars_shown": judge.TEXT_LIMITS[name]}
                                 for name, ids in big.items()}
    if failed:
        print(f"warning: {failed} judge call(s) failed; they are marked 'failed' in the CSV with the raw reply "
              "and are asked again on the next run", file=sys.stderr)
    return criteria, True, stats


# --------------------------------------------------------------------------- outputs
# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--adapter", default=DEFAULT_RUN_DIR, help="run folder from train_qlora_hf.py")
    a("--base_model", default=None, help="base model (default: run_config.json base_model, else the adapter's)")
    a("--questions", default=None,
      help="JSONL, or CSV with question[,reference,type,system,set] (set: unseen or knowledge) (default: the "
           "evaluation questions beside the run's training file, else the run folder's held-out samples)")
    a("--system", default=None,
      help="system prompt for every question; '' for none (default: the question row's, else the one the run's "
           "training data used)")
    a("--n", type=int, default=None, help="evaluate only the first N questions (default: all)")
    a("--out", default=None, help=f"results CSV; the other outputs go beside it (default: {DEFAULT_OUT}; with "
                                  "--rescore: the rescored CSV itself)")
    a("--rescore", default=None, metavar="CSV",
      help="recompute every score, the summary, verdict and charts from the answers in this evaluation.csv (as "
           "written or edited in a spreadsheet); no model is loaded (default: off)")
    a("--checkpoints", nargs="*", default=None, metavar="DIR",
      help="also evaluate these checkpoint folders, or with no folder every checkpoint the run kept "
           "(train with --keep_checkpoints), and write learning_curve.csv/.png (default: off)")
    a("--f1_threshold", type=finite_float, default=0.4,
      help="token F1 against the reference at which an answerable question counts as correct")
    a("--max_new_tokens", type=int, default=256, help="answer length limit")
    a("--min_new_tokens", type=int, default=0,
      help="suppress EOS before this many tokens; for benchmarks")
    a("--batch_size", type=int, default=None,
      help="prompts per generate call (default: from free GPU memory; 8 on CPU)")
    a("--seed", type=int, default=0, help="random seed for sampling and the bootstrap")
    a("--do_sample", action="store_true", help="sample instead of greedy decoding (default: greedy)")
    a("--temperature", type=finite_float, default=0.7, help="sampling temperature with --do_sample")
    a("--top_p", type=finite_float, default=0.9, help="nucleus sampling with --do_sample")
    add_repetition_penalty_flag(a)
    a("--mode", choices=("auto", "fast", "reference"), default="auto",
      help="fast: dequantised bf16 + merged LoRA; reference: 4-bit + adapter; auto: fast when a CUDA GPU "
           "has room")
    a("--cache", choices=("static", "dynamic"), default="static",
      help="static: our decoding loop, the KV cache allocated once per batch; dynamic: transformers' generate, "
           "the cache grown every step")
    a("--cuda_graphs", action=argparse.BooleanOptionalAction, default=True,
      help="static cache on a GPU: record the one-token decoding step once per batch as a CUDA graph and replay "
           "it (one launch per step instead of ~1,000)")
    a("--compile", action="store_true", help="transformers' generate with a static KV cache + torch.compile of "
      "the decoding step; its compile costs more than it saves on 100 questions, see bench/README.md (default: off)")
    a("--judge_model", default=None,
      help="OpenAI-compatible model that scores each answer on the rubric and picks the better answer of each pair "
           "(default: no judge)")
    a("--judge_base_url", default=None, help="judge endpoint, e.g. http://localhost:8000/v1 (default: OpenAI)")
    a("--judge_rubric", default="default",
      help="rubric file, one 'name: description' line per criterion; the first criterion is correctness; "
           "'none' for the pairwise judge only (default: the shipped paperqa_tune/evaluate/rubric_default.txt)")
    a("--judge_claims", action=argparse.BooleanOptionalAction, default=True,
      help="with --judge_model: also list each answer's factual claims, each judged supported / unsupported / "
           "contradicted by the source; the headline hallucination rate is then the judge's, the offline rule's "
           "beside it")
    a("--judge_workers", type=int, default=4, help="concurrent judge requests")
    a("--judge_timeout", type=finite_float, default=120.0,
      help="seconds one judge call may take in all, from sending it to the reply's last byte; a call is tried at "
           "most twice on timeouts")
    a("--judge_retries", type=int, default=4,
      help="retries of a judge call on rate limits (429), server errors (5xx) and lost connections, with backoff "
           "and the server's Retry-After")
    a("--judge_response_format", choices=FORMAT_STEPS, default="json_schema",
      help="structured output to ask the judge's server for; when its error says it refuses it, the next of "
           f"{', '.join(FORMAT_STEPS)} is used (decided once, by the first call)")
    a("--trust_remote_code", action="store_true",
      help="allow a base model that needs its own Python code from its folder or the hub to run it (off: such "
           "a model is refused; read its code first)")
    a("--overwrite", action="store_true", help="replace existing outputs (the answer cache is kept)")
    return p


def validate(args) -> None:
    problems = []
    if args.n is not None and args.n < 1:
        problems.append("--n must be >= 1")
    if args.max_new_tokens < 1:
        problems.append("--max_new_tokens must be >= 1")
    if args.min_new_tokens < 0 or args.min_new_tokens > args.max_new_tokens:
        problems.append("--min_new_tokens must be between 0 and --max_new_tokens")
    if args.batch_size is not None and args.batch_size < 1:
        problems.append("--batch_size must be >= 1")
    if not 0 < args.f1_threshold <= 1:
        problems.append("--f1_threshold must be in (0, 1]")
    if args.do_sample and not (args.temperature > 0 and 0 < args.top_p <= 1):
        problems.append("--temperature must be > 0 and --top_p in (0, 1] when sampling")
    if repetition_penalty_problem(args.repetition_penalty):
        problems.append(repetition_penalty_problem(args.repetition_penalty))
    if args.system and undecodable(args.system):
        problems.append(f"--system holds bytes that are not UTF-8 ({undecodable(args.system)})")
    if not (args.judge_timeout > 0 and args.judge_retries >= 0 and args.judge_workers >= 1):
        problems.append("--judge_timeout must be > 0, --judge_retries >= 0 and --judge_workers >= 1")
    if args.judge_model and not os.environ.get("OPENAI_API_KEY"):
        problems.append("--judge_model needs the OPENAI_API_KEY environment variable (any value for a local server)")
    if not problems:
        judge_rubric(args)  # a bad rubric file fails here, before any model loads
    if args.rescore and args.checkpoints is not None:
        problems.append("--rescore reads answers from a CSV; --checkpoints needs the model: use one or the other")
    if problems:
        raise InputError("; ".join(problems))


def rescore(args) -> int:
    """--rescore: scores, summary, verdict and charts again from a CSV's answers; no model load. Without --out
    it rewrites that CSV (and the files beside it) on purpose, through the same stage-and-commit."""
    src = Path(args.rescore)
    rows = report.read_results_csv(src)[: args.n]
    scored, skipped = report.split_skipped(rows)
    if not scored:
        raise InputError(f"{src}: every row was skipped (too long for the model); nothing to rescore")
    out = Path(args.out) if args.out else src
    src_real = resolve_path(src, "--rescore")
    in_place = resolve_path(out, "--out") == src_real
    paths = output_paths(out)
    prev = report.read_json_or_empty(src.with_name("summary.json"), "the adapter, base model and decoding it names")
    qfile = args.questions or prev.get("questions")
    if qfile and not args.questions and not Path(qfile).is_file():
        qfile = None  # the questions the evaluation used are gone: no abstracts for the judge
    inputs = ([] if in_place else [src]) + ([qfile] if qfile and resolve_path(qfile, "--questions") != src_real else [])
    ck_file = C.answers_path(src)  # the checkpoints' answers, when the evaluation drew a learning curve
    ck = C.read_answers(ck_file) if ck_file.is_file() else None
    with open_outputs(paths, ck is not None, inputs + ([ck_file] if ck else []), args.overwrite or in_place,
                      run_command("eval_compare.py", args), curve_answers=ck is not None and not in_place) as outs:
        if outs.finished_earlier:
            print(outs.finished_note(), file=sys.stderr)
            return 0
        questions = {}
        if qfile:  # for the abstracts the judge grounds on
            questions = {q["id"]: q for q in read_questions(Path(qfile))}
            print(f"abstracts for the judge from {qfile}")
        questions = {r["id"]: {**questions.get(r["id"], {}), **r, "context": source_context(
                         r.get("context"), questions.get(r["id"], {}).get("context"))} for r in scored}
        cache = JsonlCache(paths["cache"])
        criteria, pairwise, judge_stats = run_judges(scored, questions, args, cache)
        report.score_rows(scored, questions, args.f1_threshold, f"rubric_{criteria[0]}" if criteria else None)
        note_sets(report.assign_sets(rows, questions))
        summary = {**report.summarize(scored, criteria, args.seed, "claims" in judge_stats), "rescored_from": str(src),
                   "f1_threshold": args.f1_threshold, "questions": qfile, "judge_model": args.judge_model,
                   "judge_stats": judge_stats,
                   "skipped_too_long": {"n": len(skipped), "ids": [r["id"] for r in skipped]}}
        # what generated the answers is still true of them
        summary.update({k: prev[k] for k in ("adapter", "base_model", "system_prompt", "decoding") if k in prev})
        curve = rescore_curve(ck, ck_file, scored, questions, args.f1_threshold) if ck else None
        if curve:
            summary["learning_curve"] = curve
        return report.write_outputs(outs, rows, summary, criteria, pairwise, curve, C.PANELS,
                                    C.answers_text(*ck) if ck and not in_place else None)


def rescore_curve(ck: tuple, ck_file: Path, rows: list[dict], questions: dict, f1_threshold: float) -> list[dict]:
    """The learning curve again, from the checkpoints' answers saved beside the CSV, under today's scoring."""
    steps, answers, losses = ck
    missing = C.missing_answers(rows, answers)
    if missing:
        raise InputError(f"{ck_file}: no answers of {', '.join(missing)} for some questions of the CSV; it belongs to "
                         "another evaluation: move it away to rescore without the learning curve")
    print(f"learning curve: {len(steps)} checkpoint(s) from {ck_file}")
    return C.learning_curve(rows, answers, steps, questions, f1_threshold, losses)


def note_sets(note: str | None) -> None:
    if note:
        print(f"note: {note}", file=sys.stderr)


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    print("eval_compare: " + " ".join(f"{k}={v}" for k, v in vars(args).items()), flush=True)
    if args.rescore:
        return rescore(args)
    t_start = time.perf_counter()

    run = read_run(args.adapter, args.base_model)
    require_adapter_weights(run)
    qpath, where = resolve_questions(args.questions, run)
    print(where, flush=True)
    questions = read_questions(qpath)[: args.n]
    if qpath == run.adapter / HELDOUT_QUESTIONS_FILE:  # papers (or samples) the run never trained on
        questions = [{**q, "set": q["set"] or "unseen"} for q in questions]
    paths = output_paths(Path(args.out or DEFAULT_OUT))
    checkpoints = find_checkpoints(run, args.checkpoints) if args.checkpoints is not None else []
    config = model_config(run.base_model, args.trust_remote_code)  # found, and no custom code without the flag
    with open_outputs(paths, args.checkpoints is not None, [qpath, *run_files(run)], args.overwrite,
                      run_command("eval_compare.py", args)) as outs:
        if outs.finished_earlier:
            print(outs.finished_note(), file=sys.stderr)
            return 0
        return evaluate(args, run, questions, (qpath, where), checkpoints, max_positions(config), paths, outs,
                        t_start)


def run_files(run: Run) -> list[Path]:
    """Files of the run folder and of a local base model folder: read by this run, so never an output."""
    folders = [run.adapter] + ([Path(run.base_model)] if Path(run.base_model).is_dir() else [])
    return [p for d in folders for p in d.iterdir() if p.is_file()]


def evaluate(args, run: Run, questions: list[dict], source: tuple[Path, str], checkpoints: list[Adapter],
             limit: int | None, paths: dict, outs: OutputSet, t_start: float) -> int:
    """Answer (what is not cached), judge, score and write: the body of a run, with the outputs locked."""
    from transformers import set_seed

    set_seed(args.seed)
    tokenizer = run_tokenizer(run, args.trust_remote_code)
    dec = run_decoding(run, tokenizer, args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                       min_new_tokens=args.min_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed, cache=args.cache, compile=args.compile,
                       cuda_graphs=args.cuda_graphs)
    systems = {q["id"]: system_for(q, run, args.system) for q in questions}
    prompts = {q["id"]: prompt_ids(tokenizer, q["question"], systems[q["id"]], q.get("history", ()))
               for q in questions}
    skipped = skip_too_long(prompts, args.max_new_tokens, limit, run.base_model)
    asked = [q for q in questions if q["id"] not in skipped]
    adapters = checkpoints + [Adapter("finetuned", run.adapter, final_step(run), run.adapter_sha)]
    names = {"base": f"base:{run.base_model}", **{a.label: f"finetuned:{run.base_model}+{a.sha}" for a in adapters}}
    keys = {(q["id"], m): answer_key(q, prompts[q["id"]], name, dec) for q in asked for m, name in names.items()}
    cache = JsonlCache(paths["cache"])
    planned = {m: [(keys[q["id"], m], q, prompts[q["id"]]) for q in asked] for m in names}  # every answer, in order
    cached = {m: sum(cache.get(k) is not None for k, _, _ in planned[m]) for m in names}
    print(f"{len(asked)} questions; cached answers: base {cached['base']}, fine-tuned {cached['finetuned']}"
          + (f"; {len(checkpoints)} checkpoint(s)" if checkpoints else ""), flush=True)
    timing: dict = {"mode": None, "prepare_s": round(time.perf_counter() - t_start, 3)}
    if any(cached[m] < len(asked) for m in names):
        seq_len = max(len(prompts[q["id"]]) for q in asked) + args.max_new_tokens
        timing.update(generate_all(run, tokenizer, planned, adapters, dec, args, len(asked), seq_len, cache))

    t_scores = time.perf_counter()
    answers = {m: {q["id"]: cache.get(keys[q["id"], m]) for q in asked} for m in names}
    rows = []
    for q in questions:
        row = {k: q[k] for k in ("id", "type", "question", "reference")}
        if q["id"] in skipped:
            row["skipped"] = skipped[q["id"]]
            if len(q["question"]) > SKIPPED_QUESTION_CHARS:
                row["question"] = (q["question"][:SKIPPED_QUESTION_CHARS] +
                                   f" [... {len(q['question']):,} characters in all]")
        for side in SIDES:
            row[f"{side}_answer"] = "" if q["id"] in skipped else answers[side][q["id"]]["answer"]
            row[f"{side}_new_tokens"] = None if q["id"] in skipped else answers[side][q["id"]]["new_tokens"]
        row["system_prompt"] = systems[q["id"]]
        rows.append(row)
    scored = [r for r in rows if r["id"] not in skipped]
    by_id = {q["id"]: q for q in questions}
    criteria, pairwise, judge_stats = run_judges(scored, by_id, args, cache)
    report.score_rows(scored, by_id, args.f1_threshold, f"rubric_{criteria[0]}" if criteria else None)
    note_sets(report.assign_sets(rows, by_id))
    summary = report.summarize(scored, criteria, args.seed, "claims" in judge_stats)
    qpath, where = source
    summary.update({
        "adapter": str(run.adapter), "base_model": run.base_model, "questions": str(qpath), "questions_source": where,
        "n": len(scored), "skipped_too_long": {"n": len(skipped), "ids": list(skipped), "max_positions": limit,
                                               "max_new_tokens": args.max_new_tokens},
        "system_prompt": run.system_prompt if args.system is None else (args.system or None),
        "system_prompts_used": [{"prompt": p, "questions": n}
                                for p, n in Counter(systems[q["id"]] for q in asked).items()],
        "decoding": dec.record(), "f1_threshold": args.f1_threshold, "judge_model": args.judge_model,
        "judge_rubric": args.judge_rubric if args.judge_model else None, "judge_stats": judge_stats})
    curve = answers_text = None
    if checkpoints:
        steps = [(a.label, a.step if a.step is not None else -1) for a in adapters]
        texts = {a.label: {i: v["answer"] for i, v in answers[a.label].items()} for a in adapters}
        losses = C.losses_from_metrics(report.read_json_or_empty(run.adapter / "metrics.json", "the training losses"))
        curve = summary["learning_curve"] = C.learning_curve(scored, texts, steps, by_id, args.f1_threshold, losses)
        answers_text = C.answers_text(steps, texts, losses)
    timing["score_write_s"] = round(time.perf_counter() - t_scores, 3)
    timing["total_s"] = round(time.perf_counter() - t_start, 3)
    summary["timing"] = timing
    return report.write_outputs(outs, rows, summary, criteria, pairwise, curve, C.PANELS, answers_text)


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
