"""The offline scoring rule against 288 real answers labelled by reading (tests/data/real_answers_labelled.jsonl:
SmolLM2-135M-Instruct and two QLoRA runs of it on the pipeline's held-out questions; how they were made and
labelled is in tests/data/real_answers_labelled.README.md).

Measured at the commit that added this test: hallucinated agrees with the labels on 219 of 288 answers (0.760;
precision 0.84, recall 0.71), correct on 285 of 288, behaviour on 280 of 288; the hallucination rates per model
are 71 / 35 / 39 % (labels: 70 / 45 / 56 %). The floors below sit a few answers under those figures so that a change
that makes the rule worse on real answers fails here; the README quotes the figures as the rule's accuracy."""
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


def test_hallucination_flags_agree_with_the_labels(scored):
    pairs = Counter((r["hallucinated"], s["hallucinated"]) for r, s in scored)
    agree = pairs[(1, 1)] + pairs[(0, 0)]
    precision = pairs[(1, 1)] / (pairs[(1, 1)] + pairs[(0, 1)])
    recall = pairs[(1, 1)] / (pairs[(1, 1)] + pairs[(1, 0)])
    assert agree >= 210 and precision >= 0.80 and recall >= 0.65, (dict(pairs), precision, recall)


def test_correct_and_behaviour_agree_with_the_labels(scored):
    assert sum(r["correct"] == s["correct"] for r, s in scored) >= 282
    assert sum(r["behaviour"] == s["behaviour"] for r, s in scored) >= 276


def test_the_models_rank_by_hallucination_as_the_labels_do(scored):
    """What a user reads off summary.json: which model invents more. Labels: base 67, hi 54, seed 43 of 96."""
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
    # Measured: the rule catches 61 % of these invented answers, so 15 of 38 still beat the refusal and the sign test
    # cannot call it (p = 0.26): "no clear difference", never "fine-tuned better"; the mean score favours the base
    # with a CI below zero (-0.35 [-0.49, -0.21]).
    assert summary["verdict"] != "fine-tuned better", summary["verdict_line"]
    assert summary["evidence"]["ci95"][1] < 0, summary["verdict_line"]
