"""Evaluation of a real training run on the tiny model: the seed's own workflow (flat `text` lines with a
custom system prompt, no generate_qa.py), one system prompt from training to evaluation and inference at
token level, learning curves over checkpoints, and the rubric judge through eval_compare.main."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import eval_compare as ec
from paperqa_tune.train import chats as C
from paperqa_tune.generation import prompt_ids
from paperqa_tune.loading import run_tokenizer
from paperqa_tune.runs import read_run
import quick_infer
import train_qlora_hf as T
from fake_openai import Reply

SEED_SYSTEM = "You are a helpful academic Q&A assistant specialized in scholarly content."
TOPICS = ["sparse attention", "retrieval augmentation", "low-rank adapters", "curriculum learning", "distillation",
          "contrastive pretraining", "speculative decoding", "mixture of experts", "quantisation", "prompt tuning"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def seed_data(tmp_path_factory) -> Path:
    """The seed's flat form: <|system|>...<|user|>...<|assistant|>... on one line, no meta, no questions file."""
    path = tmp_path_factory.mktemp("seed") / "my_qa.jsonl"
    lines = []
    for i in range(48):
        topic = TOPICS[i % len(TOPICS)]
        q = f"What does paper {i} say about {topic}?"
        a = f"Paper {i} reports that {topic} reduces the cost of training by {i + 2} percent."
        lines.append(json.dumps({"text": f"<|system|>{SEED_SYSTEM}<|user|>{q}<|assistant|>{a}"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def seed_run(tiny_model, seed_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "seed-run"
    assert T.main(["--jsonl", str(seed_data), "--model", str(tiny_model), "--out", str(out), "--no-bf16",
                   "--batch", "4", "--grad_accum", "1", "--lr", "2e-3", "--max_steps", "6", "--save_steps", "2",
                   "--save_total_limit", "10", "--keep_checkpoints", "--logging_steps", "1000"]) == 0
    return out


def test_seed_workflow_holds_out_questions_and_evaluates_them(seed_run, tmp_path, capsys):
    cfg = json.loads((seed_run / "run_config.json").read_text())
    assert cfg["system_prompt"] == SEED_SYSTEM and cfg["system_prompts"] == [{"prompt": SEED_SYSTEM, "count": 48}]
    held = [json.loads(line) for line in (seed_run / "eval_questions.jsonl").read_text().splitlines()]
    assert len(held) >= 10 and cfg["n_val"] == len(held)  # at least the seed's 10 questions
    assert all(h["system"] == SEED_SYSTEM and h["question"].startswith("What does paper") for h in held)

    capsys.readouterr()
    out = tmp_path / "outputs" / "evaluation.csv"
    assert ec.main(["--adapter", str(seed_run), "--out", str(out), "--max_new_tokens", "6"]) == 0  # no --questions
    printed = capsys.readouterr().out
    assert f"{seed_run / 'eval_questions.jsonl'} (samples train_qlora_hf.py held out" in printed
    summary = json.loads((tmp_path / "outputs" / "summary.json").read_text())
    assert summary["n"] == len(held) and summary["system_prompt"] == SEED_SYSTEM
    assert summary["system_prompts_used"] == [{"prompt": SEED_SYSTEM, "questions": len(held)}]


def test_one_system_prompt_token_for_token(seed_run, seed_data, monkeypatch, capsys):
    """The prompt evaluation and inference send is exactly the prefix training computed its labels after."""
    tok = run_tokenizer(read_run(seed_run))
    chats = C.load_chats(seed_data)
    q = chats[0]["messages"][1]["content"]
    train_ids = C.tokenize_chat(tok, chats[0]["messages"], 4096)
    prompt_len = next(i for i, lab in enumerate(train_ids["labels"]) if lab != T.IGNORE)
    run = read_run(seed_run)
    held = ec.read_questions(seed_run / "eval_questions.jsonl")
    eval_ids = prompt_ids(tok, q, ec.system_for({**held[0], "question": q}, run, None))
    assert eval_ids == train_ids["input_ids"][:prompt_len]
    assert SEED_SYSTEM in tok.decode(eval_ids)

    seen = []
    real = quick_infer.generate_batch
    monkeypatch.setattr(quick_infer, "generate_batch",
                        lambda model, tok, batch, *a: seen.append(batch[0]) or real(model, tok, batch, *a))
    assert quick_infer.main(["--adapter", str(seed_run), "--prompt", q, "--max_new_tokens", "2"]) == 0
    assert seen == [eval_ids]
    assert f"system prompt: {SEED_SYSTEM}" in capsys.readouterr().err

    # --system overrides, '' means no system turn at all
    seen.clear()
    assert quick_infer.main(["--adapter", str(seed_run), "--prompt", q, "--max_new_tokens", "2", "--system", ""]) == 0
    assert SEED_SYSTEM not in tok.decode(seen[0]) and "<|system|>" not in tok.decode(seen[0])


def test_question_row_system_and_override(seed_run, tmp_path):
    run = read_run(seed_run)
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question": "a?", "system": "Row prompt."}) + "\n"
                     + json.dumps({"question": "b?"}) + "\n" + json.dumps({"question": "c?", "system": None}) + "\n")
    qs = ec.read_questions(qfile)
    assert [ec.system_for(q, run, None) for q in qs] == ["Row prompt.", SEED_SYSTEM, None]
    assert [ec.system_for(q, run, "Flag.") for q in qs] == ["Flag."] * 3


def test_learning_curve_over_checkpoints(seed_run, tmp_path, capsys):
    out = tmp_path / "curve" / "evaluation.csv"
    assert ec.main(["--adapter", str(seed_run), "--out", str(out), "--max_new_tokens", "4", "--n", "4",
                    "--checkpoints"]) == 0
    with open(out.with_name("learning_curve.csv"), encoding="utf-8-sig", newline="") as f:
        points = list(csv.DictReader(f))
    assert [p["step"] for p in points] == ["0", "2", "4", "6"]
    assert [p["label"] for p in points] == ["base", "step-2", "step-4", "finetuned"]
    assert all(p["mean_score"] != "" and p["correct_rate"] != "" for p in points)
    assert points[1]["train_loss"] != ""  # losses of the run at that step, from metrics.json
    assert out.with_name("learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    # the final point is the evaluation itself
    summary = json.loads(out.with_name("summary.json").read_text())
    assert float(points[-1]["mean_score"]) == pytest.approx(summary["by_type"]["all"]["finetuned"]["mean_score"])
    # per evaluation set (the run's held-out samples are the unseen set), and the checkpoints' answers kept
    assert all(p["unseen_n"] == "4" and p["unseen_hallucination_rate"] != "" for p in points)
    kept = [json.loads(line) for line in out.with_name("learning_curve_answers.jsonl").read_text().splitlines()]
    assert [(k["label"], k["step"]) for k in kept] == [("step-2", 2), ("step-4", 4), ("finetuned", 6)]
    assert all(len(k["answers"]) == 4 for k in kept)
    # rerun: every answer is cached, nothing is generated again
    capsys.readouterr()
    assert ec.main(["--adapter", str(seed_run), "--out", str(out), "--max_new_tokens", "4", "--n", "4",
                    "--checkpoints", "--overwrite"]) == 0
    assert "generation:" not in capsys.readouterr().out
    # --rescore draws the same curve from the saved answers, in place and into another folder (answers carried)
    before = out.with_name("learning_curve.csv").read_text(encoding="utf-8-sig")
    assert ec.main(["--rescore", str(out)]) == 0
    assert out.with_name("learning_curve.csv").read_text(encoding="utf-8-sig") == before
    other = tmp_path / "again" / "evaluation.csv"
    assert ec.main(["--rescore", str(out), "--out", str(other)]) == 0
    assert other.with_name("learning_curve.csv").read_text(encoding="utf-8-sig") == before
    assert other.with_name("learning_curve_answers.jsonl").read_text() == out.with_name(
        "learning_curve_answers.jsonl").read_text()
    # answers that do not cover the CSV's questions: a clear error, nothing rewritten
    out.with_name("learning_curve_answers.jsonl").write_text(json.dumps(
        {"label": "step-2", "step": 2, "answers": {"nope": "x"}}) + "\n")
    capsys.readouterr()
    assert ec.main(["--rescore", str(out)]) == 2
    assert "learning_curve_answers.jsonl: no answers of step-2" in capsys.readouterr().err
    assert out.with_name("learning_curve.csv").read_text(encoding="utf-8-sig") == before


def test_checkpoints_missing_is_a_clear_error(seed_run, tmp_path, capsys):
    assert ec.main(["--adapter", str(seed_run), "--out", str(tmp_path / "e.csv"), "--checkpoints",
                    str(tmp_path / "nope")]) == 2
    assert "no adapter_model.safetensors" in capsys.readouterr().err


def test_rubric_judge_and_failures(seed_run, tmp_path, openai_server, monkeypatch):
    """Rubric scores land per side; a garbage reply is a recorded failure (raw kept), never a score or a
    tie, and is asked again on the next run."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-rubric-1")
    state = {"garbage": True, "rubric_calls": 0}

    def reply(req, n):
        user = req["messages"][-1]["content"]
        if "Answer A:" in user:
            return Reply(content=json.dumps({"winner": "tie", "reason": "same"}))
        state["rubric_calls"] += 1
        if state["garbage"] and state["rubric_calls"] % 3 == 1:
            return Reply(content="I think it is quite good overall!")
        scores = {c: 4 for c in ("correctness", "grounding", "terminology", "edge_cases")}
        return Reply(content=json.dumps({"scores": scores, "reason": "fine"}))

    openai_server.responder = reply
    out = tmp_path / "j" / "evaluation.csv"
    argv = ["--adapter", str(seed_run), "--out", str(out), "--max_new_tokens", "4", "--n", "5",
            "--judge_model", "fake-model", "--judge_base_url", openai_server.base_url,
            "--no-judge_claims"]  # rubric and pairwise only (the claims judge: tests/test_judge_claims.py)
    assert ec.main(argv) == 0
    with open(out, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    statuses = [r[f"{s}_rubric_status"] for r in rows for s in ("base", "finetuned")]
    assert "ok" in statuses and any(s.startswith("failed") for s in statuses)
    for r in rows:
        for s in ("base", "finetuned"):
            if r[f"{s}_rubric_status"] == "ok":
                assert r[f"{s}_rubric_correctness"] == "4" and r[f"{s}_rubric_raw"] == ""
            else:
                assert r[f"{s}_rubric_correctness"] == "" and "quite good" in r[f"{s}_rubric_raw"]
    summary = json.loads(out.with_name("summary.json").read_text())
    assert summary["judge"]["rubric"]["failed"] == sum(s != "ok" for s in statuses) > 0
    n_before = openai_server.count
    state["garbage"] = False
    assert ec.main(argv + ["--overwrite"]) == 0
    assert openai_server.count - n_before == sum(s != "ok" for s in statuses)  # only the failures asked again
    with open(out, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r[f"{s}_rubric_status"] for r in rows for s in ("base", "finetuned")} == {"ok"}
    # with the rubric, correctness of answerable questions is the judge's (4 of 5 -> 0.75)
    # (an answer asserting a specific the source does not support scores below 0 whatever the judge says)
    assert {r["finetuned_score"] for r in rows if r["finetuned_behaviour"] == "answered"
            and r["finetuned_hallucinated"] == "0"} <= {"0.75"}
    assert all(float(r["finetuned_score"]) < 0 for r in rows if r["finetuned_hallucinated"] == "1")
    for p in out.parent.iterdir():
        assert b"sk-test-secret-rubric-1" not in p.read_bytes()
