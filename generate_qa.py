"""Turn paper abstracts into grounded Q&A training pairs (with edge cases) and held-out eval questions.

Run as:
    # offline demo: no LLM, no key, deterministic rule-based pairs from the abstracts' own sentences
    python generate_qa.py --backend offline --input data/sample_abstracts.jsonl

    # any OpenAI-compatible server (OpenAI, vLLM, Ollama...); the key comes from OPENAI_API_KEY only
    export OPENAI_API_KEY=...
    python generate_qa.py --input data/sample_abstracts.jsonl --model gpt-4o-mini --concurrency 16
    python generate_qa.py --input abstracts.csv --base_url http://localhost:8000/v1 --model HuggingFaceH4/zephyr-7b-beta

    # a local transformers model, batched
    python generate_qa.py --backend hf --model HuggingFaceH4/zephyr-7b-beta --input data/sample_abstracts.jsonl

    # straight from arXiv
    python generate_qa.py --backend offline --arxiv_ids 2305.14314,2106.09685
    python generate_qa.py --arxiv_query "cat:cs.CL AND ti:instruction tuning" --max_papers 40

Writes data/synthetic_qa.jsonl (train), data/eval_questions.jsonl (whole held-out papers), a manifest
(data/synthetic_qa.manifest.json) and the rejects (data/rejects_synthetic_qa.jsonl), together at the end:
a run that fails, is interrupted or is killed (before the final renames) leaves the previous outputs as they
were and writes no manifest, and a second run on the same outputs is refused while the first holds their
lock file.
Every LLM reply is appended to a cache (data/.cache/synthetic_qa.jsonl) the moment it arrives: after
Ctrl-C or a kill, rerun the same command and only unanswered requests are sent (the at most
--concurrency requests in flight at the kill are paid twice). A cached reply that was empty, not JSON
or not the asked schema, and whose repair failed too, is asked again on the next run (--reuse_cache).

What is refused: a pair whose question or answer holds a chat role marker or special token (<|user|>,
</s>, [INST]...) is rejected, not cleaned; such markers in an abstract or title are removed when it is
read (the manifest lists the papers). A paper longer than --max_abstract_chars is skipped as a reject.
The API key never reaches a file or the log: server errors and replies are stored with it removed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from common import (DEFAULT_SYSTEM_PROMPT, HelpFormatter, InputError, RunFailure, add_flag, chat_record,
                    eval_questions_path, qa_messages, run_main, sha256_file, sha256_text)
from paperqa_tune.abstracts import fetch_arxiv, read_abstract_file
from paperqa_tune.llm import (GIVE_UP_AFTER_TIMEOUTS, TIMEOUT_RETRIES, HFBackend, OpenAIBackend, Outcome, Progress,
                              ResponseCache, Stats)
from paperqa_tune.offline_qa import OFFLINE_MODEL, offline_pairs
from paperqa_tune.outputs import OutputSet, write_staged
from paperqa_tune.prompts import (ANSWERABLE, PAIRS_SCHEMA, SCORES_SCHEMA, TYPES, generation_messages,
                                  judge_messages, prompts_hash, repair_messages, type_quotas)
from paperqa_tune.safety import chat_structure, scrub
from paperqa_tune.scoring import corrects_premise, is_refusal
from paperqa_tune.textsim import (clean_text, cross_group_near_duplicates, grounding, normalized, numbers,
                                  question_tokens, within_paper_duplicate)

DEFAULT_MODELS = {"openai": "gpt-4o-mini", "hf": "HuggingFaceH4/zephyr-7b-beta", "offline": OFFLINE_MODEL}
ARXIV_API_URL = "https://export.arxiv.org/api/query"
ARXIV_ID_RE = re.compile(r"^(\d{4}\.\d{4,5}|[a-z][a-z\-]*(\.[A-Z]{2})?/\d{7})(v\d+)?$")
# USD per 1M (input, output) tokens, for the manifest's cost estimate only; --price_per_mtok overrides.
PRICES_PER_MTOK = {"gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00), "gpt-4.1-mini": (0.40, 1.60),
                   "gpt-4.1-nano": (0.10, 0.40), "gpt-4.1": (2.00, 8.00)}


# =========================================================================== flags
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--input", nargs="+", action="extend", default=[], metavar="FILE",
                   help="abstract files: .jsonl {id,title,abstract}, .csv with those columns, .txt with "
                        "blank-line-separated abstracts; several allowed")
    add_flag(g, "--arxiv_ids", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], action="extend",
             default=[], metavar="IDS", help="also fetch these arXiv papers' abstracts: comma-separated ids, "
                                             "e.g. 2305.14314,2106.09685")
    add_flag(g, "--arxiv_query", default=None,
             help='also fetch the abstracts an arXiv search returns, e.g. "cat:cs.CL AND ti:retrieval"')
    add_flag(g, "--max_papers", type=int, default=20, help="most papers --arxiv_query fetches")
    add_flag(g, "--arxiv_api_url", default=ARXIV_API_URL,
             help="arXiv API endpoint to fetch from (change it only for a mirror or for tests)")
    add_flag(g, "--max_abstract_chars", type=int, default=20000,
             help="skip (as a reject, the run goes on) a paper whose title and abstract together are longer: the "
                  "abstract is sent in every request about it and copied into each of its eval questions")
    g = p.add_argument_group("generation")
    g.add_argument("--backend", choices=("openai", "hf", "offline"), default="openai",
                   help="what writes the pairs: openai = any OpenAI-compatible server, hf = a local transformers "
                        "model, offline = rules over the abstract's own sentences (no LLM, no key)")
    g.add_argument("--model", default=None,
                   help=f"model that writes the pairs, a name or path (default: {DEFAULT_MODELS['openai']} for "
                        f"openai, {DEFAULT_MODELS['hf']} for hf)")
    add_flag(g, "--base_url", default=None,
             help="OpenAI-compatible server to send requests to, e.g. http://localhost:8000/v1 (default: "
                  "OpenAI's); the key comes from OPENAI_API_KEY")
    add_flag(g, "--pairs_per_abstract", type=int, default=12, help="Q&A pairs to ask for per abstract")
    add_flag(g, "--edge_case_ratio", type=float, default=0.2,
             help="share of those pairs that are edge cases (unanswerable and false-premise questions)")
    add_flag(g, "--system_prompt", default=DEFAULT_SYSTEM_PROMPT,
             help="system turn written into every training record and eval question")
    g.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature of the model writing the pairs (0: greedy)")
    add_flag(g, "--max_tokens", type=int, default=3000,
             help="longest reply per request, in tokens; a reply cut off there usually cannot be parsed")
    add_flag(g, "--response_format", choices=("json_schema", "json_object", "none"), default="json_schema",
             help="structured output to ask the server for; plain JSON is asked instead if the server refuses it")
    g.add_argument("--concurrency", type=int, default=8,
                   help="requests in flight at once (openai backend); also the most a kill can make you pay twice "
                        "(their replies never reach the cache)")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="seconds one attempt of a request may take in all, from sending it to the last byte of the "
                        "reply (a server that trickles bytes is cut off too); a request is tried at most "
                        f"{TIMEOUT_RETRIES + 1} times on timeouts, so a server that never answers costs at most "
                        f"{TIMEOUT_RETRIES + 1} x this per request, and the run stops with exit 1 after "
                        f"{GIVE_UP_AFTER_TIMEOUTS} requests in a row got no reply")
    add_flag(g, "--max_retries", type=int, default=4,
             help="retries of a request on rate limits (429), server errors (5xx) and lost connections, with "
                  "backoff and the server's Retry-After (timeouts: see --timeout)")
    add_flag(g, "--batch_size", type=int, default=4,
             help="prompts generated together (hf backend); lower it if the GPU runs out of memory")
    add_flag(g, "--trust_remote_code", action="store_true",
             help="run the model repository's own Python code (hf backend); only for models you trust")
    add_flag(g, "--price_per_mtok", default=None, metavar="IN,OUT",
             help="USD per 1M input,output tokens for the manifest's cost estimate (default: the price of "
                  "known OpenAI models, else 0)")
    g = p.add_argument_group("curation and split")
    add_flag(g, "--min_grounding", type=float, default=0.5,
             help="drop an answerable pair unless this share of its answer's content words occurs in the abstract")
    add_flag(g, "--dedup_threshold", type=float, default=0.8,
             help="drop a question whose word overlap (Jaccard) with a kept question is at least this")
    add_flag(g, "--min_question_chars", type=int, default=10, help="drop pairs whose question is shorter")
    add_flag(g, "--max_question_chars", type=int, default=400, help="drop pairs whose question is longer")
    add_flag(g, "--min_answer_chars", type=int, default=15, help="drop pairs whose answer is shorter")
    add_flag(g, "--max_answer_chars", type=int, default=1500, help="drop pairs whose answer is longer")
    add_flag(g, "--judge_model", default=None,
             help="also have this model (same server and key) score every pair 1-5, and drop low scores")
    add_flag(g, "--min_score", type=float, default=3.0, help="with --judge_model: drop pairs scored below this")
    add_flag(g, "--eval_papers", type=float, default=3,
             help="papers held out whole as evaluation questions: a count, or a fraction of them if below 1")
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default="data/synthetic_qa.jsonl", help="training records (chat JSONL) to write")
    add_flag(g, "--eval_out", default=None,
             help="held-out evaluation questions to write (default: beside --out: eval_questions.jsonl for "
                  "synthetic_qa.jsonl, else <out stem>_eval_questions.jsonl)")
    g.add_argument("--manifest", default=None,
                   help="run manifest to write: inputs, counts, tokens, cost (default: OUT with .manifest.json)")
    g.add_argument("--rejects", default=None, help="dropped pairs and failed requests with the reason "
                                                   "(default: rejects_<OUT name>.jsonl next to OUT)")
    g.add_argument("--cache", default=None, help="append-only cache of LLM replies that a rerun reuses; it is kept "
                                                 "when a run fails (default: .cache/<OUT name>.jsonl next to OUT)")
    add_flag(g, "--reuse_cache", choices=("valid", "all", "none"), default="valid",
             help="which cached replies a rerun uses instead of asking again: valid = those that passed validation "
                  "(a reply that was empty, not JSON or not the asked schema, and was not repaired, is asked again "
                  "once per run), all = every cached reply, none = ask everything again (paid again)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument("--seed", type=int, default=0, help="seed for the train/eval split and the model's sampling")
    return p


def validate_args(args) -> None:
    """Check everything at once, so one run shows every problem."""
    problems = []
    if not (args.input or args.arxiv_ids or args.arxiv_query):
        problems.append("give abstracts with --input FILE, --arxiv_ids or --arxiv_query")
    bad_ids = [i for i in args.arxiv_ids if not ARXIV_ID_RE.match(i)]
    if bad_ids:
        problems.append(f"--arxiv_ids: not arXiv ids: {', '.join(bad_ids)} "
                        "(expected e.g. 2305.14314 or hep-th/9901001)")
    if not re.match(r"^https?://", args.arxiv_api_url):
        problems.append("--arxiv_api_url must start with http:// or https://")
    checks = [("--pairs_per_abstract", args.pairs_per_abstract >= 1),
              ("--edge_case_ratio", 0 <= args.edge_case_ratio <= 1),
              ("--concurrency", args.concurrency >= 1), ("--timeout", args.timeout > 0),
              ("--max_retries", args.max_retries >= 0),
              ("--batch_size", args.batch_size >= 1), ("--max_tokens", args.max_tokens >= 1),
              ("--max_papers", args.max_papers >= 1), ("--temperature", args.temperature >= 0),
              ("--max_abstract_chars", args.max_abstract_chars >= 1),
              ("--min_grounding", 0 <= args.min_grounding <= 1), ("--dedup_threshold", 0 < args.dedup_threshold <= 1),
              ("--eval_papers", args.eval_papers >= 0 and (args.eval_papers < 1 or float(args.eval_papers).is_integer())),
              ("--min_question_chars/--max_question_chars", 0 <= args.min_question_chars <= args.max_question_chars),
              ("--min_answer_chars/--max_answer_chars", 0 <= args.min_answer_chars <= args.max_answer_chars)]
    problems += [f"{name}: invalid value" for name, ok in checks if not ok]
    if args.price_per_mtok is not None:
        try:
            args.price = tuple(float(x) for x in args.price_per_mtok.split(","))
            assert len(args.price) == 2
        except (ValueError, AssertionError):
            problems.append("--price_per_mtok must be two numbers IN,OUT, e.g. 0.15,0.60")
    marker = chat_structure(args.system_prompt)
    if marker:
        problems.append(f"--system_prompt holds the chat marker {marker!r}, which would end or fake a turn in every "
                        "training record; remove it")
    if args.backend == "offline" and args.model not in (None, OFFLINE_MODEL):
        problems.append("--model has no effect with --backend offline; drop it")
    args.api_key = os.environ.get("OPENAI_API_KEY", "").strip() or None
    if (args.backend == "openai" or args.judge_model) and not args.api_key:
        problems.append("OPENAI_API_KEY is not set: export it (any non-empty value for local servers that ignore "
                        "keys), or use --backend offline / --backend hf")
    if problems:
        raise InputError("\n  ".join(["bad arguments:"] + problems))


def output_paths(args) -> dict[str, Path]:
    out = Path(args.out)
    return {"train": out, "eval": Path(args.eval_out) if args.eval_out else eval_questions_path(out),
            "manifest": Path(args.manifest) if args.manifest else out.with_name(out.stem + ".manifest.json"),
            "rejects": Path(args.rejects) if args.rejects else out.with_name(f"rejects_{out.stem}.jsonl"),
            "cache": Path(args.cache) if args.cache else out.parent / ".cache" / f"{out.stem}.jsonl"}


FLAG_OF = {"train": "--out", "eval": "--eval_out", "rejects": "--rejects", "manifest": "--manifest"}


def output_set(args, paths: dict[str, Path]) -> OutputSet:
    """The four outputs, written together at the end (the cache is not one of them: it is the append-only resume
    log and survives a failed run, so it only has to stay clear of the inputs and outputs)."""
    outs = OutputSet({FLAG_OF[k]: paths[k] for k in FLAG_OF}, inputs=args.input, overwrite=args.overwrite)
    cache = paths["cache"]
    if cache.is_dir():
        raise InputError(f"--cache {cache} is a folder; give a file path")
    taken = {**{FLAG_OF[k]: paths[k] for k in FLAG_OF}, **{f"--input {i}": Path(i) for i in args.input}}
    for name, p in taken.items():
        if p.resolve() == cache.resolve():
            raise InputError(f"--cache {cache} is also {name.split()[0]} ({p}); the cache is appended to, so give "
                             "it its own path")
    return outs


# =========================================================================== inputs
def load_papers(args) -> tuple[list[dict], list[dict]]:
    papers, inputs = [], []
    for path in args.input:
        got = read_abstract_file(Path(path))
        inputs.append({"path": str(path), "sha256": sha256_file(path), "papers": len(got)})
        papers += got
    if args.arxiv_ids or args.arxiv_query:
        got = fetch_arxiv(args.arxiv_ids, args.arxiv_query, args.max_papers, args.arxiv_api_url)
        inputs.append({"arxiv_ids": args.arxiv_ids, "arxiv_query": args.arxiv_query, "api_url": args.arxiv_api_url,
                       "papers": len(got), "sha256": sha256_text(json.dumps(got, sort_keys=True))})
        papers += got
    seen: dict[str, dict] = {}
    unique = []
    for p in papers:
        if p["id"] in seen:
            if seen[p["id"]]["abstract"] != p["abstract"]:
                raise InputError(f"{p['_where']}: id {p['id']!r} already used at {seen[p['id']]['_where']} "
                                 "with a different abstract; give each paper its own id")
            continue
        seen[p["id"]] = p
        unique.append(p)
    if not unique:
        raise InputError("no abstracts to work on; pass --input FILE, --arxiv_ids or --arxiv_query")
    return unique, inputs


def skip_too_long(papers: list[dict], limit: int) -> tuple[list[dict], list[dict]]:
    """(papers to work on, rejects of those whose title + abstract exceed --max_abstract_chars). Such a paper would
    be sent whole in its request and again in a repair, and copied into every eval question's context."""
    kept, rejects = [], []
    for p in papers:
        n = len(p["title"]) + len(p["abstract"])
        if n <= limit:
            kept.append(p)
        else:
            rejects.append({"paper_id": p["id"], "stage": "input", "where": p["_where"],
                            "reason": f"too_long: title and abstract have {n:,} chars, more than --max_abstract_chars "
                                      f"{limit:,}; raise --max_abstract_chars to keep this paper"})
    if not kept:
        longest = max(papers, key=lambda p: len(p["title"]) + len(p["abstract"]))
        raise InputError(f"every paper is longer than --max_abstract_chars {limit:,} (the longest has "
                         f"{len(longest['title']) + len(longest['abstract']):,} chars, at {longest['_where']}); raise "
                         "--max_abstract_chars if these really are abstracts")
    return kept, rejects


# =========================================================================== generation: replies, requests
def _json_object(content: str | None):
    if content is None or not content.strip():
        raise ValueError("the reply was empty")
    text = content.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        a, b = text.find("{"), text.rfind("}")
        if 0 <= a < b:
            try:
                return json.loads(text[a: b + 1])
            except json.JSONDecodeError:
                pass
        raise ValueError(f"not valid JSON ({e.msg} at char {e.pos})") from None


def parse_pairs(out: Outcome) -> tuple[list[dict], list[tuple[dict, str]]]:
    """(valid pairs, [(bad item, reason)]). Raises ValueError when nothing usable came back."""
    try:
        obj = _json_object(out.content)
    except ValueError as e:
        cut = " (cut off at --max_tokens)" if out.finish_reason == "length" else ""
        raise ValueError(f"{e}{cut}") from None
    items = obj.get("pairs") if isinstance(obj, dict) else obj if isinstance(obj, list) else None
    if not isinstance(items, list):
        raise ValueError("the JSON has no 'pairs' list")
    good, bad = [], []
    for item in items:
        if not isinstance(item, dict):
            bad.append(({"raw": str(item)[:200]}, "pair is not an object"))
            continue
        t = re.sub(r"[\s-]+", "_", str(item.get("type", "")).strip().lower())
        q, a = item.get("question"), item.get("answer")
        if t not in TYPES:
            bad.append((item, f"unknown type {item.get('type')!r}"))
        elif not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
            bad.append((item, "missing or empty question/answer"))
        else:
            good.append({"type": t, "question": clean_text(q), "answer": a.strip()})
    if not good:
        raise ValueError(f"no valid pair in the reply ({bad[0][1] if bad else 'empty pairs list'})")
    return good, bad


def reply_problem(out: Outcome) -> str | None:
    """Why a generation reply cannot be used (empty, not JSON, no valid pair), or None."""
    try:
        parse_pairs(out)
    except ValueError as e:
        return str(e)
    return None


async def generate_llm(backend, papers: list[dict], quotas, stats: Stats, progress: Progress, counts: Counter,
                       rejects: list[dict]) -> list[dict]:
    """One request per abstract, one repair request for each unusable reply; failures become rejects."""
    def reject(pid, stage, reason, **extra):
        stats.rejects += 1
        counts[stage] += 1
        rejects.append({"paper_id": pid, "stage": stage, "reason": reason, **extra})

    base = [generation_messages(p, quotas) for p in papers]

    def generate_usable(k: int, cached: Outcome) -> bool:
        """A cached first reply is used unless it failed and so did its cached repair: then the paper starts
        over (a failed reply whose repair was never sent, e.g. after a kill, just goes on to the repair)."""
        problem = reply_problem(cached)
        if problem is None:
            return True
        repaired = backend.lookup(repair_messages(base[k], cached.content, problem), "qa_pairs", PAIRS_SCHEMA)
        return repaired is None or reply_problem(repaired) is None

    def repair_usable(k: int, cached: Outcome) -> bool:
        return reply_problem(cached) is None

    parsed: dict[int, list[dict]] = {}
    todo, msgs = list(range(len(papers))), base
    for rnd, usable in (("generate", generate_usable), ("repair", repair_usable)):
        retry: list[tuple[int, str, str | None]] = []

        def on_done(k: int, out: Outcome) -> None:  # parse each reply as it arrives, for the live counts
            i = todo[k]
            stats.add(out)
            if out.error:
                reject(papers[i]["id"], "request_failed", out.error)
            else:
                try:
                    good, bad = parse_pairs(out)
                    for item, why in bad:
                        reject(papers[i]["id"], "invalid_pair", why, item=item)
                    stats.pairs += len(good)
                    parsed[i] = good
                except ValueError as e:
                    if rnd == "repair":
                        reject(papers[i]["id"], "invalid_reply", f"unusable reply after one repair: {e}",
                               raw=(out.content or "")[:500])
                    else:
                        retry.append((i, str(e), out.content))
            progress.step()

        progress.start(len(todo), rnd)
        await backend.complete(msgs, "qa_pairs", PAIRS_SCHEMA, on_done, usable)
        progress.close()
        if not retry:
            break
        retry.sort()  # replies arrive in any order; the repair round is built in input order
        todo, msgs = [i for i, _, _ in retry], [repair_messages(base[i], raw, err) for i, err, raw in retry]
    stats.failed = counts["request_failed"]
    return [{**pair, "paper_id": papers[i]["id"]} for i in sorted(parsed) for pair in parsed[i]]


# =========================================================================== curation
# Error messages and refusals that a careless pipeline would keep as answers
_ERROR_TEXT_RE = re.compile(r"^\s*(error|exception|traceback|i'm sorry|sorry, |i cannot|i can't)\b|"
                            r"internal server error|rate limit (exceeded|reached)|as an ai (language )?model", re.I)


def check_pair(p: dict, abstract: str, args) -> str | None:
    """The reason this pair is dropped, or None (chat markers, length, error text, grounding, edge-case behaviour).
    A pair holding a chat role marker or special token is rejected, not cleaned: rendered into training text the
    marker would end the turn or open a fake one, and a pair that needed one is not worth repairing."""
    q, a = p["question"], p["answer"]
    for part, text in (("question", q), ("answer", a)):
        marker = chat_structure(text)
        if marker:
            return f"chat_markers: the {part} holds the chat marker {marker!r}"
    if not args.min_question_chars <= len(q) <= args.max_question_chars:
        return f"length: question has {len(q)} chars (allowed {args.min_question_chars}-{args.max_question_chars})"
    if not args.min_answer_chars <= len(a) <= args.max_answer_chars:
        return f"length: answer has {len(a)} chars (allowed {args.min_answer_chars}-{args.max_answer_chars})"
    if _ERROR_TEXT_RE.search(q) or _ERROR_TEXT_RE.search(a):
        return "error_text: looks like an error message, not a Q&A pair"
    invented = numbers(a) - numbers(abstract) - numbers(q)
    if invented:
        return f"ungrounded_number: answer has {', '.join(sorted(invented))} which the abstract does not"
    if p["type"] in ANSWERABLE:
        g = grounding(a, abstract)
        if g < args.min_grounding:
            return (f"ungrounded: only {g:.0%} of the answer's content words are in the abstract "
                    f"(< {args.min_grounding:.0%})")
    elif p["type"] == "unanswerable" and not is_refusal(a):
        return "no_refusal: an unanswerable question's answer must say the abstract does not give it"
    elif p["type"] == "false_premise" and not corrects_premise(a):
        return "no_correction: a false-premise question's answer must correct the premise"
    return None


def curate(pairs: list[dict], papers: dict[str, dict], args, counts: Counter, rejects: list[dict]) -> list[dict]:
    """Per-pair checks, then exact and near-duplicate removal (within a paper, then across papers)."""
    def drop(p, reason):
        counts[reason.split(":")[0]] += 1
        rejects.append({"paper_id": p["paper_id"], "stage": "curate", "reason": reason, "type": p["type"],
                        "question": p["question"], "answer": p["answer"]})

    kept, seen = [], {}
    by_paper: dict[str, list[str]] = defaultdict(list)
    for p in pairs:
        paper = papers[p["paper_id"]]
        reason = check_pair(p, paper["abstract"], args)
        norm = normalized(p["question"])
        if reason is None and norm in seen:
            reason = f"duplicate: same question as one of paper {seen[norm]}"
        if reason is None:
            other = within_paper_duplicate(p["question"], by_paper[p["paper_id"]], paper["title"], args.dedup_threshold)
            if other is not None:
                reason = f"near_duplicate: close to {other!r}"
        if reason:
            drop(p, reason)
            continue
        seen[norm] = p["paper_id"]
        by_paper[p["paper_id"]].append(p["question"])
        kept.append(p)
    dups = cross_group_near_duplicates([question_tokens(p["question"]) for p in kept], [p["paper_id"] for p in kept],
                                       args.dedup_threshold)
    for i, j in dups.items():
        drop(kept[i], f"near_duplicate: close to {kept[j]['question']!r} of paper {kept[j]['paper_id']}")
    return [p for i, p in enumerate(kept) if i not in dups]


def judge_scores(out: Outcome) -> dict[int, tuple[float, str]]:
    """{pair index: (score, reason)} from a judge reply; empty when it failed or does not parse."""
    scores = {}
    if out.error is None:
        try:
            obj = _json_object(out.content)
        except ValueError:
            return scores
        for s in obj.get("scores", []) if isinstance(obj, dict) else []:
            ok = isinstance(s, dict) and isinstance(s.get("index"), int) and not isinstance(s.get("score"), bool)
            if ok and isinstance(s.get("score"), (int, float)):
                scores[s["index"]] = (float(s["score"]), str(s.get("reason", ""))[:300])
    return scores


async def judge(judge_backend, pairs: list[dict], papers: dict[str, dict], min_score: float, stats: Stats,
                progress: Progress, counts: Counter, rejects: list[dict]) -> list[dict]:
    """Score each paper's surviving pairs in one request; keep those at or above --min_score."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        groups[p["paper_id"]].append(p)
    ids = list(groups)
    progress.start(len(ids), "judge")

    def on_done(k: int, out: Outcome) -> None:
        stats.add(out)
        progress.step()

    def usable(k: int, cached: Outcome) -> bool:  # a cached verdict missing a pair's score is asked again
        return set(judge_scores(cached)) >= set(range(1, len(groups[ids[k]]) + 1))

    msgs = [judge_messages(papers[i], groups[i]) for i in ids]
    outs = await judge_backend.complete(msgs, "scores", SCORES_SCHEMA, on_done, usable)
    progress.close()
    kept = []
    for pid, out in zip(ids, outs):
        scores = judge_scores(out)
        for k, p in enumerate(groups[pid], 1):
            if k in scores and scores[k][0] >= min_score:
                kept.append({**p, "judge_score": scores[k][0]})
                continue
            if k in scores:
                reason, key = f"judge_low_score: {scores[k][0]:g} < {min_score:g} ({scores[k][1]})", "judge_low_score"
            else:
                reason, key = f"judge_failed: no score ({out.error or 'missing in the reply'})", "judge_failed"
            counts[key] += 1
            stats.rejects += 1
            rejects.append({"paper_id": pid, "stage": "judge", "reason": reason, "type": p["type"],
                            "question": p["question"], "answer": p["answer"]})
    return kept


def split_papers(paper_ids: list[str], spec: float, seed: int) -> set[str]:
    """Whole papers held out for evaluation: K papers, or a fraction when 0 < spec < 1."""
    n = len(paper_ids)
    k = round(spec * n) if 0 < spec < 1 else int(spec)
    k = max(1, k) if spec > 0 else 0
    k = min(k, n - 1) if n > 1 else 0
    return set(random.Random(seed).sample(paper_ids, k))


# =========================================================================== outputs
def to_records(pairs: list[dict], papers: dict[str, dict], held_out: set[str], args, model: str
               ) -> tuple[list[dict], list[dict]]:
    """(training chat records, evaluation questions): every pair of a held-out paper becomes a question."""
    train, evals, n_by_paper = [], [], Counter()
    for p in pairs:
        n_by_paper[p["paper_id"]] += 1
        pid = p["paper_id"]
        if pid in held_out:
            evals.append({"id": f"{pid}-q{n_by_paper[pid]}", "question": p["question"], "reference": p["answer"],
                          "type": p["type"], "paper_id": pid, "context": papers[pid]["abstract"],
                          "system": args.system_prompt})
        else:
            meta = {"paper_id": pid, "type": p["type"], "backend": args.backend, "model": model,
                    "id": f"{pid}-q{n_by_paper[pid]}", "title": papers[pid]["title"], "generator": "generate_qa.py"}
            if "judge_score" in p:
                meta["judge_score"] = p["judge_score"]
            train.append(chat_record(qa_messages(p["question"], p["answer"], args.system_prompt), meta))
    return train, evals


def cost_estimate(args, model: str, stats: Stats) -> dict:
    price = getattr(args, "price", None) or PRICES_PER_MTOK.get(model if args.backend == "openai" else "", (0.0, 0.0))

    def cost(prompt_tokens: int, completion_tokens: int) -> float:
        return round((prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6, 6)

    return {"price_per_mtok_in_out": list(price),
            "this_run": cost(stats.new_prompt_tokens, stats.new_completion_tokens),
            "all_replies_used": cost(stats.prompt_tokens, stats.completion_tokens)}


# =========================================================================== the run
def _scrubbed(obj, secret: str | None):
    """obj with the API key removed from every string in it (what we write must never carry it)."""
    if isinstance(obj, str):
        return scrub(obj, secret)
    if isinstance(obj, dict):
        return {k: _scrubbed(v, secret) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrubbed(v, secret) for v in obj]
    return obj


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def read_inputs(args) -> tuple[list[dict], list[dict], list[dict], dict[str, int]]:
    """(papers to work on, input records for the manifest, rejects of skipped papers, input order of every id)."""
    papers, inputs = load_papers(args)
    order = {p["id"]: k for k, p in enumerate(papers)}
    papers, skipped = skip_too_long(papers, args.max_abstract_chars)
    if skipped:
        ids = [r["paper_id"] for r in skipped]
        print(f"note: {len(ids)} paper(s) longer than --max_abstract_chars {args.max_abstract_chars:,} skipped "
              f"(see the rejects): {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}", file=sys.stderr)
    marked = [p["id"] for p in papers if "_chat_markers" in p]
    if marked:
        print(f"note: chat markers removed from the title or abstract of {len(marked)} paper(s) (listed in the "
              f"manifest): {', '.join(marked[:5])}{' ...' if len(marked) > 5 else ''}", file=sys.stderr)
    return papers, inputs, skipped, order


def _main(argv=None) -> int:
    t0 = time.time()
    args = build_parser().parse_args(argv)
    validate_args(args)
    paths = output_paths(args)
    outs = output_set(args, paths)  # exits 2 on outputs that clash with each other, an input or the cache
    with outs:  # locked: a second run on these outputs is refused; ours replace the old ones only at commit()
        return _run(args, argv, paths, outs, t0)


def _run(args, argv, paths: dict[str, Path], outs: OutputSet, t0: float) -> int:
    model = args.model or DEFAULT_MODELS[args.backend]
    papers, inputs, skipped, order = read_inputs(args)
    by_id = {p["id"]: p for p in papers}
    quotas = type_quotas(args.pairs_per_abstract, args.edge_case_ratio)
    print(f"generate_qa: {len(papers)} abstracts, backend={args.backend} model={model}, "
          f"{args.pairs_per_abstract} pairs/abstract {quotas}, eval papers={args.eval_papers:g}, seed={args.seed}",
          file=sys.stderr)

    stats, counts, rejects = Stats(rejects=len(skipped)), Counter(), list(skipped)
    progress = Progress(stats)
    cache = ResponseCache(paths["cache"])
    if cache.loaded and args.backend != "offline":
        print(f"cache: {cache.loaded} earlier replies in {paths['cache']} (used unless --reuse_cache says otherwise)",
              file=sys.stderr)

    def openai_backend(m):
        return OpenAIBackend(m, args.api_key, args.base_url, args.timeout, args.max_retries, args.concurrency,
                             args.temperature, args.max_tokens, args.seed, args.response_format, cache,
                             args.reuse_cache)

    async def pipeline():
        if args.backend == "offline":
            pairs = [{**pair, "paper_id": p["id"]} for p in papers
                     for pair in offline_pairs(p, quotas, args.dedup_threshold)]
            stats.pairs = len(pairs)
        else:
            backend = openai_backend(model) if args.backend == "openai" else HFBackend(
                model, args.batch_size, args.temperature, args.max_tokens, args.seed, args.trust_remote_code, cache,
                args.reuse_cache)
            pairs = await generate_llm(backend, papers, quotas, stats, progress, counts, rejects)
        generated = len(pairs)
        pairs = curate(pairs, by_id, args, counts, rejects)
        if args.judge_model and pairs:
            pairs = await judge(openai_backend(args.judge_model), pairs, by_id, args.min_score, stats, progress,
                                counts, rejects)
        return generated, pairs

    try:
        generated, pairs = asyncio.run(pipeline())
    finally:
        progress.close()

    # whole papers are held out, so no evaluation question shares its abstract with training
    have = {q["paper_id"] for q in pairs}
    with_pairs = [p["id"] for p in papers if p["id"] in have]
    held_out = split_papers(with_pairs, args.eval_papers, args.seed)
    if args.eval_papers and not held_out and pairs:
        print("warning: fewer than 2 papers have pairs, so none is held out for evaluation", file=sys.stderr)
    train, evals = to_records(pairs, by_id, held_out, args, model)

    manifest = {
        "script": "generate_qa.py", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "args": {k: v for k, v in vars(args).items() if k not in ("api_key", "price")},
        "inputs": inputs, "backend": args.backend, "model": model, "base_url": args.base_url,
        "judge_model": args.judge_model, "prompt_sha256": prompts_hash(args.system_prompt), "quotas": quotas,
        "papers": {"total": len(order), "skipped_too_long": [r["paper_id"] for r in skipped],
                   "chat_markers_removed": {p["id"]: p["_chat_markers"] for p in papers if "_chat_markers" in p},
                   "with_pairs": len(with_pairs), "eval": sorted(held_out), "train": len(with_pairs) - len(held_out)},
        "counts": {"generated": generated, "kept": len(pairs), "train": len(train), "eval": len(evals),
                   "train_by_type": dict(Counter(r["meta"]["type"] for r in train)),
                   "eval_by_type": dict(Counter(e["type"] for e in evals)),
                   "filters": dict(counts), "rejects": len(rejects)},
        # asked_again: cached replies sent again because they failed validation (or --reuse_cache none)
        "requests": {"answered_this_run": stats.requests_sent, "from_cache": stats.cache_hits,
                     "asked_again": stats.asked_again, "failed": stats.failed},
        "tokens": {"prompt": stats.prompt_tokens, "completion": stats.completion_tokens,
                   "this_run_prompt": stats.new_prompt_tokens, "this_run_completion": stats.new_completion_tokens},
        "estimated_cost_usd": cost_estimate(args, model, stats),
        "outputs": {k: str(v) for k, v in paths.items()},
        "seconds": round(time.time() - t0, 2),
    }
    rejects.sort(key=lambda r: order[r["paper_id"]])  # replies arrive in any order; the file should not
    rejects, manifest = _scrubbed(rejects, args.api_key), _scrubbed(manifest, args.api_key)
    report_run(args, paths, stats, counts, manifest, generated, pairs, train, evals, held_out)
    why = paths["cache"].with_name(f"{paths['cache'].stem}.failed_run_rejects.jsonl")
    if not pairs:
        # A failed run replaces nothing: the reasons go beside the cache, the outputs stay as they were.
        try:
            write_staged(why, _jsonl(rejects))
        except OSError as e:
            why = f"(not saved: {e})"
        print(f"error: no pair survived, so no output was written (earlier ones are unchanged); why each pair or "
              f"request was dropped: {why}", file=sys.stderr)
        return 1
    try:
        for name, text in (("--out", _jsonl(train)), ("--eval_out", _jsonl(evals)), ("--rejects", _jsonl(rejects)),
                           ("--manifest", json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")):
            write_staged(outs.stage(name), text)
    except OSError as e:  # a full disk, a read-only folder: what was staged is removed, nothing replaced
        raise RunFailure(f"cannot write {name} {outs.paths[name]} ({e.strerror or e}); no output was replaced, and "
                         "the cache keeps every reply: free space or fix the folder, then rerun the same command"
                         ) from None
    outs.commit(["--out", "--eval_out", "--rejects", "--manifest"])  # the manifest last: it marks a finished run
    why.unlink(missing_ok=True)  # an earlier failure's report no longer applies
    return 0


def report_run(args, paths, stats: Stats, counts: Counter, manifest: dict, generated: int, pairs, train, evals,
               held_out) -> None:
    print(f"pairs: {generated} generated, {len(pairs)} kept -> {len(train)} train ({paths['train']}), "
          f"{len(evals)} eval from {len(held_out)} held-out papers ({paths['eval']})", file=sys.stderr)
    where = f" in {paths['rejects']}" if pairs else ""
    print(f"filters: {dict(sorted(counts.items())) or 'nothing dropped'}; {manifest['counts']['rejects']} "
          f"rejects{where}", file=sys.stderr)
    if args.backend != "offline" or args.judge_model:
        again = f", {stats.asked_again} cached asked again" if stats.asked_again else ""
        print(f"requests: {stats.requests_sent} answered now, {stats.cache_hits} from cache{again}, {stats.failed} "
              f"failed; tokens {stats.prompt_tokens}+{stats.completion_tokens}, est. cost this run "
              f"${manifest['estimated_cost_usd']['this_run']:.4f}", file=sys.stderr)
    if stats.failed:
        again = "rerun the same command with --overwrite" if pairs else "rerun the same command"
        print(f"note: {stats.failed} request(s) failed (see the rejects); {again} to retry only those: answered "
              "requests come from the cache", file=sys.stderr)


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
