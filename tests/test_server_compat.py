"""generate_qa.py against what real OpenAI-compatible servers answer (vLLM, llama.cpp's server, llama-cpp-python,
Ollama, LM Studio, transformers serve, OpenAI): which errors mean "the response format was refused" (fall back,
once per run), which mean "wrong model or URL" (exit 2), and which are just a failed request (reject, with the
server's words); the request defaults by server; the progress bar's tokens/s and the slow-server note.

The real `openai` client talks to the loopback fake server, which replies with the servers' own error bodies
(fake_openai.SERVER_ERRORS)."""
from __future__ import annotations

import asyncio
import io
import json
import re
import types
from collections import Counter
from pathlib import Path

import pytest

import common
import generate_qa
from fake_openai import SERVER_ERRORS, FakeOpenAI, Reply, server_error
from generate_fakes import good_reply, pairs_responder, synthetic_abstracts
from paperqa_tune import client, llm
from paperqa_tune.qa.prompts import PAIRS_SCHEMA, generation_messages, type_quotas

DATA = Path(__file__).parent / "data"
KEY = "sk-test-SECRET-0123456789abcdef"
OUTS = ("train.jsonl", "eval.jsonl", "rejects_train.jsonl", "train.manifest.json")


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def run(out: Path, srv, *extra, inputs=(DATA / "abstracts.csv",), model="fake-model"):
    return generate_qa.main(["--input", *map(str, inputs), "--out", str(out / "train.jsonl"), "--eval_out",
                             str(out / "eval.jsonl"), "--base_url", srv.base_url, "--model", model, *extra])


def fmt(req: dict) -> str:
    return (req.get("response_format") or {}).get("type", "none")


def formats(srv) -> Counter:
    return Counter(fmt(r) for r in srv.requests)


def load(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()]


def refusing(refusals: dict):
    """A server that answers each response format in `refusals` with that server error, anything else with pairs."""
    def responder(req, n):
        name = refusals.get(fmt(req))
        return server_error(name, req["model"], retry_after=0.01) if name else Reply(content=good_reply(req))
    return responder


# =========================================================================== what an error is about
def _said(name: str, model: str = "m") -> str:
    """What the backend reads out of SERVER_ERRORS[name], as the openai client hands it over (e.body)."""
    body = json.loads(server_error(name, model).raw_body or b"null") if not isinstance(
        SERVER_ERRORS[name][1], str) else SERVER_ERRORS[name][1]
    body = body.get("error", body) if isinstance(body, dict) else body
    return client.server_said(types.SimpleNamespace(body=body), KEY)


KINDS = {"vllm_schema_unsupported": "format", "vllm_model_not_found": "model", "vllm_context_length": "other",
         "llama_server_json_schema": "format", "llama_server_schema_conversion": "format",
         "llama_cpp_python_json_schema": "format", "llama_cpp_python_model_not_found": "model",
         "ollama_model_not_found": "model", "ollama_bad_format": "format", "lmstudio_json_object": "format",
         "openai_model_not_found": "model", "openai_schema_invalid": "format",
         "openai_json_schema_unsupported": "format", "transformers_serve_pinned": "model",
         "transformers_serve_crash": "other"}


@pytest.mark.parametrize("name", sorted(SERVER_ERRORS))
def test_each_real_error_body_is_classified(name):
    status = SERVER_ERRORS[name][0]
    assert client.classify_error(status, _said(name), asked_format=True) == KINDS[name]
    if KINDS[name] == "format":  # a request without response_format cannot have been refused for it
        assert client.classify_error(status, _said(name), asked_format=False) == "other"


def test_a_500_needs_more_than_the_word_format():
    said = "Traceback ...: ValueError: unknown chat template format"
    assert client.classify_error(500, said, True) == "other"  # retried as any 500
    assert client.classify_error(400, said, True) == "format"
    assert client.classify_error(404, "Invalid URL (POST /v1/chat/completions)", True) == "url"


# =========================================================================== the fallback matrix
@pytest.mark.parametrize("name", ["vllm_schema_unsupported", "llama_server_schema_conversion", "ollama_bad_format",
                                  "openai_schema_invalid", "openai_json_schema_unsupported"])
def test_400_format_refusal_falls_back_once_and_rerun_uses_the_cache(tmp_path, capsys, name):
    out = tmp_path / "out"
    with FakeOpenAI(refusing({"json_schema": name})) as srv:
        assert run(out, srv) == 0
        assert formats(srv) == {"json_schema": 1, "json_object": 3}  # one refusal, then every paper answered
        err = capsys.readouterr().err
        message = json.loads(server_error(name).raw_body)
        message = (message.get("error", message) if isinstance(message.get("error"), dict) else message)["message"]
        assert err.count("refused response_format") == 1
        assert (f"note: the server at {srv.base_url}/ refused response_format=json_schema (HTTP 400: "
                f"{' '.join(message.split())[:60]}") in err and err.rstrip().count("; using json_object") == 1
        n = srv.count
        assert run(out, srv, "--overwrite") == 0
        assert srv.count == n  # the json_object replies are found in the cache: nothing asked, no probe
    assert len(load(out / "train.jsonl")) + len(load(out / "eval.jsonl")) >= 30


@pytest.mark.parametrize("name,status", [("llama_cpp_python_model_not_found", 400), ("transformers_serve_pinned", 400),
                                         ("vllm_model_not_found", 404), ("ollama_model_not_found", 404),
                                         ("openai_model_not_found", 404)])
def test_wrong_model_is_not_a_format_refusal_but_exit_2_with_the_servers_message(tmp_path, capsys, name, status):
    out = tmp_path / "out"
    with FakeOpenAI(lambda req, n: server_error(name, req["model"])) as srv:
        assert run(out, srv, "--concurrency", "8", model="no-such-model") == 2
        assert srv.count == 1  # the probe; the requests waiting behind it were never sent
    err = capsys.readouterr().err
    assert "refused response_format" not in err
    said = _said(name, "no-such-model")
    assert "error: --model no-such-model: the server at" in err and f"(HTTP {status}: {said[:80]}" in err
    assert "it serves: fake-model" in err  # from its GET /models
    assert not [n for n in OUTS if (out / n).exists()]


def test_wrong_judge_model_names_judge_model(tmp_path, capsys):
    out = tmp_path / "out"
    with FakeOpenAI(lambda req, n: server_error("vllm_model_not_found", req["model"])) as srv:
        rc = generate_qa.main(["--backend", "offline", "--input", str(DATA / "abstracts.txt"), "--base_url",
                               srv.base_url, "--judge_model", "judgy", "--out", str(out / "train.jsonl")])
    assert rc == 2 and "error: --judge_model judgy: the server at" in capsys.readouterr().err


def test_404_without_a_model_message_points_at_base_url(tmp_path, capsys):
    not_there = Reply(status=404, raw_body=b'{"error": {"message": "Invalid URL (POST /v1/chat/completions)"}}')
    with FakeOpenAI(lambda req, n: not_there) as srv:
        assert run(tmp_path / "out", srv) == 2
        assert srv.count == 1
    err = capsys.readouterr().err
    assert "Invalid URL (POST /v1/chat/completions)" in err and "check --base_url" in err


def test_unrelated_400_is_a_reject_with_the_servers_message_and_the_format_stays(tmp_path, capsys):
    out = tmp_path / "out"
    with FakeOpenAI(lambda req, n: server_error("vllm_context_length")) as srv:
        assert run(out, srv) == 1  # every request refused: no pair, nothing written
        # the probe asked once more without response_format (an unexplained 400): refused too, so the format
        # was not the problem and stays
        assert formats(srv) == {"json_schema": 3, "none": 1}
    assert "refused response_format" not in capsys.readouterr().err
    why = load(out / ".cache" / "train.failed_run_rejects.jsonl")
    assert len(why) == 3 and all("BadRequestError (HTTP 400): This model's maximum context length is 4096 tokens"
                                 in r["reason"] for r in why)


def test_unexplained_400_answered_without_response_format_is_taken_as_a_refusal(tmp_path, capsys):
    bare = Reply(status=400, raw_body=b'{"error": {"message": "Bad Request"}}')
    with FakeOpenAI(lambda req, n: bare if "response_format" in req else Reply(content=good_reply(req))) as srv:
        assert run(tmp_path / "out", srv, "--concurrency", "8") == 0
        assert formats(srv) == {"json_schema": 1, "none": 3}
    assert "(HTTP 400: Bad Request), and the same request without it was answered; using no response_format" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("name", ["llama_cpp_python_json_schema", "llama_server_json_schema"])
def test_500_about_the_format_falls_back_to_json_object_at_once(tmp_path, capsys, name):
    out = tmp_path / "out"
    with FakeOpenAI(refusing({"json_schema": name})) as srv:
        assert run(out, srv) == 0  # --max_retries 4 by default: a 500 about the format is not retried
        assert formats(srv) == {"json_schema": 1, "json_object": 3}
    assert "refused response_format=json_schema (HTTP 500: " in capsys.readouterr().err
    assert json.loads((out / "train.manifest.json").read_text())["requests"]["failed"] == 0


OOM = {"error": {"message": "CUDA out of memory. Tried to allocate 2.00 GiB " + "x" * 400,
                 "type": "internal_server_error"}}


@pytest.mark.parametrize("reply", [server_error("transformers_serve_crash", retry_after=0.01),
                                   Reply(status=500, retry_after=0.01, raw_body=json.dumps(OOM).encode())],
                         ids=["plain_text", "long_json"])
def test_unrelated_500_is_retried_then_rejected_with_the_servers_message(tmp_path, capsys, reply):
    out = tmp_path / "out"
    with FakeOpenAI(lambda req, n: reply) as srv:
        assert run(out, srv, "--max_retries", "1") == 1
        assert formats(srv) == {"json_schema": 6}  # 3 papers x 2 attempts, the format never dropped
    assert "refused response_format" not in capsys.readouterr().err
    why = [r["reason"] for r in load(out / ".cache" / "train.failed_run_rejects.jsonl")]
    said = "Internal Server Error" if reply.content_type.startswith("text") else "CUDA out of memory. Tried to"
    assert len(why) == 3 and all(w.startswith("request failed after 2 attempt(s): InternalServerError (HTTP 500): "
                                              + said) for w in why)
    assert all(len(w) < 400 for w in why)  # cut to a few hundred characters


def test_json_object_refused_too_ends_at_none(tmp_path, capsys):
    out = tmp_path / "out"
    with FakeOpenAI(refusing({"json_schema": "llama_cpp_python_json_schema",
                              "json_object": "lmstudio_json_object"})) as srv:
        assert run(out, srv) == 0
        # json_object with the schema inside, then without it: both refused, once each
        assert formats(srv) == {"json_schema": 1, "json_object": 2, "none": 3}
        assert [req["response_format"] for req in srv.requests[1:3]] == [
            {"type": "json_object", "schema": PAIRS_SCHEMA}, {"type": "json_object"}]
        err = capsys.readouterr().err
        assert "refused response_format=json_schema (HTTP 500: " in err and "; using json_object+schema" in err
        assert ("refused response_format=json_object+schema (HTTP 400: 'response_format.type' must be "
                "'json_schema'); using json_object") in err
        assert ("refused response_format=json_object (HTTP 400: 'response_format.type' must be 'json_schema'); "
                "using no response_format") in err
        n = srv.count
        assert run(out, srv, "--overwrite") == 0 and srv.count == n  # the plain replies come from the cache


def test_format_is_probed_once_with_concurrency_8(tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    common.write_jsonl_atomic(src, synthetic_abstracts(12, seed=5))

    def responder(req, n):
        if fmt(req) == "json_schema":
            return server_error("llama_cpp_python_json_schema", delay=0.3)  # the others have time to pile up
        return Reply(content=good_reply(req))
    with FakeOpenAI(responder) as srv:
        assert run(tmp_path / "out", srv, "--concurrency", "8", inputs=(src,)) == 0
        assert formats(srv) == {"json_schema": 1, "json_object": 12}
    assert capsys.readouterr().err.count("refused response_format") == 1


def test_format_used_and_note_for_the_manifest(tmp_path):
    cache = llm.ResponseCache(tmp_path / "c.jsonl")
    with FakeOpenAI(refusing({"json_schema": "vllm_schema_unsupported"})) as srv:
        backend = llm.OpenAIBackend(client.ClientSettings("fake-model", KEY, srv.base_url, timeout=5, max_retries=0,
                                                          concurrency=2), llm.Sampling(0.7, 500, 0), cache)
        papers = generate_qa.read_abstract_file(DATA / "abstracts.csv")
        msgs = [generation_messages(p, type_quotas(12, 0.2)) for p in papers]
        outs = asyncio.run(backend.complete(msgs, "qa_pairs", PAIRS_SCHEMA, lambda k, o: None))
    assert all(o.error is None for o in outs)
    assert backend.format_used == "json_object+schema"
    assert backend.format_note.startswith(f"the server at {srv.base_url}/ refused response_format=json_schema (HTTP "
                                          "400: The provided JSON schema contains features not supported by xgrammar")


# =========================================================================== defaults by server
def test_request_defaults_by_backend_and_server():
    hosted = llm.resolve_request_defaults("openai", None, 12)
    assert hosted == {"max_tokens": 3000, "timeout": 120.0, "concurrency": 8}
    local = llm.resolve_request_defaults("openai", "http://localhost:8000/v1", 12)
    assert local == {"max_tokens": 150 * 12 + 256, "timeout": 600.0, "concurrency": 2}
    assert llm.resolve_request_defaults("openai", "http://x/v1", 3)["max_tokens"] == 706
    assert llm.resolve_request_defaults("hf", None, 12) == {"max_tokens": 2056, "timeout": 120.0, "concurrency": 8}
    assert llm.resolve_request_defaults("offline", None, 12)["max_tokens"] == 3000  # its judge: hosted OpenAI


def test_defaults_reach_the_requests_and_flags_override_them(tmp_path, capsys):
    with FakeOpenAI(pairs_responder()) as srv:
        # every request is a training one of 6 pairs (held-out papers and knowledge questions ask for more)
        assert run(tmp_path / "a", srv, "--pairs_per_abstract", "6", "--eval_papers", "0",
                   "--knowledge_questions", "0") == 0
        assert {r["max_tokens"] for r in srv.requests} == {150 * 6 + 256}
        err = capsys.readouterr().err
        assert "requests: max_tokens=1156 timeout=600s concurrency=2 response_format=json_schema (server " in err
        man = json.loads((tmp_path / "a" / "train.manifest.json").read_text())
        assert (man["args"]["max_tokens"], man["args"]["timeout"], man["args"]["concurrency"]) == (1156, 600.0, 2)
        n = srv.count
        assert run(tmp_path / "b", srv, "--max_tokens", "700", "--timeout", "30", "--concurrency", "5") == 0
        assert {r["max_tokens"] for r in srv.requests[n:]} == {700}
        assert "requests: max_tokens=700 timeout=30s concurrency=5" in capsys.readouterr().err
    assert generate_qa.main(["--input", str(DATA / "abstracts.csv"), "--out", str(tmp_path / "c" / "t.jsonl"),
                             "--concurrency", "0", "--timeout", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--concurrency: invalid value" in err and "--timeout: invalid value" in err


def test_cache_from_before_the_sized_default_is_still_used(tmp_path):
    """Replies cached under the old fixed 3000-token budget are reused when they ended within the new one."""
    out = tmp_path / "out"
    with FakeOpenAI(pairs_responder()) as srv:
        assert run(out, srv, "--max_tokens", "3000") == 0
        n = srv.count
        assert run(out, srv, "--overwrite") == 0  # default for a --base_url server: 2056
        assert srv.count == n


# =========================================================================== a slow server shows early
def test_progress_shows_tokens_per_second_of_this_rounds_fresh_replies():
    now = [100.0]
    stats, buf = llm.Stats(), io.StringIO()
    progress = llm.Progress(stats, file=buf, clock=lambda: now[0])
    stats.add(llm.Outcome(content="x", usage={"completion_tokens": 999}))  # an earlier round's reply
    progress.start(3, "generate")
    now[0] += 4.0
    stats.add(llm.Outcome(content="x", usage={"prompt_tokens": 10, "completion_tokens": 200}))
    stats.add(llm.Outcome(content="x", usage={"completion_tokens": 500}, cached=True))  # costs no time
    progress.step()
    assert progress.postfix()["tok/s"] == "50.0"
    progress.close()
    assert "tok/s=50.0" in buf.getvalue()


def test_slow_first_answer_is_reported_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(client, "SLOW_FIRST_ANSWER_S", 0.3)
    with FakeOpenAI(pairs_responder(delay=0.8)) as srv:
        assert run(tmp_path / "out", srv) == 0
    err = capsys.readouterr().err
    assert err.count("note: no answer yet from the server at") == 1
    assert re.search(r"after 0.3 s \(1 request\(s\) in flight, --timeout 600 s each\).*lower --concurrency or "
                     r"raise --timeout", err)  # 1: the probe; the others wait for it
    with FakeOpenAI(pairs_responder()) as srv:
        assert run(tmp_path / "fast", srv) == 0
    assert "no answer yet" not in capsys.readouterr().err
