"""Every script's --help in one style: each flag listed with what it does and its default, no issue numbers or
benchmark history, underscores only (generate_qa.py's old dashed spellings work but are not listed)."""
from __future__ import annotations

import re

import pytest

import eval_compare
import generate_qa
import quick_infer
import train_qlora_hf

FLAGS = {
    eval_compare: ("--adapter", "--base_model", "--questions", "--n", "--out", "--max_new_tokens", "--batch_size",
                   "--seed", "--do_sample", "--temperature", "--top_p", "--overwrite", "--judge_model",
                   "--judge_base_url", "--mode", "--compile", "--system", "--rescore", "--checkpoints",
                   "--f1_threshold", "--judge_rubric"),
    quick_infer: ("--adapter", "--base_model", "--prompt", "--answer_with", "--system", "--max_new_tokens",
                  "--temperature", "--top_p", "--seed", "--mode", "--merge_out", "--overwrite"),
    generate_qa: ("--input", "--arxiv_ids", "--backend", "--model", "--base_url", "--max_tokens", "--eval_out",
                  "--concurrency", "--timeout", "--edge_case_ratio", "--overwrite"),
    train_qlora_hf: ("--jsonl", "--model", "--out", "--epochs", "--batch", "--grad_accum", "--lr", "--bf16",
                     "--max_seq_len", "--gpu_mem_budget"),
}


@pytest.mark.parametrize("script", list(FLAGS), ids=lambda m: m.__name__)
def test_help_lists_every_flag_in_one_style(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in FLAGS[script]:
        assert re.search(rf"^\s+{flag}\b", out, re.M), flag
    listed = set(re.findall(r"^\s+(--[a-z][\w-]*)", out, re.M))
    assert not [f for f in listed if "-" in f[2:] and not f.startswith("--no-")], listed  # underscores only
    assert "issue" not in out.lower() and "tok/s" not in out  # history belongs in bench/README.md
    assert out.count("(default: (default") == 0 and "%(default)" not in out


@pytest.mark.parametrize("script,flag", [(eval_compare, "--temperature"), (eval_compare, "--f1_threshold"),
                                         (quick_infer, "--top_p"), (generate_qa, "--timeout"),
                                         (generate_qa, "--edge_case_ratio"), (train_qlora_hf, "--lr")],
                         ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_float_flags_are_refused_at_parse_time(script, flag, value, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be created: the folder must stay empty
    with pytest.raises(SystemExit) as e:
        script.main([f"{flag}={value}"])  # (argparse reads a bare -inf as a flag)
    assert e.value.code == 2
    assert f"argument {flag}: '{value}' is not a finite number" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
