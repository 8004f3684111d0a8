"""From answers to evidence: score each answer, compare the two models per question, summarise by type,
and read/write the spreadsheet (evaluation.csv) that a person checks.

Column names: every per-answer measure appears twice, `base_<m>` and `finetuned_<m>`; `finetuned_vs_base`
is win / tie / loss of the fine-tuned answer on the primary score (see paperqa_tune.evaluate.verdict); `set` is
the question's evaluation set.

Two evaluation sets, reported separately (summary.json "sets"): `unseen`, questions about papers held out of
training whole (does the behaviour carry over to papers never seen?), and `knowledge`, new questions about papers
that were in training (did the model learn what it was trained on?). The top-level verdict, evidence, rates and
by_type are over ALL questions, both sets together (the most questions, and what summary.json always held); each
set has its own verdict, rates and by_type under "sets". A question without a set (an older questions file)
counts as `unseen`. Every rate carries its n, and reads "too few to tell" below MIN_RATE_N questions.

Hallucination: with the claims judge (paperqa_tune.evaluate.claims), the headline rate (rates.hallucination_rate,
the one the verdict's guard uses) is the judge's per-claim verdicts (`*_judge_hallucinated`); the offline rule's
(`*_hallucinated`, an approximation) stays beside it as rates.hallucination_rate_offline, and
hallucination_agreement says how often the two agree per answer. `hallucination_source` names the headline's
source. Without the claims judge the offline rule is the headline, and none of those keys is written.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from pathlib import Path

from paperqa_tune.errors import InputError, RunFailure

from paperqa_tune.files import atomic_write_text, os_error_text, resolve_path
from paperqa_tune.outputs import write_staged
from paperqa_tune.scoring import BEHAVIOURS, score_answer
from paperqa_tune.evaluate.verdict import (TIE_MARGIN, compare, decide, guard_hallucination, headline, rate_reading,
                                           rates_line)

SIDES = ("base", "finetuned")
TYPES = ("factual", "conceptual", "methodology", "unanswerable", "false_premise")
EDGE_TYPES = ("unanswerable", "false_premise")
SETS = ("unseen", "knowledge")
SET_MEANING = {"unseen": "questions about papers held out of training", "knowledge": "new questions about papers "
               "in training"}
MEASURES = ("behaviour", "correct", "score", "unsupported", "hallucinated", "token_f1", "rougeL", "words")
QUESTION_COLUMNS = ["id", "type", "question", "reference"]
ANSWER_COLUMNS = ["base_answer", "finetuned_answer"]
SCORE_RULE = ("support-aware score per question: an answer asserting N specifics (numbers, names, acronyms, "
              "expansions, identifiers) that neither the source context nor the question supports scores "
              "-min(1, 0.5*N) and is never correct; otherwise answerable types (factual, conceptual, methodology, "
              "...) = token F1 against the reference of a substantive answer (0 if refused, degenerate or empty), "
              "or the rubric judge's correctness (1-5 -> 0-1) when a judge ran; unanswerable = 1 for a refusal; "
              "false_premise = 1 for an explicit correction that does not restate the false premise")


# --------------------------------------------------------------------------- scoring rows
def score_rows(rows: list[dict], questions: dict[str, dict], f1_threshold: float,
               correctness_column: str | None = None) -> None:
    """Add the per-answer measures and the paired outcome to each row (in place).

    questions: id -> question dict (type, question, reference, context). correctness_column: the rubric
    criterion that stands for correctness (e.g. "rubric_correctness"); where the judge scored it, it
    replaces token F1 as the answerable types' measure.
    """
    for row in rows:
        q = questions.get(row["id"]) or row
        for side in SIDES:
            judged = row.get(f"{side}_{correctness_column}") if correctness_column else None
            s = score_answer(row[f"{side}_answer"], {**q, "type": row["type"], "reference": row["reference"]},
                             f1_threshold=f1_threshold, judge_correctness=judged if judged not in ("", None) else None)
            for m in MEASURES:
                row[f"{side}_{m}"] = s[m]
        row["context"] = q.get("context") or ""  # what the answers were checked against, for a person to see
        b, f = row["base_score"], row["finetuned_score"]
        row["finetuned_vs_base"] = ("" if b is None or f is None else
                                    "win" if f - b > TIE_MARGIN else "loss" if b - f > TIE_MARGIN else "tie")


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None and x != ""]
    return round(sum(xs) / len(xs), 4) if xs else None


def _share(rows: list[dict], side: str, labels: tuple[str, ...]) -> float | None:
    return round(sum(r[f"{side}_behaviour"] in labels for r in rows) / len(rows), 4) if rows else None


def _side_summary(rows: list[dict], side: str, claims: bool = False) -> dict:
    """One model's means over `rows`; with the claims judge, hallucination_rate is the judge's (failed calls left
    out) and hallucination_rate_offline the offline rule's."""
    out = {"correct_rate": _mean(r[f"{side}_correct"] for r in rows),
           "mean_score": _mean(r[f"{side}_score"] for r in rows),
           "token_f1": _mean(r[f"{side}_token_f1"] for r in rows),
           "rougeL": _mean(r[f"{side}_rougeL"] for r in rows),
           "hallucination_rate": _mean(r[f"{side}_hallucinated"] for r in rows)}
    if claims:
        out = {**out, "hallucination_rate": _mean(r.get(f"{side}_judge_hallucinated") for r in rows),
               "hallucination_rate_offline": out["hallucination_rate"]}
    return {**out, "words": _mean(r[f"{side}_words"] for r in rows),
            "behaviour": {b: _share(rows, side, (b,)) for b in BEHAVIOURS}}


def type_order(rows: list[dict]) -> list[str]:
    present = {r["type"] for r in rows}
    return [t for t in TYPES if t in present] + sorted(present - set(TYPES))


def paired_rate(rows: list[dict], base: list, finetuned: list, seed: int = 0) -> dict:
    """A rate base -> fine-tuned over `rows` (0/1 values per row, None where it does not apply), with the paired
    difference fine-tuned - base, its 95% bootstrap interval over questions and the sign test, as the verdict's;
    "reading" says what may be concluded, "too few to tell" below MIN_RATE_N questions."""
    paired = compare(base, finetuned, margin=0.0, seed=seed)
    out = {"n": paired["n"], "base": paired["mean_base"], "finetuned": paired["mean_finetuned"],
           "difference": paired["mean_difference"], "ci95": paired["ci95"], "sign_test_p": paired["sign_test_p"]}
    return {**out, "reading": rate_reading(out)}


def hallucination_stats(rows: list[dict], seed: int = 0) -> dict:
    """Share of answers asserting an unsupported specific, per model, and the paired difference fine-tuned -
    base with its 95% bootstrap interval over questions (as the verdict's)."""
    return paired_rate(rows, [r.get("base_hallucinated") for r in rows],
                       [r.get("finetuned_hallucinated") for r in rows], seed)


HALLUCINATION_SOURCES = {
    "judge": "LLM judge: per-claim verdicts against the source (an answer with an unsupported or contradicted "
             "claim hallucinates; answers whose judge call failed are left out)",
    "offline": "offline rule: specifics (numbers, names, acronyms, ...) not found in the source or the question; "
               "an approximation of the judge's per-claim check"}


def _judged(v) -> int | None:
    return None if v in (None, "") else int(v)


def judge_hallucination_stats(rows: list[dict], seed: int = 0) -> dict:
    """As hallucination_stats, from the claims judge's `*_judge_hallucinated` (a failed call is no value: its
    question is left out of the paired rate, never counted as 0)."""
    return paired_rate(rows, [_judged(r.get("base_judge_hallucinated")) for r in rows],
                       [_judged(r.get("finetuned_judge_hallucinated")) for r in rows], seed)


def claims_judged(rows: list[dict]) -> bool:
    """Whether the claims judge gave a verdict on both answers of at least one of `rows`."""
    return any(all(_judged(r.get(f"{s}_judge_hallucinated")) is not None for s in SIDES) for r in rows)


def hallucination_agreement(rows: list[dict]) -> dict:
    """Per answer (both models), how often the offline rule's 0/1 matches the judge's, over the answers the judge
    gave a verdict on; Cohen's kappa corrects the agreement for chance (None when it is undefined)."""
    pairs = [(_judged(r.get(f"{s}_judge_hallucinated")), int(r[f"{s}_hallucinated"])) for r in rows for s in SIDES
             if _judged(r.get(f"{s}_judge_hallucinated")) is not None and r.get(f"{s}_hallucinated") not in (None, "")]
    n = len(pairs)
    cells = {"both": sum(j and o for j, o in pairs), "judge_only": sum(j and not o for j, o in pairs),
             "offline_only": sum(o and not j for j, o in pairs), "neither": sum(not j and not o for j, o in pairs)}
    agree = cells["both"] + cells["neither"]
    kappa = None
    if n:
        pj, po = sum(j for j, _ in pairs) / n, sum(o for _, o in pairs) / n
        chance = pj * po + (1 - pj) * (1 - po)
        kappa = round((agree / n - chance) / (1 - chance), 4) if chance < 1 else None
    return {"answers": n, "agree": agree, "rate": round(agree / n, 4) if n else None, "kappa": kappa, **cells,
            "meaning": "per answer: does the offline rule flag the same answers as the judge? judge_only: the judge "
                       "found an unsupported or contradicted claim the rule missed; offline_only: the rule flagged "
                       "a specific the judge accepted"}


def _flag(rows: list[dict], side: str, labels: tuple[str, ...]) -> list[int]:
    return [int(r[f"{side}_behaviour"] in labels) for r in rows]


def _correct(rows: list[dict], side: str) -> list:
    return [None if r[f"{side}_correct"] in (None, "") else float(r[f"{side}_correct"]) for r in rows]


def key_rates(rows: list[dict], seed: int = 0, claims: bool = False) -> dict:
    """The behaviours fine-tuning is meant to teach, base -> fine-tuned, each with its question count and the
    paired interval of the difference. Refusing an unanswerable question and correcting a false premise count
    only when the answer asserts no unsupported specific (its `correct`): a "correction" that restates the premise
    is not one. With `claims`, hallucination_rate is the claims judge's and hallucination_rate_offline the
    offline rule's, each with its "source"."""
    answerable = [r for r in rows if r["type"] not in EDGE_TYPES]
    unans, fp = ([r for r in rows if r["type"] == t] for t in EDGE_TYPES)
    return {"refusal_rate_unanswerable": paired_rate(unans, *(_correct(unans, s) for s in SIDES), seed=seed),
            "correction_rate_false_premise": paired_rate(fp, *(_correct(fp, s) for s in SIDES), seed=seed),
            "correct_answer_rate_answerable": paired_rate(answerable, *(_correct(answerable, s) for s in SIDES),
                                                          seed=seed),
            "over_refusal_rate_answerable": paired_rate(answerable, *(_flag(answerable, s, ("refused",))
                                                                      for s in SIDES), seed=seed),
            "degenerate_rate": paired_rate(rows, *(_flag(rows, s, ("degenerate", "empty")) for s in SIDES), seed=seed),
            **({"hallucination_rate": {**judge_hallucination_stats(rows, seed), "source": "judge"},
                "hallucination_rate_offline": {**hallucination_stats(rows, seed), "source": "offline"}} if claims
               else {"hallucination_rate": hallucination_stats(rows, seed)})}


EDGE_RATES = {"refusal_rate_unanswerable": "refusal on unanswerable questions",
              "correction_rate_false_premise": "correction of false premises"}


def edge_warnings(rates: dict, where: str) -> list[str]:
    """A warning for each edge behaviour (refusal, correction) that did not move between base and fine-tuned:
    the 95% interval of the difference includes 0 (with too few questions to tell, it says so)."""
    out = []
    for key, what in EDGE_RATES.items():
        r = rates[key]
        if not r["n"] or not r["ci95"] or not r["ci95"][0] <= 0 <= r["ci95"][1]:
            continue
        few = "; too few questions to tell" if r["reading"].startswith("too few") else ""
        out.append(f"{where}: {what} did not move between base and fine-tuned: {_pct(r['base'])} -> "
                   f"{_pct(r['finetuned'])} (n={r['n']}, 95% CI of the difference {r['ci95'][0]:+.0%} to "
                   f"{r['ci95'][1]:+.0%}, includes 0){few}")
    return out


def _status(failed: int, total: int) -> str:
    return "ok" if not failed else "failed" if failed >= total else "partial"


def _claims_summary(rows: list[dict]) -> dict:
    failed = sum(_judged(r.get(f"{s}_judge_hallucinated")) is None for r in rows for s in SIDES)
    return {"status": _status(failed, 2 * len(rows)), "answers": 2 * len(rows) - failed, "failed": failed}


def judge_summary(rows: list[dict], criteria: list[str]) -> dict:
    """Judge results from the rows. Rates come from parsed verdicts only: a judge whose every call failed is
    "status": "failed" with no rates (never a 100% tie)."""
    out: dict = {}
    if rows and "judge_winner" in rows[0]:
        done = [r for r in rows if r["judge_winner"] != "failed"]
        out["pairwise"] = {"status": _status(len(rows) - len(done), len(rows)), "n": len(done),
                           "failed": len(rows) - len(done),
                           **{w: round(sum(r["judge_winner"] == w for r in done) / len(done), 4) if done else None
                              for w in ("finetuned", "base", "tie")}}
    if criteria:
        out["rubric"] = {side: {c: _mean(r.get(f"{side}_rubric_{c}") for r in rows) for c in criteria + ["mean"]}
                         for side in SIDES}
        out["rubric"]["failed"] = sum(r.get(f"{side}_rubric_status", "ok") != "ok" for r in rows for side in SIDES)
        out["rubric"]["status"] = _status(out["rubric"]["failed"], 2 * len(rows))
    if rows and "base_claims" in rows[0]:
        out["claims"] = _claims_summary(rows)
    if out:
        statuses = {v["status"] for v in out.values()}
        out["status"] = "failed" if "failed" in statuses else "partial" if "partial" in statuses else "ok"
    return out


def judge_failure(summary: dict) -> str | None:
    """A warning when a judge kind failed on every question (its results are then marked "failed" in
    summary.json and the primary score falls back to token F1), else None."""
    judge = summary.get("judge") or {}
    failed = [k for k in ("pairwise", "rubric", "claims") if (judge.get(k) or {}).get("status") == "failed"]
    if not failed:
        return None
    return (f"the judge failed on EVERY call ({' and '.join(failed)}: see judge_raw / *_rubric_raw / *_claims_raw "
            "in the CSV for its replies); summary.json marks it \"failed\" and reports no judge rates"
            + ("; correctness falls back to token F1" if "rubric" in failed else "")
            + ("; the hallucination rate is the offline rule's" if "claims" in failed else "")
            + ". Check --judge_model/--judge_base_url; failed calls are not cached, so rerunning the same command "
            "asks the judge again")


def assign_sets(rows: list[dict], questions: dict[str, dict]) -> str | None:
    """Each row's "set" (from the row, else its question; unseen when neither says), and a one-line note when
    some had none (an older questions file)."""
    missing = 0
    for r in rows:
        got = str(r.get("set") or (questions.get(r["id"]) or {}).get("set") or "").strip().lower()
        if got not in SETS:
            missing += 1
            got = "unseen"
        r["set"] = got
    if not missing:
        return None
    return (f"{missing} question(s) name no evaluation set (an older questions file?): counted as 'unseen' "
            "(questions about papers held out of training)")


def _evidence(rows: list[dict], seed: int, claims: bool = False) -> dict:
    """Verdict, verdict line, evidence, rates and by_type of these rows; with `claims` (the claims judge gave
    verdicts), the hallucination rate is the judge's, and the offline rule's agreement with it."""
    by_type = {}
    for t in type_order(rows) + ["all"]:
        sel = [r for r in rows if t == "all" or r["type"] == t]
        by_type[t] = {"n": len(sel), **{side: _side_summary(sel, side, claims) for side in SIDES},
                      "paired": compare([r["base_score"] for r in sel], [r["finetuned_score"] for r in sel], seed=seed)}
    stats = by_type["all"]["paired"]  # every question, paired
    rates = key_rates(rows, seed, claims)
    verdict, reason = guard_hallucination(*decide(stats), rates["hallucination_rate"])
    line = headline(verdict, stats, reason, rates["hallucination_rate"]) + "; " + rates_line(rates)
    out = {"verdict": verdict, "verdict_line": line, "evidence": {**stats, "reason": reason, "measure": SCORE_RULE},
           "rates": rates, "by_type": by_type}
    if claims:
        out.update(hallucination_source=HALLUCINATION_SOURCES["judge"],
                   hallucination_agreement=hallucination_agreement(rows))
    return out


def summarize(rows: list[dict], criteria: list[str] | None = None, seed: int = 0, claims: bool = False) -> dict:
    """summary.json's evidence: the verdict first (over all questions), then the key rates and per type; the same
    for each evaluation set (the rows' "set", see assign_sets) under "sets"; "warnings" when an edge behaviour
    did not move in a set. `claims`: the claims judge ran (judge_claims filled the rows); its verdicts are the
    headline hallucination rate unless it failed on every answer (then the offline rule's, saying so)."""
    use_judge = claims and claims_judged(rows)
    out = _evidence(rows, seed, use_judge)
    if claims and not use_judge:
        out["hallucination_source"] = HALLUCINATION_SOURCES["offline"] + " (the claims judge failed on every answer)"
    present = [k for k in SETS if any(r.get("set", "unseen") == k for r in rows)]
    out["sets"] = {}
    for k in present:
        ev = _evidence([r for r in rows if r.get("set", "unseen") == k], seed, use_judge)
        out["sets"][k] = {"meaning": SET_MEANING[k], "n": ev["evidence"]["n"], **ev}
    out["sets_missing"] = [k for k in SETS if k not in present]
    out["warnings"] = [w for k in present for w in edge_warnings(out["sets"][k]["rates"], f"{k} set")]
    judge = judge_summary(rows, criteria or [])
    if judge:
        out["judge"] = judge
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


RATE_LABELS = {"refusal_rate_unanswerable": "refuses unanswerable (inventing nothing)",
               "correction_rate_false_premise": "corrects false premise (restating nothing unsupported)",
               "correct_answer_rate_answerable": "correct answers (answerable)",
               "over_refusal_rate_answerable": "refuses answerable (over-refusal)",
               "degenerate_rate": "degenerate or empty answers",
               "hallucination_rate": "hallucinates (asserts a specific the source does not support)",
               "hallucination_rate_offline": "hallucinates per the offline rule (an approximation of the judge's)"}
JUDGE_HALLUCINATION_LABEL = "hallucinates per the judge (a claim the source does not support or contradicts)"


def _evidence_lines(ev: dict) -> list[str]:
    """One evidence block (all questions, or one set): the table per type, then each key rate with its n."""
    header = ["type", "n", "correct base->ft", "score base->ft", "F1 base->ft", "ft win/tie/loss"]
    table = [header]
    for t, s in ev["by_type"].items():
        b, f, p = s["base"], s["finetuned"], s["paired"]
        table.append([t, str(s["n"]), f"{_pct(b['correct_rate'])} -> {_pct(f['correct_rate'])}",
                      f"{_num(b['mean_score'])} -> {_num(f['mean_score'])}",
                      f"{_num(b['token_f1'])} -> {_num(f['token_f1'])}", f"{p['wins']}/{p['ties']}/{p['losses']}"])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "-" * len(lines[0]))
    for key, label in RATE_LABELS.items():
        r = ev["rates"].get(key)
        if r and r["n"]:
            ci = r.get("ci95")
            label = JUDGE_HALLUCINATION_LABEL if key == "hallucination_rate" and r.get("source") == "judge" else label
            lines.append(f"{label}: {_pct(r['base'])} -> {_pct(r['finetuned'])} (n={r['n']}"
                         + (f", difference {r['difference']:+.0%} [95% CI {ci[0]:+.0%} to {ci[1]:+.0%}]" if ci else "")
                         + f"): {r.get('reading', '')}")
    agreement = ev.get("hallucination_agreement")
    if agreement and agreement["answers"]:
        lines.append(f"offline rule vs judge: agree on {_pct(agreement['rate'])} of {agreement['answers']} answers "
                     f"(kappa {_num(agreement['kappa'])}; the judge alone flags {agreement['judge_only']}, the rule "
                     f"alone {agreement['offline_only']})")
    return lines


def summary_table(summary: dict) -> str:
    """Plain-text tables per type (base -> fine-tuned) and the key rates: for all questions, then for each
    evaluation set with its own verdict; the overall verdict line last."""
    sets = summary.get("sets") or {}
    lines = (["== all questions" + (f" ({' + '.join(sets)})" if len(sets) > 1 else "") + " =="] if sets else [])
    lines += _evidence_lines(summary)
    if len(sets) > 1:
        for k, ev in sets.items():
            lines += ["", f"== {k} set: {ev['meaning']} (n={ev['n']}) =="] + _evidence_lines(ev)
            lines.append(f"{k} set: {ev['verdict_line']}")
        lines.append("")
    for k in summary.get("sets_missing") or []:
        lines.append(f"note: no '{k}' questions ({SET_MEANING[k]}): that set is not evaluated")
    pw = summary.get("judge", {}).get("pairwise")
    if pw and pw.get("status") == "failed":
        lines.append(f"pairwise judge: FAILED on all {pw['failed']} questions (see judge_raw)")
    elif pw:
        lines.append(f"pairwise judge: fine-tuned {_pct(pw['finetuned'])}, base {_pct(pw['base'])}, tie {_pct(pw['tie'])}"
                     f" of {pw['n']} judged" + (f"; {pw['failed']} failed (see judge_raw)" if pw["failed"] else ""))
    cl = summary.get("judge", {}).get("claims")
    if cl:
        lines.append(f"claims judge: {cl['answers']} answers checked claim by claim"
                     + (f"; {cl['failed']} failed (see *_claims_raw)" if cl["failed"] else "")
                     + ("; the hallucination rate above is the judge's"
                        if summary.get("hallucination_source") == HALLUCINATION_SOURCES["judge"] else
                        "; no verdict: the hallucination rate above is the offline rule's"))
    skipped = summary.get("skipped_too_long") or {}
    if skipped.get("n"):
        lines.append(f"skipped (too long for the model): {skipped['n']} question(s), not scored: "
                     f"{', '.join(skipped['ids'][:10])}{' ...' if skipped['n'] > 10 else ''}")
    lines.append(summary["verdict_line"])
    return "\n".join(lines)


# --------------------------------------------------------------------------- the spreadsheet
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")  # + full-width forms


def safe_cell(v):
    """OWASP CSV-injection guidance: text a spreadsheet would run as a formula gets a leading apostrophe.
    Line breaks inside text become \\n (what spreadsheets store; a lone \\r would come back as \\n anyway),
    other control characters (no spreadsheet keeps them) U+FFFD. None/NaN become empty cells; numbers stay numbers."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, str):
        if v.startswith(FORMULA_START):
            v = "'" + v
        return _CONTROL_RE.sub("\ufffd", v.replace("\r\n", "\n").replace("\r", "\n"))
    return v


def unsafe_cell(v: str) -> str:
    """Undo safe_cell's apostrophe when a CSV is read back (a spreadsheet that saved it may have dropped it)."""
    return v[1:] if v.startswith("'") and v[1:].startswith(FORMULA_START) else v


CONTEXT_CELL_CHARS = 20_000  # a spreadsheet cell holds at most 32,767 characters; the judge sees as much
CONTEXT_CUT = " …[cut: the first {:,} of {:,} characters; the full text is in the questions file]"


def context_cell(text: str) -> str:
    """The `context` column's cell: the source text, cut (saying so) past CONTEXT_CELL_CHARS."""
    text = text or ""
    return text if len(text) <= CONTEXT_CELL_CHARS else text[:CONTEXT_CELL_CHARS] + CONTEXT_CUT.format(
        CONTEXT_CELL_CHARS, len(text))


def is_cut_context(cell: str) -> bool:
    """A context cell context_cell cut: a rescore checks answers against the questions file's full text."""
    return "…[cut: the first " in (cell or "")[-120:]


def source_context(cell: str | None, from_questions: str | None) -> str:
    """What a rescore checks a row's answers against: the CSV's own context cell (it may have been edited by hand)
    over the questions file's, unless the cell is empty or was cut (context_cell)."""
    if cell and not is_cut_context(cell):
        return cell
    return from_questions or ""


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """UTF-8-with-BOM CSV text (Excel reads accents right), every cell made safe, embedded newlines quoted; a long
    context cut (context_cell)."""
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([safe_cell(context_cell(r.get(c)) if c == "context" else r.get(c)) for c in columns])
    return "\ufeff" + buf.getvalue()


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    atomic_write_text(path, csv_text(rows, columns))


# --------------------------------------------------------------------------- staged outputs
def split_skipped(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows that were answered and are scored, rows skipped with a reason in their 'skipped' cell)."""
    return [r for r in rows if not r.get("skipped")], [r for r in rows if r.get("skipped")]


def _ours(column: str) -> bool:
    """A column eval_compare.py writes (recomputed on --rescore); any other is the user's and is kept."""
    if column in QUESTION_COLUMNS + ANSWER_COLUMNS or column in ("finetuned_vs_base", "system_prompt", "skipped",
                                                                 "context", "set"):
        return True
    side, _, measure = column.partition("_")
    return (side in SIDES and (measure in MEASURES + ("new_tokens",) or measure.startswith(("rubric_", "claims",
                                                                                            "judge_")))) or \
        column.startswith("judge_")


def result_columns(rows: list[dict], criteria: list[str], pairwise: bool, per_row_system: bool) -> list[str]:
    cols = QUESTION_COLUMNS + ANSWER_COLUMNS
    claims = any("base_claims" in r for r in rows)
    for m in ("behaviour", "correct", "score", "hallucinated", "unsupported") + (
            ("judge_hallucinated", "claims") if claims else ()):  # the judge's beside the offline rule's
        cols += [f"base_{m}", f"finetuned_{m}"]
    cols.append("finetuned_vs_base")
    for m in ("token_f1", "rougeL", "words", "new_tokens"):
        cols += [f"base_{m}", f"finetuned_{m}"]
    if pairwise:
        cols += ["judge_winner", "judge_consistent", "judge_reason", "judge_raw"]
    for c in (criteria + ["mean", "reason", "status", "raw"]) if criteria else []:
        cols += [f"base_rubric_{c}", f"finetuned_rubric_{c}"]
    if claims:
        cols += ["base_claims_raw", "finetuned_claims_raw"]
    cols += ["set", "context"]
    if per_row_system:
        cols.append("system_prompt")
    if any(r.get("skipped") for r in rows):
        cols.append("skipped")
    extra = dict.fromkeys(k for r in rows for k in r.get("user_columns", {}))
    return cols + list(extra)


def read_results_csv(path: Path) -> list[dict]:
    """The answers of an evaluation.csv (as written, or edited in a spreadsheet and saved back as CSV)."""
    if not path.is_file():
        raise InputError(f"{path}: file not found; --rescore takes an evaluation.csv written by eval_compare.py")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            fields = [(c or "").strip() for c in (reader.fieldnames or [])]
            missing = [c for c in QUESTION_COLUMNS + ANSWER_COLUMNS if c not in fields]
            if missing:
                raise InputError(f"{path}:1: missing column(s) {', '.join(missing)}; --rescore needs the columns "
                                 f"{', '.join(QUESTION_COLUMNS + ANSWER_COLUMNS)} as eval_compare.py writes them")
            reader.fieldnames = fields
            rows, seen = [], set()
            for rec in reader:
                where = f"{path}:{reader.line_num}"
                row = {c: unsafe_cell(rec.get(c) or "") for c in QUESTION_COLUMNS + ANSWER_COLUMNS}
                row["id"], row["type"] = row["id"].strip(), row["type"].strip().lower() or "unknown"
                if not row["id"]:
                    raise InputError(f"{where}: empty 'id'; every row needs its question id")
                if row["id"] in seen:
                    raise InputError(f"{where}: id {row['id']!r} appears twice; ids must be unique")
                seen.add(row["id"])
                for side in SIDES:
                    n = (rec.get(f"{side}_new_tokens") or "").strip()
                    row[f"{side}_new_tokens"] = int(n) if n.isdigit() else None
                if (rec.get("set") or "").strip():  # the evaluation set (unseen / knowledge)
                    row["set"] = rec["set"].strip().lower()
                if (rec.get("context") or "").strip():  # the source the answers are checked against
                    row["context"] = unsafe_cell(rec["context"])
                if rec.get("system_prompt") is not None:
                    row["system_prompt"] = unsafe_cell(rec["system_prompt"])
                if (rec.get("skipped") or "").strip():  # not answered (too long for the model): not scored
                    row["skipped"] = unsafe_cell(rec["skipped"])
                # the user's own columns (notes, marks) ride along unchanged
                row["user_columns"] = {c: unsafe_cell(rec.get(c) or "") for c in fields if c and not _ours(c)}
                row.update(row["user_columns"])
                rows.append(row)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 ({e.reason}); save the sheet as 'CSV UTF-8'") from None
    except csv.Error as e:
        raise InputError(f"{path}: not a readable CSV ({e})") from None
    if not rows:
        raise InputError(f"{path}: no rows to rescore")
    return rows


# --------------------------------------------------------------------------- an evaluation's outputs, together
def output_paths(out: Path) -> dict[str, Path]:
    """Where an evaluation with results CSV `out` writes (the cache is the resume log, not an output)."""
    return {"csv": out, "marking": out.with_name(f"{out.stem}_for_marking.csv"),
            "summary": out.with_name("summary.json"), "plot": out.with_name("results_bar.png"),
            "cache": out.with_name(f"{out.stem}.cache.jsonl"),
            "curve_csv": out.with_name("learning_curve.csv"), "curve_plot": out.with_name("learning_curve.png"),
            "curve_answers": out.with_name("learning_curve_answers.jsonl")}


# The outputs written together, by the name messages use; committed in COMMIT_ORDER, summary.json last.
OUTPUTS = {"csv": "--out", "marking": "the marking sheet", "plot": "the chart", "curve_csv": "learning_curve.csv",
           "curve_plot": "learning_curve.png", "curve_answers": "learning_curve_answers.jsonl",
           "summary": "summary.json"}
COMMIT_ORDER = ("curve_answers", "curve_csv", "curve_plot", "marking", "plot", "csv", "summary")


def open_outputs(paths: dict, curve: bool, inputs: list, overwrite: bool, command=None, curve_answers=None):
    """The evaluation's OutputSet (with the learning curve's files when `curve`, its checkpoints' answers too
    unless `curve_answers` is False: a rescore in place reads them): distinct outputs, none an
    input, nor the answer cache one; existing ones replaced only with overwrite. `with` it to hold the lock;
    `command` (outputs.run_command) lets a rerun of the same command finish a commit cut short and stop there
    (OutputSet.finished_earlier)."""
    from paperqa_tune.outputs import OutputSet

    for i in inputs:
        if i and resolve_path(i, "input") == resolve_path(paths["cache"], "the answer cache"):
            raise InputError(f"{i} is this run's answer cache (<out stem>.cache.jsonl), where answers are appended; "
                             "choose another --out")
    with_answers = curve if curve_answers is None else curve_answers
    keys = [k for k in OUTPUTS if (curve or not k.startswith("curve")) and (with_answers or k != "curve_answers")]
    return OutputSet({OUTPUTS[k]: paths[k] for k in keys}, inputs=inputs, overwrite=overwrite, command=command)


def write_outputs(outs, rows: list[dict], summary: dict, criteria: list[str], pairwise: bool,
                  curve: list[dict] | None = None, curve_panels: dict | None = None,
                  curve_answers: str | None = None) -> int:
    """The CSV, the marking sheet, summary.json, the chart (and the learning curve, with the checkpoints'
    answers when given) staged in `outs` (an
    OutputSet from open_outputs, locked) and committed together; then the table and verdict on stdout. A
    failed write (a full disk) is RunFailure with the previous outputs untouched. Returns the exit code: 1
    when the judge failed on every call (the evaluation is written, the judge marked failed), else 0."""
    from paperqa_tune import charts

    failure = judge_failure(summary)
    if failure:
        summary["judge"]["note"] = failure
    scored, _ = split_skipped(rows)
    per_row_system = len({r.get("system_prompt") for r in scored}) > 1
    stage = {k: outs.stage(name) for k, name in OUTPUTS.items() if name in outs.paths}
    try:
        write_staged(stage["csv"], csv_text(rows, result_columns(rows, criteria, pairwise, per_row_system)))
        write_staged(stage["marking"], csv_text([{**r, "winner": ""} for r in scored],
                                                QUESTION_COLUMNS + ANSWER_COLUMNS + ["winner"]))
        if curve is not None:
            write_staged(stage["curve_csv"], csv_text(curve, list(dict.fromkeys(k for p in curve for k in p))))
            charts.plot_curve(curve, curve_panels or {}, stage["curve_plot"])
        if curve_answers is not None:
            write_staged(stage["curve_answers"], curve_answers)
        charts.plot_results(summary, stage["plot"])
        write_staged(stage["summary"], json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    except OSError as e:
        raise RunFailure(f"cannot write the outputs: {os_error_text(e)}; the previous outputs in "
                         f"{outs.paths[OUTPUTS['csv']].parent} are unchanged and no partial file is left") from None
    outs.commit([OUTPUTS[k] for k in COMMIT_ORDER if OUTPUTS[k] in outs.paths])
    print(summary_table(summary))
    for w in summary.get("warnings") or []:
        print(f"warning: {w}", file=sys.stderr)
    if curve is not None:
        print(f"learning curve over {len(curve)} points: {outs.paths[OUTPUTS['curve_csv']]}, "
              f"{outs.paths[OUTPUTS['curve_plot']]}")
    print("wrote " + ", ".join(str(outs.paths[OUTPUTS[k]]) for k in ("csv", "marking", "summary", "plot")))
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


def read_json_or_empty(path: Path, without: str) -> dict:
    """A JSON file written by an earlier stage (summary.json, metrics.json), or {} when there is none; an
    unreadable one is {} with a warning saying what goes `without` it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        print(f"warning: {path} is unreadable ({e}); going on without {without}", file=sys.stderr)
        return {}
    return data if isinstance(data, dict) else {}
