"""Corrupt or foreign model files (issue 24): a bad safetensors header, a truncated shard, a config.json that is
not JSON or names a model transformers lacks, weights of other shapes than the config gives, a damaged tokenizer
or adapter file -- every script that loads a model exits 2 naming the file and what to do, with no traceback and
no output left behind. And a full disk while quick_infer --merge_out writes: exit 1 naming the folder and the
free space, nothing left behind, and the same command then works. Loading fails before any generation, so each
case takes well under a second on the tiny model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import eval_compare as ec
import generate_qa as gq
import quick_infer as qi
import train_qlora_hf as T
from test_eval_compare import make_run, write_questions

ROOT = Path(__file__).resolve().parent.parent
FIX = "re-download or re-convert the model"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory) -> Path:
    return make_run(tiny_model, tmp_path_factory.mktemp("mf-run") / "tiny-qlora")


@pytest.fixture(scope="module")
def qa_jsonl(tmp_path_factory) -> Path:
    from common import chat_record, qa_messages

    p = tmp_path_factory.mktemp("mf-data") / "qa.jsonl"
    rows = [chat_record(qa_messages(f"Question {i}?", f"Answer number {i}."), {"paper_id": f"p{i}"}) for i in range(8)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


# --------------------------------------------------------------------------- damage
def _edit_config(folder: Path, **change) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(change)
    (folder / "config.json").write_text(json.dumps(cfg))


def damage(folder: Path, case: str) -> tuple[Path, str]:
    """Damage a copy of a model (or run) folder; (the file the message must name, a phrase it must hold)."""
    w = folder / ("adapter_model.safetensors" if (folder / "adapter_config.json").is_file() else "model.safetensors")
    if case == "header":
        data = bytearray(w.read_bytes())
        data[:8] = b"\xff" * 8  # a header length no file has
        w.write_bytes(bytes(data))
        return w, "not a valid safetensors file"
    if case == "header_json":
        data = bytearray(w.read_bytes())
        data[8:20] = b"garbage!!!!!"
        w.write_bytes(bytes(data))
        return w, "not a valid safetensors file"
    if case == "truncated":
        data = w.read_bytes()
        w.write_bytes(data[:len(data) // 2])
        return w, "truncated"
    if case == "config_not_json":
        (folder / "config.json").write_text('{"model_type": "mistral", oops')
        return folder / "config.json", "not valid JSON"
    if case == "unknown_model_type":
        _edit_config(folder, model_type="nosuchmodel")
        return folder / "config.json", "transformers cannot build this model"
    if case == "wrong_shapes":
        _edit_config(folder, intermediate_size=96)  # the weights are 128 wide
        return folder, "do not have the shapes"
    if case == "tokenizer_not_json":
        (folder / "tokenizer.json").write_text('{"version": "1.0", "trunc')
        return folder / "tokenizer.json", "not valid JSON"
    raise ValueError(case)


def damaged_copy(src: Path, tmp_path: Path, case: str) -> tuple[Path, Path, str]:
    d = tmp_path / "in" / src.name
    shutil.copytree(src, d)
    return (d, *damage(d, case))


def _run(main, capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def script_argv(script: str, tmp_path: Path, tiny_run: Path, qa_jsonl: Path, model=None, run=None) -> list:
    """argv of `script` loading `model` (a base model) or `run` (a run folder), writing only under tmp_path/out."""
    out = tmp_path / "out"
    if script == "quick_infer":
        return ["--adapter", run or tiny_run, *(["--base_model", model] if model else []), "--prompt", "Why?",
                "--max_new_tokens", "2"]
    if script == "quick_infer_merge":
        return ["--adapter", run or tiny_run, *(["--base_model", model] if model else []), "--merge_out",
                out / "merged"]
    if script == "eval_compare":
        q = write_questions(tmp_path / "questions.jsonl")
        return ["--adapter", run or tiny_run, *(["--base_model", model] if model else []), "--questions", q,
                "--out", out / "evaluation.csv", "--max_new_tokens", "2"]
    if script == "generate_qa":
        return ["--backend", "hf", "--model", model, "--input", ROOT / "data" / "sample_abstracts.jsonl",
                "--out", out / "t.jsonl", "--max_papers", "1", "--max_tokens", "8"]
    if script == "train":
        return ["--jsonl", qa_jsonl, "--model", model, "--out", out / "run", "--max_steps", "1", "--val_fraction", "0"]
    raise ValueError(script)


MAINS = {"quick_infer": qi.main, "quick_infer_merge": qi.main, "eval_compare": ec.main, "generate_qa": gq.main,
         "train": T.main}


def check(script, case, src, tmp_path, capsys, tiny_run, qa_jsonl, fix=FIX, as_run=False):
    folder, named, phrase = damaged_copy(src, tmp_path, case)
    before = {p: p.read_bytes() for p in folder.iterdir()}
    argv = script_argv(script, tmp_path, tiny_run, qa_jsonl, **({"run": folder} if as_run else {"model": folder}))
    rc, err = _run(MAINS[script], capsys, argv)
    assert rc == 2, err
    assert str(named) in err and phrase in err and fix in err, err
    assert not (tmp_path / "out").exists()  # no output, no lock, no temp folder
    assert {p: p.read_bytes() for p in folder.iterdir()} == before  # the input is untouched


# --------------------------------------------------------------------------- a base model's files
BASE_SCRIPTS = ["quick_infer", "quick_infer_merge", "eval_compare", "generate_qa", "train"]


@pytest.mark.parametrize("script", BASE_SCRIPTS)
@pytest.mark.parametrize("case", ["header", "truncated"])
def test_corrupt_weights_exit_2_naming_the_file(script, case, tiny_model, tiny_run, qa_jsonl, tmp_path, capsys):
    check(script, case, tiny_model, tmp_path, capsys, tiny_run, qa_jsonl)


def test_header_that_is_not_json(tiny_model, tiny_run, qa_jsonl, tmp_path, capsys):
    check("quick_infer", "header_json", tiny_model, tmp_path, capsys, tiny_run, qa_jsonl)


@pytest.mark.parametrize("script", ["quick_infer", "eval_compare", "generate_qa"])
@pytest.mark.parametrize("case", ["config_not_json", "unknown_model_type"])
def test_foreign_or_broken_config_exit_2_naming_config_json(script, case, tiny_model, tiny_run, qa_jsonl, tmp_path,
                                                            capsys):
    check(script, case, tiny_model, tmp_path, capsys, tiny_run, qa_jsonl)


@pytest.mark.parametrize("script", ["quick_infer", "generate_qa", "train"])
def test_weights_of_other_shapes_than_the_config(script, tiny_model, tiny_run, qa_jsonl, tmp_path, capsys):
    """4-bit loading (quick_infer, train) would quantise them without a word; the dense load (generate_qa) raised
    a RuntimeError after printing its report."""
    check(script, "wrong_shapes", tiny_model, tmp_path, capsys, tiny_run, qa_jsonl)


@pytest.mark.parametrize("script", ["generate_qa", "train"])
def test_tokenizer_file_not_json(script, tiny_model, tiny_run, qa_jsonl, tmp_path, capsys):
    check(script, "tokenizer_not_json", tiny_model, tmp_path, capsys, tiny_run, qa_jsonl)


# --------------------------------------------------------------------------- a run folder's adapter
@pytest.mark.parametrize("script", ["quick_infer", "quick_infer_merge", "eval_compare"])
@pytest.mark.parametrize("case", ["header", "truncated"])
def test_corrupt_adapter_exit_2_naming_the_file(script, case, tiny_run, qa_jsonl, tmp_path, capsys):
    check(script, case, tiny_run, tmp_path, capsys, tiny_run, qa_jsonl, fix="copy the run folder again or rerun the "
          "training", as_run=True)


def test_runtime_errors_are_not_called_corrupt_files():
    """Out of memory while loading is the machine's problem, not the files': it passes through unchanged."""
    from paperqa_tune.loading import bad_model_files, model_file_errors

    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert bad_model_files("some/model", oom) is None
    with pytest.raises(RuntimeError, match="out of memory"), model_file_errors("some/model"):
        raise oom


# --------------------------------------------------------------------------- a full disk under --merge_out
def _safetensors_full(*a, **k):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_merge_out_disk_full_in_safetensors_exit_1_and_the_rerun_works(tiny_run, tmp_path, capsys, monkeypatch):
    """A full disk reaches save_pretrained as safetensors' SafetensorError, not an OSError (what its writer raises
    on ENOSPC): exit 1 naming the folder and the free space, no temp folder, and the same command then works."""
    import transformers.modeling_utils as mu

    monkeypatch.setattr(mu, "safe_save_file", _safetensors_full)
    out = tmp_path / "models" / "merged"
    argv = ["--adapter", tiny_run, "--merge_out", out]
    rc, err = _run(qi.main, capsys, argv)
    assert rc == 1, err
    assert f"cannot write {out}" in err and "free there" in err and "No space left on device" in err
    assert "nothing was written there" in err
    assert not out.exists() and list((tmp_path / "models").iterdir()) == []
    monkeypatch.undo()
    rc, err = _run(qi.main, capsys, argv)
    assert rc == 0, err
    assert (out / "model.safetensors").is_file() and (out / "merge_info.json").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["merged"]


def _mount_tiny_tmpfs(where: Path) -> str | None:
    """Mount a 200 KiB tmpfs at `where`; the reason it cannot be, else None."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return "mounting a tiny tmpfs needs root"
    where.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(where)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot mount a tmpfs here: {r.stderr.strip()}"


def test_merge_out_on_a_really_full_disk(tiny_run, tmp_path, capsys):
    """The real thing where the platform allows it: a 200 KiB filesystem the merged model (~400 KiB) fills."""
    disk = tmp_path / "disk"
    why = _mount_tiny_tmpfs(disk)
    if why:
        pytest.skip(reason=why)
    try:
        out = disk / "merged"
        rc, err = _run(qi.main, capsys, ["--adapter", tiny_run, "--merge_out", out])
        assert rc == 1, err
        assert f"cannot write {out}" in err and "No space left on device" in err and "free there" in err
        assert list(disk.iterdir()) == []  # no temp folder, no folder without weights
    finally:
        subprocess.run(["umount", str(disk)], check=False)
