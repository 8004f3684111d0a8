"""One client for every LLM call (paperqa_tune.client): the generator, generate_qa's curation judge and
eval_compare's judge, against the same loopback server playing llama-cpp-python's (it refuses response_format
json_schema with a 500 and constrains replies only to a schema inside json_object), all negotiate down to
json_object+schema and succeed; the judge's --judge_timeout / --judge_retries reach the client."""
from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

import eval_compare as ec
import generate_qa
from fake_openai import FakeOpenAI, Reply, json_object_only
from generate_fakes import good_reply, is_judge
from paperqa_tune.evaluate import judge as J
from paperqa_tune.evaluate.claims import CLAIMS_SCHEMA
from paperqa_tune.qa.prompts import PAIRS_SCHEMA, SCORES_SCHEMA
from test_eval_compare import make_run, write_questions

DATA = Path(__file__).parent / "data"
KEY = "sk-test-shared-client-5150"
TOKENS = 8
PROSE = Reply(content="Sure! These look good to me overall, nicely done.")  # an unconstrained small model


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def answered(tiny_model, tmp_path_factory) -> dict:
    """A tiny run and one evaluation of it without a judge; the judge cases reuse its answer cache."""
    d = tmp_path_factory.mktemp("shared-client")
    run = make_run(tiny_model, d / "tiny-qlora")
    q = write_questions(d / "questions.jsonl")
    out = d / "out" / "evaluation.csv"
    assert ec.main(["--adapter", str(run), "--questions", str(q), "--out", str(out),
                    "--max_new_tokens", str(TOKENS)]) == 0
    return {"run": run, "questions": q, "cache": ec.output_paths(out)["cache"]}


def eval_argv(answered: dict, out: Path, srv, *extra) -> list[str]:
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(answered["cache"], ec.output_paths(out)["cache"])  # answers cached: nothing generates
    return ["--adapter", str(answered["run"]), "--questions", str(answered["questions"]), "--out", str(out),
            "--max_new_tokens", str(TOKENS), "--judge_model", "fake-model", "--judge_base_url", srv.base_url, *extra]


def fmt(req: dict) -> str:
    rf = req.get("response_format") or {}
    return "json_object+schema" if rf.get("type") == "json_object" and "schema" in rf else rf.get("type", "none")


def kind(req: dict) -> str:
    user = req["messages"][-1]["content"]
    if "Answer to grade:" in user:
        return "eval_rubric"
    if "\nAnswer A:\n" in user:
        return "eval_pairwise"
    if "\nAnswer to check:\n" in user:
        return "eval_claims"
    return "curation_judge" if is_judge(req) else "generate"


def answer(req: dict, n: int) -> Reply:
    """What a model constrained to each request's schema writes."""
    k = kind(req)
    if k == "generate":
        return Reply(content=good_reply(req))
    if k == "curation_judge":
        pairs = req["messages"][1]["content"].count("\nQ: ")
        return Reply(content=json.dumps({"scores": [{"index": i, "score": 5, "reason": "grounded"}
                                                    for i in range(1, pairs + 1)]}))
    if k == "eval_rubric":
        names = req["response_format"]["schema"]["properties"]["scores"]["required"]
        return Reply(content=json.dumps({"scores": {c: 4 for c in names}, "reason": "fine"}))
    if k == "eval_claims":
        return Reply(content=json.dumps({"claims": [{"claim": "It is grounded", "verdict": "supported",
                                                     "reason": "stated"}]}))
    return Reply(content=json.dumps({"winner": "tie", "reason": "same"}))


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def test_generator_curation_judge_and_eval_judge_all_negotiate_json_object_with_schema(
        answered, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAI(json_object_only(answer, free_text=lambda req, n: PROSE)) as srv:
        out = tmp_path / "qa"
        assert generate_qa.main(["--input", str(DATA / "abstracts.csv"), "--out", str(out / "train.jsonl"),
                                 "--base_url", srv.base_url, "--model", "fake-model", "--judge_model", "fake-model",
                                 "--eval_papers", "1"]) == 0
        gen = list(srv.requests)
        judged = tmp_path / "eval" / "evaluation.csv"
        assert ec.main(eval_argv(answered, judged, srv)) == 0
        evals = srv.requests[len(gen):]

    # generation and its curation judge: each backend's first request is refused json_schema (the probe), then
    # every request carries its own schema inside json_object
    by = Counter((kind(r), fmt(r)) for r in gen)
    assert by == {("generate", "json_schema"): 1, ("generate", "json_object+schema"): 3,
                  ("curation_judge", "json_schema"): 1, ("curation_judge", "json_object+schema"): 3}
    assert all(r["response_format"]["schema"] == (PAIRS_SCHEMA if kind(r) == "generate" else SCORES_SCHEMA)
               for r in gen if fmt(r) == "json_object+schema")
    man = json.loads((out / "train.manifest.json").read_text())
    assert man["response_format"]["used"] == "json_object+schema" and man["requests"]["failed"] == 0
    assert man["counts"]["filters"].get("judge_failed", 0) == 0
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert train and all(r["meta"]["judge_score"] == 5 for r in train)

    # the evaluation judge: one probe for rubric, pairwise and claims together (one client), then the schemas
    by = Counter((kind(r), fmt(r)) for r in evals)
    n = len(read_csv(judged))
    assert by == {("eval_rubric", "json_schema"): 1, ("eval_rubric", "json_object+schema"): 2 * n,
                  ("eval_pairwise", "json_object+schema"): 2 * n, ("eval_claims", "json_object+schema"): 2 * n}
    assert all(r["response_format"]["schema"] == J.VERDICT_SCHEMA for r in evals if kind(r) == "eval_pairwise")
    assert all(r["response_format"]["schema"] == CLAIMS_SCHEMA for r in evals if kind(r) == "eval_claims")
    rows = read_csv(judged)
    assert {r[f"{s}_rubric_status"] for r in rows for s in ("base", "finetuned")} == {"ok"}
    assert {r["judge_winner"] for r in rows} == {"tie"} and {r["judge_consistent"] for r in rows} == {"1"}
    assert {r[f"{s}_judge_hallucinated"] for r in rows for s in ("base", "finetuned")} == {"0"}
    summary = json.loads(judged.with_name("summary.json").read_text())
    config = summary["judge_stats"]["config"]
    assert config["response_format"] == "json_schema" and config["response_format_used"] == "json_object+schema"
    assert config["timeout"] == 120.0 and config["max_retries"] == 4
    err = capsys.readouterr().err
    assert err.count("refused response_format=json_schema (HTTP 500: ") == 3  # generator, its judge, eval judge
    assert "Input should be 'text' or 'json_object'" in err


def test_without_the_schema_rung_the_same_server_answers_prose(answered, tmp_path, monkeypatch):
    """The control: asked for plain json_object (no schema inside), this server's model writes prose, and every
    judge call fails as it did before the rung existed; the failure is recorded, not guessed."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAI(json_object_only(answer, free_text=lambda req, n: PROSE)) as srv:
        judged = tmp_path / "eval" / "evaluation.csv"
        assert ec.main(eval_argv(answered, judged, srv, "--judge_response_format", "json_object",
                                 "--judge_rubric", "none")) == 1
        assert {fmt(r) for r in srv.requests} == {"json_object"}
    rows = read_csv(judged)
    assert {r["judge_winner"] for r in rows} == {"failed"} and all("looks good" in r["judge_raw"] or
                                                                   "look good" in r["judge_raw"] for r in rows)


def test_judge_retries_and_timeout_flags_reach_the_client(answered, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAI(lambda req, n: Reply(status=503, retry_after=0.01)) as srv:
        judged = tmp_path / "a" / "evaluation.csv"
        assert ec.main(eval_argv(answered, judged, srv, "--judge_rubric", "none", "--no-judge_claims", "--n", "2",
                                 "--judge_retries", "1")) == 1
        assert srv.count == 2 * 2 * 2  # 2 questions x 2 orders, each tried once and retried once
    assert all("request failed after 2 attempt(s)" in r["judge_reason"] for r in read_csv(judged))

    with FakeOpenAI(lambda req, n: Reply(content="{}", delay=1.0)) as srv:
        judged = tmp_path / "b" / "evaluation.csv"
        assert ec.main(eval_argv(answered, judged, srv, "--judge_rubric", "none", "--no-judge_claims", "--n", "1",
                                 "--judge_timeout", "0.3", "--judge_retries", "0")) == 1
        assert srv.count == 2  # no retry of a timeout without retries
    rows = read_csv(judged)
    assert all("no complete reply within --judge_timeout 0.3 s" in r["judge_reason"] for r in rows)
    summary = json.loads(judged.with_name("summary.json").read_text())
    assert summary["judge_stats"]["config"]["timeout"] == 0.3


@pytest.mark.parametrize("argv, message", [(["--judge_timeout", "0"], "--judge_timeout"),
                                           (["--judge_retries", "-1"], "--judge_retries")])
def test_bad_judge_flags_exit_2(answered, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert ec.main(["--adapter", str(answered["run"]), "--questions", str(answered["questions"]), "--out",
                    str(tmp_path / "e.csv"), "--judge_model", "m", *argv]) == 2
    assert message in capsys.readouterr().err
