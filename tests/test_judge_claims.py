"""The claims judge (paperqa_tune.evaluate.claims) against the loopback OpenAI server, alone and through
eval_compare.py: per-claim verdicts in the CSV, the judge's hallucination rate as summary.json's headline (the
offline rule's beside it, with their agreement), the verdict's guard reading the judge's rate, caching, failures
recorded as failed (never counted as 0), --rescore with the judge, --no-judge_claims."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

import eval_compare as ec
from fake_openai import Reply
from test_judge import DictCache  # the duck-typed cache the judges expect
from paperqa_tune.evaluate import claims as C
from paperqa_tune.evaluate import judge as J
from paperqa_tune.evaluate import report

KEY = "sk-test-claims-key-9"
CTX = "We propose QLoRA, which finetunes quantized language models with low-rank adapters on a single GPU."
REF = "It finetunes quantized language models with low-rank adapters."
GOOD = "It finetunes quantized language models with low-rank adapters."
SLOW = GOOD + " This approach is also slow in practice."         # a claim with no specific: the offline rule misses it
INVENT = "It finetunes quantized language models with 12 adapters."  # a number the source does not give
REFUSE = "The abstract does not say."
MALFORMED = "It finetunes quantized models. MALFORMED"             # the fake judge cannot list this one's claims


# --------------------------------------------------------------------------- the fake judge
def checked(req) -> tuple[str, str]:
    """(source text, answer) of a claims request."""
    user = req["messages"][-1]["content"]
    source = user.split("Source text:\n", 1)[1].split("\n\nQuestion: ", 1)[0]
    return source, user.split("\n\nAnswer to check:\n", 1)[1]


def verdict_for(sentence: str, source: str) -> tuple[str, str]:
    """contradicted: a number the source does not give; supported: every longer word is in the source; else
    unsupported."""
    low = source.lower()
    numbers = [n for n in re.findall(r"\d+(?:\.\d+)?", sentence) if n not in source]
    if numbers:
        return "contradicted", f"the source gives no {numbers[0]}"
    words = [w for w in re.findall(r"[a-z][a-z-]+", sentence.lower()) if len(w) > 3]
    return ("supported", "stated") if all(w in low for w in words) else ("unsupported", "not in the source")


def claims_reply(req, n) -> Reply:
    source, answer = checked(req)
    if "MALFORMED" in answer:
        return Reply(content="I cannot list the claims of this answer.")
    claims = []
    for sentence in filter(None, (s.strip() for s in re.split(r"(?<=\.)\s+", answer))):
        if "does not say" in sentence:
            continue  # a refusal asserts nothing
        v, why = verdict_for(sentence, source)
        claims.append({"claim": sentence.rstrip("."), "verdict": v, "reason": why})
    return Reply(content=json.dumps({"claims": claims}))


def is_claims(req) -> bool:
    return "Answer to check:" in req["messages"][-1]["content"]


def responder(req, n) -> Reply:
    if is_claims(req):
        return claims_reply(req, n)
    return Reply(content=json.dumps({"winner": "tie", "reason": "same"}))  # the pairwise judge


# --------------------------------------------------------------------------- the module alone
def make_cfg(srv, **kw):
    return J.JudgeConfig(**{"model": "judge-model", "base_url": srv.base_url, "api_key": KEY, "timeout": 5,
                            "max_retries": 0, "workers": 2, **kw})


ASKED = {"factual": "What does the method finetune?", "unanswerable": "How many GPUs were used?",
         "false_premise": "Why does the method need eight GPUs?"}
QUESTIONS = {f"q{i}": {"id": f"q{i}", "type": t, "question": ASKED[t], "reference": REF, "context": CTX}
             for i, t in enumerate(ASKED, 1)}


def test_claims_both_sides_blind_grounded_schema_constrained(openai_server):
    openai_server.responder = claims_reply
    rows = [{"id": "q1", "base_answer": INVENT, "finetuned_answer": SLOW},
            {"id": "q2", "base_answer": REFUSE, "finetuned_answer": GOOD},
            {"id": "q3", "base_answer": MALFORMED, "finetuned_answer": REFUSE}]
    cache = DictCache()
    stats = C.judge_claims(rows, QUESTIONS, make_cfg(openai_server), cache)
    assert stats == {"calls": 6, "cached": 0, "failed": 1}
    q1, q2, q3 = rows
    assert q1["base_claims"] == ("[contradicted] It finetunes quantized language models with 12 adapters — the "
                                 "source gives no 12")
    assert q1["finetuned_claims"] == ("[supported] It finetunes quantized language models with low-rank adapters — "
                                      "stated | [unsupported] This approach is also slow in practice — not in the source")
    assert (q1["base_judge_hallucinated"], q1["finetuned_judge_hallucinated"]) == (1, 1)
    assert q2["base_claims"] == C.NO_CLAIMS and q2["base_judge_hallucinated"] == 0  # a refusal has no claims
    assert q2["finetuned_claims"].startswith("[supported]") and q2["finetuned_judge_hallucinated"] == 0
    # a reply that does not parse: failed, no verdict (never a 0), the reply kept, nothing cached for it
    assert q3["base_judge_hallucinated"] is None and q3["base_claims"].startswith("failed: no JSON object")
    assert q3["base_claims_raw"] == "I cannot list the claims of this answer."
    assert all(r[f"{s}_claims_raw"] == "" for r in rows for s in ("base", "finetuned") if r[f"{s}_claims"][0] != "f")
    assert len(cache.data) == 5
    for req in openai_server.requests:
        text = "\n".join(m["content"] for m in req["messages"])
        low = text.lower()
        assert "base" not in low and "fine-tun" not in low and "finetuned" not in low  # blind
        assert CTX in text and any(f"Question: {q}\n" in text for q in ASKED.values())  # the source, for every type
        assert req["temperature"] == 0 and req["model"] == "judge-model"
        assert req["response_format"]["type"] == "json_schema"
        assert req["response_format"]["json_schema"]["schema"] == C.CLAIMS_SCHEMA
    # the same again: only the failed answer is asked again
    before = openai_server.count
    again = [{k: r[k] for k in ("id", "base_answer", "finetuned_answer")} for r in rows]
    assert C.judge_claims(again, QUESTIONS, make_cfg(openai_server), cache) == {"calls": 1, "cached": 5, "failed": 1}
    assert openai_server.count == before + 1 and again == rows


def test_a_huge_source_is_capped_for_the_claims_judge(openai_server):
    openai_server.responder = claims_reply
    huge = "The abstract goes on. " * 50_000
    rows = [{"id": "q1", "base_answer": GOOD, "finetuned_answer": REFUSE}]
    C.judge_claims(rows, {"q1": {**QUESTIONS["q1"], "context": huge}}, make_cfg(openai_server), DictCache())
    sent = [json.dumps(r) for r in openai_server.requests]
    assert len(sent) == 2 and max(map(len, sent)) < J.TEXT_LIMITS["context"] + 10_000
    assert all("truncated: the first 20,000 of 1,100,000 characters" in r for r in sent)


@pytest.mark.parametrize("content, why", [
    ('{"claims": "none"}', "not a JSON list"),
    ('{"claims": [{"claim": "x", "verdict": "probably"}]}', "verdict 'probably'"),
    ('{"claims": [{"claim": "", "verdict": "supported"}]}', "claim 1 has no text"),
    ('{"claims": ["It uses 12 layers."]}', "not an object"),
    ('{"verdict": "supported"}', "has no 'claims'"),
])
def test_parse_claims_rejects_what_it_cannot_read(content, why):
    parsed, got = C.parse_claims(content)
    assert parsed is None and why in got


def test_parse_claims_reads_chatty_and_case_insensitive_replies():
    reply = 'Sure:\n```json\n{"claims": [{"claim": " It  uses\\n4 bits ", "verdict": "Contradicted"}]}\n```'
    assert C.parse_claims(reply) == ({"claims": [{"claim": "It uses 4 bits", "verdict": "contradicted",
                                                   "reason": ""}]}, "")
    assert C.parse_claims('{"claims": []}') == ({"claims": []}, "")


# --------------------------------------------------------------------------- through eval_compare --rescore
def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def write_sheet(path: Path, pairs: list[tuple[str, str]]) -> Path:
    rows = [{"id": f"q{i}", "type": "factual", "question": "What does the method finetune?", "reference": REF,
             "base_answer": b, "finetuned_answer": f, "context": CTX, "set": "unseen"}
            for i, (b, f) in enumerate(pairs, 1)]
    report.write_csv(path, rows, report.QUESTION_COLUMNS + report.ANSWER_COLUMNS + ["context", "set"])
    return path


def judge_argv(srv, *extra) -> list[str]:
    return ["--judge_model", "judge-model", "--judge_base_url", srv.base_url, "--judge_rubric", "none", *extra]


# 16 questions the fine-tuned model answers well but adds an unchecked claim to, 4 where the base invents a number
PAIRS = [(REFUSE, SLOW)] * 16 + [(INVENT, GOOD)] * 4


def test_judge_rate_is_the_headline_and_drives_the_guard(tmp_path, openai_server, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    openai_server.responder = responder
    path = write_sheet(tmp_path / "evaluation.csv", PAIRS)

    # without the claims judge: the offline rule sees no invented specific in the fine-tuned answers
    assert ec.main(["--rescore", str(path), *judge_argv(openai_server, "--no-judge_claims")]) == 0
    assert not any(is_claims(r) for r in openai_server.requests)
    plain = json.loads((tmp_path / "summary.json").read_text())
    assert plain["verdict"] == "fine-tuned better"
    assert "hallucination_source" not in plain and "hallucination_rate_offline" not in plain["rates"]
    assert "source" not in plain["rates"]["hallucination_rate"] and "claims" not in plain["judge"]
    assert "finetuned_claims" not in read_csv(path)[0]

    # with it (the default): the judge's per-claim verdicts are the headline; the guard reads them
    capsys.readouterr()
    assert ec.main(["--rescore", str(path), *judge_argv(openai_server)]) == 0
    printed = capsys.readouterr().out
    assert sum(map(is_claims, openai_server.requests)) == 2 * len(PAIRS)
    s = json.loads((tmp_path / "summary.json").read_text())
    rows = read_csv(path)
    judged = {side: [int(r[f"{side}_judge_hallucinated"]) for r in rows] for side in ("base", "finetuned")}
    offline = {side: [int(r[f"{side}_hallucinated"]) for r in rows] for side in ("base", "finetuned")}
    assert judged == {"base": [0] * 16 + [1] * 4, "finetuned": [1] * 16 + [0] * 4}
    h, ho = s["rates"]["hallucination_rate"], s["rates"]["hallucination_rate_offline"]
    assert (h["source"], ho["source"]) == ("judge", "offline")
    assert (h["n"], h["base"], h["finetuned"]) == (20, 0.2, 0.8) and h["ci95"][0] > 0
    assert (ho["n"], ho["base"], ho["finetuned"]) == (20, sum(offline["base"]) / 20, sum(offline["finetuned"]) / 20)
    assert s["hallucination_source"] == report.HALLUCINATION_SOURCES["judge"]
    assert s["sets"]["unseen"]["hallucination_source"] == report.HALLUCINATION_SOURCES["judge"]
    assert s["by_type"]["all"]["finetuned"]["hallucination_rate"] == 0.8
    assert s["by_type"]["all"]["finetuned"]["hallucination_rate_offline"] == ho["finetuned"]
    # same score evidence as before, but the fine-tuned model hallucinates more per the judge: not called better
    assert s["evidence"]["wins"] == plain["evidence"]["wins"] == 20
    assert s["verdict"] == "no clear difference" and "hallucinates significantly more per the judge" in s["verdict_line"]
    assert "hallucinated per the judge 20% (base) -> 80% (fine-tuned)" in s["verdict_line"]
    assert "hallucinates (offline rule)" in s["verdict_line"]
    # the agreement, counted here from the CSV's columns
    pairs = [(j, o) for side in judged for j, o in zip(judged[side], offline[side])]
    agree = s["hallucination_agreement"]
    assert agree["answers"] == 40 and agree["agree"] == sum(j == o for j, o in pairs)
    assert agree["rate"] == round(agree["agree"] / 40, 4) and agree["judge_only"] == sum(j > o for j, o in pairs) >= 16
    assert agree["judge_only"] + agree["offline_only"] + agree["both"] + agree["neither"] == 40
    assert f"offline rule vs judge: agree on {agree['rate']:.0%} of 40 answers" in printed
    assert "the hallucination rate above is the judge's" in printed
    assert s["judge"]["claims"] == {"status": "ok", "answers": 40, "failed": 0}
    assert s["judge_stats"]["claims"] == {"calls": 40, "cached": 0, "failed": 0}
    # the CSV: the judge's columns beside the offline rule's, readable claims
    header = list(rows[0])
    assert header.index("finetuned_judge_hallucinated") == header.index("finetuned_unsupported") + 2
    assert rows[0]["finetuned_claims"].endswith("[unsupported] This approach is also slow in practice — not in the "
                                                "source")
    assert rows[0]["base_claims"] == C.NO_CLAIMS and rows[16]["base_claims"].startswith("[contradicted]")

    # the same command again: every verdict from the cache, the same outputs
    before = openai_server.count
    assert ec.main(["--rescore", str(path), *judge_argv(openai_server)]) == 0
    assert openai_server.count == before
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["rates"] == s["rates"] and again["judge_stats"]["claims"] == {"calls": 0, "cached": 40, "failed": 0}
    assert read_csv(path) == rows

    # rescored without a judge: the offline rule is the headline again, as without the claims judge
    assert ec.main(["--rescore", str(path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["verdict"] == "fine-tuned better" and "hallucination_agreement" not in s
    assert s["rates"]["hallucination_rate"] == plain["rates"]["hallucination_rate"]


def test_failed_verdicts_are_left_out_never_counted_as_0(tmp_path, openai_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    openai_server.responder = responder
    path = write_sheet(tmp_path / "evaluation.csv", [(INVENT, MALFORMED)] * 2 + [(GOOD, SLOW)] * 4)
    assert ec.main(["--rescore", str(path), *judge_argv(openai_server)]) == 0
    rows, s = read_csv(path), json.loads((tmp_path / "summary.json").read_text())
    assert [r["finetuned_judge_hallucinated"] for r in rows] == ["", ""] + ["1"] * 4
    assert all(r["finetuned_claims"].startswith("failed: ") and "cannot list" in r["finetuned_claims_raw"]
               for r in rows[:2])
    h = s["rates"]["hallucination_rate"]
    assert (h["n"], h["base"], h["finetuned"]) == (4, 0.0, 1.0)  # the two failed questions are left out
    assert s["judge"]["claims"] == {"status": "partial", "answers": 10, "failed": 2}
    assert s["hallucination_agreement"]["answers"] == 10
    assert s["by_type"]["all"]["finetuned"]["hallucination_rate"] == 1.0  # over the 4 judged answers, not 6

    # rerun: only the two failed answers are asked again; once they parse, every answer has a verdict
    before = openai_server.count
    openai_server.responder = lambda req, n: (Reply(content=json.dumps({"claims": []})) if is_claims(req)
                                              else responder(req, n))
    assert ec.main(["--rescore", str(path), *judge_argv(openai_server)]) == 0
    assert openai_server.count == before + 2
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["rates"]["hallucination_rate"]["n"] == 6 and s["judge"]["claims"]["status"] == "ok"


def test_claims_judge_failing_everywhere_is_exit_1_and_the_offline_rule_stays(tmp_path, openai_server, monkeypatch,
                                                                              capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    openai_server.responder = lambda req, n: (Reply(content="no idea") if is_claims(req) else responder(req, n))
    path = write_sheet(tmp_path / "evaluation.csv", [(INVENT, GOOD)] * 3)
    assert ec.main(["--rescore", str(path), *judge_argv(openai_server)]) == 1
    err = capsys.readouterr().err
    assert "the judge failed on EVERY call (claims" in err and "offline rule's" in err
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["judge"]["claims"]["status"] == "failed" and s["judge"]["status"] == "failed"
    assert s["hallucination_source"].startswith(report.HALLUCINATION_SOURCES["offline"])
    assert "source" not in s["rates"]["hallucination_rate"] and s["rates"]["hallucination_rate"]["base"] == 1.0
    assert {r["base_judge_hallucinated"] for r in read_csv(path)} == {""}


# --------------------------------------------------------------------------- a whole evaluation
@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory, one_torch_thread) -> Path:
    from test_eval_compare import make_run

    return make_run(tiny_model, tmp_path_factory.mktemp("claims-run") / "tiny-qlora")


def test_evaluation_with_the_claims_judge(tiny_run, tmp_path, openai_server, monkeypatch):
    """The model's own answers (a tiny random model: gibberish) are checked claim by claim in a full run."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    openai_server.responder = responder
    q = tmp_path / "questions.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in QUESTIONS.values()), encoding="utf-8")
    out = tmp_path / "out" / "evaluation.csv"
    assert ec.main(["--adapter", str(tiny_run), "--questions", str(q), "--out", str(out), "--max_new_tokens", "6",
                    *judge_argv(openai_server)]) == 0
    rows, s = read_csv(out), json.loads(out.with_name("summary.json").read_text())
    answers = [json.loads(line)["answer"] for line in ec.output_paths(out)["cache"].read_text().splitlines()
               if json.loads(line).get("model") in ("base", "finetuned")]
    claims_asked = [checked(r)[1] for r in openai_server.requests if is_claims(r)]
    assert sorted(claims_asked) == sorted(answers) and len(answers) == 2 * len(rows)
    for side in ("base", "finetuned"):
        got = [int(r[f"{side}_judge_hallucinated"]) for r in rows]
        assert s["rates"]["hallucination_rate"][side] == round(sum(got) / len(got), 4)
        assert all(r[f"{side}_claims"] for r in rows)
    assert s["hallucination_source"] == report.HALLUCINATION_SOURCES["judge"]
    assert s["hallucination_agreement"]["answers"] == 2 * len(rows)
