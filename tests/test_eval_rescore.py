"""eval_compare.py --rescore on hand-written CSVs: every verdict, honest 'too few', spreadsheet edits, bad
files. No model is loaded (load_base is replaced by a function that fails the test if called)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import eval_compare as ec
from paperqa_tune.evaluate import report, verdict

REFUSE = "The abstract does not state how many GPUs were used."
INVENT = "They trained on 8 A100 GPUs for three days."
CORRECT = "That premise is incorrect: the paper reports that the method improves accuracy, not that it hurts it."
ACCEPT = "Because the degradation comes from the smaller learning rate they chose."
REF = "The method improves accuracy on GLUE by 2.1 points with four-bit quantization."
GOOD = "It improves accuracy on GLUE by 2.1 points using four-bit quantization."
GIBBERISH = "TheBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    monkeypatch.setattr(ec, "load_run_base", lambda *a, **k: pytest.fail("--rescore must not load a model"))


def rows_for(pattern: list[tuple[str, str, str]]) -> list[dict]:
    """pattern: (type, base answer, fine-tuned answer) per question."""
    out = []
    for i, (t, b, f) in enumerate(pattern, 1):
        q = {"unanswerable": "How many GPUs were used?", "false_premise": "Why does the method hurt accuracy?"}
        out.append({"id": f"q{i}", "type": t, "question": q.get(t, "What does the method achieve?"),
                    "reference": "" if t != "factual" else REF, "base_answer": b, "finetuned_answer": f})
    return out


def write(path: Path, rows: list[dict]) -> Path:
    report.write_csv(path, rows, report.QUESTION_COLUMNS + report.ANSWER_COLUMNS)
    return path


def rescore(tmp_path: Path, rows: list[dict], name: str = "evaluation.csv", *extra) -> dict:
    path = write(tmp_path / name, rows)
    assert ec.main(["--rescore", str(path), *extra]) == 0
    return json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))


def test_fine_tuned_better(tmp_path, capsys):
    rows = rows_for([("unanswerable", INVENT, REFUSE)] * 6 + [("false_premise", ACCEPT, CORRECT)] * 6
                    + [("factual", GIBBERISH, GOOD)] * 6 + [("factual", GOOD, GOOD)] * 4)
    s = rescore(tmp_path, rows)
    assert list(s)[0] == "verdict" and s["verdict"] == "fine-tuned better"
    ev = s["evidence"]
    assert (ev["wins"], ev["ties"], ev["losses"]) == (18, 4, 0) and ev["ci95"][0] > 0 and ev["sign_test_p"] < 0.05
    for key in ("refusal_rate_unanswerable", "correction_rate_false_premise"):
        r = s["rates"][key]
        assert (r["n"], r["base"], r["finetuned"], r["difference"], r["ci95"]) == (6, 0.0, 1.0, 1.0, [1.0, 1.0])
        assert r["reading"] == f"too few to tell (n=6 < {verdict.MIN_RATE_N})"  # all 6 moved, but 6 are few
    assert "refuses unanswerable 0% -> 100%: too few to tell (n=6 < 20)" in s["verdict_line"]
    assert s["rates"]["degenerate_rate"]["base"] == pytest.approx(6 / 22, abs=1e-3)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-2].startswith("VERDICT: fine-tuned better")  # headline last, then 'wrote'
    with open(tmp_path / "evaluation.csv", encoding="utf-8-sig", newline="") as f:
        got = list(csv.DictReader(f))
    assert got[0]["base_behaviour"] == "answered" and got[0]["finetuned_behaviour"] == "refused"
    assert got[0]["base_correct"] == "0" and got[0]["finetuned_correct"] == "1"
    assert got[12]["base_behaviour"] == "degenerate" and float(got[12]["base_score"]) == 0  # gibberish is never right
    assert {r["finetuned_vs_base"] for r in got[:18]} == {"win"} and {r["finetuned_vs_base"] for r in got[18:]} == {"tie"}
    assert (tmp_path / "results_bar.png").read_bytes()[:4] == b"\x89PNG"


def test_base_better(tmp_path):
    rows = rows_for([("unanswerable", REFUSE, INVENT)] * 8 + [("false_premise", CORRECT, REFUSE)] * 6)
    s = rescore(tmp_path, rows)
    assert s["verdict"] == "base better" and s["evidence"]["ci95"][1] < 0
    # a bare refusal is not a correction of the premise
    assert s["rates"]["correction_rate_false_premise"]["finetuned"] == 0.0


def test_mixed_results_are_no_clear_difference(tmp_path):
    rows = rows_for([("unanswerable", INVENT, REFUSE)] * 7 + [("unanswerable", REFUSE, INVENT)] * 6
                    + [("factual", GOOD, GOOD)] * 10)
    s = rescore(tmp_path, rows)
    assert s["verdict"] == "no clear difference" and "includes 0" in s["evidence"]["reason"]


def test_few_questions_cannot_win(tmp_path):
    rows = rows_for([("unanswerable", INVENT, REFUSE)] * (verdict.MIN_QUESTIONS - 1))
    s = rescore(tmp_path, rows)
    assert s["verdict"] == "no clear difference" and "too few" in s["evidence"]["reason"]
    assert s["evidence"]["wins"] == verdict.MIN_QUESTIONS - 1


def test_threshold_change_rescores(tmp_path):
    near = "It improves accuracy on GLUE."  # token F1 vs REF is about 0.5
    rows = rows_for([("factual", GIBBERISH, near)] * 12)
    s = rescore(tmp_path, rows)
    assert s["by_type"]["factual"]["finetuned"]["correct_rate"] == 1.0
    s = rescore(tmp_path, rows, "evaluation.csv", "--f1_threshold", "0.9")
    assert s["by_type"]["factual"]["finetuned"]["correct_rate"] == 0.0 and s["f1_threshold"] == 0.9


def test_spreadsheet_edit_round_trip(tmp_path):
    """A CSV written by eval_compare, edited and saved back: formula-looking answers keep their text, the
    edited answer is scored again."""
    rows = rows_for([("unanswerable", "=1+1 GPUs", REFUSE)] * 12)
    path = write(tmp_path / "evaluation.csv", rows)
    assert ec.main(["--rescore", str(path)]) == 0
    with open(path, encoding="utf-8-sig", newline="") as f:
        sheet = list(csv.reader(f))
    header = sheet[0]
    assert sheet[1][header.index("base_answer")] == "'=1+1 GPUs"
    sheet[1][header.index("finetuned_answer")] = INVENT  # the user corrects one cell and adds notes
    sheet[0].append("my notes")
    sheet[1].append("checked by hand")
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        csv.writer(f).writerows(sheet)
    assert ec.main(["--rescore", str(path)]) == 0
    with open(path, encoding="utf-8-sig", newline="") as f:
        got = list(csv.DictReader(f))
    assert got[0]["base_answer"] == "'=1+1 GPUs"  # not '' twice
    assert got[0]["finetuned_correct"] == "0" and got[1]["finetuned_correct"] == "1"
    assert got[0]["my notes"] == "checked by hand" and list(got[0])[-1] == "my notes"


@pytest.mark.parametrize("content,message", [
    ("id,question\nq1,What?\n", "evaluation.csv:1: missing column(s)"),
    ("id,type,question,reference,base_answer,finetuned_answer\n,factual,What?,,a,b\n", "evaluation.csv:2: empty 'id'"),
    ("id,type,question,reference,base_answer,finetuned_answer\nq1,factual,What?,,a,b\nq1,factual,Why?,,a,b\n",
     "evaluation.csv:3: id 'q1' appears twice"),
    ("id,type,question,reference,base_answer,finetuned_answer\n", "no rows to rescore"),
])
def test_bad_csv_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "evaluation.csv"
    path.write_text(content, encoding="utf-8")
    assert ec.main(["--rescore", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()


def test_rescore_to_another_file_needs_overwrite(tmp_path, capsys):
    src = write(tmp_path / "evaluation.csv", rows_for([("unanswerable", REFUSE, REFUSE)] * 3))
    other = tmp_path / "b" / "evaluation.csv"
    assert ec.main(["--rescore", str(src), "--out", str(other)]) == 0
    assert ec.main(["--rescore", str(src), "--out", str(other)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_verdict_statistics():
    assert verdict.sign_test_p(6, 0) == pytest.approx(2 / 64)
    assert verdict.sign_test_p(3, 3) == 1.0
    lo, hi = verdict.bootstrap_ci([1.0] * 5 + [0.0] * 5)
    assert 0.15 < lo < 0.5 < hi < 0.85
    s = verdict.compare([0.0, None, 0.5], [1.0, 1.0, 0.52])  # None pairs are left out; 0.02 is a tie
    assert (s["n"], s["wins"], s["ties"], s["losses"]) == (2, 1, 1, 0)


def test_rescore_checks_answers_against_the_csv_context(tmp_path):
    """The CSV's context cell is what answers are checked against: invented numbers land in *_unsupported,
    the hallucination rate and the verdict line; editing the context by hand changes the check."""
    ctx = "The method improves accuracy on GLUE by 2.1 points with four-bit quantization."
    rows = [{**r, "context": ctx} for r in rows_for([("factual", GOOD, "It improves accuracy by 9.7 points.")] * 12)]
    path = tmp_path / "evaluation.csv"
    report.write_csv(path, rows, report.QUESTION_COLUMNS + report.ANSWER_COLUMNS + ["context"])
    assert ec.main(["--rescore", str(path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert s["verdict"] == "base better" and s["rates"]["hallucination_rate"]["finetuned"] == 1.0
    assert "hallucinated 0% (base) -> 100% (fine-tuned)" in s["verdict_line"]
    with open(path, encoding="utf-8-sig", newline="") as f:
        got = list(csv.DictReader(f))
    assert got[0]["finetuned_unsupported"] == "9.7" and got[0]["finetuned_hallucinated"] == "1"
    assert got[0]["base_hallucinated"] == "0" and got[0]["context"] == ctx
    with open(path, encoding="utf-8-sig", newline="") as f:
        sheet = list(csv.reader(f))
    col = sheet[0].index("context")
    for line in sheet[1:]:
        line[col] = ctx.replace("2.1", "9.7")  # the source, corrected by hand, now supports 9.7 and not 2.1
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        csv.writer(f).writerows(sheet)
    assert ec.main(["--rescore", str(path)]) == 0
    with open(path, encoding="utf-8-sig", newline="") as f:
        got = list(csv.DictReader(f))
    assert got[0]["finetuned_hallucinated"] == "0"


def rescore_sets(tmp_path: Path, rows: list[dict], capsys) -> tuple[dict, str, str]:
    path = tmp_path / "evaluation.csv"
    report.write_csv(path, rows, report.QUESTION_COLUMNS + report.ANSWER_COLUMNS + ["set"])
    assert ec.main(["--rescore", str(path)]) == 0
    out, err = capsys.readouterr()
    return json.loads((tmp_path / "summary.json").read_text(encoding="utf-8")), out, err


def test_both_sets_reported_separately(tmp_path, capsys):
    """unseen: the fine-tuned model refuses and corrects (24 + 20 questions); knowledge: it answers what it was
    trained on (40 questions) but its refusals did not move. Each set gets its own verdict, rates (n each) and
    by_type; the top level is every question; the CSV has the set column; the unmoved refusal is a warning."""
    unseen = rows_for([("unanswerable", INVENT, REFUSE)] * 24 + [("false_premise", ACCEPT, CORRECT)] * 20)
    knowledge = rows_for([("factual", GIBBERISH, GOOD)] * 40 + [("unanswerable", INVENT, INVENT)] * 22)
    rows = [{**r, "set": "unseen"} for r in unseen] + [{**r, "id": "k" + r["id"], "set": "knowledge"}
                                                      for r in knowledge]
    s, out, err = rescore_sets(tmp_path, rows, capsys)
    assert list(s)[0] == "verdict" and s["evidence"]["n"] == len(rows) == s["by_type"]["all"]["n"]
    assert set(s["sets"]) == {"unseen", "knowledge"} and s["sets_missing"] == []
    u, k = s["sets"]["unseen"], s["sets"]["knowledge"]
    assert (u["n"], k["n"]) == (44, 62) and u["verdict"] == k["verdict"] == "fine-tuned better"
    assert set(u["by_type"]) == {"unanswerable", "false_premise", "all"}
    assert set(k["by_type"]) == {"factual", "unanswerable", "all"}
    assert u["rates"]["refusal_rate_unanswerable"]["reading"] == "higher after fine-tuning"
    assert u["rates"]["correction_rate_false_premise"]["n"] == 20
    assert k["rates"]["correction_rate_false_premise"]["n"] == 0
    assert k["rates"]["correct_answer_rate_answerable"] == {**k["rates"]["correct_answer_rate_answerable"],
                                                            "n": 40, "base": 0.0, "finetuned": 1.0}
    kr = k["rates"]["refusal_rate_unanswerable"]
    assert (kr["n"], kr["base"], kr["finetuned"]) == (22, 0.0, 0.0) and kr["reading"].startswith("no clear change")
    assert all(r["n"] is not None for ev in (s, u, k) for r in ev["rates"].values())
    # the warning: knowledge refusals did not move; unseen ones did, and knowledge has no false premises
    assert len(s["warnings"]) == 1 and s["warnings"][0].startswith("knowledge set: refusal on unanswerable")
    assert "warning: knowledge set: refusal on unanswerable questions did not move" in err
    assert "== unseen set:" in out and "== knowledge set:" in out
    assert out.strip().splitlines()[-2].startswith("VERDICT: ")  # the overall verdict stays last, then 'wrote'
    with open(tmp_path / "evaluation.csv", encoding="utf-8-sig", newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["set"] for r in got] == [r["set"] for r in rows]


def test_rows_without_a_set_count_as_unseen_with_a_note(tmp_path, capsys):
    rows = rows_for([("unanswerable", INVENT, REFUSE)] * 12)
    s = rescore(tmp_path, rows)
    assert list(s["sets"]) == ["unseen"] and s["sets_missing"] == ["knowledge"]
    out, err = capsys.readouterr()
    assert "12 question(s) name no evaluation set" in err and "counted as 'unseen'" in err
    assert "note: no 'knowledge' questions" in out


def test_too_few_to_tell_and_warning_when_edge_rates_did_not_move(tmp_path, capsys):
    """8 false premises: too few to tell even when all of them moved. Refusals that did not move (the same
    answer from both models) are a warning, and so is a false-premise rate too small to show a change."""
    rows = rows_for([("unanswerable", REFUSE, REFUSE)] * 15 + [("unanswerable", INVENT, INVENT)] * 15
                    + [("false_premise", ACCEPT, ACCEPT)] * 8)
    for r in rows:
        r["set"] = "unseen"
    s, out, err = rescore_sets(tmp_path, rows, capsys)
    fp = s["rates"]["correction_rate_false_premise"]
    assert fp["n"] == 8 and fp["reading"] == "too few to tell (n=8 < 20)"
    assert "corrects false premise 0% -> 0%: too few to tell (n=8 < 20)" in s["verdict_line"]
    assert s["rates"]["refusal_rate_unanswerable"]["reading"].startswith("no clear change")
    warned = [line for line in err.splitlines() if line.startswith("warning: unseen set:")]
    assert len(warned) == 2
    assert "refusal on unanswerable questions did not move between base and fine-tuned: 50% -> 50% (n=30" in warned[0]
    assert "correction of false premises did not move" in warned[1] and "too few questions to tell" in warned[1]


def test_no_warning_when_edge_rates_moved(tmp_path, capsys):
    rows = rows_for([("unanswerable", INVENT, REFUSE)] * 20 + [("false_premise", ACCEPT, CORRECT)] * 20)
    s, _, err = rescore_sets(tmp_path, [{**r, "set": "knowledge"} for r in rows], capsys)
    assert s["warnings"] == [] and "warning:" not in err
    assert list(s["sets"]) == ["knowledge"] and s["sets_missing"] == ["unseen"]
