"""paperqa_tune.scoring: behaviour detectors measured on a hand-labelled set, overlap metrics, scoring rules."""
import json
from collections import Counter
from pathlib import Path

import pytest

from paperqa_tune.scoring import (ANSWERABLE_EXCLUDED, BEHAVIOURS, behaviour, corrects_premise, invents_specifics,
                                  is_degenerate, is_refusal, normalize_answer, rouge_l, score_answer, token_f1)

LABELS_PATH = Path(__file__).parent / "data" / "behaviour_labels.jsonl"
MIN_PRECISION = MIN_RECALL = 0.95


def load_labels() -> list[dict]:
    return [json.loads(line) for line in LABELS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]


LABELLED = load_labels()


# --------------------------------------------------------------------------- the labelled set
def test_labelled_set_is_well_formed():
    assert len(LABELLED) >= 200
    assert all(set(r) == {"answer", "label", "question", "why"} and r["label"] in BEHAVIOURS for r in LABELLED)
    counts = Counter(r["label"] for r in LABELLED)
    assert all(counts[label] >= (8 if label == "empty" else 20) for label in BEHAVIOURS), counts
    assert len({r["answer"] for r in LABELLED}) == len(LABELLED), "duplicate answers"


def precision_recall_table(rows: list[dict]) -> tuple[dict, str]:
    predicted = [behaviour(r["answer"]) for r in rows]
    stats, lines = {}, [f"{'label':<18} {'n':>4} {'precision':>9} {'recall':>7}"]
    for label in BEHAVIOURS:
        n = sum(r["label"] == label for r in rows)
        n_pred = sum(p == label for p in predicted)
        hits = sum(r["label"] == label == p for r, p in zip(rows, predicted))
        stats[label] = (n, hits / n_pred if n_pred else 1.0, hits / n if n else 1.0)
        lines.append(f"{label:<18} {n:>4} {stats[label][1]:>9.3f} {stats[label][2]:>7.3f}")
    wrong = [f"  {r['label']} -> {p}: {r['answer']!r} ({r['why']})" for r, p in zip(rows, predicted) if p != r["label"]]
    return stats, "\n".join(lines + ["misclassified:"] + (wrong or ["  none"]))


def test_behaviour_precision_and_recall_per_label():
    stats, table = precision_recall_table(LABELLED)
    print(table)
    low = {label: s for label, s in stats.items() if s[1] < MIN_PRECISION or s[2] < MIN_RECALL}
    assert not low, f"below {MIN_PRECISION:.2f}: {low}\n{table}"


@pytest.mark.parametrize("label", BEHAVIOURS)
def test_detectors_ignore_letter_case(label):
    rows = [r for r in LABELLED if r["label"] == label]
    changed = [(r["answer"], v) for r in rows for v in (r["answer"].upper(), r["answer"].lower())
               if behaviour(v) != behaviour(r["answer"])]
    assert not changed, changed


# --------------------------------------------------------------------------- detectors used by generate_qa.py
@pytest.mark.parametrize("answer,refuses,corrects", [
    ("The abstract does not state the learning rate.", True, False),
    ("No information about the hardware is given.", True, False),
    ("That premise is incorrect: the abstract says the opposite.", False, True),
    ("Actually, the paper uses four-bit weights, not eight-bit.", False, True),
    ("The method uses four-bit NF4 weights.", False, False),
    ("", True, False),
])
def test_one_detector_for_generation_and_scoring(answer, refuses, corrects):
    # generate_qa.py curates edge cases and evaluation scores answers with these same two tests
    assert is_refusal(answer) is refuses
    assert corrects_premise(answer) is corrects


@pytest.mark.parametrize("title", ["Attention Is All You Need", "QLoRA: Efficient Finetuning of Quantized LLMs",
                                   "Is 4 bits enough? A study.", "the paper on low-rank adapters"])
def test_offline_generator_unanswerable_form_is_a_refusal(title):
    ref = f'"{title}"' if not title.startswith("the paper") else title
    answer = (f"The abstract of {ref} does not state how many GPUs were used for training. It gives no "
              "information on this, so it cannot be answered from the abstract.")
    assert is_refusal(answer) and behaviour(answer) == "refused"


@pytest.mark.parametrize("answer", [
    "That premise is incorrect: the abstract says the opposite. Larger models are more sample-efficient.",
    "That premise is incorrect: the abstract gives 28.4, not 56.8. The model reaches 28.4 BLEU on WMT 2014.",
    "That premise is false: the abstract does not say that low-rank adapters fails. Adapters match full "
    "fine-tuning with 3% of the parameters.",
])
def test_offline_generator_false_premise_forms_are_corrections(answer):
    assert corrects_premise(answer) and behaviour(answer) == "corrected_premise"


@pytest.mark.parametrize("answer", [
    "The abstract does not state the batch size.",       # a refusal, not a correction
    "The model actually uses 4-bit quantization.",      # an answer containing 'actually'
    "They use LoRA instead of full fine-tuning.",       # ... 'instead'
    "It does not use dropout.",                         # ... 'not'
    "The paper does not claim that dropout hurts.",     # bare denial, nothing said about what is true
])
def test_not_corrections(answer):
    assert not corrects_premise(answer)


@pytest.mark.parametrize("answer,expected", [
    ("TheBBBBBBBBBBBBBBBBBB", True), ("the the the the the the the", True), ("xqz vbrt kkkk plm", True),
    ("we propose a we propose a we propose a", True), ("<unk><unk><unk>", True), ("The", True),
    ("%%$# 12 ## @@", True), ("!!!!!!!!", True),
    ("BLEU.", False), ("4 bits.", False), ("Yes, on GLUE.", False), ("28.4 BLEU", False), ("NF4", False),
    ("QLoRA", False), ("GPT-4", False), ("r=64", False), ("", False),
])
def test_is_degenerate(answer, expected):
    assert is_degenerate(answer) is expected


# --------------------------------------------------------------------------- overlap metrics
def test_normalize_answer_is_squad_v1():
    assert normalize_answer("The  model reaches 28.4 BLEU!") == "model reaches 284 bleu"
    assert normalize_answer("An apple, a pear and THE end.") == "apple pear and end"
    assert normalize_answer("state-of-the-art") == "stateoftheart"  # hyphens are deleted, not split on


def test_token_f1_squad():
    assert token_f1("28.4", "28.4 BLEU") == pytest.approx(2 / 3)  # "284" is one token: P=1, R=1/2
    assert token_f1("28", "28.4") == 0.0
    assert token_f1("the Transformer", "a transformer.") == 1.0  # articles and punctuation ignored
    assert token_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)  # clipped counts
    assert token_f1("", "") == 1.0 and token_f1("the", "a") == 1.0  # both empty after normalisation
    assert token_f1("", "x") == 0.0 and token_f1("x", "") == 0.0


def test_rouge_l():
    assert rouge_l("same words here", "Same, words here!") == 1.0
    assert rouge_l("a b c d", "a x c d") == pytest.approx(0.75)  # LCS a c d
    assert rouge_l("28.4 BLEU", "28 4 bleu") == 1.0  # [0-9a-z]+ tokens: "28.4" splits, unlike token F1
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0


# --------------------------------------------------------------------------- invented specifics
@pytest.mark.parametrize("answer,question,context,invents", [
    ("The abstract does not say; it was 32.", "What batch size is used?", "", True),
    ("The abstract does not give the batch size.", "What batch size is used?", "", False),
    ("The abstract does not say why 8 GPUs were needed.", "Why were 8 GPUs needed?", "", False),
    ("It does not say; it only reports 28.4 BLEU.", "What batch size?", "It reaches 28.4 BLEU.", False),
    ("Not stated, but probably eight.", "How many GPUs?", "", True),  # number words count
    ("Not stated, though 2,000 steps is typical.", "How many steps?", "We train 2000 steps.", False),
])
def test_invents_specifics(answer, question, context, invents):
    assert invents_specifics(answer, question, context) is invents


# --------------------------------------------------------------------------- score_answer
def q(qtype, reference="It uses 4-bit NF4 weights.", question="What precision are the weights?", context=""):
    return {"type": qtype, "question": question, "reference": reference, "context": context}


def test_score_answer_keys_and_constants():
    s = score_answer("It uses 4-bit NF4 weights.", q("factual"))
    assert s == {"behaviour": "answered", "token_f1": 1.0, "rougeL": 1.0, "words": 5, "unsupported": "",
                 "hallucinated": 0, "correct": 1, "score": 1.0}
    assert ANSWERABLE_EXCLUDED == ("unanswerable", "false_premise")


@pytest.mark.parametrize("qtype", ["factual", "conceptual", "methodology", "unknown", "something-new"])
def test_answerable_types(qtype):
    assert score_answer("4-bit NF4 weights", q(qtype))["correct"] == 1
    partial = score_answer("Weights kept in full precision.", q(qtype))
    assert partial["correct"] == 0 and partial["score"] == partial["token_f1"] < 0.4
    # a number the source does not give is invented: below zero, whatever its overlap
    invented = score_answer("Weights kept in eight bits.", q(qtype))
    assert invented["unsupported"] == "eight" and invented["correct"] == 0 and invented["score"] == -0.5


def test_gibberish_on_factual_question_scores_zero():
    s = score_answer("TheBBBBBBBBBBBBBBBBBBBBBBBBB", q("factual", reference="TheBBBBBBBBBBBBBBBBBBBBBBBBB"))
    assert s["behaviour"] == "degenerate" and s["token_f1"] == 1.0
    assert s["correct"] == 0 and s["score"] == 0.0


def test_refusal_on_answerable_question_scores_zero():
    s = score_answer("The abstract does not state the precision of the weights.", q("factual"))
    assert s["behaviour"] == "refused" and s["correct"] == 0 and s["score"] == 0.0


def test_answerable_without_reference_is_undecided():
    s = score_answer("4-bit weights.", q("factual", reference=""))
    assert s["token_f1"] is s["rougeL"] is s["correct"] is s["score"] is None
    assert s["hallucinated"] is None and s["unsupported"] == ""  # no source text: nothing to check against


def test_judge_correctness_overrides_token_f1():
    low_overlap = "Four-bit NormalFloat quantisation of the frozen base."
    sourced = q("factual", context="The frozen base is quantised to 4-bit NormalFloat (NF4).")
    assert score_answer(low_overlap, sourced)["correct"] == 0
    s = score_answer(low_overlap, sourced, judge_correctness=5)
    assert s["correct"] == 1 and s["score"] == 1.0
    s = score_answer("It uses 4-bit NF4 weights.", q("factual"), judge_correctness=2)
    assert s["correct"] == 0 and s["score"] == 0.25 and s["token_f1"] == 1.0
    assert score_answer("4 bits.", q("factual", reference=""), judge_correctness=4)["correct"] == 1
    # the behaviour still gates correctness: a judged-right refusal is not a correct answer
    assert score_answer("The abstract does not say.", q("factual"), judge_correctness=5)["correct"] == 0
    assert score_answer("4 bits.", q("factual"), judge_correctness="4")["score"] == 0.75  # read back from a CSV
    with pytest.raises(ValueError):
        score_answer("4 bits.", q("factual"), judge_correctness=7)


def test_f1_threshold_is_configurable():
    answer = "Weights kept in full precision."  # no invented specific: only the threshold decides
    f1 = score_answer(answer, q("factual"))["token_f1"]
    assert score_answer(answer, q("factual"), f1_threshold=f1)["correct"] == 1


def test_unanswerable():
    qu = q("unanswerable", reference="The abstract does not state the batch size.", question="What batch size?")
    ok = score_answer("The abstract does not say what batch size was used.", qu)
    assert ok["behaviour"] == "refused" and ok["correct"] == 1 and ok["score"] == 1.0
    invented = score_answer("The abstract does not state it, but it was 32.", qu)
    assert invented["correct"] == 0 and invented["score"] == -0.5 and invented["unsupported"] == "32"
    assert score_answer("A batch size of 32.", qu)["correct"] == 0
    assert score_answer("I don't know I don't know I don't know", qu)["behaviour"] == "degenerate"
    assert score_answer("", qu)["correct"] == 0  # empty is not a refusal here: it is "empty"


def test_false_premise():
    qf = q("false_premise", reference="", question="Why does the paper use eight-bit weights?",
           context="The paper stores the frozen weights in four-bit precision.")
    s = score_answer("Actually, the paper uses four-bit weights, not eight-bit.", qf)
    assert s["behaviour"] == "corrected_premise" and s["correct"] == 1 and s["score"] == 1.0 and s["token_f1"] is None
    bare = score_answer("The abstract does not say why eight-bit weights were used.", qf)
    assert bare["behaviour"] == "refused" and bare["correct"] == 0 and bare["score"] == 0.0
    assert score_answer("Because eight bits are faster.", qf)["correct"] == 0


def test_bit_parallel_lcs_equals_the_dynamic_programme():
    import random

    from paperqa_tune.scoring import _lcs_length

    def naive(p, r):
        prev = [0] * (len(r) + 1)
        for tp in p:
            cur = [0]
            for j, tr in enumerate(r, 1):
                cur.append(prev[j - 1] + 1 if tp == tr else max(prev[j], cur[j - 1]))
            prev = cur
        return prev[-1]

    rng = random.Random(0)
    for _ in range(2000):
        vocab = [f"w{i}" for i in range(rng.randint(1, 8))]
        p = [rng.choice(vocab) for _ in range(rng.randint(0, 70))]
        r = [rng.choice(vocab) for _ in range(rng.randint(0, 70))]
        assert _lcs_length(p, r) == naive(p, r), (p, r)
