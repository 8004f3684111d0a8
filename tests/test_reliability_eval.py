"""Adversarial cases for eval_compare.py and quick_infer.py (issue 11): every case checks the exit code, the
message, and the state of every file afterwards -- previous outputs byte-identical, no partial or temp file, no
lock left behind. Most eval_compare cases reuse the answers of one evaluation (copied answer cache), so no
model generates; one case kills a real `python eval_compare.py` with SIGKILL mid-generation and resumes it."""
from __future__ import annotations

import builtins
import csv
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest

import eval_compare as ec
import quick_infer as qi
from fake_openai import Reply
from matplotlib.figure import Figure

from paperqa_tune.evaluate import report
from test_eval_compare import QUESTIONS, make_run, write_questions

ROOT = Path(__file__).resolve().parent.parent
TOKENS = 8
KEY = "sk-test-reliability-key-77"
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory) -> Path:
    return make_run(tiny_model, tmp_path_factory.mktemp("rel-run") / "tiny-qlora")


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory) -> dict:
    """One evaluation of QUESTIONS; the other cases copy its answer cache, so they generate nothing."""
    d = tmp_path_factory.mktemp("rel-eval")
    q = write_questions(d / "questions.jsonl")
    out = d / "out" / "evaluation.csv"
    assert ec.main(["--adapter", str(tiny_run), "--questions", str(q), "--out", str(out),
                    "--max_new_tokens", str(TOKENS)]) == 0
    return {"questions": q, "out": out, "cache": ec.output_paths(out)["cache"]}


# --------------------------------------------------------------------------- helpers
def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temp, partial and lock files: none may survive a run, failed or not."""
    return [p.name for p in folder.rglob("*") if p.name.endswith((".partial", ".lock", ".tmp", ".tmp.png"))
            or ".partial" in p.name]


def with_answers(evaluated: dict, out: Path, questions: Path | None = None) -> list[str]:
    """argv for an evaluation at `out` whose answers are all cached already."""
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(evaluated["cache"], ec.output_paths(out)["cache"])
    return ["--adapter", str(evaluated["tiny_run"]), "--questions", str(questions or evaluated["questions"]),
            "--out", str(out), "--max_new_tokens", str(TOKENS)]


@pytest.fixture
def ev(evaluated, tiny_run):
    return {**evaluated, "tiny_run": tiny_run}


def _run(main, capsys, argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a script's main on argv; never a traceback."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, cap.out, cap.err


def run_ec(capsys, argv) -> tuple[int, str, str]:
    return _run(ec.main, capsys, argv)


def run_qi(capsys, argv) -> tuple[int, str, str]:
    return _run(qi.main, capsys, argv)


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------- outputs: distinct, never an input
def test_out_equal_to_questions_is_refused_even_with_overwrite(ev, tmp_path, capsys):
    q = write_questions(tmp_path / "questions.jsonl")
    before = snapshot(tmp_path)
    rc, _, err = run_ec(capsys, ["--adapter", ev["tiny_run"], "--questions", q, "--out", q, "--overwrite"])
    assert rc == 2 and "is also an input of this run" in err and str(q) in err
    assert snapshot(tmp_path) == before  # questions untouched, no cache, no lock


def test_marking_sheet_equal_to_questions_is_refused(ev, tmp_path, capsys):
    q = tmp_path / "evaluation_for_marking.csv"
    q.write_text("question\nWhat is proposed?\n", encoding="utf-8")
    before = snapshot(tmp_path)
    rc, _, err = run_ec(capsys, ["--adapter", ev["tiny_run"], "--questions", q, "--out",
                                 tmp_path / "evaluation.csv", "--overwrite"])
    assert rc == 2 and "the marking sheet" in err and "is also an input" in err
    assert snapshot(tmp_path) == before


def test_answer_cache_equal_to_questions_is_refused(ev, tmp_path, capsys):
    q = write_questions(tmp_path / "evaluation.cache.jsonl")
    before = snapshot(tmp_path)
    rc, _, err = run_ec(capsys, ["--adapter", ev["tiny_run"], "--questions", q, "--out", tmp_path / "evaluation.csv"])
    assert rc == 2 and "answer cache" in err and "choose another --out" in err
    assert snapshot(tmp_path) == before  # nothing appended to the questions


def test_out_is_a_folder(ev, tmp_path, capsys):
    (tmp_path / "res").mkdir()
    rc, _, err = run_ec(capsys, ["--adapter", ev["tiny_run"], "--questions", ev["questions"],
                                 "--out", tmp_path / "res"])
    assert rc == 2 and "is a folder" in err
    assert snapshot(tmp_path) == {} and [p.name for p in tmp_path.iterdir()] == ["res"]


def test_rescore_out_equal_to_questions_is_refused(ev, tmp_path, capsys):
    src = tmp_path / "evaluation.csv"
    shutil.copy(ev["out"], src)
    q = write_questions(tmp_path / "q.jsonl")
    before = snapshot(tmp_path)
    rc, _, err = run_ec(capsys, ["--rescore", src, "--questions", q, "--out", q, "--overwrite"])
    assert rc == 2 and "is also an input" in err
    assert snapshot(tmp_path) == before


def test_out_inside_the_run_folder_never_replaces_its_files(ev, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ev["tiny_run"], run)
    before = snapshot(tmp_path)
    rc, _, err = run_ec(capsys, ["--adapter", run, "--questions", ev["questions"], "--out",
                                 run / "adapter_config.json", "--overwrite"])
    assert rc == 2 and f"--out {run / 'adapter_config.json'} is also an input" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("script", ["eval_compare", "quick_infer"])
def test_unfinished_run_without_weights(script, ev, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ev["tiny_run"], run)
    (run / "adapter_model.safetensors").unlink()
    before = snapshot(tmp_path)
    if script == "eval_compare":
        rc, _, err = run_ec(capsys, ["--adapter", run, "--questions", ev["questions"], "--out", tmp_path / "e.csv"])
    else:
        rc, _, err = run_qi(capsys, ["--adapter", run, "--prompt", "Why?"])
    assert rc == 2 and "no adapter_model.safetensors here, so the run did not finish" in err
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- written together, or not at all
def _fail_savefig(fig, fname, *a, **k):
    """matplotlib running out of disk half-way through writing a chart."""
    Path(fname).write_bytes(b"\x89PNG half")
    raise ENOSPC


@pytest.mark.parametrize("where", ["chart", "summary"])
def test_disk_full_mid_write_keeps_previous_outputs(ev, tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "res" / "evaluation.csv"
    argv = with_answers(ev, out)
    assert run_ec(capsys, argv)[0] == 0
    before = snapshot(tmp_path)
    if where == "chart":
        monkeypatch.setattr(Figure, "savefig", _fail_savefig)
    else:
        real = report.write_staged

        def full(path, text):
            if "summary" in path.name:
                path.write_text(text[:10])
                raise ENOSPC
            real(path, text)

        monkeypatch.setattr(report, "write_staged", full)
    rc, _, err = run_ec(capsys, argv + ["--overwrite", "--f1_threshold", "0.9"])
    assert rc == 1 and "No space left on device" in err and "previous outputs" in err and "unchanged" in err
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


def test_disk_full_on_a_first_run_leaves_no_output(ev, tmp_path, capsys, monkeypatch):
    out = tmp_path / "evaluation.csv"
    argv = with_answers(ev, out)
    before = snapshot(tmp_path)
    monkeypatch.setattr(Figure, "savefig", _fail_savefig)
    rc, _, err = run_ec(capsys, argv)
    assert rc == 1 and "No space left on device" in err
    assert snapshot(tmp_path) == before  # the cache it started with, nothing else


def test_disk_full_while_appending_answers(ev, tmp_path, capsys, monkeypatch):
    import paperqa_tune.cache as cache_mod

    monkeypatch.setattr(cache_mod, "append_jsonl", lambda *a, **k: (_ for _ in ()).throw(ENOSPC))
    out = tmp_path / "res" / "evaluation.csv"
    rc, _, err = run_ec(capsys, ["--adapter", ev["tiny_run"], "--questions", ev["questions"], "--out", out,
                                 "--max_new_tokens", "2", "--n", "1"])
    assert rc == 1 and err.strip().splitlines()[-1].startswith("error: No space left on device")
    assert "the disk is full" in err
    assert snapshot(tmp_path) == {}


def test_second_run_on_the_same_outputs_is_refused_naming_the_lock(ev, tmp_path, capsys):
    out = tmp_path / "evaluation.csv"
    argv = with_answers(ev, out)
    lock = out.with_name(f".{out.name}.lock")
    other = subprocess.Popen(["sleep", "60"])  # a live process holds the lock
    try:
        lock.write_text(str(other.pid))
        before = snapshot(tmp_path)
        rc, _, err = run_ec(capsys, argv)
        assert rc == 2 and str(lock) in err and f"process {other.pid}" in err
        assert snapshot(tmp_path) == before
    finally:
        other.kill()
        other.wait()


def test_lock_and_partials_of_a_killed_run_are_cleaned(ev, tmp_path, capsys):
    out = tmp_path / "evaluation.csv"
    argv = with_answers(ev, out)
    pid = dead_pid()
    out.with_name(f".{out.name}.lock").write_text(str(pid))
    out.with_name(f".{out.name}.{pid}.partial").write_text("half a csv")
    out.with_name(f"..results_bar.png.{pid}.partial.tmp.png").write_bytes(b"\x89PNG half")
    rc, _, _ = run_ec(capsys, argv)
    assert rc == 0 and leftovers(tmp_path) == []
    assert {p.name for p in tmp_path.iterdir()} == {"evaluation.csv", "evaluation_for_marking.csv", "summary.json",
                                                     "results_bar.png", "evaluation.cache.jsonl"}


def test_rescore_in_place_disk_full_keeps_the_csv(ev, tmp_path, capsys, monkeypatch):
    for name in ("evaluation.csv", "summary.json", "results_bar.png", "evaluation_for_marking.csv"):
        shutil.copy(ev["out"].with_name(name), tmp_path / name)
    before = snapshot(tmp_path)
    monkeypatch.setattr(Figure, "savefig", _fail_savefig)
    rc, _, err = run_ec(capsys, ["--rescore", tmp_path / "evaluation.csv", "--f1_threshold", "0.9"])
    assert rc == 1 and "No space left on device" in err
    assert snapshot(tmp_path) == before
    monkeypatch.undo()
    assert run_ec(capsys, ["--rescore", tmp_path / "evaluation.csv"])[0] == 0  # on purpose, through stage+commit
    assert leftovers(tmp_path) == []


def _eval_process(argv: list, log: Path) -> subprocess.Popen:
    """`python eval_compare.py ARGV` as a user runs it. Every run of a comparison gets this same environment
    (threads included: OMP_NUM_THREADS is inherited as the test runs), so the same kernels run on the same shapes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "eval_compare.py", *map(str, argv)], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)


@pytest.mark.numerics
def test_kill_9_mid_evaluation_then_resume_equals_uninterrupted(tiny_run, tmp_path):
    """A real process killed with SIGKILL at a random point once answers are in the cache: the rerun of the
    same command completes and writes the same evaluation.csv, byte for byte, as a run that was never
    interrupted. Batches of 2 over questions of different lengths: the answers depend on their batch (padding,
    shapes), so this holds only because the batches are fixed by the questions, not by what was cached."""
    qs = [{"id": f"k{i}", "type": "factual", "question": f"What does paper {i} report about topic {i * 7}?"
           + " In detail." * (i % 4), "reference": f"Paper {i} reports a gain of {i} points."} for i in range(9)]
    q = write_questions(tmp_path / "q.jsonl", qs)
    common_args = ["--adapter", tiny_run, "--questions", q, "--batch_size", "2", "--max_new_tokens", "12",
                   "--mode", "reference"]
    out = tmp_path / "killed" / "evaluation.csv"
    cache = ec.output_paths(out)["cache"]
    seed = int.from_bytes(os.urandom(2), "little")
    target = random.Random(seed).randint(1, 2 * len(qs) - 2)
    proc = _eval_process(common_args + ["--out", out], tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if cache.is_file() and cache.read_bytes().count(b"\n") >= target:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"finished before the kill (seed {seed}): " + \
            (tmp_path / "killed.log").read_text()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = cache.read_bytes().count(b"\n")
    assert target <= done < 2 * len(qs), (seed, target, done)
    assert not out.exists() and {p.name for p in out.parent.iterdir()} <= {cache.name, f".{out.name}.lock"}

    ref = tmp_path / "ref" / "evaluation.csv"
    resumed = _eval_process(common_args + ["--out", out], tmp_path / "resumed.log")  # the same command again
    uninterrupted = _eval_process(common_args + ["--out", ref], tmp_path / "ref.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    assert uninterrupted.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    assert "cached answers: base" in (tmp_path / "resumed.log").read_text() and leftovers(out.parent) == []
    cols = ("id", "base_answer", "finetuned_answer", "base_new_tokens", "finetuned_new_tokens")
    assert [[r[c] for c in cols] for r in read_csv(out)] == [[r[c] for c in cols] for r in read_csv(ref)], seed
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.numerics
def test_answer_batches_do_not_depend_on_what_was_cached(tmp_path, monkeypatch):
    """The construction behind the resume promise: whatever part of the answers a killed run cached (a whole
    batch, part of one, none), the rerun generates exactly the batches of an uninterrupted run that are not
    yet complete, with the same members in the same order, and writes only the missing answers."""
    from paperqa_tune.cache import JsonlCache

    planned = [(f"key{i}", {"id": f"q{i}"}, [i] * (3 + i % 5)) for i in range(11)]  # lengths tie
    seen: list[list[str]] = []

    def fake_generate(model, tok, batch, dec):
        seen.append([f"key{p[0]}" for p in batch])
        return [(f"answer {len(p)}", 2, [7, 2]) for p in batch]

    monkeypatch.setattr(ec, "generate_batch", fake_generate)
    dec = ec.Decoding(max_new_tokens=4)
    ec.generate_missing(None, None, planned, "base", dec, 3, JsonlCache(tmp_path / "full.jsonl"))
    full, seen[:] = list(seen), []
    batches = [[k for k, _, _ in b] for _, b in ec.batches_in_order(planned, 3)]
    assert [len(b) for b in batches] == [3, 3, 3, 2] and sorted(sum(batches, [])) == sorted(k for k, _, _ in planned)
    for cached in ([], batches[0], batches[1][:1], batches[0] + batches[2][1:], sum(batches, [])[:-1]):
        cache = JsonlCache(tmp_path / f"part{len(seen)}-{len(cached)}.jsonl")
        for k in cached:
            cache.put({"key": k, "answer": "from the killed run"})
        seen[:] = []
        r = ec.generate_missing(None, None, planned, "base", dec, 3, cache)
        expect = [full[i] for i, b in enumerate(batches) if not set(b) <= set(cached)]
        assert seen == expect, cached
        assert r["questions"] == len(planned) - len(cached) == len(cache) - len(cached)
        assert all(cache.get(k)["answer"] == "from the killed run" for k in cached)


# --------------------------------------------------------------------------- no custom code without the flag
@pytest.fixture(scope="module")
def custom_code_model(tiny_model, tmp_path_factory) -> dict:
    """The tiny model, re-labelled as a model type only its own code (marker_code.py) can load; importing
    that code writes a marker file."""
    d = tmp_path_factory.mktemp("custom") / "custom-model"
    shutil.copytree(tiny_model, d)
    marker = d.parent / "CUSTOM_CODE_RAN"
    (d / "marker_code.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="marker_model", architectures=["MarkerForCausalLM"],
               auto_map={"AutoConfig": "marker_code.MarkerConfig",
                         "AutoModelForCausalLM": "marker_code.MarkerForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    return {"path": d, "marker": marker}


@pytest.mark.parametrize("script", ["eval_compare", "quick_infer"])
def test_custom_code_needs_the_flag_and_never_prompts(script, custom_code_model, ev, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # what a prompt would read as consent
    if script == "eval_compare":
        rc, out, err = run_ec(capsys, ["--adapter", ev["tiny_run"], "--base_model", custom_code_model["path"],
                                       "--questions", ev["questions"], "--out", tmp_path / "e.csv"])
    else:
        rc, out, err = run_qi(capsys, ["--adapter", ev["tiny_run"], "--base_model", custom_code_model["path"],
                                       "--prompt", "What is proposed?"])
    assert rc == 2 and "--trust_remote_code" in err and str(custom_code_model["path"]) in err
    assert "[y/N]" not in out + err and sys.stdin.read() == "y\n"  # never asked, stdin untouched
    assert not custom_code_model["marker"].exists()
    assert snapshot(tmp_path) == {}


# --------------------------------------------------------------------------- clear causes, exit 2
@pytest.fixture(scope="module")
def other_base_run(tiny_model, tmp_path_factory) -> Path:
    """A run whose adapter was trained on a narrower model (hidden 32 instead of 64)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = tmp_path_factory.mktemp("narrow")
    cfg = AutoConfig.from_pretrained(tiny_model)
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 32, 64, 8
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d / "narrow-base")
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, d / "narrow-base" / f.name)
    return make_run(d / "narrow-base", d / "narrow-run")


@pytest.mark.parametrize("script", ["eval_compare", "quick_infer"])
def test_adapter_of_another_base_model(script, other_base_run, tiny_model, ev, tmp_path, capsys):
    if script == "eval_compare":
        rc, _, err = run_ec(capsys, ["--adapter", other_base_run, "--base_model", tiny_model, "--questions",
                                     ev["questions"], "--out", tmp_path / "e.csv", "--max_new_tokens", "2"])
    else:
        rc, _, err = run_qi(capsys, ["--adapter", other_base_run, "--base_model", tiny_model, "--prompt", "Why?"])
    assert rc == 2 and f"the adapter {other_base_run} does not fit the base model {tiny_model}" in err
    assert "narrow-base" in err and "size" in err  # what it was trained on, and why it does not fit
    assert leftovers(tmp_path) == [] and not (tmp_path / "e.csv").exists()


@pytest.mark.parametrize("script", ["eval_compare", "quick_infer"])
def test_missing_local_base_model_is_not_found(script, ev, tmp_path, capsys):
    missing = tmp_path / "models" / "gone" / "tiny"
    argv = ["--adapter", ev["tiny_run"], "--base_model", missing]
    if script == "eval_compare":
        rc, _, err = run_ec(capsys, argv + ["--questions", ev["questions"], "--out", tmp_path / "e.csv"])
    else:
        rc, _, err = run_qi(capsys, argv + ["--prompt", "Why?"])
    assert rc == 2 and f"base model {missing} not found" in err and "repo id" not in err.lower()
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("case,message", [
    ("folder", "is a folder"),
    ("unreadable", "cannot read the questions file (Permission denied)"),
    ("empty", "no questions in the file"),
    ("latin1_csv", "not valid UTF-8"),
    ("lone_surrogate", "not valid Unicode"),
])
def test_bad_questions_file(case, message, ev, tmp_path, capsys, monkeypatch):
    q = tmp_path / "in" / ("q.csv" if case == "latin1_csv" else "q.jsonl")
    q.parent.mkdir()
    if case == "folder":
        q.mkdir()
    elif case == "unreadable":
        write_questions(q)
        real_open = builtins.open
        monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (_ for _ in ()).throw(
            PermissionError(errno.EACCES, "Permission denied", str(f))) if str(f) == str(q) else real_open(f, *a, **k))
    elif case == "empty":
        q.write_bytes(b"")
    elif case == "latin1_csv":
        q.write_bytes("question\nQu'est-ce que l'été ?\n".encode("latin-1"))
    else:
        q.write_text('{"question": "What is \\udcff?"}\n', encoding="utf-8")
    before = snapshot(tmp_path)
    rc, _, err = run_ec(capsys, ["--adapter", ev["tiny_run"], "--questions", q, "--out", tmp_path / "o" / "e.csv"])
    monkeypatch.undo()
    assert rc == 2 and message in err and str(q) in err
    assert snapshot(tmp_path) == before and not (tmp_path / "o").exists()


def test_questions_jsonl_with_a_bom_is_read(ev, tmp_path, capsys):
    q = tmp_path / "bom.jsonl"
    q.write_bytes(b"\xef\xbb\xbf" + ev["questions"].read_bytes())
    out = tmp_path / "res" / "evaluation.csv"
    rc, _, _ = run_ec(capsys, with_answers(ev, out, questions=q))
    assert rc == 0
    assert [r["id"] for r in read_csv(out)] == [x["id"] for x in QUESTIONS]
    assert [r["base_answer"] for r in read_csv(out)] == [r["base_answer"] for r in read_csv(ev["out"])]


def test_system_prompt_not_utf8(ev, tmp_path, capsys):
    rc, _, err = run_ec(capsys, ["--adapter", ev["tiny_run"], "--questions", ev["questions"], "--out",
                                 tmp_path / "e.csv", "--system", "Answer \udcff briefly."])
    assert rc == 2 and "--system holds bytes that are not UTF-8 (byte 0xff" in err
    assert snapshot(tmp_path) == {}


# --------------------------------------------------------------------------- long inputs
def test_too_long_question_is_skipped_flagged_and_counted(ev, tmp_path, capsys):
    long_q = {"id": "long1", "type": "factual", "question": "Why " + "quantization and adapters " * 1500 + "?",
              "reference": "x", "context": ""}
    q = write_questions(tmp_path / "q.jsonl", QUESTIONS + [long_q])
    out = tmp_path / "res" / "evaluation.csv"
    rc, printed, err = run_ec(capsys, with_answers(ev, out, questions=q))
    assert rc == 0 and "1 of 6 question(s) skipped" in err and "long1: too long: prompt" in err
    assert "> the model's 4096 positions" in err and "skipped (too long for the model): 1" in printed
    summary = json.loads(out.with_name("summary.json").read_text())
    assert summary["skipped_too_long"]["n"] == 1 and summary["skipped_too_long"]["ids"] == ["long1"]
    assert summary["n"] == len(QUESTIONS) and summary["by_type"]["all"]["n"] == len(QUESTIONS)
    rows = {r["id"]: r for r in read_csv(out)}
    assert rows["long1"]["skipped"].startswith("too long: prompt") and rows["long1"]["base_answer"] == ""
    assert rows["long1"]["base_score"] == "" and rows["f1"]["skipped"] == "" and rows["f1"]["base_score"] != ""
    assert len(rows["long1"]["question"]) < 2100  # capped in the sheet (spreadsheet cells hold 32,767 chars)
    assert "long1" not in {r["id"] for r in read_csv(out.with_name("evaluation_for_marking.csv"))}
    # --rescore keeps it skipped and counted
    assert run_ec(capsys, ["--rescore", out])[0] == 0
    assert json.loads(out.with_name("summary.json").read_text())["skipped_too_long"]["n"] == 1
    assert read_csv(out)[-1]["skipped"].startswith("too long")


def test_every_question_too_long_is_exit_2(ev, tmp_path, capsys):
    rc, _, err = run_ec(capsys, ["--adapter", ev["tiny_run"], "--questions", ev["questions"], "--out",
                                 tmp_path / "e.csv", "--max_new_tokens", "5000"])
    assert rc == 2 and "every question is too long" in err and "lower --max_new_tokens" in err
    assert leftovers(tmp_path) == [] and not (tmp_path / "e.csv").exists()


def pick_by_content(req, n):
    text = req["messages"][-1]["content"]
    a = text.split("\nAnswer A:\n", 1)[1].split("\n\nAnswer B:\n", 1)[0]
    b = text.split("\n\nAnswer B:\n", 1)[1]
    return Reply(content=json.dumps({"winner": "tie" if a == b else "A" if a > b else "B", "reason": "r"}))


def judge_args(server_url: str) -> list[str]:
    return ["--judge_model", "fake-model", "--judge_base_url", server_url, "--judge_rubric", "none",
            "--no-judge_claims"]  # the pairwise judge alone (the claims judge: tests/test_judge_claims.py)


def test_huge_context_is_capped_for_the_judge_and_copied_nowhere(ev, tmp_path, capsys, monkeypatch, openai_server):
    from paperqa_tune.evaluate import judge

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    huge = "The abstract goes on. " * 240_000  # 5.3 MB
    qs = [dict(x) for x in QUESTIONS]
    qs[0]["context"] = huge
    q = write_questions(tmp_path / "q.jsonl", qs)
    out = tmp_path / "res" / "evaluation.csv"
    openai_server.responder = pick_by_content
    rc, _, err = run_ec(capsys, with_answers(ev, out, questions=q) + judge_args(openai_server.base_url))
    assert rc == 0 and "1 question(s) have a context longer than 20,000 characters (f1)" in err
    sizes = [len(json.dumps(r)) for r in openai_server.requests]
    assert max(sizes) < judge.TEXT_LIMITS["context"] + 10_000
    assert any("truncated: the first 20,000 of 5,280,000 characters" in json.dumps(r) for r in openai_server.requests)
    assert sum(len(b) for b in snapshot(out.parent).values()) < 500_000  # the 5 MB went nowhere
    summary = json.loads(out.with_name("summary.json").read_text())
    assert summary["judge_stats"]["capped_for_judge"]["context"]["questions"] == 1


# --------------------------------------------------------------------------- judge failures
def test_judge_that_never_parses_is_marked_failed_and_exits_1(ev, tmp_path, capsys, monkeypatch, openai_server):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    openai_server.responder = lambda req, n: Reply(content="Both answers are fine, I suppose.")
    out = tmp_path / "res" / "evaluation.csv"
    rc, printed, err = run_ec(capsys, with_answers(ev, out) + judge_args(openai_server.base_url))
    assert rc == 1 and "the judge failed on EVERY call (pairwise" in err and "rerunning" in err
    assert "pairwise judge: FAILED on all 5 questions" in printed
    summary = json.loads(out.with_name("summary.json").read_text())
    pw = summary["judge"]["pairwise"]
    assert pw["status"] == "failed" and summary["judge"]["status"] == "failed" and "EVERY" in summary["judge"]["note"]
    assert pw["tie"] is None and pw["finetuned"] is None and pw["n"] == 0 and pw["failed"] == 5
    assert {r["judge_winner"] for r in read_csv(out)} == {"failed"}
    assert all("Both answers are fine" in r["judge_raw"] for r in read_csv(out))
    judged = [json.loads(x) for x in ec.output_paths(out)["cache"].read_text().splitlines()]
    assert not [r for r in judged if r.get("model") == "judge"]  # failures are not cached
    assert leftovers(out.parent) == []


def test_judge_http_500_is_a_failure_not_a_traceback(ev, tmp_path, capsys, monkeypatch, openai_server):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    openai_server.responder = lambda req, n: Reply(status=500, retry_after=0.01)
    out = tmp_path / "res" / "evaluation.csv"
    rc, _, err = run_ec(capsys, with_answers(ev, out) + judge_args(openai_server.base_url) + ["--n", "2"])
    assert rc == 1 and "EVERY call" in err
    rows = read_csv(out)
    assert {r["judge_winner"] for r in rows} == {"failed"} and all("500" in r["judge_reason"] for r in rows)
    assert openai_server.count == 2 * 2 * 5  # each call tried once and retried 4 times by the client


class EchoAuthServer:
    """Answers every request with 400 and an error body that echoes the Authorization header."""

    def __enter__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.dumps({"error": {"message": f"bad header {self.headers.get('Authorization')}",
                                             "type": "invalid_request_error"}}).encode()
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_judge_error_echoing_the_key_is_scrubbed_everywhere(ev, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "res" / "evaluation.csv"
    with EchoAuthServer() as srv:
        rc, printed, err = run_ec(capsys, with_answers(ev, out) + judge_args(srv.base_url) + ["--n", "2"])
    assert rc == 1
    assert all("BadRequestError" in r["judge_reason"] and "Bearer [api key removed]" in r["judge_raw"]
               for r in read_csv(out))
    for name, data in snapshot(tmp_path).items():
        assert KEY.encode() not in data, f"API key leaked into {name}"
    assert KEY not in printed + err


# --------------------------------------------------------------------------- quick_infer
def test_merge_out_disk_full_leaves_nothing_and_the_rerun_works(ev, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def full(self, folder, *a, **k):  # the weights are written, then the disk is full
        real(self, folder, *a, **k)
        raise ENOSPC

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "merged"
    rc, _, err = run_qi(capsys, ["--adapter", ev["tiny_run"], "--merge_out", out])
    assert rc == 1 and "No space left on device" in err and "nothing was written there" in err
    assert f"cannot write {out} (" in err and "free there" in err  # the folder, and the space left on its disk
    assert list(tmp_path.iterdir()) == []  # no half-written folder, no temp folder
    monkeypatch.undo()
    rc, _, err = run_qi(capsys, ["--adapter", ev["tiny_run"], "--merge_out", out])
    assert rc == 0 and (out / "merge_info.json").is_file() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


@pytest.mark.timeout(900)
def test_kill_9_at_every_write_of_merge_out_then_the_same_command_completes(ev, tmp_path, capsys):
    """quick_infer --merge_out killed (SIGKILL, a real process) before each of its writes in the output's folder:
    what is left is no merged model or a whole one (weights, config, merge_info), never a folder without weights;
    the same command then completes it (exit 0), or, finding it whole, asks for --overwrite."""
    import killpoints

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def argv(out: Path) -> list[str]:
        return ["--adapter", str(ev["tiny_run"]), "--merge_out", str(out)]

    clean = tmp_path / "clean" / "merged"
    done, events = killpoints.count(["quick_infer.py", *argv(clean)], cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    points = [k for k, (_, path) in enumerate(events, 1) if path.startswith(str(clean.parent))]
    assert len(points) >= 3 and events[points[-1] - 1][0] == "replace"  # the final rename among them
    whole = {"config.json", "model.safetensors", "merge_info.json"}
    for k in points:
        out = tmp_path / f"kill{k}" / "merged"
        proc = killpoints.run(["quick_infer.py", *argv(out)], kill_at=k, cwd=ROOT, env=env, timeout=300)
        assert proc.returncode == -signal.SIGKILL, (k, proc.stderr[-2000:])
        left = {p.name for p in out.iterdir()} if out.exists() else None
        assert left is None or whole <= left, (k, left)
        rc, _, err = run_qi(capsys, argv(out))
        assert (rc, "--overwrite" in err) == ((2, True) if left else (0, False)), (k, rc, err)
        assert whole <= {p.name for p in out.iterdir()}
        assert [p.name for p in out.parent.iterdir()] == ["merged"], k  # no temp folder left beside it


@pytest.mark.parametrize("case", ["the_run_folder", "a_folder_of_other_files"])
def test_merge_out_never_replaces_what_it_did_not_write(case, ev, tmp_path, capsys):
    if case == "the_run_folder":
        target = tmp_path / "run"
        shutil.copytree(ev["tiny_run"], target)
        argv = ["--adapter", target, "--merge_out", target, "--overwrite"]
        message = "is or holds the run folder"
    else:
        target = tmp_path / "notes"
        target.mkdir()
        (target / "thesis.tex").write_text("months of work")
        argv = ["--adapter", ev["tiny_run"], "--merge_out", target, "--overwrite"]
        message = "not a merged model written by quick_infer.py"
    before = snapshot(tmp_path)
    rc, _, err = run_qi(capsys, argv)
    assert rc == 2 and message in err
    assert snapshot(tmp_path) == before and len(list(tmp_path.iterdir())) == 1


def test_interactive_non_utf8_line_then_the_session_goes_on(ev, capsys, monkeypatch):
    script = b"caf\xe9 au lait?\n" + b"Why " + b"adapters " * 5000 + b"?\nWhy four bits?\n/quit\n"
    stdin = io.TextIOWrapper(io.BytesIO(script), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    asked = []
    real = qi.generate_batch
    monkeypatch.setattr(qi, "generate_batch", lambda m, tok, batch, *a: asked.append(tok.decode(batch[0])) or
                        real(m, tok, batch, *a))
    rc, out, err = run_qi(capsys, ["--adapter", ev["tiny_run"], "--max_new_tokens", "4"])
    assert rc == 0
    assert "that line is not valid UTF-8 (byte 0xe9 at character 3)" in out
    assert "the question is too long: prompt" in out and "> the model's 4096 positions" in out
    assert out.split("not valid UTF-8", 1)[1].count("[ft] > ") == 3  # the session went on to /quit
    assert len(asked) == 1 and "Why four bits?" in asked[0]  # the bad lines were not asked, the next one was



def test_quick_infer_prompt_too_long(ev, capsys):
    rc, out, err = run_qi(capsys, ["--adapter", ev["tiny_run"], "--prompt", "Why " + "adapters " * 5000])
    assert rc == 2 and "--prompt is too long: prompt" in err and "> the model's 4096 positions" in err
    assert out == ""
