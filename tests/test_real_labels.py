"""The offline scoring rule against 288 real answers labelled by reading (tests/data/real_answers_labelled.jsonl:
SmolLM2-135M-Instruct and two QLoRA runs of it on the pipeline's held-out questions; how they were made and
labelled is in tests/data/real_answers_labelled.README.md). `python tools/label_agreement.py` prints the figures.

Measured at the commit that set these floors: hallucinated agrees with the labels on 264 of 288 answers (0.917;
precision 0.96, recall 0.89), correct on 286 of 288 (287 before corrections had to state the fix), behaviour on 281 of 288; the hallucination rates per model
are 67 / 38 / 54 % (labels: 70 / 45 / 56 %). Per half (papers split by sorted id, alternating; the rule's last
changes were developed on half A first): hallucinated agrees on 136 of 144 in A (P 1.00, R 0.90) and 128 of 144 in B
(P 0.92, R 0.88). The floors below sit a few answers under those figures so that a change that makes the rule worse on
real answers fails here; the README quotes the figures as the rule's accuracy."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from paperqa_tune import scoring

LABELS = Path(__file__).parent / "data" / "real_answers_labelled.jsonl"


@pytest.fixture(scope="module")
def scored():
    rows = [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 288 and Counter(r["model"] for r in rows) == {"base": 96, "seed": 96, "hi": 96}
    return [(r, scoring.score_answer(r["answer"], r)) for r in rows]


def _figures(pairs):
    c = Counter(pairs)
    tp, fp, fn = c[(1, 1)], c[(0, 1)], c[(1, 0)]
    return c[(1, 1)] + c[(0, 0)], tp / (tp + fp), tp / (tp + fn)


def test_hallucination_flags_agree_with_the_labels(scored):
    agree, precision, recall = _figures([(r["hallucinated"], s["hallucinated"]) for r, s in scored])
    assert agree >= 258 and precision >= 0.93 and recall >= 0.86, (agree, precision, recall)


@pytest.mark.parametrize("half,min_agree", [(0, 132), (1, 123)])
def test_hallucination_flags_agree_on_each_half_of_the_papers(scored, half, min_agree):
    """Sorted paper ids, alternating (tools/label_agreement.py): a rule tuned to one half's answers would drop on
    the other."""
    papers = sorted({r["paper_id"] for r, _ in scored})[half::2]
    agree, precision, recall = _figures([(r["hallucinated"], s["hallucinated"]) for r, s in scored
                                         if r["paper_id"] in papers])
    assert agree >= min_agree and precision >= 0.88 and recall >= 0.84, (agree, precision, recall)


def test_correct_and_behaviour_agree_with_the_labels(scored):
    assert sum(r["correct"] == s["correct"] for r, s in scored) >= 285
    assert sum(r["behaviour"] == s["behaviour"] for r, s in scored) >= 278


# (label, precision floor, recall floor); measured: answered 0.98/0.995 (n=204), degenerate 0.96/0.94 (n=54),
# refused 1.00/0.95 (n=22), corrected_premise 0.86/0.75 (n=8: one answer moves either by 0.1), correct 1.00/0.92 (n=12)
@pytest.mark.parametrize("label,min_p,min_r", [("answered", 0.96, 0.98), ("degenerate", 0.92, 0.90),
                                               ("refused", 0.95, 0.90), ("corrected_premise", 0.75, 0.6),
                                               ("correct", 0.9, 0.8)])
def test_precision_and_recall_per_label(scored, label, min_p, min_r):
    if label == "correct":
        pairs = [(r["correct"], s["correct"]) for r, s in scored]
    else:
        pairs = [(int(r["behaviour"] == label), int(s["behaviour"] == label)) for r, s in scored]
    _, precision, recall = _figures(pairs)
    assert precision >= min_p and recall >= min_r, (label, precision, recall)


def test_the_models_rank_by_hallucination_as_the_labels_do(scored):
    """What a user reads off summary.json: which model invents more. Labels: base 67, hi 54, seed 43 of 96; the rule:
    64, 52, 36."""
    rate = Counter()
    for r, s in scored:
        rate[r["model"]] += s["hallucinated"]
    labelled = Counter()
    for r, _ in scored:
        labelled[r["model"]] += r["hallucinated"]
    assert sorted(rate, key=rate.get) == sorted(labelled, key=labelled.get) == ["seed", "hi", "base"], (rate, labelled)



@pytest.mark.parametrize("text", [
    # seen on SmolLM2-135M without a repetition penalty: a list whose items differ only by their number
    "1. **No prior knowledge**: The method does not provide any prior knowledge about the task. "
    "2. **No prior knowledge**: The method does not provide any prior knowledge about the task. "
    "3. **No prior knowledge**: The method does not provide any prior knowledge about the task.",
    # one long sentence said again, with other text between
    "The model is trained with only one other parameter, which is the number of epochs. It is simple. "
    "The model is trained with only one other parameter, which is the number of epochs.",
    "The answer to this question is: 1" + "0" * 200,
])
def test_loops_that_are_not_back_to_back_are_degenerate(text):
    assert scoring.behaviour(text) == "degenerate"


def test_a_sentence_said_twice_in_short_is_not_a_loop():
    assert scoring.behaviour("It uses attention. It is fast. It uses attention. It scales to long inputs.") == "answered"


def test_rescore_of_real_invented_answers_against_correct_longer_ones_says_base_better(tmp_path, monkeypatch):
    """From the labelled real answers: the fine-tuned side gives the tuned models' answers a reader labelled
    hallucinated (answerable questions, the shorter ones), the base side a correct longer answer (the question's
    reference, written from the abstract). Token overlap alone would not be enough to tell them apart reliably; the
    verdict must say the base is better."""
    import eval_compare as ec
    from paperqa_tune.evaluate import report

    monkeypatch.setattr(ec, "load_run_base", lambda *a, **k: pytest.fail("--rescore must not load a model"))
    rows = [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines() if line.strip()]
    invented = [r for r in rows if r["model"] != "base" and r["hallucinated"] == 1
                and r["type"] in ("factual", "conceptual", "methodology") and len(r["reference"]) > len(r["answer"])]
    assert len(invented) >= 20
    csv_rows = [{"id": f"{r['id']}-{r['model']}", "type": r["type"], "question": r["question"],
                 "reference": r["reference"], "base_answer": r["reference"], "finetuned_answer": r["answer"],
                 "context": r["context"]} for r in invented]
    path = tmp_path / "evaluation.csv"
    report.write_csv(path, csv_rows, report.QUESTION_COLUMNS + report.ANSWER_COLUMNS + ["context"])
    assert ec.main(["--rescore", str(path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["verdict"] == "base better", summary["verdict_line"]
    assert summary["rates"]["hallucination_rate"]["finetuned"] > summary["rates"]["hallucination_rate"]["base"]

    # And against an honest "the abstract does not say" (a real refusal of the same models): overlap with the
    # reference would favour the invented answers (they reuse its words; a refusal scores 0), the rule must not.
    refusal = next(r["answer"] for r in rows if r["behaviour"] == "refused" and r["hallucinated"] == 0
                   and r["type"] == "unanswerable")
    honest = [{**r, "base_answer": refusal} for r in csv_rows]
    path = tmp_path / "honest" / "evaluation.csv"
    path.parent.mkdir()
    report.write_csv(path, honest, report.QUESTION_COLUMNS + report.ANSWER_COLUMNS + ["context"])
    assert ec.main(["--rescore", str(path)]) == 0
    summary = json.loads((path.parent / "summary.json").read_text(encoding="utf-8"))
    # Measured: the rule catches 30 of these 38 invented answers, so 8 still beat the refusal; the sign test calls it
    # (p = 0.0005) and the mean score favours the base with a CI below zero (-0.49 [-0.61, -0.36]).
    assert summary["verdict"] == "base better", summary["verdict_line"]
    assert summary["evidence"]["ci95"][1] < 0, summary["verdict_line"]
