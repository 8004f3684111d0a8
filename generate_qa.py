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

    # full texts, split into sections: PDF files or folders of them, or the arXiv papers' PDFs
    python generate_qa.py --backend offline --input paper.pdf papers/
    python generate_qa.py --arxiv_ids 2305.14314 --full_text

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
import re
import sys
import time
from collections import Counter
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path

from common import (DEFAULT_SYSTEM_PROMPT, HelpFormatter, InputError, RunFailure, add_flag, eval_questions_path,
                    jsonl_lines,
                    finite_float, resolve_path, run_main, sha256_file, sha256_text)
from paperqa_tune.client import FORMAT_STEPS, GIVE_UP_AFTER_TIMEOUTS, TIMEOUT_RETRIES, ClientSettings, Flags
from paperqa_tune.qa.abstracts import fetch_arxiv, http_session, input_files, read_abstract_file
from paperqa_tune.qa.curation import (CurationRules, Kept, Plan, Tally, curate, judge, plan_requests, quality_items,
                                      set_notes, skip_too_long, source_units, split_sets, to_records)
from paperqa_tune.qa.fulltext import PdfRejected, add_full_texts, read_pdf
from paperqa_tune.llm import (HOSTED_DEFAULTS, LOCAL_CONCURRENCY, LOCAL_TIMEOUT, TOKENS_PER_ITEM, TOKENS_SLACK,
                              HFBackend, HFSettings, OpenAIBackend, Outcome, Progress, ResponseCache, Sampling, Stats,
                              cost_estimate, price_per_mtok, resolve_request_defaults, sized_max_tokens)
from paperqa_tune.qa.offline_qa import OFFLINE_MODEL, offline_conversations
from paperqa_tune.outputs import OutputSet, run_command, write_staged
from paperqa_tune.qa.prompts import (DIALOGUES_SCHEMA, PAIRS_SCHEMA, conversations_per_source, generation_messages,
                                     items_asked, prompts_hash, repair_messages, request_schema)
from paperqa_tune.qa.quality import format_quality, plot_quality, quality_report
from paperqa_tune.qa.replies import parse_reply, reply_problem
from paperqa_tune.safety import chat_structure, scrub_all

DEFAULT_MODELS = {"openai": "gpt-4o-mini", "hf": "HuggingFaceH4/zephyr-7b-beta", "offline": OFFLINE_MODEL}
ARXIV_API_URL = "https://export.arxiv.org/api/query"
ARXIV_PDF_URL = "https://arxiv.org/pdf/{id}"
ARXIV_ID_RE = re.compile(r"^(\d{4}\.\d{4,5}|[a-z][a-z\-]*(\.[A-Z]{2})?/\d{7})(v\d+)?$")
RULES = CurationRules()  # the curation flags' defaults


# =========================================================================== flags
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--input", nargs="+", action="extend", default=[], metavar="PATH",
                   help="papers: .pdf full texts (split into sections), abstract files (.jsonl {id,title,abstract}, "
                        ".csv with those columns, .txt with blank-line-separated abstracts), or folders (every "
                        ".pdf/.jsonl/.csv/.txt directly in one); several allowed. A PDF that gives no text "
                        "(encrypted, scanned, damaged) is a reject and the run goes on")
    add_flag(g, "--arxiv_ids", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], action="extend",
             default=[], metavar="IDS", help="also fetch these arXiv papers' abstracts: comma-separated ids, "
                                             "e.g. 2305.14314,2106.09685")
    add_flag(g, "--arxiv_query", default=None,
             help='also fetch the abstracts an arXiv search returns, e.g. "cat:cs.CL AND ti:retrieval"')
    add_flag(g, "--max_papers", type=int, default=20, help="most papers --arxiv_query fetches")
    add_flag(g, "--arxiv_api_url", default=ARXIV_API_URL,
             help="arXiv API endpoint to fetch from (change it only for a mirror or for tests)")
    add_flag(g, "--full_text", action="store_true",
             help="with --arxiv_ids/--arxiv_query: also download each paper's PDF and work on its sections; a paper "
                  "whose PDF fails keeps its abstract (the rejects say why)")
    add_flag(g, "--arxiv_pdf_url", default=ARXIV_PDF_URL,
             help="where --full_text downloads a paper's PDF from, {id} standing for its arXiv id")
    add_flag(g, "--arxiv_delay", type=finite_float, default=3.0,
             help="seconds between requests to arXiv (API pages and PDFs); arXiv asks for 3")
    add_flag(g, "--max_section_chars", type=int, default=6000,
             help="full texts: cut a longer section into parts of at most this many characters, at paragraph or "
                  "sentence boundaries")
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
    add_flag(g, "--edge_case_ratio", type=finite_float, default=0.2,
             help="share of those pairs that are edge cases (unanswerable and false-premise questions)")
    add_flag(g, "--system_prompt", default=DEFAULT_SYSTEM_PROMPT,
             help="system turn written into every training record and eval question")
    g.add_argument("--temperature", type=finite_float, default=0.7,
                   help="sampling temperature of the model writing the pairs (0: greedy)")
    add_flag(g, "--max_tokens", type=int, default=None,
             help="longest reply per request, in tokens; a reply cut off there usually cannot be parsed (default: "
                  f"{HOSTED_DEFAULTS['max_tokens']} for OpenAI; for a --base_url server or --backend hf "
                  f"{TOKENS_PER_ITEM} per pair asked + {TOKENS_SLACK}, e.g. {sized_max_tokens(12)} for 12 pairs, so a "
                  "reply that never ends stops near the size of what was asked)")
    add_flag(g, "--response_format", choices=FORMAT_STEPS, default="json_schema",
             help="structured output to ask the server for; when the server's error says it refuses it, the next "
                  f"of {', '.join(FORMAT_STEPS)} is used (decided once, by the run's first request; "
                  "json_object+schema: the schema inside json_object, as llama-cpp-python's server takes it)")
    g.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight at once (openai backend); also the most a kill can make you pay twice "
                        f"(their replies never reach the cache) (default: {HOSTED_DEFAULTS['concurrency']} for OpenAI, "
                        f"{LOCAL_CONCURRENCY} for a --base_url server: a local server often answers one request at a "
                        "time, and the others wait in its queue, their --timeout running)")
    g.add_argument("--timeout", type=finite_float, default=None,
                   help="seconds one attempt of a request may take in all, from sending it to the last byte of the "
                        "reply (a server that trickles bytes is cut off too); a request is tried at most "
                        f"{TIMEOUT_RETRIES + 1} times on timeouts, so a server that never answers costs at most "
                        f"{TIMEOUT_RETRIES + 1} x this per request, and the run stops with exit 1 after "
                        f"{GIVE_UP_AFTER_TIMEOUTS} requests in a row got no reply (default: "
                        f"{HOSTED_DEFAULTS['timeout']:g} for OpenAI, {LOCAL_TIMEOUT:g} for a --base_url server)")
    add_flag(g, "--max_retries", type=int, default=4,
             help="retries of a request on rate limits (429), server errors (5xx) and lost connections, with "
                  "backoff and the server's Retry-After (timeouts: see --timeout)")
    add_flag(g, "--batch_size", type=int, default=16,
             help="prompts generated together (hf backend): the KV cache holds batch x (prompt + --max_tokens) "
                  "tokens, ~0.13 MB each for a 7B Mistral; lower it if the GPU runs out of memory")
    g.add_argument("--constrained_decoding", action=argparse.BooleanOptionalAction, default=True,
                   help="hf backend: every reply follows the request's JSON schema token by token (xgrammar), with "
                        "the number of items asked and questions and answers no longer than --max_question_chars and "
                        "--max_answer_chars, so it "
                        "parses unless --max_tokens cuts it; --no-constrained_decoding lets the model write freely")
    add_flag(g, "--trust_remote_code", action="store_true",
             help="run the model repository's own Python code (hf backend); only for models you trust")
    add_flag(g, "--price_per_mtok", default=None, metavar="IN,OUT",
             help="USD per 1M input,output tokens for the manifest's cost estimate (default: the price of "
                  "known OpenAI models, else 0)")
    g = p.add_argument_group("curation and split")
    add_flag(g, "--min_grounding", type=finite_float, default=RULES.min_grounding,
             help="drop an answerable pair unless this share of its answer's content words occurs in the abstract")
    add_flag(g, "--dedup_threshold", type=finite_float, default=RULES.dedup_threshold,
             help="drop a question whose word overlap (Jaccard) with a kept question is at least this")
    add_flag(g, "--min_question_chars", type=int, default=RULES.min_question_chars,
             help="drop pairs whose question is shorter")
    add_flag(g, "--max_question_chars", type=int, default=RULES.max_question_chars,
             help="drop pairs whose question is longer")
    add_flag(g, "--min_answer_chars", type=int, default=RULES.min_answer_chars,
             help="drop pairs whose answer is shorter")
    add_flag(g, "--max_answer_chars", type=int, default=RULES.max_answer_chars,
             help="drop pairs whose answer is longer")
    add_flag(g, "--judge_model", default=None,
             help="also have this model (same server and key) score every pair 1-5, and drop low scores")
    add_flag(g, "--min_score", type=finite_float, default=3.0, help="with --judge_model: drop pairs scored below this")
    add_flag(g, "--eval_papers", type=finite_float, default=8,
             help="papers held out whole, their questions the 'unseen' evaluation set (a count, or a fraction if "
                  "below 1). 8: a rate needs ~20 questions before its interval can tell base and fine-tuned apart, and "
                  "a held-out abstract gives ~3-5 unanswerable and 2-5 false-premise ones; with few papers, lower it")
    add_flag(g, "--eval_pairs_per_abstract", type=int, default=16,
             help="Q&A pairs to ask for per held-out abstract (more than for training ones: they are all questions)")
    add_flag(g, "--eval_edge_case_ratio", type=finite_float, default=0.5,
             help="edge-case share of evaluation questions asked for (both sets); training keeps --edge_case_ratio")
    add_flag(g, "--knowledge_questions", type=int, default=100,
             help="questions of the 'knowledge' evaluation set, about papers that ARE in training: training texts "
                  "are asked for up to half as many pairs again, held out of the training file (so none repeats, or "
                  "nearly repeats, a training question); fewer when the generator writes fewer. 0: none")
    g = p.add_argument_group("conversations")
    add_flag(g, "--turns", type=int, default=RULES.turns,
             help="Q&A turns per conversation: above 1, each record is a conversation whose follow-up questions build "
                  "on the earlier answers (about --pairs_per_abstract turns per text, in conversations of this many; "
                  "edge cases can come at any turn)")
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
        problems.append("give papers with --input FILE|FOLDER, --arxiv_ids or --arxiv_query")
    if args.full_text and not (args.arxiv_ids or args.arxiv_query):
        problems.append("--full_text downloads arXiv PDFs: give --arxiv_ids or --arxiv_query (PDF files on disk go "
                        "to --input)")
    try:
        pdf_url_ok = bool(re.match(r"^https?://", args.arxiv_pdf_url)) and "{id}" in args.arxiv_pdf_url
        args.arxiv_pdf_url.format(id="2305.14314")
    except (KeyError, IndexError, ValueError):  # other {fields} in the template
        pdf_url_ok = False
    if not pdf_url_ok:
        problems.append("--arxiv_pdf_url must start with http:// or https:// and hold {id} (and no other {...})")
    bad_ids = [i for i in args.arxiv_ids if not ARXIV_ID_RE.match(i)]
    if bad_ids:
        problems.append(f"--arxiv_ids: not arXiv ids: {', '.join(bad_ids)} "
                        "(expected e.g. 2305.14314 or hep-th/9901001)")
    if not re.match(r"^https?://", args.arxiv_api_url):
        problems.append("--arxiv_api_url must start with http:// or https://")
    # Q&A turns of the largest request: a held-out text's, or a training text's with its knowledge extras
    asked = max(conversations_per_source(n, args.turns) * args.turns for n in (
        args.pairs_per_abstract + (args.pairs_per_abstract // 2 if args.knowledge_questions else 0),
        args.eval_pairs_per_abstract if args.eval_papers else 1))
    defaults = resolve_request_defaults(args.backend, args.base_url, asked)  # by server: see --help
    vars(args).update({k: v for k, v in defaults.items() if getattr(args, k) is None})
    checks = [("--pairs_per_abstract", args.pairs_per_abstract >= 1),
              ("--edge_case_ratio", 0 <= args.edge_case_ratio <= 1),
              ("--concurrency", args.concurrency >= 1), ("--timeout", args.timeout > 0),
              ("--max_retries", args.max_retries >= 0),
              ("--batch_size", args.batch_size >= 1), ("--turns", 1 <= args.turns <= 20),
              ("--max_tokens", args.max_tokens >= 1),
              ("--max_papers", args.max_papers >= 1), ("--temperature", args.temperature >= 0),
              ("--max_abstract_chars", args.max_abstract_chars >= 1),
              ("--max_section_chars", args.max_section_chars >= 200), ("--arxiv_delay", args.arxiv_delay >= 0),
              ("--min_grounding", 0 <= args.min_grounding <= 1), ("--dedup_threshold", 0 < args.dedup_threshold <= 1),
              ("--eval_papers",
               args.eval_papers >= 0 and (args.eval_papers < 1 or float(args.eval_papers).is_integer())),
              ("--eval_pairs_per_abstract", args.eval_pairs_per_abstract >= 1),
              ("--eval_edge_case_ratio", 0 <= args.eval_edge_case_ratio <= 1),
              ("--knowledge_questions", args.knowledge_questions >= 0),
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
            "cache": Path(args.cache) if args.cache else out.parent / ".cache" / f"{out.stem}.jsonl",
            "quality": out.with_name(out.stem + ".quality.json"),
            "quality_png": out.with_name(out.stem + ".quality.png")}


FLAG_OF = {"train": "--out", "eval": "--eval_out", "rejects": "--rejects", "manifest": "--manifest",
           "quality": "quality report", "quality_png": "quality chart"}  # the last two: named after --out


def output_set(args, paths: dict[str, Path]) -> OutputSet:
    """The four outputs, written together at the end (the cache is not one of them: it is the append-only resume
    log and survives a failed run, so it only has to stay clear of the inputs and outputs)."""
    outs = OutputSet({FLAG_OF[k]: paths[k] for k in FLAG_OF}, inputs=args.input, overwrite=args.overwrite,
                     command=run_command("generate_qa.py", args))
    cache = paths["cache"]
    if cache.is_dir():
        raise InputError(f"--cache {cache} is a folder; give a file path")
    taken = {**{FLAG_OF[k]: paths[k] for k in FLAG_OF}, **{f"--input {i}": Path(i) for i in args.input}}
    for name, p in taken.items():
        if resolve_path(p, name.split()[0] if name.startswith("--") else name) == resolve_path(cache, "--cache"):
            raise InputError(f"--cache {cache} is also {name.split()[0]} ({p}); the cache is appended to, so give "
                             "it its own path")
    return outs


# =========================================================================== inputs
def load_papers(args) -> tuple[list[dict], list[dict], list[dict]]:
    """(papers, input records for the manifest, rejects of PDFs that gave no text). A folder in --input stands for
    the files in it (this run's own outputs aside: they may live there)."""
    papers, inputs, rejects = [], [], []
    own = {resolve_path(p, "--out") for p in output_paths(args).values()}
    for path in input_files(args.input, own):
        if path.suffix.lower() == ".pdf" and path.is_file():
            try:
                got = [read_pdf(path, args.max_section_chars)]
            except PdfRejected as e:
                got = []
                rejects.append({"paper_id": path.stem, "stage": "input", "where": str(path), "reason": str(e)})
            record = {"path": str(path), "sha256": sha256_file(path), "papers": len(got)}
            inputs.append({**record, "rejected": rejects[-1]["reason"]} if not got else record)
        else:
            got = read_abstract_file(path)
            inputs.append({"path": str(path), "sha256": sha256_file(path), "papers": len(got)})
        papers += got
    if args.arxiv_ids or args.arxiv_query:
        session = http_session()  # one timeout'ed session for the API and the PDFs
        got = fetch_arxiv(args.arxiv_ids, args.arxiv_query, args.max_papers, args.arxiv_api_url, session,
                          args.arxiv_delay)
        entry = {"arxiv_ids": args.arxiv_ids, "arxiv_query": args.arxiv_query, "api_url": args.arxiv_api_url}
        if args.full_text:
            got, failed = add_full_texts(got, args.arxiv_pdf_url, session, args.arxiv_delay, args.max_section_chars)
            rejects += failed
            entry.update(full_text=True, pdf_url=args.arxiv_pdf_url, pdfs_read=sum("sections" in p for p in got))
        inputs.append({**entry, "papers": len(got), "sha256": sha256_text(json.dumps(got, sort_keys=True))})
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
    if not unique and rejects:
        raise InputError("\n  ".join(["no paper to work on: every input was rejected:"]
                                      + [f"{r['where']}: {r['reason']}" for r in rejects]))
    if not unique:
        raise InputError("no abstracts to work on; pass --input FILE, --arxiv_ids or --arxiv_query")
    return unique, inputs, rejects


# =========================================================================== generation: requests
async def generate_llm(backend, units: list[dict], quotas_of: dict[str, dict], turns: int, stats: Stats,
                       progress: Progress, counts: Counter, rejects: list[dict]) -> list[dict]:
    """One request per source text (an abstract or a section) for its quotas_of[unit], one repair request for each
    unusable reply; failures become rejects. Returns conversations {"paper_id", "unit", "turns": [...]}."""
    def reject(pid, stage, reason, **extra):
        stats.rejects += 1
        counts[stage] += 1
        rejects.append({"paper_id": pid, "stage": stage, "reason": reason, **extra})

    schema_name, schema = ("qa_pairs", PAIRS_SCHEMA) if turns == 1 else ("qa_conversations", DIALOGUES_SCHEMA)
    base = [generation_messages(u, quotas_of[u["unit"]], turns) for u in units]
    per_request = backend.name == "hf"  # its grammar fixes each request's pair count and types
    if per_request:
        backend.progress = progress  # its bar moves token by token

    def schema_of(i: int) -> dict:
        return request_schema(quotas_of[units[i]["unit"]], turns) if per_request else schema

    def generate_usable(k: int, cached: Outcome) -> bool:
        """A cached first reply is used unless it failed and so did its cached repair: then the source starts
        over (a failed reply whose repair was never sent, e.g. after a kill, just goes on to the repair)."""
        problem = reply_problem(cached, turns)
        if problem is None:
            return True
        repair = repair_messages(base[k], cached.content, problem, turns)
        repaired = backend.lookup(repair, schema_name, schema_of(k))
        return repaired is None or reply_problem(repaired, turns) is None

    def repair_usable(k: int, cached: Outcome) -> bool:
        return reply_problem(cached, turns) is None

    parsed: dict[int, list[list[dict]]] = {}
    todo, msgs = list(range(len(units))), base
    for rnd, usable in (("generate", generate_usable), ("repair", repair_usable)):
        retry: list[tuple[int, str, str | None]] = []

        def on_done(k: int, out: Outcome) -> None:  # parse each reply as it arrives, for the live counts
            i = todo[k]
            pid = units[i]["id"]
            stats.add(out)
            if out.error:
                reject(pid, "request_failed", out.error, section=units[i]["section"])
            else:
                try:
                    good, bad = parse_reply(out, turns)
                    for item, why in bad:
                        reject(pid, "invalid_pair", why, item=item)
                    stats.pairs += sum(map(len, good))
                    parsed[i] = good
                except ValueError as e:
                    if rnd == "repair":
                        reject(pid, "invalid_reply", f"unusable reply after one repair: {e}",
                               raw=(out.content or "")[:500])
                    else:
                        retry.append((i, str(e), out.content))
            progress.step()

        progress.start(len(todo), rnd)
        await backend.complete(msgs, schema_name, [schema_of(i) for i in todo] if per_request else schema,
                               on_done, usable)
        progress.close()
        if not retry:
            break
        retry.sort()  # replies arrive in any order; the repair round is built in input order
        todo = [i for i, _, _ in retry]
        msgs = [repair_messages(base[i], raw, err, turns) for i, err, raw in retry]
    stats.failed = counts["request_failed"]
    return [{"paper_id": units[i]["id"], "unit": units[i]["unit"], "turns": conv}
            for i in sorted(parsed) for conv in parsed[i]]


# =========================================================================== the run
def read_inputs(args) -> tuple[list[dict], list[dict], list[dict], dict[str, int]]:
    """(papers to work on, input records for the manifest, rejects of skipped papers, input order of every id)."""
    papers, inputs, unreadable = load_papers(args)
    order = {p["id"]: k for k, p in enumerate(papers)}
    for r in unreadable:  # rejected PDFs count as papers too, after the read ones
        order.setdefault(r["paper_id"], len(order))
    if unreadable:
        print(f"note: {len(unreadable)} PDF(s) gave no full text (see the rejects): "
              + "; ".join(f"{r['where']}: {r['reason'].split(';')[0]}" for r in unreadable[:3])
              + (" ..." if len(unreadable) > 3 else ""), file=sys.stderr)
    papers, skipped = skip_too_long(papers, args.max_abstract_chars)
    if skipped:
        ids = [r["paper_id"] for r in skipped]
        print(f"note: {len(ids)} paper(s) longer than --max_abstract_chars {args.max_abstract_chars:,} skipped "
              f"(see the rejects): {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}", file=sys.stderr)
    skipped = unreadable + skipped
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
    read = read_inputs(args)  # before the lock: bad input exits 2 having created nothing (not even a folder)
    with outs:  # locked: a second run on these outputs is refused; ours replace the old ones only at commit()
        if outs.finished_earlier:  # this command's run was killed in its commit, now completed: nothing to redo
            print(outs.finished_note(), file=sys.stderr)
            failed_run_rejects(paths).unlink(missing_ok=True)  # as that run would have, right after its commit
            return 0
        return _run(args, argv, paths, outs, t0, read)


def failed_run_rejects(paths: dict[str, Path]) -> Path:
    """Where a run that kept no pair writes why (beside the cache: it is not an output)."""
    return paths["cache"].with_name(f"{paths['cache'].stem}.failed_run_rejects.jsonl")


def announce(args, model: str, papers: list[dict], units: list[dict], plan: Plan) -> None:
    """The run's settings, once, before anything is asked."""
    sections = f" ({len(units)} texts: abstracts and full-text sections)" if len(units) > len(papers) else ""
    quotas = plan.train
    shape = f"{args.pairs_per_abstract} pairs" if args.turns == 1 else (
        f"{sum(quotas.values()) // args.turns} conversations of {args.turns} turns")
    knowledge = sum(plan.summary()["knowledge_asked"].values())
    print(f"generate_qa: {len(papers)} papers{sections}, backend={args.backend} model={model}, {shape} per text "
          f"{quotas}, eval papers={args.eval_papers:g} ({len(plan.held_out)} held out, asked for {plan.eval} each), "
          f"knowledge questions asked={knowledge}, seed={args.seed}", file=sys.stderr)
    if args.backend == "hf":  # the server settings below mean nothing to a local model
        print(f"local model: max_tokens={args.max_tokens} batch_size={args.batch_size} "
              f"constrained_decoding={args.constrained_decoding}", file=sys.stderr)
    if args.backend == "openai" or args.judge_model:
        print(f"requests{' (judge)' if args.backend != 'openai' else ''}: max_tokens={args.max_tokens} "
              f"timeout={args.timeout:g}s concurrency={args.concurrency} response_format={args.response_format} "
              f"({'server ' + args.base_url if args.base_url else 'OpenAI'})", file=sys.stderr)


def make_backend(args, model: str, cache: ResponseCache, quotas: dict, judge_model: str | None = None):
    """The backend that writes the pairs, or with judge_model the one that scores them (an OpenAI-compatible
    server, the generator's --base_url and key)."""
    sampling = Sampling(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    if args.backend == "hf" and judge_model is None:
        return HFBackend(HFSettings(model, sampling, batch_size=args.batch_size,
                                    trust_remote_code=args.trust_remote_code, constrained=args.constrained_decoding,
                                    shape=(items_asked(quotas, args.turns), args.turns),
                                    max_chars={"question": args.max_question_chars, "answer": args.max_answer_chars}),
                         cache, args.reuse_cache)
    settings = ClientSettings(model=judge_model or model, api_key=args.api_key, base_url=args.base_url,
                              timeout=args.timeout, max_retries=args.max_retries, concurrency=args.concurrency,
                              response_format=args.response_format,
                              flags=Flags(model="--judge_model" if judge_model else "--model"))
    return OpenAIBackend(settings, sampling, cache, args.reuse_cache)


def generate_and_curate(args, model: str, units: list[dict], plan: Plan, cache: ResponseCache, tally: Tally
                        ) -> tuple[int, list[dict], dict]:
    """(Q&A turns generated, conversations that passed curation and the judge, the response formats used)."""
    quotas_of, quotas = plan.quotas_of, plan.largest  # the largest request sizes a local model's JSON grammar
    by_unit = {u["unit"]: u for u in units}
    formats = {"asked": args.response_format if args.backend == "openai" else None}  # what the server accepted
    s = tally

    async def pipeline():
        if args.backend == "offline":
            convs = [{"paper_id": u["id"], "unit": u["unit"], "turns": turns} for u in units
                     for turns in offline_conversations(u, quotas_of[u["unit"]], args.turns, args.dedup_threshold)]
            s.stats.pairs = sum(len(c["turns"]) for c in convs)
        else:
            backend = make_backend(args, model, cache, quotas)
            convs = await generate_llm(backend, units, quotas_of, args.turns, s.stats, s.progress, s.counts,
                                       s.rejects)
            formats.update(used=getattr(backend, "format_used", None), note=getattr(backend, "format_note", None))
        generated = sum(len(c["turns"]) for c in convs)
        convs = curate(convs, by_unit, curation_rules(args), s.counts, s.rejects)
        if args.judge_model and convs:
            convs = await judge(make_backend(args, model, cache, quotas, args.judge_model), convs, by_unit,
                                args.min_score, s.stats, s.progress, s.counts, s.rejects)
        return generated, convs

    try:
        generated, convs = asyncio.run(pipeline())
    finally:
        s.progress.close()
    return generated, convs, formats


def curation_rules(args) -> CurationRules:
    return CurationRules(**{f.name: getattr(args, f.name) for f in fields(CurationRules)})


def split_and_record(args, model: str, papers: list[dict], units: list[dict], plan: Plan, generated: int,
                     convs: list[dict], tally: Tally) -> Kept:
    """Knowledge pairs held back from training papers (curation.split_sets), then training and evaluation records."""
    have = {c["paper_id"] for c in convs}
    by_unit = {u["unit"]: u for u in units}
    held_out = plan.held_out & have
    convs = split_sets(convs, plan, by_unit, [p["id"] for p in papers], args.turns, args.dedup_threshold,
                       tally.counts, tally.rejects)
    train, evals = to_records(convs, by_unit, held_out, turns=args.turns, system_prompt=args.system_prompt,
                              backend=args.backend, model=model)
    return Kept(generated, convs, [p["id"] for p in papers if p["id"] in have], held_out, train, evals)


def build_manifest(args, argv, t0: float, paths: dict[str, Path], model: str, read: tuple, units: list[dict],
                   plan: Plan, formats: dict, kept: Kept, tally: Tally) -> dict:
    papers, inputs, skipped, order = read
    by_unit = {u["unit"]: u for u in units}
    stats, train, evals, held_out, with_pairs = tally.stats, kept.train, kept.evals, kept.held_out, kept.with_pairs
    return {
        "script": "generate_qa.py", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "args": {k: v for k, v in vars(args).items() if k not in ("api_key", "price")},
        "inputs": inputs, "backend": args.backend, "model": model, "base_url": args.base_url,
        "response_format": formats, "judge_model": args.judge_model,
        "prompt_sha256": prompts_hash(args.system_prompt, args.turns > 1 or len(units) > len(papers)),
        "turns": args.turns, "quotas": plan.summary(),
        "papers": {"total": len(order),
                   "skipped_too_long": [r["paper_id"] for r in skipped if r["reason"].startswith("too_long")],
                   "rejected_inputs": [r["paper_id"] for r in skipped if not r["reason"].startswith("too_long")],
                   "chat_markers_removed": {p["id"]: p["_chat_markers"] for p in papers if "_chat_markers" in p},
                   "with_pairs": len(with_pairs), "eval": sorted(held_out), "train": len(with_pairs) - len(held_out)},
        # generated / kept count Q&A turns; train counts records (conversations), eval counts questions (turns)
        "counts": {"generated": kept.generated, "kept": kept.turns, "conversations": len(kept.convs),
                   "train": len(train), "eval": len(evals),
                   "train_by_type": dict(Counter(r["meta"]["type"] for r in train)),
                   "eval_by_type": dict(Counter(e["type"] for e in evals)),
                   # evaluation questions per set ("unseen": held-out papers; "knowledge": training papers)
                   "eval_by_set": {k: sum(e["set"] == k for e in evals) for k in ("unseen", "knowledge")},
                   "eval_by_set_type": {k: dict(Counter(e["type"] for e in evals if e["set"] == k))
                                        for k in ("unseen", "knowledge")},
                   "by_section": dict(Counter(by_unit[c["unit"]]["section"] for c in kept.convs for _ in c["turns"])),
                   "filters": dict(tally.counts), "rejects": len(tally.rejects),
                   "kept_rate": round(kept.turns / max(kept.generated, 1), 4),
                   "dropped_by_type": dict(Counter(f"{r['type']}: {r['reason'].split(':')[0]}" for r in tally.rejects
                                                   if "type" in r))},
        # asked_again: cached replies sent again because they failed validation (or --reuse_cache none)
        "requests": {"answered_this_run": stats.requests_sent, "from_cache": stats.cache_hits,
                     "asked_again": stats.asked_again, "failed": stats.failed},
        "tokens": {"prompt": stats.prompt_tokens, "completion": stats.completion_tokens,
                   "this_run_prompt": stats.new_prompt_tokens, "this_run_completion": stats.new_completion_tokens},
        "estimated_cost_usd": cost_estimate(stats, getattr(args, "price", None) or price_per_mtok(model, args.backend)),
        "outputs": {k: str(v) for k, v in paths.items()},
        "seconds": round(time.time() - t0, 2),
    }


def write_outputs(outs: OutputSet, paths: dict[str, Path], kept: Kept, rejects: list[dict], manifest: dict,
                  items: list[dict], quality: dict) -> None:
    """Stage every output, then replace the old ones together (the manifest last: it marks a finished run)."""
    try:
        for name, text in (("--out", jsonl_lines(kept.train)), ("--eval_out", jsonl_lines(kept.evals)),
                           ("--rejects", jsonl_lines(rejects)),
                           ("quality report", json.dumps(quality, ensure_ascii=False, indent=2) + "\n"),
                           ("--manifest", json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")):
            write_staged(outs.stage(name), text)
        name = "quality chart"
        plot_quality(items, outs.stage(name))
    except OSError as e:  # a full disk, a read-only folder: what was staged is removed, nothing replaced
        raise RunFailure(f"cannot write {name} {outs.paths[name]} ({e.strerror or e}); no output was replaced, and "
                         "the cache keeps every reply: free space or fix the folder, then rerun the same command"
                         ) from None
    outs.commit(["--out", "--eval_out", "--rejects", "quality report", "quality chart", "--manifest"])
    print(format_quality(quality), file=sys.stderr)
    print(f"quality report: {paths['quality']} and {paths['quality_png']}: check it before training", file=sys.stderr)


def _run(args, argv, paths: dict[str, Path], outs: OutputSet, t0: float, read: tuple) -> int:
    model = args.model or DEFAULT_MODELS[args.backend]
    papers, _, skipped, order = read
    units = source_units(papers)
    # --turns N: about --pairs_per_abstract Q&A turns per source text, dealt into conversations of N turns
    plan = plan_requests([p["id"] for p in papers], units, eval_papers=args.eval_papers, seed=args.seed,
                         turns=args.turns, pairs=args.pairs_per_abstract, edge_ratio=args.edge_case_ratio,
                         eval_pairs=args.eval_pairs_per_abstract, eval_edge_ratio=args.eval_edge_case_ratio,
                         knowledge=args.knowledge_questions)
    if args.eval_papers and not plan.held_out:
        print("warning: fewer than 2 papers, so none is held out for evaluation", file=sys.stderr)
    announce(args, model, papers, units, plan)
    tally = Tally(Stats(rejects=len(skipped)), rejects=list(skipped))
    cache = ResponseCache(paths["cache"])
    if cache.loaded and args.backend != "offline":
        print(f"cache: {cache.loaded} earlier replies in {paths['cache']} (used unless --reuse_cache says otherwise)",
              file=sys.stderr)
    generated, convs, formats = generate_and_curate(args, model, units, plan, cache, tally)
    kept = split_and_record(args, model, papers, units, plan, generated, convs, tally)
    manifest = build_manifest(args, argv, t0, paths, model, read, units, plan, formats, kept, tally)
    tally.rejects.sort(key=lambda r: order[r["paper_id"]])  # replies arrive in any order; the file should not
    rejects, manifest = scrub_all(tally.rejects, args.api_key), scrub_all(manifest, args.api_key)
    items = quality_items(kept.convs, {u["unit"]: u for u in units}, kept.held_out, args.turns)
    quality = quality_report(items, rejects)
    report_run(args, paths, tally.stats, tally.counts, manifest, generated, kept.turns, kept.train, kept.evals,
               kept.held_out)
    why = failed_run_rejects(paths)
    if not convs:
        # A failed run replaces nothing: the reasons go beside the cache, the outputs stay as they were.
        try:
            write_staged(why, jsonl_lines(rejects))
        except OSError as e:
            why = f"(not saved: {e})"
        print(f"error: no pair survived, so no output was written (earlier ones are unchanged); why each pair or "
              f"request was dropped: {why}", file=sys.stderr)
        return 1
    write_outputs(outs, paths, kept, rejects, manifest, items, quality)
    why.unlink(missing_ok=True)  # an earlier failure's report no longer applies
    return 0


def report_run(args, paths, stats: Stats, counts: Counter, manifest: dict, generated: int, kept: int, train, evals,
               held_out) -> None:
    what = "pairs" if args.turns == 1 else "turns"
    records = "train" if args.turns == 1 else "train conversations"
    sets = manifest["counts"]["eval_by_set"]
    print(f"{what}: {generated} generated, {kept} kept -> {len(train)} {records} ({paths['train']}), "
          f"{len(evals)} eval ({paths['eval']}): {sets['unseen']} unseen from {len(held_out)} held-out papers, "
          f"{sets['knowledge']} knowledge about training papers", file=sys.stderr)
    for note in set_notes(manifest["counts"]["eval_by_set_type"]):
        print(f"note: {note}", file=sys.stderr)
    where = f" in {paths['rejects']}" if kept else ""
    print(f"filters: {dict(sorted(counts.items())) or 'nothing dropped'}; {manifest['counts']['rejects']} "
          f"rejects{where}", file=sys.stderr)
    if args.backend != "offline" or args.judge_model:
        again = f", {stats.asked_again} cached asked again" if stats.asked_again else ""
        print(f"requests: {stats.requests_sent} answered now, {stats.cache_hits} from cache{again}, {stats.failed} "
              f"failed; tokens {stats.prompt_tokens}+{stats.completion_tokens}, est. cost this run "
              f"${manifest['estimated_cost_usd']['this_run']:.4f}", file=sys.stderr)
    if stats.failed:
        again = "rerun the same command with --overwrite" if kept else "rerun the same command"
        print(f"note: {stats.failed} request(s) failed (see the rejects); {again} to retry only those: answered "
              "requests come from the cache", file=sys.stderr)


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
