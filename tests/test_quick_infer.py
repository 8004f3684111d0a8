"""quick_infer.py on the tiny model: one-shot answer, scripted interactive session, merged model export."""
from __future__ import annotations

import io
import json
import sys

import pytest

from paperqa_tune.generation import Decoding, generate_batch, prompt_ids, run_decoding
from paperqa_tune.loading import attach_adapter, load_run_base, merged_model, run_tokenizer
from paperqa_tune.runs import read_run
import quick_infer as qi
from numerics import assert_greedy_agrees, four_bit_dtype, logit_tolerance, teacher_forced_logits
from test_eval_compare import make_run

N = 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    return make_run(tiny_model, tmp_path_factory.mktemp("qi") / "tiny-qlora")


@pytest.fixture(scope="module")
def reference(tiny_run):
    """The reference path (4-bit + adapter) and a function giving its greedy answer to a question."""
    run = read_run(tiny_run)
    tok = run_tokenizer(run)
    model = attach_adapter(load_run_base(run), run.adapter)

    def answer(question: str, side: str = "ft", system: str = run.system_prompt, n: int = N):
        ids = prompt_ids(tok, question, system)
        dec = run_decoding(run, tok, None, max_new_tokens=n)  # quick_infer's defaults: the penalty, the stops
        if side == "base":
            with model.disable_adapter():
                return generate_batch(model, tok, [ids], dec)[0]
        return generate_batch(model, tok, [ids], dec)[0]

    return {"run": run, "tok": tok, "model": model, "answer": answer}


def test_one_shot_both(tiny_run, reference, capsys):
    q = "What does the paper propose?"
    assert qi.main(["--adapter", str(tiny_run), "--prompt", q, "--answer_with", "both", "--max_new_tokens", str(N)]) == 0
    out = capsys.readouterr().out
    base, ft = out.split("--- fine-tuned ---")
    assert base.startswith("--- base ---")
    assert base.split("--- base ---", 1)[1].strip() == reference["answer"](q, "base")[0]
    assert ft.strip() == reference["answer"](q, "ft")[0]
    assert reference["answer"](q, "base")[0] != reference["answer"](q, "ft")[0]


def test_interactive_session(tiny_run, reference, capsys, monkeypatch):
    script = ("What is QLoRA?\n/base\nWhat is QLoRA?\n/both\nWhy four bits?\n/system Answer in one word.\n/ft\n"
              "Why four bits?\n/nonsense\n\n/quit\nnever asked\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert qi.main(["--adapter", str(tiny_run), "--max_new_tokens", str(N)]) == 0
    out = capsys.readouterr().out
    ans = reference["answer"]
    expected = [
        qi.HELP,
        "[ft] > " + ans("What is QLoRA?")[0],
        "[ft] > now answering: base",
        "[base] > " + ans("What is QLoRA?", "base")[0],
        "[base] > now answering: both",
        "[both] > --- base ---", ans("Why four bits?", "base")[0], "--- fine-tuned ---", ans("Why four bits?")[0],
        "[both] > system prompt set",
        "[both] > now answering: ft",
        "[ft] > " + ans("Why four bits?", system="Answer in one word.")[0],
        "[ft] > " + qi.HELP,
    ]
    squash = lambda text: " ".join(text.split())  # noqa: E731 - streamed text keeps the model's leading space
    assert squash(out).startswith(squash("\n".join(expected)))
    assert "never asked" not in out and "[ft] > [ft] > " in out  # the empty line was skipped, /quit ended it


def test_interactive_ends_on_eof(tiny_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/both\n"))
    assert qi.main(["--adapter", str(tiny_run), "--max_new_tokens", "2"]) == 0
    assert "now answering: both" in capsys.readouterr().out


@pytest.mark.numerics
def test_merge_out_loads_in_plain_transformers(tiny_run, reference, tmp_path, capsys):
    """bf16 run: the merged checkpoint is a plain bf16 model (no quantization_config) that reproduces the
    in-memory fast path bit for bit and the adapter path within the logit tolerance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert qi.main(["--adapter", str(tiny_run), "--merge_out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    assert json.loads((out / "merge_info.json").read_text())["adapter_sha256"] == reference["run"].adapter_sha
    from common import output_mode

    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {f.name: output_mode() for f in out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert merged.dtype == torch.bfloat16 and tok.chat_template
    assert not any("lora" in n for n, _ in merged.named_parameters())

    q = "What does the paper propose?"
    ids = prompt_ids(tok, q, reference["run"].system_prompt)
    assert ids == prompt_ids(reference["tok"], q, reference["run"].system_prompt)  # same template
    in_memory = merged_model(reference["run"])
    device = next(in_memory.parameters()).device
    merged.to(device)  # the same weights through the same kernels on the same shapes: bit for bit
    with torch.no_grad():
        a = merged(input_ids=torch.tensor([ids], device=device)).logits
        b = in_memory(input_ids=torch.tensor([ids], device=device)).logits
    assert torch.equal(a, b)
    _, _, ref_ids = reference["answer"](q, n=12)
    ref_logits = teacher_forced_logits(reference["model"], ids, ref_ids)
    tol = logit_tolerance(merged, torch.bfloat16, ref_logits.abs().max().item())  # another kernel: its rounding
    assert (teacher_forced_logits(merged, ids, ref_ids) - ref_logits).abs().max().item() <= tol

    assert qi.main(["--adapter", str(tiny_run), "--merge_out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.numerics
def test_merged_greedy_matches_adapter_path_fp32(tiny_model, tmp_path):
    """fp32 run (the merge is exact to float rounding): the saved merged model's logits are the adapter path's
    within fp32's kernel tolerance, and its greedy output is the adapter path's token for token except where the
    adapter path itself nearly tied (merged W + BA and W then BA are different arithmetic)."""
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = make_run(tiny_model, tmp_path / "fp32-run", bf16=False)
    assert qi.main(["--adapter", str(run_dir), "--merge_out", str(tmp_path / "m")]) == 0
    run = read_run(run_dir)
    tok = run_tokenizer(run)
    adapter_path = attach_adapter(load_run_base(run), run.adapter)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    prompts = [prompt_ids(tok, q, run.system_prompt) for q in ("What is proposed?", "Why four bits?")]
    dec = Decoding(max_new_tokens=12)
    ours = [generate_batch(merged, tok, [p], dec)[0][2] for p in prompts]
    ref = [generate_batch(adapter_path, tok, [p], dec)[0][2] for p in prompts]
    ref_logits = [teacher_forced_logits(adapter_path, p, r) for p, r in zip(prompts, ref)]
    scale = max(x.abs().max().item() for x in ref_logits)
    tol = logit_tolerance(merged, four_bit_dtype(adapter_path, torch.float32), scale)
    for p, r, rl in zip(prompts, ref, ref_logits):
        assert (teacher_forced_logits(merged, p, r) - rl).abs().max().item() <= tol
    assert_greedy_agrees(adapter_path, prompts, ours, ref, tol)


def test_bad_inputs_exit_2(tmp_path, tiny_run, capsys):
    assert qi.main(["--adapter", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "adapter folder not found" in capsys.readouterr().err
    assert qi.main(["--adapter", str(tiny_run), "--prompt", "  "]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    assert qi.main(["--adapter", str(tiny_run), "--temperature", "-1"]) == 2


def test_old_model_flag_still_works_with_a_warning(capsys):
    assert qi.build_parser().parse_args(["--model", "base"]).answer_with == "base"
    assert "--model is deprecated; use --answer_with" in capsys.readouterr().err
    assert qi.build_parser().parse_args([]).answer_with == "ft"
    with pytest.raises(SystemExit):
        qi.build_parser().parse_args(["--model", "nobody"])
