"""generate_qa.py with an LLM: the openai backend against the loopback server (faults, resume, judge), hf in-process."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import common
import generate_qa
from paperqa_tune import llm
from fake_openai import FakeOpenAI, Reply
from generate_fakes import FaultyResponder, good_reply, is_judge, pairs_responder, request_paper, synthetic_abstracts
from paperqa_tune.generation import chat_prompt_ids
from paperqa_tune.loading import load_tokenizer
from paperqa_tune.qa.prompts import TYPES, generation_messages, type_quotas

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")


def load(path):
    return [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines()]


def argv(out: Path, inputs, *extra):
    return ["--input", *map(str, inputs), "--out", str(out / "train.jsonl"), "--eval_out", str(out / "eval.jsonl"),
            "--model", "fake-model", *extra]


def outputs(out: Path) -> dict:
    files = ("train.jsonl", "eval.jsonl", "rejects_train.jsonl", "train.manifest.json")
    return {n: (out / n).read_text(encoding="utf-8") if (out / n).exists() else None for n in files}


def request_key(req: dict) -> str:
    """The cache key generate_qa computed for a request the server received."""
    params = {k: req[k] for k in ("temperature", "max_tokens", "seed", "response_format") if k in req}
    return llm.cache_key(req["model"], req["messages"], params)


def all_text(out: Path) -> str:
    return "".join((out / n).read_text() for n in ("train.jsonl", "eval.jsonl"))


def test_openai_backend_structured_output_and_cache(tmp_path, openai_server):
    openai_server.responder = pairs_responder()
    out = tmp_path / "out"
    assert generate_qa.main(argv(out, [DATA / "abstracts.jsonl"], "--base_url", openai_server.base_url,
                                 "--eval_papers", "2")) == 0
    assert openai_server.count == 8
    rf = openai_server.requests[0]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"]["properties"]["pairs"]["items"]["properties"]["type"]["enum"] == list(TYPES)
    train, evals = load(out / "train.jsonl"), load(out / "eval.jsonl")
    assert len(train) >= 60 and len({e["paper_id"] for e in evals if e["set"] == "unseen"}) == 2
    assert all(r["meta"]["backend"] == "openai" and r["meta"]["model"] == "fake-model" for r in train)
    assert all(common.record_messages(r) == r["messages"] for r in train)
    man = json.loads((out / "train.manifest.json").read_text())
    assert man["tokens"]["prompt"] == 800 and man["tokens"]["completion"] == 400
    assert man["requests"] == {"answered_this_run": 8, "from_cache": 0, "asked_again": 0, "failed": 0}
    assert "test-key" not in (out / "train.manifest.json").read_text()
    assert len(common.read_jsonl_tolerant(out / ".cache" / "train.jsonl")) == 8

    first = outputs(out)
    assert generate_qa.main(argv(out, [DATA / "abstracts.jsonl"], "--base_url", openai_server.base_url,
                                 "--eval_papers", "2", "--overwrite")) == 0
    assert openai_server.count == 8  # everything came from the cache, not even a preflight
    again = outputs(out)
    assert again["train.jsonl"] == first["train.jsonl"] and again["eval.jsonl"] == first["eval.jsonl"]


def test_falls_back_to_plain_json_when_schema_is_refused(tmp_path, openai_server):
    def responder(req, n):
        if "response_format" in req:
            return Reply(status=400)
        return Reply(content="```json\n" + good_reply(req) + "\n```")  # fenced, as some servers reply
    openai_server.responder = responder
    out = tmp_path / "out"
    args = argv(out, [DATA / "abstracts.csv"], "--base_url", openai_server.base_url)
    assert generate_qa.main(args) == 0
    plain = [r for r in openai_server.requests if "response_format" not in r]
    assert len(plain) == 3 and len(load(out / "train.jsonl")) + len(load(out / "eval.jsonl")) >= 30
    n = openai_server.count
    assert generate_qa.main(args + ["--overwrite"]) == 0
    assert openai_server.count == n  # the plain-JSON answers are found in the cache


def test_one_repair_retry_then_reject_with_reason(tmp_path, openai_server):
    def responder(req, n):
        paper = request_paper(req)["id"]
        if paper == "2005.14165" or (paper == "1910.10683" and len(req["messages"]) == 2):
            return Reply(content="I am sorry, I cannot produce JSON today.")
        if paper == "2305.18290":
            return Reply(content='{"pairs": [{"type": "factual", "question": "", "answer": "x"}, {"type": "trivia", '
                                 '"question": "What?", "answer": "Something."}]}')
        return Reply(content=good_reply(req))
    openai_server.responder = responder
    out = tmp_path / "out"
    assert generate_qa.main(argv(out, [DATA / "abstracts.csv"], "--base_url", openai_server.base_url)) == 0
    asked = Counter(request_paper(r)["id"] for r in openai_server.requests)
    assert asked == {"2005.14165": 2, "1910.10683": 2, "2305.18290": 2}
    repair = [r for r in openai_server.requests if len(r["messages"]) == 4][0]["messages"]
    assert repair[2]["role"] == "assistant" and "could not be used" in repair[3]["content"]
    rejects = load(out / "rejects_train.jsonl")
    failed = {r["paper_id"]: r["reason"] for r in rejects if r["stage"] == "invalid_reply"}
    assert set(failed) == {"2005.14165", "2305.18290"}
    assert "after one repair: not valid JSON" in failed["2005.14165"]
    assert "no valid pair" in failed["2305.18290"]
    assert "sorry" not in all_text(out).lower()
    papers = {r["meta"]["paper_id"] for r in load(out / "train.jsonl")} | {e["paper_id"] for e in load(out / "eval.jsonl")}
    assert papers == {"1910.10683"}


def test_injected_faults_all_end_in_rejects(tmp_path, openai_server):
    """~30% of first attempts fail (429, 500, timeout, malformed body, truncated JSON, prose); two papers always fail."""
    abstracts = tmp_path / "abstracts.jsonl"
    common.write_jsonl_atomic(abstracts, synthetic_abstracts(30))
    fr = FaultyResponder(rate=0.3, always_500={"synth-0004"}, always_garbage={"synth-0008"}, timeout_delay=1.0)
    openai_server.responder = fr
    out = tmp_path / "out"
    t = time.time()
    rc = generate_qa.main(argv(out, [abstracts], "--base_url", openai_server.base_url, "--timeout", "0.4",
                               "--max_retries", "2", "--concurrency", "8"))
    assert rc == 0 and time.time() - t < 30
    assert set(fr.injected) >= set(FaultyResponder.KINDS) | {"always_500", "always_garbage"}

    rejects = load(out / "rejects_train.jsonl")
    failed = {r["paper_id"]: r["reason"] for r in rejects if r["stage"] in ("request_failed", "invalid_reply")}
    produced = {r["meta"]["paper_id"] for r in load(out / "train.jsonl")} | {e["paper_id"] for e in load(out / "eval.jsonl")}
    assert produced | set(failed) == {f"synth-{i:04d}" for i in range(30)}  # every paper accounted for
    assert not produced & set(failed)
    assert "InternalServerError" in failed["synth-0004"] and "500" in failed["synth-0004"]
    assert "after one repair" in failed["synth-0008"]
    malformed = [pid for pid, why in failed.items() if "JSONDecodeError" in why]
    assert malformed  # a 200 with a broken body is a failed request, not a crash
    text = all_text(out).lower()
    assert "injected" not in text and "overloaded" not in text and "error" not in text
    man = json.loads((out / "train.manifest.json").read_text())
    assert man["counts"]["filters"]["request_failed"] == len([w for w in failed.values() if "request failed" in w])


@pytest.mark.numerics
def test_killed_run_resumes_without_repeating_answered_requests(tmp_path):
    abstracts = tmp_path / "abstracts.jsonl"
    common.write_jsonl_atomic(abstracts, synthetic_abstracts(12, seed=1))
    responder = pairs_responder(delay=0.15)

    # the reference: one uninterrupted run
    with FakeOpenAI(responder) as srv:
        ref = tmp_path / "ref"
        assert generate_qa.main(argv(ref, [abstracts], "--base_url", srv.base_url, "--concurrency", "2")) == 0
        ref_keys = [request_key(r) for r in srv.requests]

    with FakeOpenAI(responder) as srv:
        out = tmp_path / "out"
        cmd = [sys.executable, str(ROOT / "generate_qa.py"), *argv(out, [abstracts], "--base_url", srv.base_url,
                                                                    "--concurrency", "2")]
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OPENAI_API_KEY": "test-key"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cache = out / ".cache" / "train.jsonl"
        deadline = time.time() + 60
        while len(common.read_jsonl_tolerant(cache)) < 4:
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert all(v is None for v in outputs(out).values())  # a killed run leaves no partial outputs
        answered = {e["key"] for e in common.read_jsonl_tolerant(cache)}
        assert 4 <= len(answered) < 12
        before = srv.count

        assert generate_qa.main(argv(out, [abstracts], "--base_url", srv.base_url, "--concurrency", "2")) == 0
        rerun_keys = [request_key(r) for r in srv.requests[before:]]

    assert not set(rerun_keys) & answered  # nothing whose answer was stored is asked again
    assert len(rerun_keys) == len(set(rerun_keys)) == len(ref_keys) - len(answered)
    assert set(rerun_keys) | answered == set(ref_keys)
    resumed, reference = outputs(out), outputs(ref)
    assert resumed["train.jsonl"] == reference["train.jsonl"] and resumed["eval.jsonl"] == reference["eval.jsonl"]
    assert resumed["rejects_train.jsonl"] == reference["rejects_train.jsonl"]
    assert len(common.read_jsonl_tolerant(cache)) == 12  # no duplicate cache entries either


def test_judge_scores_filter_pairs(tmp_path, openai_server):
    def responder(req, n):
        if is_judge(req):
            k = req["messages"][1]["content"].count("\nQ: ")
            scores = [{"index": i, "score": 2 if i == 1 else 5, "reason": "r"} for i in range(1, k + 1)]
            return Reply(content=json.dumps({"scores": scores}))
        return Reply(content=good_reply(req))
    openai_server.responder = responder
    out = tmp_path / "out"
    assert generate_qa.main(argv(out, [DATA / "abstracts.csv"], "--base_url", openai_server.base_url,
                                 "--judge_model", "judge-m", "--min_score", "3", "--eval_papers", "0")) == 0
    judged = [r for r in openai_server.requests if is_judge(r)]
    assert len(judged) == 3 and {r["model"] for r in judged} == {"judge-m"}
    train = load(out / "train.jsonl")
    assert all(r["meta"]["judge_score"] == 5 for r in train)
    rejects = [r for r in load(out / "rejects_train.jsonl") if r["stage"] == "judge"]
    assert len(rejects) == 3 and all(r["reason"].startswith("judge_low_score: 2 < 3") for r in rejects)
    assert json.loads((out / "train.manifest.json").read_text())["counts"]["filters"]["judge_low_score"] == 3


def test_offline_backend_with_judge_uses_the_server(tmp_path, openai_server):
    openai_server.responder = lambda req, n: Reply(content='{"scores": []}')  # judge answers without scores
    out = tmp_path / "out"
    rc = generate_qa.main(["--backend", "offline", "--input", str(DATA / "abstracts.txt"), "--base_url",
                           openai_server.base_url, "--judge_model", "j", "--out", str(out / "train.jsonl"),
                           "--eval_out", str(out / "eval.jsonl")])
    assert rc == 1  # every pair lost its score, so none is kept
    assert len(openai_server.requests) == 2 and all(is_judge(r) for r in openai_server.requests)
    assert all(v is None for v in outputs(out).values())  # a failed run writes no output...
    why = load(out / ".cache" / "train.failed_run_rejects.jsonl")  # ...but says why, beside the cache
    assert {r["reason"].split(":")[0] for r in why} == {"judge_failed"}


def test_hf_backend_turns_garbage_into_rejects(tmp_path, tiny_model):
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy CI box: OpenMP spinning costs more than it gives
    try:
        out = tmp_path / "out"
        rc = generate_qa.main(["--backend", "hf", "--model", str(tiny_model), "--input", str(DATA / "abstracts.txt"),
                               "--max_tokens", "16", "--batch_size", "2", "--temperature", "0",
                               "--eval_papers", "0", "--knowledge_questions", "0",  # every request as below
                               "--out", str(out / "train.jsonl"), "--eval_out", str(out / "eval.jsonl")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 1
    assert all(v is None for v in outputs(out).values())  # a failed run writes no output and no manifest
    rejects = load(out / ".cache" / "train.failed_run_rejects.jsonl")
    assert [r["paper_id"] for r in rejects] == ["abstracts-1", "abstracts-2"]
    assert all(r["stage"] == "invalid_reply" and "after one repair" in r["reason"] for r in rejects)
    cached = common.read_jsonl_tolerant(out / ".cache" / "train.jsonl")
    assert len(cached) == 4  # 2 replies + 2 repairs, all stored
    for r in cached:  # "length": the reply has no EOS, so it used every token it was allowed
        assert r["finish_reason"] in ("stop", "length") and 1 <= r["usage"]["completion_tokens"] <= 16
        assert r["finish_reason"] == "stop" or r["usage"]["completion_tokens"] == 16
    tok = load_tokenizer(tiny_model, padding_side="left")
    paper = generate_qa.read_abstract_file(DATA / "abstracts.txt")[0]
    ids = chat_prompt_ids(tok, generation_messages(paper, type_quotas(12, 0.2)))
    assert ids.count(tok.bos_token_id) == 1 and cached[0]["usage"]["prompt_tokens"] == len(ids)


def test_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = llm.ResponseCache(path)
    cache.put("k1", "m", llm.Outcome(content="one"))
    with open(path, "a") as f:
        f.write('{"key": "k2", "content": "tw')  # killed mid-write
    cache = llm.ResponseCache(path)
    assert cache.get("k1").content == "one" and cache.get("k2") is None
    cache.put("k3", "m", llm.Outcome(content="three"))
    again = llm.ResponseCache(path)
    assert again.get("k3").content == "three" and again.get("k1").cached and again.loaded == 2
    # the record format of earlier runs, so their caches keep answering
    assert set(common.read_jsonl_tolerant(path)[-1]) == {"key", "model", "content", "finish_reason", "usage", "time"}
