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
(data/synthetic_qa.manifest.json) and the rejects (data/rejects_synthetic_qa.jsonl), all at the end
and atomically. Every LLM reply is appended to a cache (data/.cache/synthetic_qa.jsonl) the moment
it arrives: after Ctrl-C or a kill, rerun the same command and only unanswered requests are sent.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from common import (DEFAULT_SYSTEM_PROMPT, HelpFormatter, InputError, add_flag, chat_record, check_outputs_free,
                    eval_questions_path, qa_messages, read_jsonl, run_main, sha256_file, sha256_text,
                    write_json_atomic, write_jsonl_atomic)
from paperqa_tune.cache import JsonlCache
from paperqa_tune.offline_qa import OFFLINE_MODEL, offline_pairs
from paperqa_tune.prompts import (ANSWERABLE, PAIRS_SCHEMA, SCORES_SCHEMA, TYPES, generation_messages,
                                  judge_messages, prompts_hash, repair_messages, type_quotas)
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
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (openai backend)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a reply before retrying")
    add_flag(g, "--max_retries", type=int, default=4,
             help="retries of a request on rate limits (429), server errors (5xx) and timeouts, with backoff")
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
    g.add_argument("--cache", default=None, help="append-only cache of LLM replies that a rerun reuses "
                                                 "(default: .cache/<OUT name>.jsonl next to OUT)")
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


# =========================================================================== inputs
def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                         "re-save the file as UTF-8") from None


def _paper(path: Path, line: int, obj: dict, fallback_id: str) -> dict:
    abstract = obj.get("abstract")
    if abstract is None:
        raise InputError(f"{path}:{line}: no 'abstract' field; each record needs "
                         "{\"id\", \"title\", \"abstract\"}")
    if not isinstance(abstract, str) or not abstract.strip():
        raise InputError(f"{path}:{line}: empty abstract (it must be non-empty text); fill it in or delete that record")
    pid = obj.get("id")
    pid = fallback_id if pid is None or str(pid).strip() == "" else str(pid).strip()
    title = obj.get("title")
    return {**obj, "id": pid, "title": clean_text(title), "abstract": clean_text(abstract),
            "_where": f"{path}:{line}"}


def read_abstract_file(path: Path) -> list[dict]:
    """JSONL ({"id","title","abstract"}, extra keys kept), CSV with those columns, or blank-line-separated text."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return [_paper(path, ln, obj, f"{path.stem}-{ln}") for ln, obj in read_jsonl(path)]
    if suffix == ".csv":
        text = _decode(path)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "abstract" not in columns:
            raise InputError(f"{path}:1: unknown CSV columns {columns or '(none)'}; the header needs an "
                             "'abstract' column (and optionally 'id' and 'title')")
        reader.fieldnames = columns
        papers, start = [], 2
        for row in reader:
            if None in row:
                raise InputError(f"{path}:{start}: more fields than the header has columns; quote fields "
                                 "that contain commas")
            if any((v or "").strip() for v in row.values()):
                papers.append(_paper(path, start, row, f"{path.stem}-{start}"))
            start = reader.line_num + 1
        return papers
    if suffix in (".txt", ".text", ".md"):
        text = _decode(path)
        papers, block, block_line = [], [], 0
        for ln, line in enumerate(text.splitlines() + [""], 1):
            if line.strip():
                if not block:
                    block_line = ln
                block.append(line)
            elif block:
                papers.append(_paper(path, block_line, {"abstract": " ".join(block)}, f"{path.stem}-{len(papers) + 1}"))
                block = []
        return papers
    raise InputError(f"{path}: unknown input type {suffix or '(no suffix)'}; use .jsonl, .csv or .txt "
                     "(blank-line-separated abstracts)")


def fetch_arxiv(ids: list[str], query: str | None, max_papers: int, api_url: str) -> list[dict]:
    """Abstracts from the arXiv API through the `arxiv` client (its paging, rate limit and retries)."""
    import arxiv
    import requests

    class _Session(requests.Session):  # the arxiv client sets no timeout; never hang on a dead connection
        def request(self, *a, **kw):
            kw.setdefault("timeout", 30)
            return super().request(*a, **kw)

    client = arxiv.Client(page_size=min(100, max(len(ids), max_papers)), delay_seconds=3.0, num_retries=2)
    client.query_url_format = api_url + "?{}"  # class attribute in arxiv 4.x; the tests point it at loopback
    client._session = _Session()
    search = arxiv.Search(query=query or "", id_list=ids, max_results=len(ids) if ids and not query else max_papers)
    try:
        results = list(client.results(search))
    except (arxiv.ArxivError, requests.RequestException) as e:
        raise InputError(f"arXiv API ({api_url}): {e}; check the network, the ids/query, or --arxiv_api_url") from None
    papers = []
    for r in results:
        pid = re.sub(r"v\d+$", "", r.get_short_id())
        papers.append({"id": pid, "title": clean_text(r.title), "abstract": clean_text(r.summary),
                       "categories": " ".join(r.categories), "source": "arxiv", "_where": f"arXiv {pid}"})
    if ids:
        missing = [i for i in ids if re.sub(r"v\d+$", "", i) not in {p["id"] for p in papers}]
        if missing:
            raise InputError(f"arXiv returned no paper for id(s) {', '.join(missing)}; check them on arxiv.org")
    return [p for p in papers if p["abstract"]]


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


# =========================================================================== generation: backends, reply cache
@dataclass
class Outcome:
    content: str | None = None
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    error: str | None = None
    cached: bool = False


def cache_key(model: str, messages: list[dict], params: dict) -> str:
    return sha256_text(json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True,
                                  ensure_ascii=False))


class ResponseCache:
    """LLM replies as Outcomes, stored in the shared append-only JsonlCache keyed by hash(model, messages,
    params); a reply is on disk before anything else happens with it."""

    def __init__(self, path: Path):
        self.store = JsonlCache(path)
        self.loaded = self.store.loaded

    def get(self, key: str) -> Outcome | None:
        e = self.store.get(key)
        if e is None:
            return None
        return Outcome(content=e.get("content"), finish_reason=e.get("finish_reason"), usage=e.get("usage") or {},
                       cached=True)

    def put(self, key: str, model: str, out: Outcome) -> None:
        self.store.put({"key": key, "model": model, "content": out.content, "finish_reason": out.finish_reason,
                        "usage": out.usage, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})


class Progress:
    """One tqdm bar per round of requests, showing pairs / rejects / tokens so far."""

    def __init__(self, stats: "Stats"):
        self.stats = stats
        self.bar = None

    def start(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=desc, unit="req", disable=None, dynamic_ncols=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            s = self.stats
            self.bar.set_postfix(pairs=s.pairs, rejects=s.rejects, tokens=s.prompt_tokens + s.completion_tokens,
                                 refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class Stats:
    pairs: int = 0
    rejects: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    new_prompt_tokens: int = 0
    new_completion_tokens: int = 0
    requests_sent: int = 0
    cache_hits: int = 0
    failed: int = 0

    def add(self, out: Outcome) -> None:
        p, c = int(out.usage.get("prompt_tokens") or 0), int(out.usage.get("completion_tokens") or 0)
        self.prompt_tokens += p
        self.completion_tokens += c
        if out.cached:
            self.cache_hits += 1
        elif out.error is None:
            self.requests_sent += 1
            self.new_prompt_tokens += p
            self.new_completion_tokens += c


class OpenAIBackend:
    """Any OpenAI-compatible chat server through the official async client (its retries honour Retry-After)."""

    name = "openai"

    def __init__(self, model, api_key, base_url, timeout, max_retries, concurrency, temperature, max_tokens, seed,
                 response_format, cache: ResponseCache):
        import openai

        self.client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)
        self.model, self.temperature, self.max_tokens, self.seed = model, temperature, max_tokens, seed
        self.response_format = response_format
        self.sem = asyncio.Semaphore(concurrency)
        self.cache = cache
        self.checked = False

    def _params(self, schema_name: str, schema: dict) -> dict:
        p = {"temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed}
        if self.response_format == "json_schema":
            p["response_format"] = {"type": "json_schema",
                                    "json_schema": {"name": schema_name, "schema": schema, "strict": True}}
        elif self.response_format == "json_object":
            p["response_format"] = {"type": "json_object"}
        return p

    def _lookup(self, messages, params) -> tuple[str, Outcome | None]:
        key = cache_key(self.model, messages, params)
        hit = self.cache.get(key)
        if hit is None and "response_format" in params:  # answered earlier after a plain-JSON fallback
            plain = {k: v for k, v in params.items() if k != "response_format"}
            hit = self.cache.get(cache_key(self.model, messages, plain))
        return key, hit

    async def preflight(self) -> None:
        """Fail fast, before any output, on a wrong URL or key (one cheap GET /models, no retries)."""
        import openai

        if self.checked:
            return
        self.checked = True
        try:
            await self.client.with_options(max_retries=0, timeout=min(10.0, self.client.timeout or 10.0)).models.list()
        except openai.APIConnectionError as e:
            raise InputError(f"cannot reach the server at {self.client.base_url} ({e}); start it or fix "
                             "--base_url") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise InputError(f"the server at {self.client.base_url} refused the API key ({e.status_code}); "
                             "check OPENAI_API_KEY") from None
        except openai.APIStatusError:
            pass  # some compatible servers have no /models; the chat requests will tell

    async def _one(self, k, messages, schema_name, schema, on_done) -> Outcome:
        import openai

        params = self._params(schema_name, schema)
        key, hit = self._lookup(messages, params)
        if hit is None:
            async with self.sem:
                while True:
                    params = self._params(schema_name, schema)
                    key, hit = self._lookup(messages, params)
                    if hit is not None:
                        break
                    try:
                        resp = await self.client.chat.completions.create(model=self.model, messages=messages, **params)
                    except openai.BadRequestError as e:
                        if "response_format" in params:
                            if self.response_format != "none":
                                print(f"note: the server refused response_format={self.response_format} "
                                      f"({e.status_code}); asking for plain JSON instead", file=sys.stderr)
                                self.response_format = "none"
                            continue
                        hit = Outcome(error=f"{type(e).__name__}: {e}")
                        break
                    except (openai.OpenAIError, ValueError) as e:  # ValueError: a malformed / truncated HTTP body
                        hit = Outcome(error=f"request failed after retries: {type(e).__name__}: {str(e)[:300]}")
                        break
                    try:
                        choice, u = (resp.choices or [None])[0], resp.usage
                        hit = Outcome(content=choice.message.content if choice else None,
                                      finish_reason=choice.finish_reason if choice else None,
                                      usage={"prompt_tokens": u.prompt_tokens or 0,
                                             "completion_tokens": u.completion_tokens or 0} if u else {})
                    except AttributeError:  # e.g. a proxy's HTML page instead of a completion
                        hit = Outcome(error=f"unexpected response from the server: {str(resp)[:200]!r}")
                        break
                    self.cache.put(key, self.model, hit)  # durable before anything else happens
                    break
        on_done(k, hit)
        return hit

    async def complete(self, batch: list[list[dict]], schema_name: str, schema: dict, on_done) -> list[Outcome]:
        """Replies for every message list, in order; on_done(k, outcome) runs as each one arrives."""
        if not self.checked and any(self._lookup(m, self._params(schema_name, schema))[1] is None for m in batch):
            await self.preflight()
        return list(await asyncio.gather(*(self._one(k, m, schema_name, schema, on_done) for k, m in enumerate(batch))))


class HFBackend:
    """A local transformers model: batched left-padded generation through the shared generation code (prompts
    rendered and tokenized as training renders them); replies go through the same cache."""

    name = "hf"

    def __init__(self, model, batch_size, temperature, max_tokens, seed, trust_remote_code, cache: ResponseCache):
        import torch

        from paperqa_tune.generation import Decoding
        from paperqa_tune.loading import default_device, load_causal_lm, load_tokenizer

        device = default_device()
        try:
            self.tok = load_tokenizer(model, padding_side="left", trust_remote_code=trust_remote_code)
            # device_map "auto" on GPUs: a generator model larger than one GPU is spread over all of them
            self.lm = load_causal_lm(model, torch.bfloat16 if device.type == "cuda" else torch.float32, device,
                                     quantized=False, trust_remote_code=trust_remote_code,
                                     device_map="auto" if device.type == "cuda" else None)
        except InputError as e:
            raise InputError(f"--model {model}: {e}") from None
        self.lm.eval()
        # The dynamic KV cache: a static one would reserve prompt + max_tokens (3000 by default) per prompt for
        # every batch up front, for replies that usually stop far sooner.
        self.dec = Decoding(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature,
                            top_p=0.95, seed=seed, cache="dynamic")
        self.model, self.batch_size = model, batch_size
        self.cache = cache

    def _params(self) -> dict:  # the cache key's params, as replies were cached before
        return {"temperature": self.dec.temperature, "max_new_tokens": self.dec.max_new_tokens, "seed": self.dec.seed}

    def _generate(self, batch: list[list[dict]]) -> list[Outcome]:
        from transformers import set_seed

        from paperqa_tune.generation import chat_prompt_ids, generate_batch

        prompts = [chat_prompt_ids(self.tok, m) for m in batch]  # exactly one BOS, decided per prompt
        set_seed(self.dec.seed)  # each batch samples the same way on a rerun, whatever came before it
        eos = self.tok.eos_token_id
        return [Outcome(content=text, finish_reason="stop" if eos in ids else "length",
                        usage={"prompt_tokens": len(prompt), "completion_tokens": n})
                for prompt, (text, n, ids) in zip(prompts, generate_batch(self.lm, self.tok, prompts, self.dec))]

    async def complete(self, batch: list[list[dict]], schema_name: str, schema: dict, on_done) -> list[Outcome]:
        params = self._params()
        keys = [cache_key(self.model, m, params) for m in batch]
        results: list[Outcome | None] = [self.cache.get(k) for k in keys]
        for i, r in enumerate(results):
            if r is not None:
                on_done(i, r)
        todo = [i for i, r in enumerate(results) if r is None]
        for s in range(0, len(todo), self.batch_size):
            idx = todo[s: s + self.batch_size]
            for i, out in zip(idx, self._generate([batch[i] for i in idx])):
                self.cache.put(keys[i], self.model, out)
                results[i] = out
                on_done(i, out)
        return results  # type: ignore[return-value]


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


async def generate_llm(backend, papers: list[dict], quotas, stats: Stats, progress: Progress, counts: Counter,
                       rejects: list[dict]) -> list[dict]:
    """One request per abstract, one repair request for each unusable reply; failures become rejects."""
    def reject(pid, stage, reason, **extra):
        stats.rejects += 1
        counts[stage] += 1
        rejects.append({"paper_id": pid, "stage": stage, "reason": reason, **extra})

    base = [generation_messages(p, quotas) for p in papers]
    parsed: dict[int, list[dict]] = {}
    todo, msgs = list(range(len(papers))), base
    for rnd in ("generate", "repair"):
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
        await backend.complete(msgs, "qa_pairs", PAIRS_SCHEMA, on_done)
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
    """The reason this pair is dropped, or None (length, error text, grounding, edge-case behaviour)."""
    q, a = p["question"], p["answer"]
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

    msgs = [judge_messages(papers[i], groups[i]) for i in ids]
    outs = await judge_backend.complete(msgs, "scores", SCORES_SCHEMA, on_done)
    progress.close()
    kept = []
    for pid, out in zip(ids, outs):
        scores = {}
        if out.error is None:
            try:
                obj = _json_object(out.content)
                for s in obj.get("scores", []) if isinstance(obj, dict) else []:
                    ok = isinstance(s, dict) and isinstance(s.get("index"), int)
                    if ok and isinstance(s.get("score"), (int, float)):
                        scores[s["index"]] = (float(s["score"]), str(s.get("reason", ""))[:300])
            except ValueError:
                pass
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
def _main(argv=None) -> int:
    t0 = time.time()
    args = build_parser().parse_args(argv)
    validate_args(args)
    paths = output_paths(args)
    check_outputs_free([paths[k] for k in ("train", "eval", "manifest", "rejects")], args.overwrite)
    model = args.model or DEFAULT_MODELS[args.backend]

    papers, inputs = load_papers(args)
    by_id = {p["id"]: p for p in papers}
    quotas = type_quotas(args.pairs_per_abstract, args.edge_case_ratio)
    print(f"generate_qa: {len(papers)} abstracts, backend={args.backend} model={model}, "
          f"{args.pairs_per_abstract} pairs/abstract {quotas}, eval papers={args.eval_papers:g}, seed={args.seed}",
          file=sys.stderr)

    stats, counts, rejects = Stats(), Counter(), []
    progress = Progress(stats)
    cache = ResponseCache(paths["cache"])
    if cache.loaded and args.backend != "offline":
        print(f"cache: {cache.loaded} earlier replies in {paths['cache']} (not sent again)", file=sys.stderr)

    def openai_backend(m):
        return OpenAIBackend(m, args.api_key, args.base_url, args.timeout, args.max_retries, args.concurrency,
                             args.temperature, args.max_tokens, args.seed, args.response_format, cache)

    async def pipeline():
        if args.backend == "offline":
            pairs = [{**pair, "paper_id": p["id"]} for p in papers
                     for pair in offline_pairs(p, quotas, args.dedup_threshold)]
            stats.pairs = len(pairs)
        else:
            backend = openai_backend(model) if args.backend == "openai" else HFBackend(
                model, args.batch_size, args.temperature, args.max_tokens, args.seed, args.trust_remote_code, cache)
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
    if args.eval_papers and not held_out:
        print("warning: fewer than 2 papers have pairs, so none is held out for evaluation", file=sys.stderr)
    train, evals = to_records(pairs, by_id, held_out, args, model)

    manifest = {
        "script": "generate_qa.py", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "args": {k: v for k, v in vars(args).items() if k not in ("api_key", "price")},
        "inputs": inputs, "backend": args.backend, "model": model, "base_url": args.base_url,
        "judge_model": args.judge_model, "prompt_sha256": prompts_hash(args.system_prompt), "quotas": quotas,
        "papers": {"total": len(papers), "with_pairs": len(with_pairs), "eval": sorted(held_out),
                   "train": len(with_pairs) - len(held_out)},
        "counts": {"generated": generated, "kept": len(pairs), "train": len(train), "eval": len(evals),
                   "train_by_type": dict(Counter(r["meta"]["type"] for r in train)),
                   "eval_by_type": dict(Counter(e["type"] for e in evals)),
                   "filters": dict(counts), "rejects": len(rejects)},
        "requests": {"answered_this_run": stats.requests_sent, "from_cache": stats.cache_hits, "failed": stats.failed},
        "tokens": {"prompt": stats.prompt_tokens, "completion": stats.completion_tokens,
                   "this_run_prompt": stats.new_prompt_tokens, "this_run_completion": stats.new_completion_tokens},
        "estimated_cost_usd": cost_estimate(args, model, stats),
        "outputs": {k: str(v) for k, v in paths.items()},
        "seconds": round(time.time() - t0, 2),
    }
    order = {p["id"]: k for k, p in enumerate(papers)}
    rejects.sort(key=lambda r: order[r["paper_id"]])  # replies arrive in any order; the file should not
    write_jsonl_atomic(paths["train"], train)
    write_jsonl_atomic(paths["eval"], evals)
    write_jsonl_atomic(paths["rejects"], rejects)
    write_json_atomic(paths["manifest"], manifest)  # last: its presence marks a finished run

    print(f"pairs: {generated} generated, {len(pairs)} kept -> {len(train)} train ({paths['train']}), "
          f"{len(evals)} eval from {len(held_out)} held-out papers ({paths['eval']})", file=sys.stderr)
    print(f"filters: {dict(sorted(counts.items())) or 'nothing dropped'}; {len(rejects)} rejects in {paths['rejects']}",
          file=sys.stderr)
    if args.backend != "offline" or args.judge_model:
        print(f"requests: {stats.requests_sent} answered now, {stats.cache_hits} from cache, {stats.failed} failed; "
              f"tokens {stats.prompt_tokens}+{stats.completion_tokens}, est. cost this run "
              f"${manifest['estimated_cost_usd']['this_run']:.4f}", file=sys.stderr)
    if stats.failed:
        print(f"note: {stats.failed} request(s) failed (see {paths['rejects']}); rerun the same command with "
              "--overwrite to retry only those: answered requests come from the cache", file=sys.stderr)
    if not pairs:
        print("error: no pair survived; see the rejects file for why", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
