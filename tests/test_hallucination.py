"""Support-aware scoring: specifics an answer asserts are checked against the source; fabrication scores
below an honest refusal and below a correct longer answer, and cannot win the verdict. Measured against a
hand-written, hand-labelled set (tests/data/hallucination_labels.jsonl; see its README)."""
import json
from pathlib import Path

import pytest

from paperqa_tune import scoring
from paperqa_tune.evaluate import report, verdict
from paperqa_tune.scoring import score_answer, unsupported_specifics

LABELS = [json.loads(line) for line in
          (Path(__file__).parent / "data" / "hallucination_labels.jsonl").read_text(encoding="utf-8").splitlines()
          if line.strip()]
# Agreement floor: 73 rows, so one disagreement is 1.4 points. Two rows are known blind spots of a rule that
# only sees specifics (97% is what it reaches); 0.90 leaves room for about 4 more disagreements before the
# test fails, so a change that breaks a whole case (units, expansions, premise restatement) is caught.
MIN_AGREEMENT = 0.90
MIN_PRECISION = MIN_RECALL = 0.85

CONTEXT = ("We fine-tune a 7B-parameter model on one 24 GB GPU with 4-bit weights and low-rank adapters. On the "
           "MMLU benchmark it reaches 61.2% accuracy and uses 40 percent less memory than full fine-tuning.")


def q(qtype="factual", question="What accuracy does the method reach on MMLU?",
      reference="It reaches 61.2% accuracy on MMLU.", context=CONTEXT):
    return {"type": qtype, "question": question, "reference": reference, "context": context}


# --------------------------------------------------------------------------- the labelled set
def test_labelled_set_is_hand_written_and_covers_every_case():
    assert len(LABELS) >= 60 and all(r["origin"] == "hand-written" for r in LABELS)
    assert {r["type"] for r in LABELS} >= {"factual", "conceptual", "unanswerable", "false_premise"}
    assert 0.3 < sum(r["hallucinated"] for r in LABELS) / len(LABELS) < 0.7
    assert sum("corrected" in r for r in LABELS) >= 15


def test_agreement_with_hand_labels():
    got = [score_answer(r["answer"], r)["hallucinated"] for r in LABELS]
    want = [r["hallucinated"] for r in LABELS]
    agree = sum(g == w for g, w in zip(got, want)) / len(LABELS)
    tp = sum(g == w == 1 for g, w in zip(got, want))
    precision, recall = tp / sum(got), tp / sum(want)
    wrong = [f"{w}->{g}: {r['answer']}" for r, g, w in zip(LABELS, got, want) if g != w]
    print(f"hallucination agreement {agree:.3f} precision {precision:.3f} recall {recall:.3f} (n={len(LABELS)})")
    assert agree >= MIN_AGREEMENT and precision >= MIN_PRECISION and recall >= MIN_RECALL, wrong


def test_false_premise_corrections_agree_with_hand_labels():
    rows = [r for r in LABELS if "corrected" in r]
    got = [score_answer(r["answer"], r)["correct"] for r in rows]
    agree = sum(g == r["corrected"] for g, r in zip(got, rows)) / len(rows)
    print(f"false-premise correction agreement {agree:.3f} (n={len(rows)})")
    assert agree >= 0.85


# --------------------------------------------------------------------------- hand-written cases
def test_invented_number_is_flagged_and_scores_below_zero():
    s = score_answer("It reaches 72.4% accuracy.", q())
    assert s["unsupported"] == "72.4%" and s["hallucinated"] == 1 and s["correct"] == 0 and s["score"] < 0


def test_honest_refusal_beats_invented_specifics():
    refusal = score_answer("The abstract does not say.", q())
    invented = score_answer("It reaches 72.4% accuracy on MMLU.", q())
    assert refusal["hallucinated"] == 0 and refusal["score"] > invented["score"]
    qu = q("unanswerable", question="What learning rate is used?", reference="The abstract does not say.")
    assert score_answer("The abstract does not state the learning rate.", qu)["score"] == 1.0
    slipped = score_answer("The abstract does not state it; it was probably 2e-4.", qu)
    assert slipped["correct"] == 0 and slipped["score"] < 0 and slipped["unsupported"] == "2e-4"


def test_short_invented_answer_never_outscores_a_correct_longer_one():
    longer = score_answer("The method reaches 61.2% accuracy on the MMLU benchmark while using 40 percent less "
                          "memory than full fine-tuning on one 24 GB GPU.", q())
    short = score_answer("61.2% accuracy on MMLU and 65.0% on ARC.", q())  # high overlap, one invented number
    assert longer["hallucinated"] == 0 and longer["score"] > 0
    assert short["token_f1"] > longer["token_f1"] and short["score"] < longer["score"]


@pytest.mark.parametrize("answer", ["It uses 40% less memory.", "It uses 40 percent less memory.",
                                    "It uses 40 per cent less memory.", "It uses forty percent less memory.",
                                    "A seven-billion-parameter model.", "A 7 billion parameter model.",
                                    "On one 24GB GPU.", "It reaches 0.612 accuracy."])
def test_numbers_in_other_spellings_are_supported(answer):
    assert unsupported_specifics(answer, "", CONTEXT) == []


@pytest.mark.parametrize("answer,unsupported", [
    ("Low-Rank Adaptation (LoRA) on a 7B model.", []),           # expansion words are in the source
    ("Long-Range Attention (LoRA) on a 7B model.", ["LoRA = Long-Range Attention"]),
    ("LoRA stands for Layered Output Routing.", ["LoRA = Layered Output Routing"]),
    ("It is evaluated on MMLU and HellaSwag.", ["HellaSwag"]),
    ("It uses GPTQ and an NVIDIA A100.", ["GPTQ", "NVIDIA A100"]),
    ("It was trained on the Stanford Question Answering Dataset.", ["Stanford Question Answering Dataset"]),
])
def test_acronyms_expansions_and_names(answer, unsupported):
    assert unsupported_specifics(answer, "", CONTEXT) == unsupported


@pytest.mark.parametrize("answer", [
    "The abstract does not say which GPU vendor or which LLM was used.",
    "It is a language model, like most LLMs in NLP (Natural Language Processing).",
    "Large language models (LLMs) are fine-tuned with adapters.",
    '"Attention Is All You Need" is not cited in the abstract.',   # a quoted title is not a claim
    "1. It stores 4-bit weights.\n2. It trains adapters.",          # list markers are not numbers
])
def test_general_knowledge_and_layout_are_not_flagged(answer):
    assert unsupported_specifics(answer, "", CONTEXT) == []


def test_restating_the_questions_terms_is_not_a_new_claim():
    question = "Why were 8 GPUs and the Pile dataset needed?"
    assert unsupported_specifics("The abstract does not say why 8 GPUs and the Pile were needed.", question,
                                 CONTEXT) == []


def test_false_premise_correction_is_judged_by_content():
    qf = q("false_premise", question="Why does the method need eight GPUs?", reference="It uses one GPU.")
    good = score_answer("That premise is incorrect: it uses one 24 GB GPU, not eight.", qf)
    assert good["behaviour"] == "corrected_premise" and good["correct"] == 1 and good["hallucinated"] == 0
    restated = score_answer("That premise is incorrect. It needs eight GPUs because the model is large.", qf)
    assert restated["behaviour"] == "corrected_premise"  # the opening words say "correction"...
    assert restated["correct"] == 0 and "eight (restates the false premise)" in restated["unsupported"]
    new_number = score_answer("That premise is incorrect: it uses a single 48 GB GPU.", qf)
    assert new_number["correct"] == 0 and new_number["unsupported"] == "48"


def test_junk_is_not_a_claim_but_a_loop_is_checked():
    s = score_answer("TheBBBBBBBBBBBBBBBBBBBBBBB", q())
    assert s["behaviour"] == "degenerate" and s["hallucinated"] == 0 and s["unsupported"] == ""
    # a loop still asserts what its words say (real base models loop on invented names)
    loop = score_answer("It was trained on the Foobar corpus. " * 4, q())
    assert loop["behaviour"] == "degenerate" and loop["hallucinated"] == 1 and "Foobar" in loop["unsupported"]


# --------------------------------------------------------------------------- the verdict
BASE_LONG = ("The method reaches 61.2% accuracy on the MMLU benchmark, within reach of full fine-tuning, and uses 40 "
             "percent less memory on one 24 GB GPU.")
TUNED_SHORT = ["It reaches 65.3% accuracy.", "Accuracy is 58.9% on MMLU.", "It uses 16 GB and gets 70.1%.",
               "It gets 63.0% with 8 GPUs."]


VERDICT_Q = q(reference="The method reaches 61.2% accuracy on MMLU and uses 40 percent less memory.")


def scored_rows(pairs: list[tuple[str, str]], qd: dict = VERDICT_Q) -> list[dict]:
    rows = [{"id": f"q{i}", "type": qd["type"], "question": qd["question"], "reference": qd["reference"],
             "base_answer": b, "finetuned_answer": f} for i, (b, f) in enumerate(pairs)]
    report.score_rows(rows, {r["id"]: qd for r in rows}, f1_threshold=0.4)
    return rows


def test_invented_short_answers_against_correct_longer_ones_is_base_better():
    """The hand check that used to give "no clear difference" (and label invented answers correct)."""
    rows = scored_rows([(BASE_LONG, TUNED_SHORT[i % 4]) for i in range(20)])
    s = report.summarize(rows)
    assert s["verdict"] == "base better", s["verdict_line"]
    h = s["rates"]["hallucination_rate"]
    assert (h["base"], h["finetuned"], h["n"]) == (0.0, 1.0, 20) and h["ci95"][0] > 0
    r = s["rates"]["correct_answer_rate_answerable"]
    assert (r["n"], r["base"], r["finetuned"], r["reading"]) == (20, 1.0, 0.0, "lower after fine-tuning")
    assert "hallucinated 0% (base) -> 100% (fine-tuned)" in s["verdict_line"]
    assert all(r["finetuned_correct"] == 0 and r["finetuned_unsupported"] for r in rows)


def test_verdict_never_calls_fine_tuned_better_when_it_hallucinates_significantly_more():
    # 40 questions the base answers with gibberish and the tuned model answers right, 8 where the tuned model
    # invents a number: the score alone favours the tuned model
    pairs = [("TheBBBBBBBBBBBBBBBBBBBBBBB", BASE_LONG)] * 40 + [(BASE_LONG, TUNED_SHORT[0])] * 8
    rows = scored_rows(pairs)
    stats = report.summarize(rows)["by_type"]["all"]["paired"]
    assert verdict.decide(stats)[0] == "fine-tuned better"  # what the score says without the guard
    s = report.summarize(rows)
    assert s["verdict"] == "no clear difference" and "hallucinates significantly more" in s["evidence"]["reason"]


def test_guard_leaves_other_verdicts_alone():
    more = {"base": 0.0, "finetuned": 0.5, "ci95": [0.2, 0.8]}
    assert verdict.guard_hallucination("base better", "r", more) == ("base better", "r")
    assert verdict.guard_hallucination("fine-tuned better", "r", {**more, "ci95": [-0.1, 0.4]})[0] == \
        "fine-tuned better"
    assert verdict.guard_hallucination("fine-tuned better", "r", more)[0] == "no clear difference"


# --------------------------------------------------------------------------- rules added against real answers
def test_naming_an_architecture_the_source_does_not_name_is_a_claim():
    """A model family is a claim about the paper; "Transformer" is not supported by "translation" (same first
    letters, another word), only by the source saying it."""
    ctx = "We train a recurrent translation model with attention on English-German pairs."
    assert unsupported_specifics("It runs on the Transformer.", "", ctx) == ["Transformer"]
    assert unsupported_specifics("It runs on the Transformer.", "", ctx + " A Transformer baseline is compared.") == []


@pytest.mark.parametrize("answer,flagged", [
    ("Gradient Clipping (GCN) keeps training stable.", True),       # the letters are not the words' initials
    ("Sparse Mixture of Experts (MSE) routes tokens.", True),
    ("Gradient Clipping (GC) keeps training stable.", False),        # spelt right
])
def test_an_expansion_that_does_not_spell_its_acronym_is_wrong(answer, flagged):
    from paperqa_tune.scoring import misspelt_expansions
    assert bool(misspelt_expansions(answer, "We clip gradients and route tokens to experts.")) == flagged


def test_a_quoted_coined_term_is_a_claim_but_a_quoted_title_or_a_denied_one_is_not():
    from paperqa_tune.scoring import quoted_terms
    question = 'What does "Sparse Routing at Scale" propose?'
    ctx = "Tokens are routed to two of sixteen experts."
    assert quoted_terms('It proposes "token juggling".', question, ctx) == [
        '"token juggling" (quoted term not in the source)']
    assert quoted_terms('"Sparse Routing at Scale" routes tokens to experts.', question, ctx) == []
    assert quoted_terms('The abstract does not mention "token juggling".', question, ctx) == []


def test_a_number_counts_what_the_source_counts_it_of():
    ctx = "We train networks of 50 and 200 layers on CIFAR-10. Training takes 3 days."
    assert unsupported_specifics("They use a learning rate of 200.", "", ctx) == ["200"]
    assert unsupported_specifics("The deepest network has 200 layers.", "", ctx) == []
    assert unsupported_specifics("It is 200.", "", ctx) == []                 # says nothing of what it counts
    assert unsupported_specifics("The model has only one layer.", "", ctx) == ["only one"]
    assert unsupported_specifics("Training takes only one day.", "", "Training takes one day.") == []


def test_a_false_premise_restated_in_plain_words_is_unsupported():
    from paperqa_tune.scoring import premise_restatements
    question = 'Why does "Quiet Decoding" find that beam search needs more memory than sampling?'
    ctx = "Beam search needs less memory than sampling and gives shorter outputs."
    assert premise_restatements("It needs more memory because it keeps many beams.", question, ctx) \
        == ["more (restates the false premise)"]
    # a comparative of the same direction restates it too; the opposite does not; nor does a denial
    assert premise_restatements("Its memory use is higher.", question, ctx) == ["higher (restates the false premise)"]
    assert premise_restatements("The premise is wrong: it needs less memory.", question, ctx) == []
    assert premise_restatements("It needs less memory, not more.", question, ctx) == []
    # a premise that carries its own negation is restated by repeating it
    q2 = 'Why do the authors of "Quiet Decoding" conclude that sampling does not help?'
    assert premise_restatements("Sampling does not help here.", q2, ctx) == ["help (restates the false premise)"]
    assert premise_restatements("The abstract does not say whether sampling helps.", q2, ctx) == []


@pytest.mark.parametrize("answer,claim", [
    ("It is a highly acclaimed, groundbreaking work in natural language processing.", False),   # praise and field
    ("It is often misunderstood because it is often misunderstood because it is often misunderstood.", False),
    ("The method reduces self-awareness and emotional fatigue in annotators.", True),
])
def test_vague_filler_is_not_a_plain_word_claim(answer, claim):
    from paperqa_tune.scoring import unsupported_claims
    ctx = "We present a parser that labels syntactic dependencies with a small graph network."
    assert bool(unsupported_claims(answer, "What does the paper propose?", ctx)) == claim


@pytest.mark.parametrize("answer,stated", [
    ("That is not right: the abstract says the encoder has six layers.", True),
    ("That premise is incorrect: the abstract says the opposite. The encoder is very deep and powerful.", False),
    ("No, it does not: the encoder stacks six identical layers.", True),
    ("That premise is wrong; the abstract says the opposite.", False),  # rejects, but says nothing instead
])
def test_a_correction_must_state_what_the_reference_says_instead(answer, stated):
    q = {"type": "false_premise", "question": "Why does the paper's encoder stack twelve identical layers?",
         "reference": "That premise is incorrect: the abstract says the encoder stacks six identical layers.",
         "context": "The encoder stacks six identical layers. Each layer has two sub-layers."}
    assert scoring.fix_words(q["question"], q["reference"]) == ["6"]  # number words read as digits
    assert scoring.states_the_fix(answer, q["question"], q["reference"]) is stated
    s = scoring.score_answer(answer, q)
    assert s["behaviour"] == "corrected_premise" and s["correct"] == int(stated), s


def test_without_a_reference_a_correction_is_judged_on_its_rejection_alone():
    assert scoring.states_the_fix("No, it does not.", "Why does it use twelve layers?", "") is True
    # a reference that adds nothing to the question cannot ask for more
    assert scoring.fix_words("Why does it use six layers?", "It uses six layers.") == []
