"""The claims judge: the answer's factual claims, each checked against the source text by an LLM judge.

    stats = judge_claims(rows, questions, cfg, cache, client)   # fills {base,finetuned}_claims, ..._judge_hallucinated

For each answer (both sides of every row) one request shows the judge the source (the question's `context`, the
abstract -- also for unanswerable questions: what the answer asserts is checked against what the paper says), the
question and the answer, and asks for a JSON list of the answer's factual claims, each with a verdict:

    supported     the source states it or directly implies it
    contradicted  the source says something incompatible with it
    unsupported   the source does not say it either way

A refusal, or an answer that asserts nothing about the paper, has no claims (an empty list). An answer with any
unsupported or contradicted claim is hallucinated (1), else 0. This is the measure the offline rule
(paperqa_tune.scoring: unsupported specifics found by matching words) approximates; summary.json reports both and
how often they agree (paperqa_tune.evaluate.report).

Like the other judges (paperqa_tune.evaluate.judge): blind (the prompt never says which model wrote the answer),
the reply's shape asked for through the shared client's response-format ladder, failures recorded as failed (no
verdict, never a guessed 0), only parsed replies cached, the API key scrubbed by the client.
"""
from __future__ import annotations

import json

from paperqa_tune.evaluate.judge import (TEXT_LIMITS, Job, JudgeConfig, cache_key, capped, extract_json, one_line,
                                         run_jobs)

VERDICTS = ("supported", "unsupported", "contradicted")
HALLUCINATED = ("unsupported", "contradicted")
MAX_TOKENS = 1200      # room for a dozen claims with reasons; a reply cut short is a failure that says so
NO_CLAIMS = "(no factual claims)"


CLAIMS_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["claims"],
    "properties": {"claims": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["claim", "verdict", "reason"],
        "properties": {"claim": {"type": "string"}, "verdict": {"type": "string", "enum": list(VERDICTS)},
                       "reason": {"type": "string"}}}}}}

CLAIMS_SYSTEM = (
    "You check one answer to a question about a scientific paper against the paper's source text. List each "
    "factual claim the answer makes about the paper or its subject (a number, name, method, setting, result or "
    "comparison), one short self-contained sentence per claim, and give each a verdict:\n"
    "- supported: the source text states it or directly implies it;\n"
    "- contradicted: the source text says something incompatible with it;\n"
    "- unsupported: the source text does not say it either way (even if it may be true elsewhere).\n"
    "Check only against the source text: not against your own knowledge, and not against the question (a "
    "question may rest on a false premise). Saying that the source does not give some information, or declining "
    "to answer, is not a factual claim: an answer that only declines has no claims (an empty list). Give each "
    "verdict a short reason; for a contradicted claim, say what the source says instead. Reply with JSON only, "
    'no other text: {"claims": [{"claim": "<claim>", "verdict": "supported" | "unsupported" | "contradicted", '
    '"reason": "<short reason>"}]}'
)


def claims_messages(q: dict, answer: str) -> list[dict]:
    source = capped(str(q.get("context") or ""), TEXT_LIMITS["context"]) or "(not available)"
    user = (f"Source text:\n{source}\n\nQuestion: {capped(str(q.get('question') or ''), TEXT_LIMITS['question'])}"
            f"\n\nAnswer to check:\n{answer}")
    return [{"role": "system", "content": CLAIMS_SYSTEM}, {"role": "user", "content": user}]


def parse_claims(text: str) -> tuple[dict | None, str]:
    """({"claims": [{"claim", "verdict", "reason"}, ...]}, "") or (None, why). Every claim needs its text and one
    of VERDICTS (any case); a missing reason is ""."""
    obj, why = extract_json(text, "claims")
    if obj is None:
        return None, why
    items = obj["claims"]
    if not isinstance(items, list):
        return None, "'claims' is not a JSON list"
    out = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            return None, f"claim {i} is {one_line(json.dumps(item))[:60]}, not an object"
        claim, verdict = one_line(item.get("claim")), str(item.get("verdict") or "").strip().lower()
        if not claim:
            return None, f"claim {i} has no text"
        if verdict not in VERDICTS:
            return None, f"claim {i} has verdict {item.get('verdict')!r}, not one of {', '.join(VERDICTS)}"
        out.append({"claim": claim, "verdict": verdict, "reason": one_line(item.get("reason"))})
    return {"claims": out}, ""


def claims_text(claims: list[dict]) -> str:
    """The claims for a spreadsheet cell: "[contradicted] claim — reason | [supported] claim — reason"."""
    if not claims:
        return NO_CLAIMS
    return " | ".join(f"[{c['verdict']}] {c['claim']}" + (f" — {c['reason']}" if c["reason"] else "") for c in claims)


def judge_claims(rows: list[dict], questions: dict, cfg: JudgeConfig, cache, client=None) -> dict:
    """Per-claim verdicts for each answer (both sides of every row). Fills per side p: p_claims (claims_text, or
    "failed: <why>"), p_judge_hallucinated (1 when a claim is unsupported or contradicted, 0 when every claim is
    supported or there is none, None when the call failed), p_claims_raw (the failed reply, else "").
    Returns {"calls", "cached", "failed"} counted in judge requests."""
    jobs, targets = [], []
    for row in rows:
        q = questions.get(row["id"], {})
        for side in ("base", "finetuned"):
            msgs = claims_messages(q, row.get(f"{side}_answer") or "")
            jobs.append(Job(key=cache_key(cfg, "claims", None, "", msgs), messages=msgs, max_tokens=MAX_TOKENS,
                            parse=parse_claims, meta={"kind": "judge_claims", "id": row["id"], "side": side},
                            schema_name="claims", schema=CLAIMS_SCHEMA))
            targets.append((row, side))
    results, stats = run_jobs(jobs, cfg, cache, client, "judge claims")
    for (row, side), out in zip(targets, results):
        if out["ok"]:
            row[f"{side}_claims"] = claims_text(out["claims"])
            row[f"{side}_judge_hallucinated"] = int(any(c["verdict"] in HALLUCINATED for c in out["claims"]))
            row[f"{side}_claims_raw"] = ""
        else:
            row[f"{side}_claims"] = f"failed: {out['why']}"
            row[f"{side}_judge_hallucinated"] = None
            row[f"{side}_claims_raw"] = out["raw"]
    return stats
