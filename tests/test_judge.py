"""paperqa_tune.evaluate.judge against the loopback OpenAI server: rubric scores per answer, the pairwise judge in
both orders, failures recorded (never a default score or a tie) and never cached, the API key scrubbed."""
from __future__ import annotations

import json

import pytest

from common import InputError
from fake_openai import Reply
from paperqa_tune.evaluate import judge as J

KEY = "sk-test-secret-4242"
CRITERIA = [("correctness", "the answer is right"), ("grounding", "nothing invented"),
            ("edge_cases", "refuses or corrects when it should")]
NAMES = [n for n, _ in CRITERIA]
QUESTIONS = {
    "f1": {"id": "f1", "type": "factual", "question": "What method does the paper propose?",
           "reference": "Low-rank adapters on a four-bit model.", "context": "We propose QLoRA, adapters on 4-bit."},
    "u1": {"id": "u1", "type": "unanswerable", "question": "What dataset size is used?",
           "reference": "The abstract does not say.", "context": "No size given here."},
    "fp1": {"id": "fp1", "type": "false_premise", "question": "Why eight-bit weights?",
            "reference": "It uses four-bit weights.", "context": "Four-bit NF4 weights."},
    "x1": {"id": "x1", "type": "unknown", "question": "Anything else?", "reference": "", "context": ""},
}


class DictCache:
    """The duck-typed cache the judge expects: get(key) and put(record)."""

    def __init__(self):
        self.data: dict[str, dict] = {}

    def get(self, key):
        return self.data.get(key)

    def put(self, record):
        self.data[record["key"]] = record


def make_rows():
    return [{"id": qid, "base_answer": f"plain answer {qid}", "finetuned_answer": f"GOOD answer {qid}"}
            for qid in QUESTIONS]


def make_cfg(srv, **kw):
    return J.JudgeConfig(**{"model": "judge-model", "base_url": srv.base_url, "api_key": KEY, "timeout": 5,
                            "max_retries": 0, "workers": 2, **kw})


def graded(req) -> str:
    return req["messages"][-1]["content"].split("Answer to grade:\n", 1)[1]


def scores_reply(answer: str, fenced: bool = False) -> Reply:
    """5 on every criterion for a GOOD answer, 2 otherwise; the fine-tuned side's reply comes in a code
    fence amid prose, as chatty judges write it."""
    s = 5 if answer.startswith("GOOD") else 2
    body = json.dumps({"scores": {n: s for n in NAMES}, "reason": f"graded {answer}"})
    return Reply(content=f"Here you go:\n```json\n{body}\n```\nHope that helps." if fenced else body)


def good_rubric(req, n):
    a = graded(req)
    return scores_reply(a, fenced=a.startswith("GOOD"))


# --------------------------------------------------------------------------- rubric file
def test_default_rubric_has_the_four_criteria():
    crit = J.read_rubric(J.DEFAULT_RUBRIC)
    assert [n for n, _ in crit] == ["correctness", "grounding", "terminology", "edge_cases"]
    assert all(d for _, d in crit)
    assert "abstract" in dict(crit)["correctness"] and "directly" in dict(crit)["edge_cases"]


def test_read_rubric_skips_comments_and_keeps_colons(tmp_path):
    p = tmp_path / "r.txt"
    p.write_text("\ufeff# my rubric\n\nclarity: easy to read: short sentences\n  # indented comment\n"
                 "rigor_2: states #limits\n", encoding="utf-8")
    assert J.read_rubric(p) == [("clarity", "easy to read: short sentences"), ("rigor_2", "states #limits")]
    assert J.rubric_columns(J.read_rubric(p))[:3] == ["base_rubric_clarity", "base_rubric_rigor_2", "base_rubric_mean"]


@pytest.mark.parametrize("text, where, what", [
    ("ok: fine\njust words\n", ":2:", "expected 'name: description'"),
    ("Correctness: caps\n", ":1:", "lowercase"),
    ("# c\n2nd: digit first\n", ":2:", "lowercase"),
    ("has space: x\n", ":1:", "lowercase"),
    ("a: one\n\nb: two\na: again\n", ":4:", "already defined on line 1"),
    ("a: one\nb:\n", ":2:", "no description"),
    ("mean: collides with the mean column\n", ":1:", "reserved"),
    ("# only comments\n\n", "", "no criteria"),
    (b"a: caf\xe9\n", ":1:", "UTF-8"),
])
def test_read_rubric_errors_name_file_and_line(tmp_path, text, where, what):
    p = tmp_path / "bad.txt"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InputError, match=f"bad.txt{where}") as e:
        J.read_rubric(p)
    assert what in str(e.value)


def test_read_rubric_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        J.read_rubric(tmp_path / "nope.txt")


# --------------------------------------------------------------------------- rubric scores
def test_rubric_scores_both_sides_blind_and_grounded(openai_server):
    openai_server.responder = good_rubric
    rows, cache = make_rows(), DictCache()
    stats = J.rubric_scores(rows, QUESTIONS, CRITERIA, make_cfg(openai_server), cache)
    assert stats == {"calls": 2 * len(rows), "cached": 0, "failed": 0}
    for row in rows:
        assert set(J.rubric_columns(CRITERIA)) <= set(row)
        for n in NAMES:
            assert row[f"base_rubric_{n}"] == 2 and row[f"finetuned_rubric_{n}"] == 5
        assert row["base_rubric_mean"] == 2.0 and row["finetuned_rubric_mean"] == 5.0
        assert row["base_rubric_status"] == row["finetuned_rubric_status"] == "ok"
        assert row["base_rubric_raw"] == row["finetuned_rubric_raw"] == ""
        assert row["finetuned_rubric_reason"] == f"graded GOOD answer {row['id']}"
    for req in openai_server.requests:
        text = "\n".join(m["content"] for m in req["messages"])
        assert req["model"] == "judge-model" and req["temperature"] == 0
        low = text.lower()
        assert "base" not in low and "fine-tun" not in low and "finetun" not in low  # blind
        assert "json" in low and all(d in text for _, d in CRITERIA)
        q = next(q for q in QUESTIONS.values() if f"Question: {q['question']}" in text)
        assert (q["context"] or "(not available)") in text and q["reference"] in text
        if q["type"] == "unanswerable":
            assert "does not contain the answer" in text
        if q["type"] == "false_premise":
            assert "false premise" in text
    assert len(cache.data) == 2 * len(rows)


def test_rubric_mean_is_rounded(openai_server):
    openai_server.responder = lambda req, n: Reply(content=json.dumps(
        {"scores": {"correctness": 5, "grounding": 4, "edge_cases": 4.0}, "reason": "fine"}))
    rows = make_rows()[:1]
    J.rubric_scores(rows, QUESTIONS, CRITERIA, make_cfg(openai_server), DictCache())
    assert rows[0]["finetuned_rubric_mean"] == 4.33 and rows[0]["finetuned_rubric_edge_cases"] == 4


@pytest.mark.parametrize("content, why", [
    ("I think it is pretty good, maybe a 4.", "no JSON object"),
    ("", "empty reply"),
    ('{"verdict": "good"}', "has no 'scores'"),
    ('{"scores": {"correctness": 5, "grounding": 4}, "reason": "x"}', "no score for edge_cases"),
    ('{"scores": {"correctness": 6, "grounding": 4, "edge_cases": 3}}', "not a whole number 1-5"),
    ('{"scores": {"correctness": 0, "grounding": 4, "edge_cases": 3}}', "not a whole number 1-5"),
    ('{"scores": {"correctness": "4", "grounding": 4, "edge_cases": 3}}', "not a whole number 1-5"),
    ('{"scores": {"correctness": 4.5, "grounding": 4, "edge_cases": 3}}', "not a whole number 1-5"),
    ('{"scores": {"correctness": true, "grounding": 4, "edge_cases": 3}}', "not a whole number 1-5"),
    ('{"scores": [5, 5, 5]}', "not a JSON object"),
])
def test_rubric_invalid_reply_is_failed_not_a_default(openai_server, content, why):
    openai_server.responder = lambda req, n: Reply(content=content)
    rows, cache = make_rows()[:1], DictCache()
    stats = J.rubric_scores(rows, QUESTIONS, CRITERIA, make_cfg(openai_server), cache)
    assert stats == {"calls": 2, "cached": 0, "failed": 2}
    for p in ("base", "finetuned"):
        row = rows[0]
        assert row[f"{p}_rubric_status"].startswith("failed: ") and why in row[f"{p}_rubric_status"]
        assert row[f"{p}_rubric_raw"] == content
        assert all(row[f"{p}_rubric_{n}"] is None for n in NAMES) and row[f"{p}_rubric_mean"] is None
    assert cache.data == {}


def test_rubric_raw_is_truncated_and_cut_off_reply_says_so(openai_server):
    long = "x" * 2000
    openai_server.responder = lambda req, n: Reply(content=long, finish_reason="length")
    rows = make_rows()[:1]
    J.rubric_scores(rows, QUESTIONS, CRITERIA, make_cfg(openai_server), DictCache())
    assert rows[0]["base_rubric_raw"] == "x" * J.RAW_LIMIT
    assert "cut off at max_tokens" in rows[0]["base_rubric_status"]


def test_rubric_failures_not_cached_successes_cached(openai_server):
    cfg, cache = make_cfg(openai_server), DictCache()
    openai_server.responder = lambda req, n: Reply(content="sorry, cannot grade")
    rows = make_rows()
    assert J.rubric_scores(rows, QUESTIONS, CRITERIA, cfg, cache)["failed"] == 2 * len(rows)
    assert cache.data == {}

    openai_server.responder = good_rubric  # the same command again asks again, and now succeeds
    rows = make_rows()
    assert J.rubric_scores(rows, QUESTIONS, CRITERIA, cfg, cache) == {"calls": 8, "cached": 0, "failed": 0}
    assert all(r["finetuned_rubric_status"] == "ok" and r["finetuned_rubric_correctness"] == 5 for r in rows)
    sent = openai_server.count

    rows2 = make_rows()
    assert J.rubric_scores(rows2, QUESTIONS, CRITERIA, cfg, cache) == {"calls": 0, "cached": 8, "failed": 0}
    assert openai_server.count == sent and rows2 == rows

    # another rubric, judge model or answer is another question to the judge
    J.rubric_scores(make_rows(), QUESTIONS, CRITERIA[:2], cfg, cache)
    assert openai_server.count == sent + 8
    J.rubric_scores(make_rows(), QUESTIONS, CRITERIA, make_cfg(openai_server, model="other"), cache)
    assert openai_server.count == sent + 16


def test_api_error_after_retries_is_failed_and_run_continues(openai_server):
    def responder(req, n):
        if "f1" in graded(req):
            return Reply(status=500)
        return scores_reply(graded(req))

    openai_server.responder = responder
    rows, cache = make_rows(), DictCache()
    stats = J.rubric_scores(rows, QUESTIONS, CRITERIA, make_cfg(openai_server, max_retries=1), cache)
    assert stats == {"calls": 8, "cached": 0, "failed": 2}
    f1 = [r for r in openai_server.requests if "f1" in graded(r)]
    assert len(f1) == 4  # both sides, each tried once and retried once by the client
    row = rows[0]
    assert row["base_rubric_status"].startswith("failed: API error") and "500" in row["base_rubric_status"]
    assert row["base_rubric_correctness"] is None and "500" in row["base_rubric_raw"]
    assert all(r["finetuned_rubric_status"] == "ok" for r in rows[1:])
    assert len(cache.data) == 6


def test_timeout_is_failed(openai_server):
    openai_server.responder = lambda req, n: Reply(content="{}", delay=1.0)
    rows = make_rows()[:1]
    stats = J.rubric_scores(rows, QUESTIONS, CRITERIA, make_cfg(openai_server, timeout=0.2), DictCache())
    assert stats["failed"] == 2
    assert "no complete reply within --judge_timeout 0.2 s" in rows[0]["base_rubric_status"]


def test_api_key_is_scrubbed_everywhere(openai_server):
    cfg = make_cfg(openai_server)
    echo = json.dumps({"error": {"message": f"bad auth header: Bearer {KEY}"}}).encode()

    def responder(req, n):
        qid = graded(req).split()[-1]
        if qid == "f1":
            return Reply(status=500, raw_body=echo)  # an error body that echoes the header
        if qid == "u1":
            return Reply(content=f"garbage mentioning {KEY}")
        return Reply(content=json.dumps({"scores": {n: 3 for n in NAMES}, "reason": f"key is {KEY}"}))

    openai_server.responder = responder
    rows, cache = make_rows(), DictCache()
    J.rubric_scores(rows, QUESTIONS, CRITERIA, cfg, cache)
    assert rows[0]["base_rubric_status"].startswith("failed") and rows[1]["base_rubric_status"].startswith("failed")
    assert rows[2]["base_rubric_status"] == "ok"
    stored = json.dumps([rows, list(cache.data.values())])
    assert KEY not in stored and "[api key removed]" in stored
    assert KEY not in repr(cfg) and KEY not in json.dumps(cfg.describe())


# --------------------------------------------------------------------------- pairwise
def shown(req) -> tuple[str, str]:
    user = req["messages"][-1]["content"]
    a = user.split("\nAnswer A:\n", 1)[1].split("\n\nAnswer B:\n", 1)[0]
    return a, user.split("\n\nAnswer B:\n", 1)[1]


def verdict(w, reason="r"):
    return Reply(content=json.dumps({"winner": w, "reason": reason}))


def test_pairwise_both_orders_content_judge_is_consistent(openai_server):
    def by_content(req, n):  # prefers the GOOD answer wherever it is shown
        a, b = shown(req)
        return verdict("A" if a.startswith("GOOD") else "B", f"picked {a if a.startswith('GOOD') else b}")

    openai_server.responder = by_content
    rows, cache = make_rows(), DictCache()
    assert J.pairwise(rows, QUESTIONS, make_cfg(openai_server), cache) == {"calls": 8, "cached": 0, "failed": 0}
    firsts = {}
    for req in openai_server.requests:
        text = "\n".join(m["content"] for m in req["messages"])
        assert req["temperature"] == 0 and "fine-tun" not in text.lower() and "base" not in text.lower()
        q = next(q for q in QUESTIONS.values() if f"Question: {q['question']}" in text)
        assert (q["context"] or "(not available)") in text
        firsts.setdefault(q["id"], []).append(shown(req)[0])
    for row in rows:
        assert sorted(firsts[row["id"]]) == sorted([row["base_answer"], row["finetuned_answer"]])
        assert row["judge_winner"] == "finetuned" and row["judge_consistent"] == 1 and row["judge_raw"] == ""
        assert row["judge_reason"].startswith("[base shown first: finetuned] picked GOOD")
        assert "| [fine-tuned shown first: finetuned]" in row["judge_reason"]
    assert len(cache.data) == 8


def test_pairwise_position_bias_cancels_to_tie(openai_server):
    openai_server.responder = lambda req, n: verdict("A", "first is better")
    rows = make_rows()
    J.pairwise(rows, QUESTIONS, make_cfg(openai_server), DictCache())
    assert {(r["judge_winner"], r["judge_consistent"]) for r in rows} == {("tie", 0)}
    assert "[base shown first: base]" in rows[0]["judge_reason"]
    assert "[fine-tuned shown first: finetuned]" in rows[0]["judge_reason"]


@pytest.mark.parametrize("base_first, ft_first, expected", [
    ("A", "B", ("base", 1)), ("B", "A", ("finetuned", 1)), ("tie", "tie", ("tie", 1)),
    ("A", "tie", ("base", 0)), ("tie", "A", ("finetuned", 0)), ("B", "tie", ("finetuned", 0)),
    ("A", "A", ("tie", 0)), ("B", "B", ("tie", 0)),
    (None, "A", ("failed", None)), ("tie", None, ("failed", None)), (None, None, ("failed", None)),
])
def test_combine_verdicts(base_first, ft_first, expected):
    assert J.combine_verdicts(base_first, ft_first) == expected


def test_pairwise_swap_combined_with_a_tie(openai_server):
    # base shown first: the judge picks A (base); fine-tuned shown first: tie -> base, inconsistent
    openai_server.responder = lambda req, n: verdict("A" if shown(req)[0].startswith("plain") else "tie")
    rows = make_rows()[:1]
    J.pairwise(rows, QUESTIONS, make_cfg(openai_server), DictCache())
    assert (rows[0]["judge_winner"], rows[0]["judge_consistent"]) == ("base", 0)


@pytest.mark.parametrize("content", ["A is better", '{"winner": "C", "reason": "?"}', '{"reason": "no winner"}', ""])
def test_pairwise_unparseable_is_failed_not_tie_and_not_cached(openai_server, content):
    cfg, cache = make_cfg(openai_server), DictCache()
    openai_server.responder = lambda req, n: Reply(content=content)
    rows = make_rows()
    assert J.pairwise(rows, QUESTIONS, cfg, cache) == {"calls": 8, "cached": 0, "failed": 8}
    for r in rows:
        assert r["judge_winner"] == "failed" and r["judge_consistent"] is None
        assert "[base shown first: failed]" in r["judge_reason"]
        assert r["judge_raw"] == f"[base shown first] {content} | [fine-tuned shown first] {content}"
    assert cache.data == {}

    openai_server.responder = lambda req, n: verdict("tie")
    rows = make_rows()
    assert J.pairwise(rows, QUESTIONS, cfg, cache)["calls"] == 8
    assert {(r["judge_winner"], r["judge_consistent"], r["judge_raw"]) for r in rows} == {("tie", 1, "")}
    assert J.pairwise(make_rows(), QUESTIONS, cfg, cache) == {"calls": 0, "cached": 8, "failed": 0}


def test_pairwise_one_order_failing_fails_the_row(openai_server):
    openai_server.responder = lambda req, n: verdict("B") if shown(req)[0].startswith("plain") else Reply(
        content="Answer A, clearly")
    cache = DictCache()
    rows = make_rows()
    assert J.pairwise(rows, QUESTIONS, make_cfg(openai_server), cache) == {"calls": 8, "cached": 0, "failed": 4}
    assert all(r["judge_winner"] == "failed" and r["judge_consistent"] is None for r in rows)
    assert all(r["judge_reason"].startswith("[base shown first: finetuned]") for r in rows)
    assert all(r["judge_raw"] == "[fine-tuned shown first] Answer A, clearly" for r in rows)
    assert len(cache.data) == 4  # the order that parsed is kept; only the failed one is asked again
    before = openai_server.count
    stats = J.pairwise(make_rows(), QUESTIONS, make_cfg(openai_server), cache)
    assert stats == {"calls": 4, "cached": 4, "failed": 4} and openai_server.count == before + 4
