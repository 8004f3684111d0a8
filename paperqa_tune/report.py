"""From answers to evidence: score each answer, compare the two models per question, summarise by type,
and read/write the spreadsheet (evaluation.csv) that a person checks.

Column names: every per-answer measure appears twice, `base_<m>` and `finetuned_<m>`; `finetuned_vs_base`
is win / tie / loss of the fine-tuned answer on the primary score (see paperqa_tune.verdict).
"""
from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

from common import InputError, atomic_write_text
from paperqa_tune.scoring import BEHAVIOURS, score_answer
from paperqa_tune.verdict import TIE_MARGIN, compare, decide, headline

SIDES = ("base", "finetuned")
TYPES = ("factual", "conceptual", "methodology", "unanswerable", "false_premise")
EDGE_TYPES = ("unanswerable", "false_premise")
MEASURES = ("behaviour", "correct", "score", "token_f1", "rougeL", "words")
QUESTION_COLUMNS = ["id", "type", "question", "reference"]
ANSWER_COLUMNS = ["base_answer", "finetuned_answer"]
SCORE_RULE = ("primary score per question: answerable types (factual, conceptual, methodology, ...) = token F1 "
              "against the reference of a substantive answer (0 if refused, degenerate or empty), or the rubric "
              "judge's correctness (1-5 -> 0-1) when a judge ran; unanswerable = 1 for a refusal that invents no "
              "specifics; false_premise = 1 for an explicit correction of the premise")


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
        b, f = row["base_score"], row["finetuned_score"]
        row["finetuned_vs_base"] = ("" if b is None or f is None else
                                    "win" if f - b > TIE_MARGIN else "loss" if b - f > TIE_MARGIN else "tie")


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None and x != ""]
    return round(sum(xs) / len(xs), 4) if xs else None


def _share(rows: list[dict], side: str, labels: tuple[str, ...]) -> float | None:
    return round(sum(r[f"{side}_behaviour"] in labels for r in rows) / len(rows), 4) if rows else None


def _side_summary(rows: list[dict], side: str) -> dict:
    return {"correct_rate": _mean(r[f"{side}_correct"] for r in rows),
            "mean_score": _mean(r[f"{side}_score"] for r in rows),
            "token_f1": _mean(r[f"{side}_token_f1"] for r in rows),
            "rougeL": _mean(r[f"{side}_rougeL"] for r in rows),
            "words": _mean(r[f"{side}_words"] for r in rows),
            "behaviour": {b: _share(rows, side, (b,)) for b in BEHAVIOURS}}


def type_order(rows: list[dict]) -> list[str]:
    present = {r["type"] for r in rows}
    return [t for t in TYPES if t in present] + sorted(present - set(TYPES))


def key_rates(rows: list[dict]) -> dict:
    """The behaviours fine-tuning is meant to teach, base -> fine-tuned, each with its question count."""
    groups = {
        "refusal_rate_unanswerable": ([r for r in rows if r["type"] == "unanswerable"], ("refused",)),
        "correction_rate_false_premise": ([r for r in rows if r["type"] == "false_premise"], ("corrected_premise",)),
        "over_refusal_rate_answerable": ([r for r in rows if r["type"] not in EDGE_TYPES], ("refused",)),
        "degenerate_rate": (rows, ("degenerate", "empty")),
    }
    return {name: {"n": len(sel), **{side: _share(sel, side, labels) for side in SIDES}}
            for name, (sel, labels) in groups.items()}


def judge_summary(rows: list[dict], criteria: list[str]) -> dict:
    out: dict = {}
    if rows and "judge_winner" in rows[0]:
        done = [r for r in rows if r["judge_winner"] != "failed"]
        out["pairwise"] = {"n": len(done), "failed": len(rows) - len(done),
                           **{w: round(sum(r["judge_winner"] == w for r in done) / len(done), 4) if done else None
                              for w in ("finetuned", "base", "tie")}}
    if criteria:
        out["rubric"] = {side: {c: _mean(r.get(f"{side}_rubric_{c}") for r in rows) for c in criteria + ["mean"]}
                         for side in SIDES}
        out["rubric"]["failed"] = sum(r.get(f"{side}_rubric_status", "ok") != "ok" for r in rows for side in SIDES)
    return out


def summarize(rows: list[dict], criteria: list[str] | None = None, seed: int = 0) -> dict:
    """summary.json's evidence: the verdict first, then the key rates, then per type."""
    by_type = {}
    for t in type_order(rows) + ["all"]:
        sel = [r for r in rows if t == "all" or r["type"] == t]
        by_type[t] = {"n": len(sel), **{side: _side_summary(sel, side) for side in SIDES},
                      "paired": compare([r["base_score"] for r in sel], [r["finetuned_score"] for r in sel], seed=seed)}
    stats = by_type["all"]["paired"]  # every question, paired
    verdict, reason = decide(stats)
    out = {"verdict": verdict, "verdict_line": headline(verdict, stats, reason),
           "evidence": {**stats, "reason": reason, "measure": SCORE_RULE}, "rates": key_rates(rows), "by_type": by_type}
    judge = judge_summary(rows, criteria or [])
    if judge:
        out["judge"] = judge
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def summary_table(summary: dict) -> str:
    """Plain-text table per type (base -> fine-tuned), the key rates, and the verdict line last."""
    header = ["type", "n", "correct base->ft", "score base->ft", "F1 base->ft", "ft win/tie/loss"]
    table = [header]
    for t, s in summary["by_type"].items():
        b, f, p = s["base"], s["finetuned"], s["paired"]
        table.append([t, str(s["n"]), f"{_pct(b['correct_rate'])} -> {_pct(f['correct_rate'])}",
                      f"{_num(b['mean_score'])} -> {_num(f['mean_score'])}",
                      f"{_num(b['token_f1'])} -> {_num(f['token_f1'])}", f"{p['wins']}/{p['ties']}/{p['losses']}"])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "-" * len(lines[0]))
    names = {"refusal_rate_unanswerable": "refuses unanswerable", "correction_rate_false_premise":
             "corrects false premise", "over_refusal_rate_answerable": "refuses answerable (over-refusal)",
             "degenerate_rate": "degenerate or empty answers"}
    for key, label in names.items():
        r = summary["rates"][key]
        if r["n"]:
            lines.append(f"{label}: {_pct(r['base'])} -> {_pct(r['finetuned'])} (n={r['n']})")
    pw = summary.get("judge", {}).get("pairwise")
    if pw:
        lines.append(f"pairwise judge: fine-tuned {_pct(pw['finetuned'])}, base {_pct(pw['base'])}, tie {_pct(pw['tie'])}"
                     f" of {pw['n']} judged" + (f"; {pw['failed']} failed (see judge_raw)" if pw["failed"] else ""))
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


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """UTF-8-with-BOM CSV text (Excel reads accents right), every cell made safe, embedded newlines quoted."""
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([safe_cell(r.get(c)) for c in columns])
    return "\ufeff" + buf.getvalue()


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    atomic_write_text(path, csv_text(rows, columns))


def _ours(column: str) -> bool:
    """A column eval_compare.py writes (recomputed on --rescore); any other is the user's and is kept."""
    if column in QUESTION_COLUMNS + ANSWER_COLUMNS or column in ("finetuned_vs_base", "system_prompt"):
        return True
    side, _, measure = column.partition("_")
    return (side in SIDES and (measure in MEASURES + ("new_tokens",) or measure.startswith("rubric_"))) or \
        column.startswith("judge_")


def result_columns(rows: list[dict], criteria: list[str], pairwise: bool, per_row_system: bool) -> list[str]:
    cols = QUESTION_COLUMNS + ANSWER_COLUMNS
    for m in ("behaviour", "correct", "score"):
        cols += [f"base_{m}", f"finetuned_{m}"]
    cols.append("finetuned_vs_base")
    for m in ("token_f1", "rougeL", "words", "new_tokens"):
        cols += [f"base_{m}", f"finetuned_{m}"]
    if pairwise:
        cols += ["judge_winner", "judge_consistent", "judge_reason", "judge_raw"]
    for c in (criteria + ["mean", "reason", "status", "raw"]) if criteria else []:
        cols += [f"base_rubric_{c}", f"finetuned_rubric_{c}"]
    if per_row_system:
        cols.append("system_prompt")
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
                if rec.get("system_prompt") is not None:
                    row["system_prompt"] = unsafe_cell(rec["system_prompt"])
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
