"""The learning curve: the evaluation repeated on each saved checkpoint, scored like the final one.

    points = learning_curve(rows, answers, steps, questions, f1_threshold, losses)
    write_answers(path, steps, answers, losses)        # learning_curve_answers.jsonl, for --rescore
    steps, answers, losses = read_answers(path)

`rows` are the evaluation's scored result rows (base answers in them); `answers` maps a checkpoint label to
{question id: answer}; `steps` is [(label, step)] in training order, the final adapter ("finetuned") last.
A point per checkpoint (step 0 = the base model) carries the overall rates and, for each evaluation set
present (unseen papers / knowledge of trained papers), the same rates prefixed with the set's name, plus the
run's training and validation loss at that step. The checkpoints' answers are written beside the CSV so that
`eval_compare.py --rescore` recomputes the whole curve under the current scoring rule without the model.
"""
from __future__ import annotations

import json
from pathlib import Path

from paperqa_tune.errors import InputError
from paperqa_tune.evaluate import report

# Overall columns of a point, and the per-set ones (prefixed "<set>_").
RATES = ("hallucination_rate", "refusal_rate_unanswerable", "correction_rate_false_premise",
         "over_refusal_rate_answerable", "correct_answer_rate_answerable", "degenerate_rate")
# What each panel of learning_curve.png draws: column -> legend label.
PANELS = {
    "unseen papers (does it invent, refuse, correct?)": {
        "unseen_hallucination_rate": "hallucinates", "unseen_refusal_rate_unanswerable": "refuses unanswerable",
        "unseen_correction_rate_false_premise": "corrects false premise",
        "unseen_over_refusal_rate_answerable": "refuses answerable"},
    "knowledge of trained papers (did it learn?)": {
        "knowledge_correct_answer_rate_answerable": "correct answers", "knowledge_hallucination_rate": "hallucinates"},
    "all questions": {"hallucination_rate": "hallucinates",
                      "correct_rate": "correct (all)", "degenerate_rate": "degenerate or empty"},
}


def losses_from_metrics(metrics: dict) -> dict[int, dict]:
    """{step: {"train_loss", "val_loss"}} from a run's metrics.json (either may be missing at a step)."""
    losses: dict[int, dict] = {}
    for split in ("train", "val"):
        for r in metrics.get(split, []):
            losses.setdefault(r["step"], {})[f"{split}_loss"] = round(r["loss"], 4)
    return losses


def point(step: int, label: str, rows: list[dict], side: str, losses: dict) -> dict:
    s = report.summarize(rows)
    overall = s["by_type"]["all"][side]
    p = {"step": step, "label": label, "n": len(rows), "mean_score": overall["mean_score"],
         "correct_rate": overall["correct_rate"], "token_f1": overall["token_f1"]}
    p.update({k: s["rates"][k][side] for k in RATES if k in s["rates"]})
    p.update({f"correct_{t}": v[side]["correct_rate"] for t, v in s["by_type"].items() if t != "all"})
    for name, sub in s.get("sets", {}).items():
        p[f"{name}_n"] = sub["n"]
        p.update({f"{name}_{k}": sub["rates"][k][side] for k in RATES if k in sub["rates"]})
    p.update(losses.get(step, {}))
    return p


def learning_curve(rows: list[dict], answers: dict[str, dict], steps: list[tuple[str, int]], questions: dict,
                   f1_threshold: float, losses: dict[int, dict]) -> list[dict]:
    """One point per checkpoint, step 0 = the base model (the rows' base side), scored like the evaluation."""
    points = [point(0, "base", rows, "base", losses)]
    for label, step in steps:
        ck_rows = [{**r, "finetuned_answer": answers[label][r["id"]]} for r in rows]
        report.score_rows(ck_rows, questions, f1_threshold)
        points.append(point(step, label, ck_rows, "finetuned", losses))
    return points


def answers_path(csv_path: Path) -> Path:
    return csv_path.with_name("learning_curve_answers.jsonl")


def answers_text(steps: list[tuple[str, int]], answers: dict[str, dict], losses: dict[int, dict]) -> str:
    """learning_curve_answers.jsonl: one line per checkpoint (training order), its answers by question id."""
    return "".join(json.dumps({"label": label, "step": step, **losses.get(step, {}), "answers": answers[label]},
                              ensure_ascii=False) + "\n" for label, step in steps)


def read_answers(path: Path) -> tuple[list[tuple[str, int]], dict[str, dict], dict[int, dict]]:
    """The checkpoints' answers written by answers_text; a malformed line is an InputError naming it."""
    steps, answers, losses = [], {}, {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            label, step, given = str(rec["label"]), int(rec["step"]), dict(rec["answers"])
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}:{i}: not a learning-curve answers line ({e}); rerun the evaluation with "
                             "--checkpoints, or remove the file to rescore without the curve") from None
        steps.append((label, step))
        answers[label] = {str(k): str(v) for k, v in given.items()}
        losses[step] = {k: rec[k] for k in ("train_loss", "val_loss") if k in rec}
    return steps, answers, losses


def missing_answers(rows: list[dict], answers: dict[str, dict]) -> list[str]:
    """Checkpoint labels whose answers do not cover every scored row (a CSV cut with --n is fine)."""
    return [label for label, given in answers.items() if any(r["id"] not in given for r in rows)]
