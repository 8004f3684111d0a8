"""Turn paper abstracts into grounded Q&A training pairs (with edge cases) and held-out eval questions.

Run as:
    # offline demo: no LLM, no key, deterministic rule-based pairs from the abstracts' own sentences
    python generate_qa.py --backend offline --input data/sample_abstracts.jsonl

    # any OpenAI-compatible server (OpenAI, vLLM, Ollama...); the key comes from OPENAI_API_KEY only
    export OPENAI_API_KEY=...
    python generate_qa.py --input data/sample_abstracts.jsonl --model gpt-4o-mini --concurrency 16
    python generate_qa.py --input abstracts.csv --base-url http://localhost:8000/v1 --model HuggingFaceH4/zephyr-7b-beta

    # a local transformers model, batched
    python generate_qa.py --backend hf --model HuggingFaceH4/zephyr-7b-beta --input data/sample_abstracts.jsonl

    # straight from arXiv
    python generate_qa.py --backend offline --arxiv-ids 2305.14314,2106.09685
    python generate_qa.py --arxiv-query "cat:cs.CL AND ti:instruction tuning" --max-papers 40

Writes data/synthetic_qa.jsonl (train), data/eval_questions.jsonl (whole held-out papers), a manifest
(data/synthetic_qa.manifest.json) and the rejects (data/rejects_synthetic_qa.jsonl), all at the end
and atomically. Every LLM reply is appended to a cache (data/.cache/synthetic_qa.jsonl) the moment
it arrives: after Ctrl-C or a kill, rerun the same command and only unanswered requests are sent.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import hashlib
import io
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from common import (DEFAULT_SYSTEM_PROMPT, InputError, append_jsonl, chat_record, check_outputs_free,
                    eval_questions_path,
                    qa_messages,
                    read_jsonl, read_jsonl_tolerant, run_main, sha256_file, sha256_text, write_json_atomic,
                    write_jsonl_atomic)
from paperqa_tune.scoring import corrects_premise, is_refusal

ANSWERABLE = ("factual", "conceptual", "methodology")
EDGE_CASES = ("unanswerable", "false_premise")
TYPES = ANSWERABLE + EDGE_CASES
OFFLINE_MODEL = "offline-rules-v1"
DEFAULT_MODELS = {"openai": "gpt-4o-mini", "hf": "HuggingFaceH4/zephyr-7b-beta", "offline": OFFLINE_MODEL}
ARXIV_API_URL = "https://export.arxiv.org/api/query"
# USD per 1M (input, output) tokens, for the manifest's cost estimate only; --price-per-mtok overrides.
PRICES_PER_MTOK = {"gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00), "gpt-4.1-mini": (0.40, 1.60),
                   "gpt-4.1-nano": (0.10, 0.40), "gpt-4.1": (2.00, 8.00)}


# =========================================================================== prompts (all of them)
GENERATOR_SYSTEM = ("You write training data for a research assistant: question-answer pairs about one paper, "
                    "using only its abstract. You reply with JSON only.")

TYPE_GUIDE = {
    "factual": "a specific fact the abstract states (a result, number, dataset, model or name); the answer "
               "gives it from the abstract.",
    "conceptual": "the idea, motivation or significance of the work, as the abstract explains it.",
    "methodology": "how the method works or how it was trained or evaluated, as the abstract describes it.",
    "unanswerable": "asks for a plausible detail the abstract does NOT give (hardware, hyperparameters, cost, "
                    "dataset size...); the answer says the abstract does not state it and invents nothing.",
    "false_premise": "presupposes something the abstract contradicts (a wrong number, the opposite finding); "
                     "the answer points out the false premise and gives what the abstract actually says.",
}

GENERATION_PROMPT = """Paper: "{title}" (id {paper_id})
<abstract>
{abstract}
</abstract>

Write exactly {n} question-answer pairs about this paper: {quota}.

Types:
{type_guide}

Rules:
- Every question names the paper ("{name}") so that it makes sense on its own, without the abstract.
- Answers use only what the abstract says, in 1-3 sentences. Never add numbers or names it does not give.
- No two questions ask the same thing.

Reply with one JSON object and nothing else:
{{"pairs": [{{"type": "<one of {types}>", "question": "...", "answer": "..."}}]}}"""

REPAIR_PROMPT = """Your reply could not be used: {error}.
Reply again with only the JSON object {{"pairs": [{{"type": ..., "question": ..., "answer": ...}}]}} as \
instructed above: no prose, no code fences, every pair with a non-empty "type", "question" and "answer"."""

JUDGE_SYSTEM = "You grade question-answer pairs written about a paper abstract. You reply with JSON only."

JUDGE_PROMPT = """Paper: "{title}"
<abstract>
{abstract}
</abstract>

Grade each pair from 1 (wrong, unsupported by the abstract, or useless) to 5 (correct, fully supported by
the abstract, useful). An "unanswerable" pair is good only if its answer says the abstract does not give
that detail and invents nothing; a "false_premise" pair only if its answer corrects the premise.

{pairs}

Reply with one JSON object and nothing else:
{{"scores": [{{"index": 1, "score": 4, "reason": "..."}}]}}"""

PAIRS_SCHEMA = {
    "type": "object",
    "properties": {"pairs": {"type": "array", "items": {
        "type": "object",
        "properties": {"type": {"type": "string", "enum": list(TYPES)}, "question": {"type": "string"},
                       "answer": {"type": "string"}},
        "required": ["type", "question", "answer"], "additionalProperties": False}}},
    "required": ["pairs"], "additionalProperties": False,
}
SCORES_SCHEMA = {
    "type": "object",
    "properties": {"scores": {"type": "array", "items": {
        "type": "object",
        "properties": {"index": {"type": "integer"}, "score": {"type": "number"}, "reason": {"type": "string"}},
        "required": ["index", "score", "reason"], "additionalProperties": False}}},
    "required": ["scores"], "additionalProperties": False,
}


def prompts_hash(system_prompt: str) -> str:
    """One hash over every prompt text, so the manifest says which prompts made the data."""
    return sha256_text(json.dumps([GENERATOR_SYSTEM, TYPE_GUIDE, GENERATION_PROMPT, REPAIR_PROMPT, JUDGE_SYSTEM,
                                   JUDGE_PROMPT, PAIRS_SCHEMA, SCORES_SCHEMA, system_prompt], sort_keys=True))


def type_quotas(n: int, edge_ratio: float) -> dict[str, int]:
    """How many pairs of each type to ask for: edge cases split unanswerable/false_premise, the rest evenly."""
    n_edge = min(n, round(n * edge_ratio))
    if edge_ratio > 0 and n >= 4 and n_edge == 0:
        n_edge = 1
    q = {"unanswerable": (n_edge + 1) // 2, "false_premise": n_edge // 2}
    rest = n - n_edge
    for i, t in enumerate(("factual", "methodology", "conceptual")):
        q[t] = rest // 3 + (1 if i < rest % 3 else 0)
    return {t: q[t] for t in TYPES}


def short_name(title: str, paper_id: str) -> str:
    if not title:
        return f"paper {paper_id}"
    head = title.split(":")[0].strip()
    return head if ":" in title and 1 < len(head) <= 40 else title


def generation_messages(paper: dict, quotas: dict[str, int]) -> list[dict]:
    quota = ", ".join(f"{k} {t}" for t, k in quotas.items() if k)
    guide = "\n".join(f"- {t}: {TYPE_GUIDE[t]}" for t in TYPES if quotas.get(t))
    user = GENERATION_PROMPT.format(title=paper["title"] or "(untitled)", paper_id=paper["id"],
                                    abstract=paper["abstract"], n=sum(quotas.values()), quota=quota,
                                    type_guide=guide, name=short_name(paper["title"], paper["id"]),
                                    types="|".join(TYPES))
    return [{"role": "system", "content": GENERATOR_SYSTEM}, {"role": "user", "content": user}]


def repair_messages(messages: list[dict], bad_reply: str | None, error: str) -> list[dict]:
    return messages + [{"role": "assistant", "content": (bad_reply or "")[:4000]},
                       {"role": "user", "content": REPAIR_PROMPT.format(error=error)}]


def judge_messages(paper: dict, pairs: list[dict]) -> list[dict]:
    listing = "\n\n".join(f"{i}. [{p['type']}]\nQ: {p['question']}\nA: {p['answer']}" for i, p in enumerate(pairs, 1))
    user = JUDGE_PROMPT.format(title=paper["title"] or paper["id"], abstract=paper["abstract"], pairs=listing)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


# =========================================================================== inputs
def _clean(text) -> str:
    return " ".join(str(text).split()) if text is not None else ""


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
    return {**obj, "id": pid, "title": _clean(title), "abstract": _clean(abstract),
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


ARXIV_ID_RE = re.compile(r"^(\d{4}\.\d{4,5}|[a-z][a-z\-]*(\.[A-Z]{2})?/\d{7})(v\d+)?$")


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
        raise InputError(f"arXiv API ({api_url}): {e}; check the network, the ids/query, or --arxiv-api-url") from None
    papers = []
    for r in results:
        pid = re.sub(r"v\d+$", "", r.get_short_id())
        papers.append({"id": pid, "title": _clean(r.title), "abstract": _clean(r.summary),
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
        raise InputError("no abstracts to work on; pass --input FILE, --arxiv-ids or --arxiv-query")
    return unique, inputs


# =========================================================================== text helpers (grounding, dedup)
STOPWORDS = frozenset("""a an the of and or to in on for with by from as at is are was were be been being this that
these those it its their there which who whom what when where why how does do did done can could would should may
might will shall not no nor than then also into over under about between both each such only very more most other
some any all our we they them us he she his her you your i if so but while whereas via per up out one two using used
use paper papers abstract authors author according state states stated report reports reported describe describes
described work study present presents presented propose proposes proposed""".split())
_WORD_RE = re.compile(r"[a-z0-9]+(?:[.'][a-z0-9]+)*")
_NUM_RE = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?")
_SUFFIXES = ("ations", "ation", "ments", "ment", "ings", "ing", "ies", "ied", "es", "ed", "ly", "s")


@functools.lru_cache(maxsize=65536)
def _stem(w: str) -> str:
    for suf in _SUFFIXES:
        if w.endswith(suf) and len(w) - len(suf) >= 4:
            w = w[: -len(suf)]
            break
    return w[:8]


@functools.lru_cache(maxsize=4096)  # each abstract is checked against every one of its pairs
def content_stems(text: str) -> frozenset[str]:
    words = _WORD_RE.findall(text.lower())
    return frozenset(_stem(w) for w in words if w not in STOPWORDS and (len(w) > 2 or w.isdigit()))


@functools.lru_cache(maxsize=4096)
def numbers(text: str) -> frozenset[str]:
    return frozenset(n.replace(",", "") for n in _NUM_RE.findall(text))


def grounding(answer: str, abstract: str) -> float:
    """Share of the answer's content words (crudely stemmed) that the abstract contains."""
    ans = content_stems(answer)
    return len(ans & content_stems(abstract)) / len(ans) if ans else 0.0


def question_tokens(question: str) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", question.lower()))


def jaccard(a: frozenset, b: frozenset) -> float:
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter) if a or b else 1.0


def normalized(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def cross_group_near_duplicates(sets: list[frozenset], groups: list, threshold: float) -> dict[int, int]:
    """{i: j}: set i has Jaccard >= threshold with an earlier kept set j of another group.

    Prefix filtering (the all-pairs similarity join): order tokens rarest first; two sets with
    Jaccard >= t must share a token within their first |x| - ceil(t|x|) + 1 tokens, so only those are
    indexed and probed. Exact, and near-linear on real data where the pairwise loop is quadratic.
    """
    freq = Counter(t for s in sets for t in s)
    index: dict[str, list[int]] = defaultdict(list)
    dups = {}
    for i, s in enumerate(sets):
        if not s:
            continue
        n = len(s)
        prefix = sorted(s, key=lambda t: (freq[t], t))[: n - math.ceil(threshold * n) + 1]
        lo, hi = threshold * n, n / threshold  # Jaccard >= t also needs t|x| <= |y| <= |x|/t
        hit = None
        for j in sorted({j for t in prefix for j in index[t]}):
            y = sets[j]
            if groups[j] != groups[i] and lo <= len(y) <= hi and jaccard(s, y) >= threshold:
                hit = j
                break
        if hit is not None:
            dups[i] = hit
            continue
        for t in prefix:
            index[t].append(i)
    return dups


def within_paper_duplicate(q: str, kept: list[str], title: str, threshold: float) -> str | None:
    """A kept question of the same paper this one nearly repeats (the shared title does not count)."""
    drop = question_tokens(title)
    a = question_tokens(q) - drop
    for other in kept:
        if jaccard(a, question_tokens(other) - drop) >= threshold:
            return other
    return None


# =========================================================================== offline backend (rule-based)
_ABBREVS = ("e.g.", "i.e.", "et al.", "vs.", "cf.", "Fig.", "Eq.", "approx.", "resp.", "etc.", "Sec.", "al.")
_METHOD_RE = re.compile(r"\b(we (propose|introduce|present|develop|design|apply|build|adopt|employ|leverage|combine|"
                        r"extend)|method|approach|architecture|algorithm|framework|objective|loss|technique|procedure|"
                        r"mechanism|module|layers?|encoder|decoder|based on|by (using|training|combining|adding|"
                        r"replacing|learning)|consists? of|relies on|uses?|using|trained|trains?|pre-?train\w*|"
                        r"fine-?tun\w*|freez\w*|inject\w*|condition\w*|retriev\w*|fetch\w*|quantiz\w*|"
                        r"backpropagat\w*|reparameteri\w*|optimi[sz]\w*|tiling|prompting|exemplars?|supervis\w*|"
                        r"reward|index|embedd\w*|attention|casts?|maps?|learns?)\b", re.I)
_RESULT_RE = re.compile(r"\d|\b(achiev|outperform|result|state-of-the-art|improv|accura|score|bleu|surpass|"
                        r"match|reach|gain|speed|reduc|exceed|better|faster|fewer|competitive)\w*", re.I)
_CONCEPT_RE = re.compile(r"\b(problem|challenge|limitation|motivat|because|however|allow|enabl|key|insight|"
                         r"important|crucial|remain|lack|difficult|costly|expensive|suggest|implication|understand|"
                         r"question|hypothes|idea|intuition|fundamental)\w*", re.I)
_CONTRIB_RE = re.compile(r"\b(we (propose|introduce|present|develop|describe)|this (paper|work) (proposes|introduces|"
                         r"presents|describes)|in this (paper|work))\b", re.I)
_EVAL_RE = re.compile(r"\b(evaluat\w*|experiment\w*|benchmarks?|we test|tested on|datasets?)\b", re.I)
_KP_STOP = STOPWORDS | frozenset("""show shows shown demonstrate demonstrates achieve achieves obtain obtains improve
improves outperform outperforms introduce introduces find finds make makes allow allows enable enables based new novel
approach method results result model models first further however moreover furthermore here thus therefore simple large
well since across without within through among able like called named task tasks way ways many much several various
different existing recent previous prior generate generates define defines develop develops provide provides require
requires learn learns predict predicts produce produces focus focuses include includes explore explores study studies
consider considers capture captures combine combines extend extends leverage leverages utilize utilizes exploit exploits
address addresses solve solves train trains optimize optimizes build builds design designs discover discovers infer
infers map maps modify modifies apply applies manipulate measure measures distinguish evaluate evaluates compare
compares analyze analyzes investigate investigates identify identifies detect detects estimate estimates compute
computes perform performs create creates construct constructs transfer adapt adapts align aligns support supports
reach reaches scale scales handle handles mitigate mitigates involve involves remain remains become becomes help helps
yield yields lead leads take takes stand stands rely relies contain contains consist consists reduce reduces increase
increases match matches surpass surpasses suggest suggests argue argues allowing enabling get gets beat beats give
gives need needs work works fit fits run runs set sets see sees lift lifts store stores show cannot""".split())
# -ing words that are usually nouns in ML abstracts (other -ing/-ed/-ly words end a key phrase)
_ING_NOUNS = frozenset("""learning training reasoning understanding modeling modelling processing embedding embeddings
computing engineering parsing tuning pretraining answering encoding decoding sampling testing prompting planning
clustering ranking labeling labelling captioning reading writing translating forecasting tracking mining
spotting""".split())
_ANTONYMS = [("outperforms", "underperforms"), ("outperform", "underperform"), ("improves", "degrades"),
             ("improve", "degrade"), ("increases", "decreases"), ("reduces", "increases"), ("faster", "slower"),
             ("fewer", "more"), ("better", "worse"), ("higher", "lower"), ("lower", "higher"), ("smaller", "larger"),
             ("larger", "smaller"), ("without", "only with"), ("efficient", "inefficient"),
             ("surpasses", "falls short of")]
_LEAD_IN_RE = re.compile(r"^(as a result|however|next|moreover|furthermore|finally|also|specifically|in particular|"
                         r"in addition|to do so|in this (work|paper)|overall|thus|therefore|consequently|surprisingly|"
                         r"notably|importantly|additionally|then|second|first|third),?\s+", re.I)
# Details abstracts almost never give: (question, what the answer says is missing, words that mean it IS given)
_UNANSWERABLE = [
    ("How many GPUs were used to train the models in {ref}?", "how many GPUs were used for training", ("gpu", "tpu")),
    ("What learning rate did the authors of {ref} use?", "the learning rate", ("learning rate",)),
    ("What was the total compute cost in US dollars of the experiments in {ref}?",
     "the cost of the experiments in dollars", ("$", "dollar", "cost")),
    ("Which random seeds were used for the experiments in {ref}?", "the random seeds", ("seed",)),
    ("How many hours of wall-clock time did training take in {ref}?", "the wall-clock training time",
     ("hour", "days", "wall-clock")),
    ("Which funding agency supported the work in {ref}?", "who funded the work", ("fund", "grant")),
    ("What batch size was used for training in {ref}?", "the batch size", ("batch size",)),
    ("How many human annotators were involved in {ref}, and how were they paid?", "any human annotators or their pay",
     ("annotator", "crowd")),
    ("Under which software license is the code of {ref} released?", "the license of the code", ("license",)),
    ("Which optimizer and weight decay did {ref} use?", "the optimizer or weight decay",
     ("optimizer", "adam", "weight decay")),
]


def split_sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9(\[\"'$\\])", _clean(text))
    out: list[str] = []
    for p in parts:
        if out and (out[-1].endswith(_ABBREVS) or len(out[-1]) < 25):
            out[-1] += " " + p
        else:
            out.append(p)
    return [s for s in out if len(s) >= 15]


def _as_answer(sentence: str) -> str:
    """Third person, so the answer reads as a statement about the paper."""
    s = re.sub(r"^We\b", "The authors", sentence)
    s = re.sub(r"^Our\b", "Their", s)
    s = re.sub(r"\bwe\b", "the authors", s)
    s = re.sub(r"\bour\b", "their", s)
    s = re.sub(r"\bus\b", "them", s)
    return s if s.endswith((".", "!", "?")) else s + "."


def _clause(sentence: str) -> str:
    s = _LEAD_IN_RE.sub("", _as_answer(sentence).rstrip(".!? "))
    return s[0].lower() + s[1:] if s[:1].isupper() and not s[1:2].isupper() else s


def _skip_word(w: str) -> bool:
    low = w.lower()
    if not w or "$" in w or "\\" in w or low in _KP_STOP or not re.search(r"[A-Za-z]", w):
        return True
    if w[0].islower() and "-" not in w and len(w) > 4:  # adverbs, participles: "typically", "introduced", "using"
        return low.endswith("ly") or (low.endswith("ed") and not low.endswith("eed")) or \
            (low.endswith("ing") and low not in _ING_NOUNS)
    return False


def keyphrase(sentence: str) -> str | None:
    """The most specific run of 1-4 content words (names, acronyms, hyphenated terms score high)."""
    runs, run = [], []
    for i, raw in enumerate(sentence.split()):
        w = raw.strip(".,;:!?()[]\"'")
        breaks = raw != w and not raw.startswith(w)  # punctuation before the word
        if _skip_word(w) or breaks:
            if run:
                runs.append(run)
            run = [] if _skip_word(w) else [(i, w)]
        else:
            run.append((i, w))
        if raw != raw.rstrip(".,;:!?)]\"'"):  # punctuation after the word ends the run
            if run:
                runs.append(run)
            run = []
    if run:
        runs.append(run)

    def score(word: str, pos: int) -> float:
        s = 1.0
        if any(c.isupper() for c in word[1:]) or (word[0].isupper() and pos > 0):
            s += 1.0
        if len(word) > 6:
            s += 0.5
        if "-" in word or any(c.isdigit() for c in word):
            s += 0.5
        return s

    best, best_score = None, 0.0
    for run in runs:
        for a in range(len(run)):
            for b in range(a + 1, min(a + 4, len(run)) + 1):
                window = run[a:b]
                sc = sum(score(w, i) for i, w in window) + 0.3 * len(window)
                if sc > best_score:
                    best, best_score = window, sc
    if not best or (len(best) == 1 and len(best[0][1]) < 4):
        return None
    words = [w for _, w in best]
    if best[0][0] == 0 and words[0][:1].isupper() and not any(c.isupper() for c in words[0][1:]):
        words[0] = words[0].lower()
    return " ".join(words)


def _sentence_type(i: int, s: str) -> str:
    scores = {"methodology": len(_METHOD_RE.findall(s)), "factual": len(_RESULT_RE.findall(s)),
              "conceptual": len(_CONCEPT_RE.findall(s)) + (1 if i == 0 else 0)}
    return max(scores, key=lambda t: (scores[t], t == "factual"))


def _false_premises(ref: str, sents: list[str]) -> list[tuple[str, str]]:
    out = []
    by_len = sorted((s for s in sents if len(s) <= 240), key=len) + [s for s in sents if len(s) > 240]
    for s in by_len:  # the opposite finding
        for word, opposite in _ANTONYMS:
            if re.search(rf"\b{re.escape(word)}\b", s):
                swapped = re.sub(rf"\b{re.escape(word)}\b", opposite, s, count=1)
                out.append((f"Why does {ref} find that {_clause(swapped)}?",
                            f"That premise is incorrect: the abstract says the opposite. {_as_answer(s)}"))
                break
    for s in by_len:  # a wrong number
        m = next((m for m in _NUM_RE.finditer(s) if not re.fullmatch(r"(19|20)\d\d", m.group())), None)
        if m:
            val = float(m.group().replace(",", ""))
            alt = val * 2 if val >= 2 else val + 3
            alt_s = f"{alt:g}" if "." in m.group() else str(int(alt))
            wrong = s[: m.start()] + alt_s + s[m.end():]
            out.append((f"Why does {ref} report that {_clause(wrong)}?",
                        f"That premise is incorrect: the abstract gives {m.group()}, not {alt_s}. {_as_answer(s)}"))
    contrib = next((s for s in sents if _CONTRIB_RE.search(s)), sents[min(1, len(sents) - 1)])
    kp = keyphrase(contrib) or "the proposed approach"
    out.append((f"Why do the authors of {ref} conclude that {kp} does not work?",
                f"That premise is false: the abstract does not say that {kp} fails. {_as_answer(contrib)}"))
    return out


def offline_pairs(paper: dict, quotas: dict[str, int], dedup_threshold: float = 0.8) -> list[dict]:
    """Deterministic pairs from the abstract's own sentences: each answer is (close to) a sentence of it."""
    title = paper["title"]
    sents = split_sentences(paper["abstract"]) or [paper["abstract"]]
    # An untitled paper (plain-text input) is named by its first sentence's key phrase, not its file position.
    ref = f'"{title}"' if title else f"the paper on {keyphrase(sents[0]) or 'paper ' + paper['id']}"
    cands: dict[str, list[tuple[str, str]]] = {t: [] for t in TYPES}

    contrib = next((s for s in sents if _CONTRIB_RE.search(s)), None)
    first = sents[0] if len(sents[0]) > 60 or len(sents) == 1 else f"{sents[0]} {sents[1]}"
    cands["conceptual"].append((f"What problem does {ref} address?", _as_answer(first)))
    if contrib:
        cands["conceptual"].append((f"What is the main contribution of {ref}?", _as_answer(contrib)))
    if len(sents) > 2:
        cands["conceptual"].append((f"What is the overall conclusion of {ref}?", _as_answer(sents[-1])))
    results = [s for s in sents if re.search(r"\d", s)][:2]
    if results:
        cands["factual"].append((f"What quantitative results does {ref} report?", " ".join(map(_as_answer, results))))
    ev = next((s for s in sents if _EVAL_RE.search(s)), None)
    if ev:
        cands["methodology"].append((f"How is the work in {ref} evaluated?", _as_answer(ev)))
    how = max(sents, key=lambda s: len(_METHOD_RE.findall(s)))
    if _METHOD_RE.search(how):
        cands["methodology"].append((f"How does the method described in {ref} work?", _as_answer(how)))

    templates = {
        "factual": ["What does {ref} report about {kp}?", "According to {ref}, what is found regarding {kp}?"],
        "methodology": ["How does {ref} approach {kp}?", "What technique does {ref} describe regarding {kp}?"],
        "conceptual": ["Why does {kp} matter in {ref}?", "What idea about {kp} does {ref} put forward?"],
    }
    for i, s in enumerate(sents):
        kp = keyphrase(s)
        if not kp or kp in ref:
            continue
        t = _sentence_type(i, s)
        for j, tpl in enumerate(templates[t]):
            cands[t].append((tpl.format(ref=ref, kp=kp), _as_answer(s)))
        other = "factual" if t != "factual" else "conceptual"
        cands[other].append((templates[other][i % 2].format(ref=ref, kp=kp), _as_answer(s)))

    low = paper["abstract"].lower()
    start = int(hashlib.sha256(paper["id"].encode()).hexdigest(), 16)
    for k in range(len(_UNANSWERABLE)):
        q, missing, given = _UNANSWERABLE[(start + k) % len(_UNANSWERABLE)]
        if not any(g in low for g in given):
            answer = (f"The abstract of {ref} does not state {missing}. It gives no information on this, "
                      "so it cannot be answered from the abstract.")
            cands["unanswerable"].append((q.format(ref=ref), answer))
    cands["false_premise"] = _false_premises(ref, sents)

    chosen: list[dict] = []

    def take(t: str, limit: int, reuse: int) -> None:
        """Add candidates of type t up to `limit`, skipping near-duplicate questions and over-used answers."""
        for cand in list(cands[t]):
            if sum(1 for p in chosen if p["type"] == t) >= limit or (
                    t in ANSWERABLE and sum(1 for p in chosen if p["type"] in ANSWERABLE) >= want):
                return
            q, a = cand
            if sum(1 for p in chosen if p["answer"] == a) >= reuse:
                continue
            cands[t].remove(cand)
            if within_paper_duplicate(q, [p["question"] for p in chosen], title, dedup_threshold) is None:
                chosen.append({"type": t, "question": q, "answer": a})

    # Types take turns so that none uses up the sentences; each sentence answers at most two questions
    # (three if there is no other way); a type with too few candidates lends its quota to the others.
    want = sum(quotas.get(t, 0) for t in ANSWERABLE)
    for reuse in (2, 3):
        for turn in range(1, max(quotas.values(), default=0) + 1):
            for t in TYPES:
                take(t, min(turn, quotas.get(t, 0)), reuse)
        for t in ANSWERABLE * 3:
            have = sum(1 for p in chosen if p["type"] in ANSWERABLE)
            if have >= want:
                break
            take(t, sum(1 for p in chosen if p["type"] == t) + 1, reuse)
    order = {t: i for i, t in enumerate(TYPES)}
    chosen.sort(key=lambda p: order[p["type"]])
    return chosen


# =========================================================================== LLM backends and the response cache
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
    """Append-only JSONL of replies, keyed by hash(model, messages, params); a torn last line is skipped."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = {e["key"]: e for e in read_jsonl_tolerant(path) if "key" in e}
        self.loaded = len(self.entries)
        if path.exists() and path.stat().st_size:
            with open(path, "rb+") as f:  # a kill mid-line: start the next entry on a line of its own
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def get(self, key: str) -> Outcome | None:
        e = self.entries.get(key)
        if e is None:
            return None
        return Outcome(content=e.get("content"), finish_reason=e.get("finish_reason"), usage=e.get("usage") or {},
                       cached=True)

    def put(self, key: str, model: str, out: Outcome) -> None:
        entry = {"key": key, "model": model, "content": out.content, "finish_reason": out.finish_reason,
                 "usage": out.usage, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        append_jsonl(self.path, entry)
        self.entries[key] = entry


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
                             "--base-url") from None
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
    """A local transformers model, batched left-padded generation; replies go through the same cache."""

    name = "hf"

    def __init__(self, model, batch_size, temperature, max_tokens, seed, trust_remote_code, cache: ResponseCache):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
            cuda = torch.cuda.is_available()
            self.lm = AutoModelForCausalLM.from_pretrained(
                model, dtype=torch.bfloat16 if cuda else torch.float32, device_map="auto" if cuda else None,
                trust_remote_code=trust_remote_code)
        except OSError as e:
            raise InputError(f"cannot load --model {model}: {e}") from None
        self.lm.eval()
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model, self.batch_size, self.temperature, self.max_tokens, self.seed = (
            model, batch_size, temperature, max_tokens, seed)
        self.cache = cache

    def _params(self) -> dict:
        return {"temperature": self.temperature, "max_new_tokens": self.max_tokens, "seed": self.seed}

    def _generate(self, batch: list[list[dict]]) -> list[Outcome]:
        import torch

        from common import chat_text

        texts = [chat_text(self.tok, m, add_generation_prompt=True) for m in batch]
        add_bos = not (self.tok.bos_token and texts[0].startswith(self.tok.bos_token))
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=add_bos).to(self.lm.device)
        kw = {"max_new_tokens": self.max_tokens, "pad_token_id": self.tok.pad_token_id,
              "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kw.update(temperature=self.temperature, top_p=0.95)
        torch.manual_seed(self.seed)
        with torch.no_grad():
            out = self.lm.generate(**enc, **kw)
        new = out[:, enc["input_ids"].shape[1]:]
        outs = []
        for i, ids in enumerate(new):
            n_new = int((ids != self.tok.pad_token_id).sum())
            outs.append(Outcome(content=self.tok.decode(ids, skip_special_tokens=True),
                                finish_reason="length" if n_new >= self.max_tokens else "stop",
                                usage={"prompt_tokens": int(enc["attention_mask"][i].sum()),
                                       "completion_tokens": n_new}))
        return outs

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


# =========================================================================== parsing and validation of replies
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
        cut = " (cut off at --max-tokens)" if out.finish_reason == "length" else ""
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
            good.append({"type": t, "question": _clean(q), "answer": a.strip()})
    if not good:
        raise ValueError(f"no valid pair in the reply ({bad[0][1] if bad else 'empty pairs list'})")
    return good, bad


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


def split_papers(paper_ids: list[str], spec: float, seed: int) -> set[str]:
    """Whole papers held out for evaluation: K papers, or a fraction when 0 < spec < 1."""
    n = len(paper_ids)
    k = round(spec * n) if 0 < spec < 1 else int(spec)
    k = max(1, k) if spec > 0 else 0
    k = min(k, n - 1) if n > 1 else 0
    return set(random.Random(seed).sample(paper_ids, k))


# =========================================================================== the run
def build_parser() -> argparse.ArgumentParser:
    class Fmt(argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action):  # every flag shows its default, once
            h = action.help or ""
            if "(default:" in h or not action.option_strings or action.default is argparse.SUPPRESS:
                return h
            return f"{h} (default: %(default)s)".strip()

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Fmt)
    g = p.add_argument_group("inputs")
    g.add_argument("--input", nargs="+", action="extend", default=[], metavar="FILE",
                   help="abstract files: .jsonl {id,title,abstract}, .csv with those columns, .txt with "
                        "blank-line-separated abstracts; several allowed")
    g.add_argument("--arxiv-ids", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], action="extend",
                   default=[], metavar="IDS", help="comma-separated arXiv ids, e.g. 2305.14314,2106.09685")
    g.add_argument("--arxiv-query", default=None, help='arXiv API search, e.g. "cat:cs.CL AND ti:retrieval"')
    g.add_argument("--max-papers", type=int, default=20, help="how many papers --arxiv-query fetches")
    g.add_argument("--arxiv-api-url", default=ARXIV_API_URL, help="arXiv API endpoint (advanced: mirrors, tests)")
    g = p.add_argument_group("generation")
    g.add_argument("--backend", choices=("openai", "hf", "offline"), default="openai",
                   help="openai: any OpenAI-compatible server; hf: local transformers model; "
                        "offline: rule-based, no LLM")
    g.add_argument("--model", default=None,
                   help=f"model name or path (default: {DEFAULT_MODELS['openai']} for openai, "
                        f"{DEFAULT_MODELS['hf']} for hf)")
    g.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 "
                                                    "(default: the client's, i.e. OpenAI); key from OPENAI_API_KEY")
    g.add_argument("--pairs-per-abstract", type=int, default=12, help="pairs asked for per abstract")
    g.add_argument("--edge-case-ratio", type=float, default=0.2, help="share of unanswerable + false_premise pairs")
    g.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="system turn of the training records")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    g.add_argument("--max-tokens", type=int, default=3000, help="reply length limit per request")
    g.add_argument("--response-format", choices=("json_schema", "json_object", "none"), default="json_schema",
                   help="structured output asked of the server; falls back to plain JSON if it refuses")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight (openai backend)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request before the client retries")
    g.add_argument("--max-retries", type=int, default=4, help="client retries on 429/5xx/timeouts (with backoff)")
    g.add_argument("--batch-size", type=int, default=4, help="prompts per generate() call (hf backend)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (hf backend)")
    g.add_argument("--price-per-mtok", default=None, metavar="IN,OUT",
                   help="USD per 1M input,output tokens for the cost estimate (default: known OpenAI models, else 0)")
    g = p.add_argument_group("curation and split")
    g.add_argument("--min-grounding", type=float, default=0.5,
                   help="share of an answer's content words that must occur in the abstract (answerable types)")
    g.add_argument("--dedup-threshold", type=float, default=0.8,
                   help="questions with word Jaccard >= this are near-duplicates")
    g.add_argument("--min-question-chars", type=int, default=10, help="length bounds of kept pairs")
    g.add_argument("--max-question-chars", type=int, default=400)
    g.add_argument("--min-answer-chars", type=int, default=15)
    g.add_argument("--max-answer-chars", type=int, default=1500)
    g.add_argument("--judge-model", default=None, help="score pairs 1-5 with this model (same server and key)")
    g.add_argument("--min-score", type=float, default=3.0, help="drop pairs the judge scores below this")
    g.add_argument("--eval-papers", type=float, default=3,
                   help="papers held out for evaluation: a count, or a fraction if below 1")
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default="data/synthetic_qa.jsonl", help="training records")
    g.add_argument("--eval-out", default=None,
                   help="held-out evaluation questions (default: beside --out: eval_questions.jsonl for "
                        "synthetic_qa.jsonl, else <out stem>_eval_questions.jsonl)")
    g.add_argument("--manifest", default=None, help="run manifest (default: OUT with .manifest.json)")
    g.add_argument("--rejects", default=None, help="dropped pairs and failed requests with the reason "
                                                   "(default: rejects_<OUT name>.jsonl next to OUT)")
    g.add_argument("--cache", default=None,
                   help="append-only reply cache (default: .cache/<OUT name>.jsonl next to OUT)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument("--seed", type=int, default=0, help="seed for the split, sampling and the offline templates")
    return p


def validate_args(args) -> None:
    """Check everything at once, so one run shows every problem."""
    problems = []
    if not (args.input or args.arxiv_ids or args.arxiv_query):
        problems.append("give abstracts with --input FILE, --arxiv-ids or --arxiv-query")
    bad_ids = [i for i in args.arxiv_ids if not ARXIV_ID_RE.match(i)]
    if bad_ids:
        problems.append(f"--arxiv-ids: not arXiv ids: {', '.join(bad_ids)} "
                        "(expected e.g. 2305.14314 or hep-th/9901001)")
    if not re.match(r"^https?://", args.arxiv_api_url):
        problems.append("--arxiv-api-url must start with http:// or https://")
    checks = [("--pairs-per-abstract", args.pairs_per_abstract >= 1),
              ("--edge-case-ratio", 0 <= args.edge_case_ratio <= 1),
              ("--concurrency", args.concurrency >= 1), ("--timeout", args.timeout > 0),
              ("--max-retries", args.max_retries >= 0),
              ("--batch-size", args.batch_size >= 1), ("--max-tokens", args.max_tokens >= 1),
              ("--max-papers", args.max_papers >= 1), ("--temperature", args.temperature >= 0),
              ("--min-grounding", 0 <= args.min_grounding <= 1), ("--dedup-threshold", 0 < args.dedup_threshold <= 1),
              ("--eval-papers", args.eval_papers >= 0 and (args.eval_papers < 1 or float(args.eval_papers).is_integer())),
              ("--min-question-chars/--max-question-chars", 0 <= args.min_question_chars <= args.max_question_chars),
              ("--min-answer-chars/--max-answer-chars", 0 <= args.min_answer_chars <= args.max_answer_chars)]
    problems += [f"{name}: invalid value" for name, ok in checks if not ok]
    if args.price_per_mtok is not None:
        try:
            args.price = tuple(float(x) for x in args.price_per_mtok.split(","))
            assert len(args.price) == 2
        except (ValueError, AssertionError):
            problems.append("--price-per-mtok must be two numbers IN,OUT, e.g. 0.15,0.60")
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


async def judge(judge_backend, pairs: list[dict], papers: dict[str, dict], min_score: float, stats: Stats,
                progress: Progress, counts: Counter, rejects: list[dict]) -> list[dict]:
    """Score each paper's surviving pairs in one request; keep those at or above --min-score."""
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

    # --- split whole papers, then write everything at once
    have = {q["paper_id"] for q in pairs}
    with_pairs = [p["id"] for p in papers if p["id"] in have]
    held_out = split_papers(with_pairs, args.eval_papers, args.seed)
    if args.eval_papers and not held_out:
        print("warning: fewer than 2 papers have pairs, so none is held out for evaluation", file=sys.stderr)
    train, evals, n_by_paper = [], [], Counter()
    for p in pairs:
        n_by_paper[p["paper_id"]] += 1
        pid = p["paper_id"]
        if pid in held_out:
            evals.append({"id": f"{pid}-q{n_by_paper[pid]}", "question": p["question"], "reference": p["answer"],
                          "type": p["type"], "paper_id": pid, "context": by_id[pid]["abstract"],
                          "system": args.system_prompt})
        else:
            meta = {"paper_id": pid, "type": p["type"], "backend": args.backend, "model": model,
                    "id": f"{pid}-q{n_by_paper[pid]}", "title": by_id[pid]["title"], "generator": "generate_qa.py"}
            if "judge_score" in p:
                meta["judge_score"] = p["judge_score"]
            train.append(chat_record(qa_messages(p["question"], p["answer"], args.system_prompt), meta))

    price = getattr(args, "price", None) or PRICES_PER_MTOK.get(model if args.backend == "openai" else "", (0.0, 0.0))

    def cost(prompt_tokens: int, completion_tokens: int) -> float:
        return round((prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6, 6)

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
        "estimated_cost_usd": {"price_per_mtok_in_out": list(price),
                               "this_run": cost(stats.new_prompt_tokens, stats.new_completion_tokens),
                               "all_replies_used": cost(stats.prompt_tokens, stats.completion_tokens)},
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
