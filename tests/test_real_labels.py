"""The offline scoring rule against real answers labelled by reading: batch 1, 288 answers
(tests/data/real_answers_labelled.jsonl: SmolLM2-135M-Instruct and two QLoRA runs of it on an earlier generator's
held-out questions) and batch 2, 258 answers (real_answers_labelled_2.jsonl: the base and two `--lr 1e-3` runs, 8 and 16
epochs, on the current questions); how they were made and labelled is in tests/data/real_answers_labelled.README.md.
`python tools/label_agreement.py` prints the figures.

Measured at the commit that set these floors, batch 1: hallucinated agrees with the labels on 264 of 288 answers
(precision 0.96, recall 0.89), correct on 287, behaviour on 284; the hallucination counts per model (base / seed /
hi) are 64 / 36 / 52 of 96 (labels: 67 / 43 / 54). Per half (papers split by sorted id, alternating): hallucinated
agrees on 136 of 144 in A (P 1.00, R 0.90) and 128 of 144 in B (P 0.92, R 0.88). Batch 2 and both batches: below.
The floors sit a few answers under the measured figures so that a change that makes the rule worse on real answers
fails here; the README quotes the figures as the rule's accuracy."""
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
    assert sum(r["correct"] == s["correct"] for r, s in scored) >= 286
    assert sum(r["behaviour"] == s["behaviour"] for r, s in scored) >= 281


# (label, precision floor, recall floor) on batch 1 alone; measured: answered 0.985/0.995 (n=204), degenerate
# 1.00/0.94 (n=54), refused 1.00/1.00 (n=22), corrected_premise 0.89/1.00 (n=8: one answer moves either by 0.1),
# correct 1.00/0.92 (n=12)
@pytest.mark.parametrize("label,min_p,min_r", [("answered", 0.96, 0.98), ("degenerate", 0.95, 0.90),
                                               ("refused", 0.95, 0.95), ("corrected_premise", 0.85, 0.95),
                                               ("correct", 0.9, 0.9)])
def test_precision_and_recall_per_label(scored, label, min_p, min_r):
    if label == "correct":
        pairs = [(r["correct"], s["correct"]) for r, s in scored]
    else:
        pairs = [(int(r["behaviour"] == label), int(s["behaviour"] == label)) for r, s in scored]
    _, precision, recall = _figures(pairs)
    assert precision >= min_p and recall >= min_r, (label, precision, recall)


LABELS_2 = Path(__file__).parent / "data" / "real_answers_labelled_2.jsonl"


@pytest.fixture(scope="module")
def scored_both(scored):
    """Both batches: the 288 above and 258 answers of two --lr 1e-3 runs, 8 and 16 epochs (and the base), to the current
    generator's questions, labelled by three readers (tests/data/real_answers_labelled.README.md)."""
    rows = [json.loads(line) for line in LABELS_2.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 258 and Counter(r["model"] for r in rows) == {"rec": 97, "k16": 89, "base": 72}
    return scored + [(r, scoring.score_answer(r["answer"], r)) for r in rows]


def _pairs(scored, label):
    if label in ("hallucinated", "correct"):
        return [(int(r[label]), int(s[label] or 0)) for r, s in scored]
    return [(int(r["behaviour"] == label), int(s["behaviour"] == label)) for r, s in scored]


# The bar: precision and recall >= 0.9 per label over all 546 labelled answers. Measured at the commit that
# added batch 2: hallucinated 0.951 / 0.909 (n=364), correct 0.927 / 0.905 (n=42), answered 0.992 / 0.989,
# refused 1.00 / 1.00 (n=22), corrected_premise 0.963 / 1.00 (n=105), degenerate 1.00 / 0.952 (n=63).
@pytest.mark.parametrize("label", ["hallucinated", "correct", "answered", "refused", "corrected_premise",
                                   "degenerate"])
def test_every_label_reaches_0_9_precision_and_recall_on_both_batches(scored_both, label):
    _, precision, recall = _figures(_pairs(scored_both, label))
    assert precision >= 0.9 and recall >= 0.9, (label, precision, recall)


def test_batch_2_alone_stays_near_its_measured_agreement(scored_both):
    """Batch 2 was read after the rule's earlier changes; these floors sit an answer or two under what it measured
    (hallucinated 232/258, correct 252/258, behaviour 255/258)."""
    second = scored_both[288:]
    assert sum(r["hallucinated"] == s["hallucinated"] for r, s in second) >= 228
    assert sum(r["correct"] == s["correct"] for r, s in second) >= 250
    assert sum(r["behaviour"] == s["behaviour"] for r, s in second) >= 253


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
