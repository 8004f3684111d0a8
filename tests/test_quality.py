"""paperqa_tune.qa.quality: the data quality report written next to generate_qa.py's manifest."""
import json

import pytest

from paperqa_tune.qa.quality import format_quality, plot_quality, quality_report


def item(split, type_, question, answer, source, conversation, turn=1, section="abstract", **extra):
    return {"split": split, "type": type_, "section": section, "question": question, "answer": answer,
            "source": source, "conversation": conversation, "turn": turn, **extra}


SOURCE = "alpha beta gamma"
ITEMS = [
    # fully supported: every content word of the answer is in the source
    item("train", "factual", "What does Alpha report?", "alpha beta gamma", SOURCE, "c1", paper_id="p1"),
    # 1 of 4 content words (delta) unsupported -> 0.25
    item("train", "conceptual", "What does Beta mean?", "alpha beta gamma delta", SOURCE, "c1", turn=2, paper_id="p1"),
    # 2 of 2 unsupported -> 1.0
    item("eval", "methodology", "How is gamma measured here?", "omega sigma", SOURCE, "c2", section="methods",
         paper_id="p2"),
    # an edge case: its answer names what the source lacks, so it is not in the answerable measure
    item("train", "unanswerable", "Why is zeta missing?", "the source never states zeta kappa", SOURCE, "c3",
         paper_id="p3"),
]
REJECTS = [
    {"paper_id": "p1", "stage": "curate", "reason": "ungrounded: only 20% of the answer's content words"},
    {"paper_id": "p2", "stage": "curate", "reason": "near_duplicate: close to 'What does Alpha report?'"},
    {"paper_id": "p3", "stage": "curate", "reason": "ungrounded: only 10% of the answer's content words"},
    {"paper_id": "p4", "stage": "request_failed", "reason": "timeout after 3 attempts"},
]


def test_counts_and_totals():
    r = quality_report(ITEMS, REJECTS)
    assert r["totals"] == {"turns": 4, "conversations": 3, "papers": 3, "rejects": 4}
    assert r["by_split"] == {"train": 3, "eval": 1}
    assert r["by_type"] == {"factual": 1, "conceptual": 1, "methodology": 1, "unanswerable": 1}
    assert r["by_split_type"] == {"train": {"factual": 1, "conceptual": 1, "unanswerable": 1},
                                  "eval": {"methodology": 1}}
    assert r["by_section"] == {"abstract": 3, "methods": 1}
    assert r["by_turn"] == {"1": 3, "2": 1}
    # without paper ids the paper count is not derivable
    bare = [{k: v for k, v in it.items() if k != "paper_id"} for it in ITEMS]
    assert quality_report(bare, [])["totals"]["papers"] is None


def test_question_start_diversity():
    d = quality_report(ITEMS, [])["question_starts"]["first_2_words"]
    # openings: "what does" x2, "how is", "why is"
    assert d["distinct"] == 3 and d["distinct_share"] == 0.75
    assert d["entropy_bits"] == 1.5  # -(1/2 log2 1/2 + 2 * 1/4 log2 1/4)
    assert d["normalised_entropy"] == 0.75  # 1.5 / log2(4)
    assert d["effective_starts"] == round(2 ** 1.5, 2)
    assert d["top"][0] == {"start": "what does", "count": 2, "share": 0.5}
    three = quality_report(ITEMS, [])["question_starts"]["first_3_words"]
    assert three["distinct"] == 4 and three["normalised_entropy"] == 1.0
    same = [item("train", "factual", "What is it?", "alpha", SOURCE, f"c{k}") for k in range(5)]
    assert quality_report(same, [])["question_starts"]["first_2_words"]["normalised_entropy"] == 0.0


def test_lengths_in_words():
    r = quality_report(ITEMS, [])["length_words"]
    # question words: 4, 4, 5, 4 ; answer words: 3, 4, 2, 6
    assert r["question"]["all"] == {"n": 4, "mean": 4.25, "p50": 4, "p90": 5, "max": 5}
    assert r["answer"]["all"] == {"n": 4, "mean": 3.75, "p50": 3, "p90": 6, "max": 6}
    assert r["answer"]["by_type"]["unanswerable"] == {"n": 1, "mean": 6.0, "p50": 6, "p90": 6, "max": 6}


def test_unsupported_share_is_exact_and_edge_cases_are_apart():
    u = quality_report(ITEMS, [])["unsupported"]
    assert u["types"] == ["factual", "conceptual", "methodology"] and u["answers"] == 3
    assert u["mean_share"] == round((0 + 0.25 + 1.0) / 3, 4)
    assert u["answers_over_20pct"] == round(2 / 3, 4) and u["answers_over_50pct"] == round(1 / 3, 4)
    assert u["mean_share_by_type"] == {"factual": 0.0, "conceptual": 0.25, "methodology": 1.0}
    assert [w["share"] for w in u["worst"]] == [1.0, 0.25]  # fully supported answers are not "worst"
    assert u["worst"][0]["question"] == "How is gamma measured here?" and u["worst"][0]["conversation"] == "c2"
    assert {w["stem"] for w in u["top_unsupported_words"]} == {"delta", "omega", "sigma"}
    edge = quality_report(ITEMS, [])["unsupported_edge_cases"]
    assert list(edge) == ["unanswerable"] and edge["unanswerable"]["answers"] == 1
    # "more than 50%": an answer exactly half unsupported counts over 20% but not over 50%
    half = quality_report([item("train", "factual", "What?", "alpha omega", SOURCE, "h")], [])["unsupported"]
    assert (half["mean_share"], half["answers_over_20pct"], half["answers_over_50pct"]) == (0.5, 1.0, 0.0)
    # a long answer is cut in the example, never copied whole
    long = [item("train", "factual", "What?", "omega " * 100, SOURCE, "x")]
    assert len(quality_report(long, [])["unsupported"]["worst"][0]["answer"]) == 200


def test_reject_reasons_by_key_with_an_example():
    r = quality_report(ITEMS, REJECTS)["rejects"]
    assert r["total"] == 4 and r["by_stage"] == {"curate": 3, "request_failed": 1}
    assert [(x["reason"], x["count"]) for x in r["top_reasons"]] == [
        ("ungrounded", 2), ("near_duplicate", 1), ("timeout after 3 attempts", 1)]
    assert r["top_reasons"][0]["example"]["paper_id"] == "p1"
    many = [{"paper_id": "p", "stage": "curate", "reason": f"key{k}: x"} for k in range(30)]
    assert len(quality_report([], many)["rejects"]["top_reasons"]) == 10


def test_report_is_small_json_with_a_stable_order():
    big = ITEMS * 500
    r = quality_report(big, REJECTS)
    text = json.dumps(r)
    assert json.loads(text) == r and len(text) < 8000  # no per-item lists: size does not grow with the items
    assert list(r) == ["totals", "by_split", "by_type", "by_split_type", "by_section", "by_turn", "question_starts",
                       "length_words", "unsupported", "unsupported_edge_cases", "rejects"]
    assert json.dumps(quality_report(list(big), list(REJECTS))) == text
    empty = quality_report([], [])
    assert empty["totals"]["turns"] == 0 and empty["unsupported"]["mean_share"] is None
    assert "0 turns" in format_quality(empty)


def test_bad_item_names_what_is_missing():
    with pytest.raises(ValueError, match=r"item 1 lacks source"):
        quality_report([ITEMS[0], {k: v for k, v in ITEMS[1].items() if k != "source"}], [])


def test_format_mentions_the_key_numbers():
    text = format_quality(quality_report(ITEMS, REJECTS))
    lines = text.splitlines()
    assert 5 <= len(lines) <= 10
    for needle in ("4 turns", "3 conversations", "3 papers", "train 3", "eval 1", "\"what does\" 50%",
                   "41.7%", "66.7% of answers over 20%", "33.3% over 50%", "rejects: 4", "ungrounded 2",
                   "factual 1", "methods 1"):
        assert needle in text, needle


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "sub" / "train.quality.png"
    plot_quality(ITEMS * 3, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(path.parent.glob(".*tmp*"))  # written atomically
    plot_quality([], tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG"
