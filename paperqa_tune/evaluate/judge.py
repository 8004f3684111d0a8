"""An LLM judge for the evaluation: rubric scores per answer, and a pairwise verdict in both orders.

    criteria = read_rubric(DEFAULT_RUBRIC)            # [(name, description), ...]; the first is "correctness"
    cfg = JudgeConfig(model="gpt-4o-mini", base_url=None, api_key=os.environ["OPENAI_API_KEY"])
    client = make_client(cfg)                                      # paperqa_tune.client, as the generator's
    stats = rubric_scores(rows, questions, criteria, cfg, cache, client)  # fills {base,finetuned}_rubric_* columns
    stats = pairwise(rows, questions, cfg, cache, client)                 # fills judge_* columns
    # per-claim verdicts (supported / unsupported / contradicted): paperqa_tune.evaluate.claims, over the
    # same Job / run_jobs machinery

Rows are eval_compare's result rows ({"id", "base_answer", "finetuned_answer", ...}); `questions` maps
id -> {"question", "reference", "type", "context"}. `cache` is any object with get(key) -> dict | None and
put(record) (record["key"] is the key).

Both judges are blind: the prompt never says which model wrote an answer. The pairwise judge sees each
pair twice with the answers swapped, so a judge that prefers whatever comes first cancels to a tie.

Requests go through the shared client (paperqa_tune.client): one deadline per attempt for the whole reply,
retries honouring Retry-After, and the reply's JSON shape asked for with the response format the server
accepts (json_schema -> json_object+schema -> json_object -> none, settled by the first call).

Failure is recorded, never guessed: a reply that does not parse, or an API error the client's retries did
not cure, leaves the scores empty (None) with status "failed: <why>" and the raw reply, and the evaluation
goes on. Only parsed results are cached, so rerunning the same command asks again for the failed ones.
The API key is scrubbed from everything stored (a server's error body may echo the Authorization header).
"""
from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from paperqa_tune.client import ChatClient, ClientSettings, Flags
from paperqa_tune.errors import InputError
from paperqa_tune.files import sha256_text

DEFAULT_RUBRIC = Path(__file__).with_name("rubric_default.txt")
SIDES = (("base", "base_answer", "base"), ("finetuned", "finetuned_answer", "finetuned"))  # (side, row field, prefix)
ORDERS = (("base_first", "base shown first"), ("ft_first", "fine-tuned shown first"))
PAIRWISE_COLUMNS = ["judge_winner", "judge_consistent", "judge_reason", "judge_raw"]
RAW_LIMIT = 500          # characters of a failed reply kept in the row (enough to see what went wrong)
# Characters of a question row's text shown to the judge: an abstract is ~2,000; a whole paper pasted into
# `context` (or a runaway generator) would otherwise be sent -- and paid for -- with every call.
TEXT_LIMITS = {"context": 20_000, "question": 4_000, "reference": 4_000}
MAX_TOKENS = {"rubric": 400, "pairwise": 300}

_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
# The per-side columns that are not criteria: a criterion with one of these names would collide.
_RESERVED = {"mean", "status", "raw", "reason"}


# --------------------------------------------------------------------------- rubric file
def read_rubric(path: str | Path) -> list[tuple[str, str]]:
    """Criteria [(name, description), ...] from a plain-text rubric: one `name: description` a line,
    blank lines and `#` comments ignored. The FIRST criterion is the one the evaluation reports as
    "correctness". Names become CSV columns ({base,finetuned}_rubric_<name>), hence [a-z][a-z0-9_]*.
    Bad input raises InputError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: rubric file not found; pass an existing file or leave the option out "
                         f"to use the default ({DEFAULT_RUBRIC})")
    criteria: list[tuple[str, str]] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        line = _decode_line(raw, path, lineno).strip()
        if not line or line.startswith("#"):
            continue
        name, desc = _parse_criterion(line, f"{path}:{lineno}")
        if name in first_line:
            raise InputError(f"{path}:{lineno}: criterion {name!r} already defined on line {first_line[name]}; "
                             "give each criterion a different name")
        first_line[name] = lineno
        criteria.append((name, desc))
    if not criteria:
        raise InputError(f"{path}: no criteria; add lines like 'correctness: the answer is correct "
                         "with respect to the abstract'")
    return criteria


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8").lstrip("\ufeff")  # an editor's BOM is not part of the first name
    except UnicodeDecodeError as e:
        raise InputError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                         "re-save the rubric as UTF-8") from None


def _parse_criterion(line: str, where: str) -> tuple[str, str]:
    if ":" not in line:
        raise InputError(f"{where}: expected 'name: description', got {line[:60]!r}")
    name, desc = (s.strip() for s in line.split(":", 1))
    if not _NAME_RE.fullmatch(name):
        raise InputError(f"{where}: criterion name {name!r} must be lowercase letters, digits and _, "
                         "starting with a letter (it becomes a CSV column name)")
    if name in _RESERVED:
        raise InputError(f"{where}: criterion name {name!r} is reserved (it would collide with the "
                         f"{{base,finetuned}}_rubric_{name} column); rename it")
    if not desc:
        raise InputError(f"{where}: criterion {name!r} has no description; say what the judge should check")
    return name, desc


def rubric_columns(criteria: list[tuple[str, str]]) -> list[str]:
    """The columns rubric_scores() writes, base side then fine-tuned side."""
    per = [n for n, _ in criteria] + ["mean", "reason", "status", "raw"]
    return [f"{p}_rubric_{c}" for _, _, p in SIDES for c in per]


# --------------------------------------------------------------------------- config
# The flags eval_compare.py takes the judge's settings from, named in what a failed call tells the user.
JUDGE_FLAGS = Flags(model="--judge_model", base_url="--judge_base_url", timeout="--judge_timeout",
                    retries="--judge_retries", concurrency="--judge_workers")


@dataclass
class JudgeConfig:
    model: str
    base_url: str | None
    api_key: str = field(repr=False)   # never printed, logged or stored
    timeout: float = 60
    max_retries: int = 3
    workers: int = 4
    response_format: str = "json_schema"   # the first rung tried (paperqa_tune.client.FORMAT_STEPS)

    def describe(self) -> dict:
        """Everything but the key, e.g. for summary.json."""
        return {"model": self.model, "base_url": self.base_url, "timeout": self.timeout,
                "max_retries": self.max_retries, "workers": self.workers, "response_format": self.response_format}


def make_client(cfg: JudgeConfig) -> ChatClient:
    """The judge's client: the same deadline, retries, error handling and response-format negotiation as the
    generator's (paperqa_tune.client). Pass one to rubric_scores and pairwise so the format is settled once."""
    return ChatClient(ClientSettings(model=cfg.model, api_key=cfg.api_key, base_url=cfg.base_url,
                                     timeout=cfg.timeout, max_retries=cfg.max_retries,
                                     concurrency=max(1, cfg.workers), response_format=cfg.response_format,
                                     flags=JUDGE_FLAGS))


# --------------------------------------------------------------------------- prompts
_TYPE_HINTS = {
    "unanswerable": "Note: the abstract does not contain the answer to this question. A good answer says "
                    "that the abstract does not say, instead of guessing.",
    "false_premise": "Note: this question rests on a false premise. A good answer points out the false "
                     "premise and corrects it.",
    **dict.fromkeys(("factual", "conceptual", "methodology"),
                    "Note: this is an ordinary question that the abstract answers. A good answer answers "
                    "it directly."),
}


def capped(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying so where it was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[... truncated: the first {limit:,} of {len(text):,} characters are shown]"


def oversized(questions: dict) -> dict[str, list[str]]:
    """Which question ids carry a field longer than the judge is shown (TEXT_LIMITS), per field."""
    out: dict[str, list[str]] = {}
    for qid, q in questions.items():
        for name, limit in TEXT_LIMITS.items():
            if len(str(q.get(name) or "")) > limit:
                out.setdefault(name, []).append(qid)
    return out


def _question_block(q: dict) -> str:
    """Abstract, question, what a good answer does for this question type, reference answer; each capped
    at TEXT_LIMITS characters."""
    lim = TEXT_LIMITS
    parts = [f"Abstract:\n{capped(str(q.get('context') or ''), lim['context']) or '(not available)'}",
             f"Question: {capped(str(q.get('question') or ''), lim['question'])}"]
    hint = _TYPE_HINTS.get(str(q.get("type") or "").lower())
    if hint:
        parts.append(hint)
    if q.get("reference"):
        parts.append(f"Reference answer (written from the abstract): {capped(str(q['reference']), lim['reference'])}")
    return "\n\n".join(parts)


def rubric_messages(q: dict, answer: str, criteria: list[tuple[str, str]]) -> list[dict]:
    example = json.dumps({"scores": {n: "<1-5>" for n, _ in criteria}, "reason": "<one sentence>"})
    system = (
        "You grade one answer to a question about a scientific paper. Judge it only against the paper's "
        "abstract and, when given, the reference answer. Score each criterion below from 1 (poor) to 5 "
        "(excellent) as a whole number, and give a one-sentence reason. Ignore length and style.\n\n"
        "Criteria:\n" + "\n".join(f"- {n}: {d}" for n, d in criteria) +
        f"\n\nReply with JSON only, no other text:\n{example}")
    user = f"{_question_block(q)}\n\nAnswer to grade:\n{answer}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


PAIRWISE_SYSTEM = (
    "You compare two answers to a question about a scientific paper. Judge only against the paper's "
    "abstract: prefer the answer that is correct and supported by it; if the abstract does not contain the "
    "answer, prefer the answer that says so; if the question rests on a false premise, prefer the answer "
    "that corrects it. Ignore length, style and the order in which the answers are shown. Reply with JSON "
    'only, no other text: {"winner": "A" | "B" | "tie", "reason": "<one sentence>"}'
)


def pairwise_messages(q: dict, a: str, b: str) -> list[dict]:
    # Answer B comes last so a reader (or a test) can split the prompt on the two headings.
    user = f"{_question_block(q)}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}"
    return [{"role": "system", "content": PAIRWISE_SYSTEM}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------- parsing
def extract_json(text: str, required: str) -> tuple[dict | None, str]:
    """The first JSON object in `text` that has key `required` -- bare, in a code fence or amid prose.
    Returns (object, "") or (None, why)."""
    if not text.strip():
        return None, "empty reply"
    decoder = json.JSONDecoder()
    other_object = False
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(obj, dict):
            if required in obj:
                return obj, ""
            other_object = True
    return None, (f"the JSON in the reply has no {required!r}" if other_object else "no JSON object in the reply")


def one_line(text) -> str:
    return " ".join(str(text or "").split())


def _score(v) -> int | None:
    """An integer 1..5 (4.0 counts as 4); None for anything else -- strings, booleans, 4.5, 7."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not v.is_integer():
        return None
    return int(v) if 1 <= v <= 5 else None


def parse_rubric(text: str, names: list[str]) -> tuple[dict | None, str]:
    """({"scores": {name: int}, "reason": str}, "") or (None, why). Every criterion must be scored."""
    obj, why = extract_json(text, "scores")
    if obj is None:
        return None, why
    scores = obj["scores"]
    if not isinstance(scores, dict):
        return None, "'scores' is not a JSON object"
    missing = [n for n in names if n not in scores]
    if missing:
        return None, f"no score for {', '.join(missing)}"
    out = {}
    for n in names:
        out[n] = _score(scores[n])
        if out[n] is None:
            return None, f"score for {n} is {scores[n]!r}, not a whole number 1-5"
    return {"scores": out, "reason": one_line(obj.get("reason"))}, ""


def parse_verdict(text: str) -> tuple[dict | None, str]:
    """({"winner": "A" | "B" | "tie", "reason": str}, "") or (None, why)."""
    obj, why = extract_json(text, "winner")
    if obj is None:
        return None, why
    w = re.sub(r"^ANSWER\s+", "", str(obj["winner"]).strip().upper())
    if w not in ("A", "B", "TIE"):
        return None, f"winner is {obj['winner']!r}, not A, B or tie"
    return {"winner": "tie" if w == "TIE" else w, "reason": one_line(obj.get("reason"))}, ""


# Which side a verdict picks, per order: A is whichever answer was shown first.
_SIDE_PICKED = {"base_first": {"A": "base", "B": "finetuned", "tie": "tie"},
                "ft_first": {"A": "finetuned", "B": "base", "tie": "tie"}}


def combine_verdicts(base_first: str | None, ft_first: str | None) -> tuple[str, int | None]:
    """Two orders -> (winner, consistent). base_first: A=base, B=ft; ft_first: A=ft, B=base; None = that
    order failed. Consistent votes win; a vote against a tie wins (inconsistent); opposite votes cancel to
    a tie (the position bias the swap exposes). A failed order makes the row "failed", never a tie."""
    if base_first is None or ft_first is None:
        return "failed", None
    v1, v2 = _SIDE_PICKED["base_first"][base_first], _SIDE_PICKED["ft_first"][ft_first]
    if v1 == v2:
        return v1, 1
    if "tie" in (v1, v2):
        return (v1 if v2 == "tie" else v2), 0
    return "tie", 0


# --------------------------------------------------------------------------- asking
def rubric_schema(names: list[str]) -> dict:
    """The JSON a rubric reply must be, for servers that constrain replies: a whole score 1-5 per criterion."""
    score = {"type": "integer", "enum": [1, 2, 3, 4, 5]}
    return {"type": "object", "additionalProperties": False, "required": ["scores", "reason"],
            "properties": {"scores": {"type": "object", "additionalProperties": False, "required": list(names),
                                      "properties": {n: score for n in names}},
                           "reason": {"type": "string"}}}


VERDICT_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["winner", "reason"],
                  "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]},
                                 "reason": {"type": "string"}}}


@dataclass
class Job:
    """One judge request: what to send, how to parse the reply, and the cache key its parsed reply is kept under."""
    key: str
    messages: list[dict]
    max_tokens: int
    parse: Callable[[str], tuple[dict | None, str]]
    meta: dict          # stored with the cached record so a person can tell what it was
    schema_name: str = "judgement"
    schema: dict = field(default_factory=dict)


def cache_key(cfg: JudgeConfig, kind: str, rubric: list[tuple[str, str]] | None, order: str,
               messages: list[dict]) -> str:
    # The messages carry question, context, reference, answer(s) and the exact prompt wording, so a
    # prompt change also invalidates old verdicts.
    return sha256_text(json.dumps({"judge": cfg.model, "url": cfg.base_url or "", "kind": kind,
                                   "rubric": rubric or [], "order": order, "messages": messages},
                                  sort_keys=True))[:32]


async def _ask(client: ChatClient, job: Job) -> dict:
    """One judge call -> {"ok": True, "reply", **parsed} or {"ok": False, "why", "raw"}. A call the shared
    client's retries did not cure is a failure, not an exception: the evaluation goes on."""
    _, out = await client.request(job.messages, {"temperature": 0, "max_tokens": job.max_tokens}, job.schema_name,
                                  job.schema)
    if out.error is not None:  # scrubbed by the client, like every reply
        return {"ok": False, "why": f"API error: {one_line(out.error)[:200]}", "raw": out.error[:RAW_LIMIT]}
    content = out.content if isinstance(out.content, str) else ""
    parsed, why = job.parse(content)
    if parsed is None:
        if out.finish_reason == "length":
            why += " (the reply was cut off at max_tokens)"
        return {"ok": False, "why": why, "raw": content[:RAW_LIMIT]}
    return {"ok": True, "reply": content, **parsed}


def _from_cache(cache, job: Job) -> dict | None:
    """A cached reply, parsed again: a record the current parser rejects counts as a miss."""
    hit = cache.get(job.key)
    if not hit or not isinstance(hit.get("reply"), str):
        return None
    parsed, _ = job.parse(hit["reply"])
    return {"ok": True, "reply": hit["reply"], **parsed} if parsed else None


async def _ask_all(client: ChatClient, jobs: list[Job], todo: list[int], on_done) -> None:
    """Ask every job in `todo` (at most the client's concurrency in flight); on_done(i, result) as each arrives.
    A server that cannot be reached, or refuses the key, fails every call with its one reason."""
    async def one(i: int) -> None:
        on_done(i, await _ask(client, jobs[i]))

    watch = asyncio.create_task(client.tell_if_silent())
    try:
        await client.preflight()
        await asyncio.gather(*(one(i) for i in todo))
    except InputError as e:
        for i in todo:
            on_done(i, {"ok": False, "why": f"API error: {one_line(e)[:200]}", "raw": str(e)[:RAW_LIMIT]})
    finally:
        watch.cancel()
        await client.aclose()


def run_jobs(jobs: list[Job], cfg: JudgeConfig, cache, client, desc: str) -> tuple[list[dict], dict]:
    """Results in job order, and stats. Everything runs on this thread (one event loop), so the cache need not
    be thread-safe; each success is written as it arrives, so an interrupted run keeps what it paid for."""
    from tqdm import tqdm

    results: list[dict | None] = [_from_cache(cache, j) for j in jobs]
    todo = [i for i, r in enumerate(results) if r is None]
    stats = {"calls": 0, "cached": len(jobs) - len(todo), "failed": 0}
    if not todo:
        return results, stats
    client = client or make_client(cfg)
    bar = tqdm(total=len(todo), desc=desc, unit="call")

    def on_done(i: int, out: dict) -> None:
        results[i] = out
        stats["calls"] += 1
        if out["ok"]:
            cache.put({"key": jobs[i].key, "model": "judge", **jobs[i].meta, "reply": out["reply"]})
        else:
            stats["failed"] += 1
        bar.update(1)

    try:
        asyncio.run(_ask_all(client, jobs, todo, on_done))
    finally:
        bar.close()
    return results, stats


# --------------------------------------------------------------------------- rubric scores
def rubric_scores(rows: list[dict], questions: dict, criteria: list[tuple[str, str]], cfg: JudgeConfig,
                  cache, client=None) -> dict:
    """Score each answer (both sides of every row) on each criterion, 1-5. Fills per prefix p in
    ("base", "finetuned"): p_rubric_<criterion> (int), p_rubric_mean (float, 2 dp), p_rubric_reason,
    p_rubric_status ("ok" / "failed: <why>"), p_rubric_raw (failed reply, else ""). Scores are None
    when failed. Returns {"calls", "cached", "failed"} counted in judge requests."""
    names = [n for n, _ in criteria]
    schema = rubric_schema(names)
    jobs, targets = [], []
    for row in rows:
        q = questions.get(row["id"], {})
        for side, field_, prefix in SIDES:
            msgs = rubric_messages(q, row.get(field_) or "", criteria)
            jobs.append(Job(key=cache_key(cfg, "rubric", criteria, "", msgs), messages=msgs,
                             max_tokens=MAX_TOKENS["rubric"], parse=lambda t: parse_rubric(t, names),
                             meta={"kind": "judge_rubric", "id": row["id"], "side": side},
                             schema_name="rubric_scores", schema=schema))
            targets.append((row, prefix))
    results, stats = run_jobs(jobs, cfg, cache, client, "judge rubric")
    for (row, prefix), out in zip(targets, results):
        _fill_rubric(row, prefix, names, out)
    return stats


def _fill_rubric(row: dict, p: str, names: list[str], out: dict) -> None:
    if out["ok"]:
        scores = out["scores"]
        row.update({f"{p}_rubric_{n}": scores[n] for n in names})
        row[f"{p}_rubric_mean"] = round(sum(scores.values()) / len(names), 2)
        row.update({f"{p}_rubric_reason": out["reason"], f"{p}_rubric_status": "ok", f"{p}_rubric_raw": ""})
    else:
        row.update({f"{p}_rubric_{n}": None for n in names})
        row[f"{p}_rubric_mean"] = None
        row.update({f"{p}_rubric_reason": "", f"{p}_rubric_status": f"failed: {out['why']}",
                    f"{p}_rubric_raw": out["raw"]})


# --------------------------------------------------------------------------- pairwise
def pairwise(rows: list[dict], questions: dict, cfg: JudgeConfig, cache, client=None) -> dict:
    """Judge base vs fine-tuned twice per row (each answer shown first once). Fills judge_winner
    ("base" / "finetuned" / "tie" / "failed"), judge_consistent (1 / 0 / None when failed), judge_reason,
    judge_raw (the failed replies, else ""). Returns {"calls", "cached", "failed"} in judge requests."""
    jobs = []
    for row in rows:
        q = questions.get(row["id"], {})
        base, ft = row.get("base_answer") or "", row.get("finetuned_answer") or ""
        for order, _ in ORDERS:
            msgs = pairwise_messages(q, *((base, ft) if order == "base_first" else (ft, base)))
            jobs.append(Job(key=cache_key(cfg, "pairwise", None, order, msgs), messages=msgs,
                             max_tokens=MAX_TOKENS["pairwise"], parse=parse_verdict,
                             meta={"kind": "judge_pairwise", "id": row["id"], "order": order},
                             schema_name="verdict", schema=VERDICT_SCHEMA))
    results, stats = run_jobs(jobs, cfg, cache, client, "judge pairwise")
    for i, row in enumerate(rows):
        _fill_pairwise(row, results[2 * i], results[2 * i + 1])
    return stats


def _fill_pairwise(row: dict, base_first: dict, ft_first: dict) -> None:
    votes = [o["winner"] if o["ok"] else None for o in (base_first, ft_first)]
    row["judge_winner"], row["judge_consistent"] = combine_verdicts(*votes)
    reasons, raws = [], []
    for (order, label), out in zip(ORDERS, (base_first, ft_first)):
        if out["ok"]:
            reasons.append(f"[{label}: {_SIDE_PICKED[order][out['winner']]}] {out['reason']}")
        else:
            reasons.append(f"[{label}: failed] {out['why']}")
            raws.append(f"[{label}] {out['raw']}")
    row["judge_reason"] = " | ".join(reasons)
    row["judge_raw"] = " | ".join(raws)
