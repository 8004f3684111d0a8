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
