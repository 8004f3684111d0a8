"""Adversarial cases for train_qlora_hf.py (issue 11): each asserts the exit code, the message and what the run
folder holds afterwards. Tiny model, real bitsandbytes 4-bit on CPU, fp32; failures are injected through the
script's own seams (train's on_step, the save functions) or by writing bad files, and one run is killed with
SIGKILL in a subprocess.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_qlora_hf as T
from common import chat_record, qa_messages
from paperqa_tune.train import chats as C
from paperqa_tune import checkpoints, runs
from paperqa_tune.checkpoints import list_checkpoints
from paperqa_tune.runs import STAGE_DIR, lock_path, read_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny model: threads only cost (see conftest)
ROOT = Path(__file__).resolve().parent.parent
QA = [(f"What does paper {i} measure?", f"It measures quantity number {i} in the lab.") for i in range(8)]
# 8 samples, 2 per step: 6 steps over two epochs, a checkpoint after each; fp32 (exact resume), no validation
FLAGS = ["--max_steps", 6, "--batch", 2, "--grad_accum", 1, "--lr", "1e-3", "--val_fraction", 0, "--save_steps", 1,
         "--save_total_limit", 3, "--no-bf16", "--logging_steps", 1000]


# --------------------------------------------------------------------------- helpers and shared runs
def write_jsonl(path: Path, rows, prefix: bytes = b"") -> Path:
    path.write_bytes(prefix + "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode())
    return path


def run(data, model, out, *flags) -> int:
    return T.main(["--jsonl", str(data), "--model", str(model), "--out", str(out), *map(str, flags)])


def interrupted(data, model, out, at: int, *flags) -> int:
    """A run stopped as a kill would stop it, right after optimizer step `at` (before that step's checkpoint)."""
    real = T.train

    def train(*a, **kw):
        def on_step(step, *_):
            if step == at:
                raise KeyboardInterrupt
        return real(*a, **{**kw, "on_step": on_step})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "train", train)
        return run(data, model, out, *flags)


def snapshot(folder: Path) -> dict:
    """sha256 of every file under `folder` by relative path, a staged --overwrite run (.overwrite/) aside."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and STAGE_DIR not in p.relative_to(folder).parts}


def losses(out) -> list[float]:
    return [r["loss"] for r in json.loads((Path(out) / "metrics.json").read_text())["train"]]


def adapter(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "adapter_model.safetensors"))


def same_adapter(a, b, atol=1e-5) -> bool:
    x, y = adapter(a), adapter(b)
    return x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=atol) for k in x)


def no_traceback(err: str) -> bool:
    return "Traceback" not in err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    return write_jsonl(path, [chat_record(qa_messages(q, a), {"paper_id": f"p{i}"}) for i, (q, a) in enumerate(QA)])


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(tiny_model, data, runs_dir) -> Path:
    """The uninterrupted run every resumed one must reproduce."""
    out = runs_dir / "reference"
    assert run(data, tiny_model, out, *FLAGS) == 0
    return out


@pytest.fixture(scope="module")
def unfinished(tiny_model, data, runs_dir) -> Path:
    """A run stopped after step 4: checkpoints step-1..3 (3 kept), no adapter."""
    out = runs_dir / "unfinished"
    assert interrupted(data, tiny_model, out, 4, *FLAGS) == 130
    assert [p.name for p in list_checkpoints(out)] == ["step-1", "step-2", "step-3"]
    return out


@pytest.fixture
def copy_of(tmp_path):
    def copy(src: Path, name="run") -> Path:
        return Path(shutil.copytree(src, tmp_path / name))
    return copy


# --------------------------------------------------------------------------- 1. --overwrite never destroys first
def test_overwrite_with_a_missing_model_keeps_the_finished_run(reference, data, copy_of, capsys):
    out = copy_of(reference)
    before = snapshot(out)
    assert run(data, "/nonexistent/model", out, *FLAGS, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "/nonexistent/model" in err and no_traceback(err)
    assert snapshot(out) == before  # byte for byte, adapter included
    assert not (out / STAGE_DIR).exists() and not lock_path(out).exists()
    assert json.loads((out / "metrics.json").read_text())["finished"]
    assert read_run(out).adapter_sha == hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert run(data, reference, out, *FLAGS) == 2  # still a finished run: refused without --overwrite
    assert "holds a finished run" in capsys.readouterr().err


@pytest.mark.numerics
def test_killed_overwrite_keeps_the_old_run_and_resume_completes_it(reference, tiny_model, data, copy_of, capsys):
    out = copy_of(reference)
    before = snapshot(out)
    new = ["--seed", 7]  # another run: another adapter
    # a lock left by a killed run (its process is gone) is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(out).write_text(f"{dead.pid}\n")
    assert interrupted(data, tiny_model, out, 3, *FLAGS, *new, "--overwrite") == 130
    assert snapshot(out) == before  # the finished run, untouched
    assert [p.name for p in list_checkpoints(out / STAGE_DIR)] == ["step-1", "step-2"]
    capsys.readouterr()
    assert run(data, tiny_model, out, *FLAGS, *new) == 2
    assert "--resume continues it" in capsys.readouterr().err
    assert snapshot(out) == before

    assert run(data, tiny_model, out, *FLAGS, *new, "--resume") == 0
    assert not (out / STAGE_DIR).exists() and not (out / "checkpoints").exists() and not lock_path(out).exists()
    cfg = json.loads((out / "run_config.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    assert cfg["args"]["seed"] == 7 and m["finished"] and m["resumed_from_step"] == 2
    assert not same_adapter(out, reference, atol=0)
    assert adapter(out).keys() == adapter(reference).keys()


def test_commit_cut_short_is_finished_by_the_next_run(reference, data, copy_of, capsys):
    """A kill in the middle of the swap: the next run on the folder finishes it; never a mix of two runs."""
    out = copy_of(reference, "run")
    stage = out / STAGE_DIR
    shutil.copytree(reference, stage)
    (stage / "adapter_model.safetensors").write_bytes(b"new weights")
    (stage / "run_config.json").write_text('{"base_model": "new"}')
    (stage / "metrics.json").unlink()  # the new run has none: the old one must go too
    want = snapshot(stage)
    calls = []
    real_replace = os.replace

    def killed_after_two(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs.os, "replace", killed_after_two)
        with pytest.raises(KeyboardInterrupt):
            runs.commit_staged(out)
    assert not (out / "adapter_model.safetensors").exists()  # not finished while half swapped
    assert run(data, reference, out, *FLAGS) == 2  # any run on the folder finishes the swap first
    assert "finished replacing" in capsys.readouterr().out
    assert snapshot(out) == want and not stage.exists()


# --------------------------------------------------------------------------- 2. disk full while saving
def enospc(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def _adapter_save_fails(mp):
    """The final adapter's weights fail half-written with a full disk; checkpoints save as usual."""
    from peft import PeftModel

    real_sp = PeftModel.save_pretrained

    def final_fails(self, path, *a, **kw):
        if Path(path).name == ".adapter.tmp":
            Path(path).mkdir()
            (Path(path) / "adapter_model.safetensors").write_bytes(b"half")
            enospc()
        return real_sp(self, path, *a, **kw)
    mp.setattr(PeftModel, "save_pretrained", final_fails)


@pytest.mark.parametrize("where", ["checkpoint", "torch.save", "metrics", "adapter"])
def test_disk_full_is_exit_1_and_resume_completes(where, tiny_model, data, tmp_path, capsys):
    out, flags = tmp_path / "run", [*FLAGS, "--max_steps", 3]
    real_save, real_json = torch.save, runs.write_json_atomic
    calls = []

    def second_checkpoint(*a, **kw):  # the first checkpoint is written, the second one fails
        calls.append(1)
        if len(calls) == 2:
            if where == "torch.save":  # what torch.save really raises on a full disk
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
            enospc()
        return real_save(*a, **kw)

    def metrics_on_step_2(path, obj):
        if Path(path).name == "metrics.json" and obj.get("steps") == 2:
            enospc()
        return real_json(path, obj)

    with pytest.MonkeyPatch.context() as mp:
        if where in ("checkpoint", "torch.save"):
            mp.setattr(checkpoints.torch, "save", second_checkpoint)
        elif where == "metrics":
            mp.setattr(runs, "write_json_atomic", metrics_on_step_2)
        else:
            _adapter_save_fails(mp)
        assert run(data, tiny_model, out, *flags) == 1
    err = capsys.readouterr().err
    named = {"checkpoint": "checkpoints/step-2", "torch.save": "checkpoints/step-2", "metrics": "metrics.json",
             "adapter": "adapter_model.safetensors"}[where]
    assert named in err and "free space" in err and no_traceback(err), err
    assert not (out / "adapter_model.safetensors").exists()
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob(".step-*"))  # nothing half-written left
    assert not lock_path(out).exists()
    assert run(data, tiny_model, out, *flags, "--resume") == 0  # the rerun is not refused
    m = json.loads((out / "metrics.json").read_text())
    assert m["finished"] and m["steps"] == 3 and m["resumed_from_step"] == {"metrics": 2, "adapter": 2}.get(where, 1)


# --------------------------------------------------------------------------- 3. one run per folder
def test_second_run_on_a_locked_folder_is_refused(reference, data, copy_of, capsys):
    out = copy_of(reference)
    before = snapshot(out)
    lock = lock_path(out)
    lock.write_text(f"{os.getppid()}\n")  # a live process holds it
    assert run(data, reference, out, *FLAGS, "--overwrite") == 2
    err = capsys.readouterr().err
    assert str(lock) in err and f"process {os.getppid()}" in err and no_traceback(err)
    assert lock.read_text() == f"{os.getppid()}\n" and snapshot(out) == before


# --------------------------------------------------------------------------- 4. --resume checks its flags
@pytest.mark.parametrize("change, named", [
    (["--lr", "2e-3"], "--lr 0.001 -> 0.002"),
    (["--lora_r", "8", "--lora_alpha", "16"], "--lora_r 16 -> 8; --lora_alpha 32 -> 16.0"),
    (["--bf16"], "precision (--bf16/--fp16/--no-bf16) float32 -> bfloat16"),
    (["--target_modules", "q_proj,v_proj", "--max_seq_len", "512"], "--target_modules all-linear -> q_proj,v_proj"),
    (["--seed", "3"], "--seed 42 -> 3"),
])
def test_resume_refuses_flags_that_change_the_run(change, named, unfinished, tiny_model, data, copy_of, capsys):
    out = copy_of(unfinished)
    before = snapshot(out)
    assert run(data, tiny_model, out, *FLAGS, *change, "--resume") == 2  # before the model is loaded
    err = capsys.readouterr().err
    assert named in err and "step-3" in err and "--overwrite" in err and no_traceback(err), err
    assert snapshot(out) == before


def test_resume_refuses_changed_data(unfinished, data, tiny_model, copy_of, tmp_path, capsys):
    out = copy_of(unfinished)
    other = write_jsonl(tmp_path / "qa.jsonl", data.read_text().splitlines()[::-1])
    assert run(other, tiny_model, out, *FLAGS, "--resume") == 2
    assert "--jsonl content (sha256)" in capsys.readouterr().err


def test_resume_allows_logging_and_checkpoint_flags_with_the_same_updates(reference, unfinished, tiny_model, data,
                                                                          copy_of, capsys):
    out = copy_of(unfinished)
    allowed = ["--logging_steps", 1, "--save_steps", 2, "--save_total_limit", 5, "--no-gradient_checkpointing"]
    assert run(data, tiny_model, out, *FLAGS, *allowed, "--resume") == 0
    log = capsys.readouterr().out
    assert "--logging_steps 1000 -> 1" in log and "--save_steps 1 -> 2" in log and "the same updates" in log
    assert losses(out) == pytest.approx(losses(reference), abs=1e-5)
    assert same_adapter(out, reference)


def test_old_checkpoint_without_flags_resumes_with_a_note(reference, unfinished, tiny_model, data, copy_of, capsys):
    out = copy_of(unfinished)
    for ck in list_checkpoints(out):
        state = json.loads((ck / "trainer_state.json").read_text())
        del state["flags"]
        (ck / "trainer_state.json").write_text(json.dumps(state))
    assert run(data, tiny_model, out, *FLAGS, "--resume") == 0
    assert "records no flags" in capsys.readouterr().out
    assert losses(out) == pytest.approx(losses(reference), abs=1e-5)


# --------------------------------------------------------------------------- 5. corrupt checkpoint files
class WritesAFile:
    """A pickle that creates `path` when unpickled (what a crafted checkpoint would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


def _corrupt(ck: Path, how: str, tmp_path: Path) -> str:
    """Damage checkpoint `ck`; return the file name the message must name."""
    if how == "state not JSON":
        (ck / "trainer_state.json").write_text('{"step": 3, "micro"')
        return "trainer_state.json"
    if how == "state without micro":  # valid JSON with step and fingerprint, but not the loop's state
        state = json.loads((ck / "trainer_state.json").read_text())
        del state["micro"]
        (ck / "trainer_state.json").write_text(json.dumps(state))
        return "trainer_state.json"
    if how == "state truncated":
        (ck / "training_state.pt").write_bytes((ck / "training_state.pt").read_bytes()[:300])
        return "training_state.pt"
    if how == "state garbage":
        (ck / "training_state.pt").write_bytes(os.urandom(2000))
        return "training_state.pt"
    if how == "crafted pickle":
        torch.save({"optimizer": WritesAFile(tmp_path / "PWNED"), "scheduler": {}}, ck / "training_state.pt")
        return "training_state.pt"
    if how == "adapter garbage":
        (ck / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + os.urandom(64))
        return "adapter_model.safetensors"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["state not JSON", "state without micro", "state truncated", "state garbage",
                                 "crafted pickle", "adapter garbage"])
def test_corrupt_checkpoint_is_exit_2_naming_the_file(how, unfinished, tiny_model, data, copy_of, tmp_path, capsys):
    out = copy_of(unfinished)
    ck = out / "checkpoints" / "step-3"
    name = _corrupt(ck, how, tmp_path)
    before = snapshot(out)
    assert run(data, tiny_model, out, *FLAGS, "--resume") == 2  # found before the model is loaded
    err = capsys.readouterr().err
    assert f"{ck / name}" in err and f"delete {ck} to resume from step-2" in err and "--overwrite" in err, err
    assert no_traceback(err)
    assert not (tmp_path / "PWNED").exists()  # the pickle never ran
    assert snapshot(out) == before


def test_crafted_pickle_would_run_without_weights_only(tmp_path):
    """The payload above is real: plain pickle runs it (so the test before means weights_only stopped it)."""
    pickle.loads(pickle.dumps(WritesAFile(tmp_path / "ran")))
    assert (tmp_path / "ran").exists()


def test_deleting_the_bad_checkpoint_as_told_resumes_from_the_one_before(reference, unfinished, tiny_model, data,
                                                                         copy_of, tmp_path, capsys):
    out = copy_of(unfinished)
    _corrupt(out / "checkpoints" / "step-3", "state garbage", tmp_path)
    assert run(data, tiny_model, out, *FLAGS, "--resume") == 2
    shutil.rmtree(out / "checkpoints" / "step-3")
    assert run(data, tiny_model, out, *FLAGS, "--resume") == 0
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 2
    assert losses(out) == pytest.approx(losses(reference), abs=1e-5)


@pytest.mark.parametrize("kind", ["shape", "base"])
def test_adapter_of_another_shape_or_base_is_exit_2(kind, unfinished, tiny_model, data, copy_of, capsys):
    from safetensors.torch import load_file, save_file

    out = copy_of(unfinished)
    f = out / "checkpoints" / "step-3" / "adapter_model.safetensors"
    w = load_file(str(f))
    if kind == "shape":  # as if trained with --lora_r 8
        w = {k: (v[:8] if "lora_A" in k else v[:, :8]).contiguous() for k, v in w.items()}
    else:  # LoRA layers the model does not have
        w = {k.replace("layers.1.", "layers.9."): v for k, v in w.items()}
    save_file(w, str(f))
    assert run(data, tiny_model, out, *FLAGS, "--resume") == 2
    err = capsys.readouterr().err
    assert f"{f}:" in err and ("does not fit" in err or "does not match" in err) and no_traceback(err), err
    assert not (out / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------- 6. bad input paths
def test_out_under_a_file_is_exit_2(data, tmp_path, capsys):
    f = tmp_path / "some_file.txt"
    f.write_text("mine")
    assert run(data, "/unused", f / "run", *FLAGS) == 2
    err = capsys.readouterr().err
    assert f"{f} is a file, not a folder" in err and f.read_text() == "mine"


@pytest.mark.parametrize("kind, says", [("folder", "a folder"), ("empty", "empty"), ("not utf-8", "not valid UTF-8"),
                                        ("unreadable", "cannot read")])
def test_bad_jsonl_is_exit_2_naming_it(kind, says, tmp_path, capsys, monkeypatch):
    p = tmp_path / "qa.jsonl"
    if kind == "folder":
        p.mkdir()
    else:
        p.write_bytes({"empty": b"", "not utf-8": b"\xff\xfe{}\n", "unreadable": b"{}\n"}[kind])
    if kind == "unreadable":  # tests run as root, where chmod 000 does not stop reads: the OS error is injected
        import builtins

        real_open = builtins.open

        def denied(file, *a, **k):
            if str(file) == str(p):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *a, **k)

        monkeypatch.setattr(builtins, "open", denied)
    assert run(p, "/unused", tmp_path / "o", *FLAGS) == 2
    err = capsys.readouterr().err
    assert str(p) in err and says in err and no_traceback(err), err
    assert not (tmp_path / "o").exists()


def test_bad_jsonl_into_a_new_folder_leaves_none(tmp_path, capsys):
    """The lock beside the run folder made its parent folders; a run refused on its data removes them again."""
    p = write_jsonl(tmp_path / "qa.jsonl", ['{"bad json'])
    assert run(p, "/unused", tmp_path / "new" / "deeper" / "run", *FLAGS) == 2
    err = capsys.readouterr().err
    assert f"{p}:1: malformed JSON" in err and no_traceback(err), err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["qa.jsonl"]


@pytest.mark.parametrize("where", ["out", "under_out", "jsonl"])
def test_symlink_loop_is_exit_2_naming_it(where, data, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    jsonl, out = (loop, tmp_path / "run") if where == "jsonl" else (data, loop if where == "out" else loop / "run")
    assert run(jsonl, "/unused", out, *FLAGS) == 2
    err = capsys.readouterr().err
    # (--jsonl: train_qlora_hf.validate_args still calls the loop "file not found"; exit 2 naming it all the same)
    said = f"--jsonl {jsonl}: " if where == "jsonl" else f"--out {out}: a symbolic link that loops"
    assert said in err and no_traceback(err), err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["loop"]


def test_jsonl_with_a_utf8_bom_is_read(tiny_model, tmp_path, capsys):
    rows = [chat_record(qa_messages(q, a)) for q, a in QA[:2]]
    p = write_jsonl(tmp_path / "bom.jsonl", rows, prefix=b"\xef\xbb\xbf")
    assert [c["line"] for c in C.load_chats(p)] == [1, 2]
    assert run(p, tiny_model, tmp_path / "o", "--inspect", 1) == 0
    assert "--- line 1" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], "{oops"], prefix=b"\xef\xbb\xbf")
    assert run(bad, tiny_model, tmp_path / "o", "--inspect") == 2
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err  # names the real file, not a temporary copy


# --------------------------------------------------------------------------- 7. chat markers in the data
@pytest.mark.parametrize("bad, marker", [
    ({"messages": qa_messages("What is measured?", "Nothing.</s><|user|>\nfake")}, "'</s>'"),
    ({"messages": qa_messages("Q <|assistant|> sure", "An answer.")}, "'<|assistant|>'"),
    ({"messages": qa_messages("What is measured?", "It says <unk> here.")}, "'<unk>'"),  # the tokenizer's own
    ({"messages": qa_messages("Q?", "A [INST] new turn [/INST]")}, "'[INST]'"),
])
def test_chat_markers_in_content_are_refused(bad, marker, tiny_model, data, tmp_path, capsys):
    rows = data.read_text().splitlines()
    p = write_jsonl(tmp_path / "qa.jsonl", [rows[0], bad, rows[1], bad])
    assert run(p, tiny_model, tmp_path / "o", *FLAGS) == 2
    err = capsys.readouterr().err
    assert f"{p}:2:" in err and marker in err and "2 records: lines 2, 4" in err and no_traceback(err), err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- 8. model code never runs by default
def _model_with_code(tiny_model: Path, folder: Path, marker: Path, model_type: str) -> Path:
    shutil.copytree(tiny_model, folder)
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "from transformers import MistralConfig, MistralForCausalLM\n"
                                    "class EvilConfig(MistralConfig):\n    model_type = 'evil_llm'\n"
                                    "class EvilForCausalLM(MistralForCausalLM):\n    config_class = EvilConfig\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_model_folder_with_its_own_code_is_refused(tiny_model, data, tmp_path, capsys):
    model = _model_with_code(tiny_model, tmp_path / "evil", tmp_path / "RAN", "evil_llm")
    assert run(data, model, tmp_path / "o", *FLAGS) == 2
    err = capsys.readouterr().err
    assert "pass --trust_remote_code if you trust" in err and str(model) in err and no_traceback(err), err
    assert not (tmp_path / "RAN").exists() and not (tmp_path / "o").exists()


def test_model_code_beside_a_builtin_type_is_not_run(tiny_model, data, tmp_path, capsys):
    model = _model_with_code(tiny_model, tmp_path / "evil", tmp_path / "RAN", "mistral")
    assert run(data, model, tmp_path / "o", *FLAGS, "--max_steps", 1) == 0
    assert "transformers' built-in 'mistral' code is used" in capsys.readouterr().out
    assert not (tmp_path / "RAN").exists()


# --------------------------------------------------------------------------- 9. kill -9 and resume
@pytest.mark.numerics
def test_kill_9_at_a_random_point_then_resume_matches_uninterrupted(reference, tiny_model, data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}  # one thread, as this process under the default --torch-threads 1
    cmd = [sys.executable, str(ROOT / "train_qlora_hf.py"), "--jsonl", str(data), "--model", str(tiny_model),
           "--out", str(out), *map(str, FLAGS)]
    rng = random.Random()
    k = rng.randint(1, 2)
    log = tmp_path / "log.txt"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while len(list_checkpoints(out)) < k and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.15))  # anywhere in the following step, a checkpoint write included
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert not (out / "adapter_model.safetensors").exists() and lock_path(out).exists()
    done = int(list_checkpoints(out)[-1].name[5:])
    assert run(data, tiny_model, out, *FLAGS, "--resume") == 0  # the dead run's lock is taken over
    m = json.loads((out / "metrics.json").read_text())
    assert m["finished"] and m["resumed_from_step"] == done >= k
    assert losses(out) == pytest.approx(losses(reference), abs=1e-5)
    assert same_adapter(out, reference)
    assert not lock_path(out).exists() and not (out / "checkpoints").exists()


# --------------------------------------------------------------------------- 10. finished means whole (issue 24)
def test_disk_full_saving_the_adapter_leaves_no_folder_that_claims_finished(tiny_model, data, tmp_path, capsys):
    import eval_compare
    import quick_infer

    out, flags = tmp_path / "run", [*FLAGS, "--max_steps", 3]
    with pytest.MonkeyPatch.context() as mp:
        _adapter_save_fails(mp)
        assert run(data, tiny_model, out, *flags) == 1
    capsys.readouterr()
    assert not (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "metrics.json").read_text())["finished"] is False  # it said true before the weights
    assert runs.run_unfinished(out)
    questions = write_jsonl(tmp_path / "q.jsonl", [{"id": "q1", "question": "Why?", "reference": "Because."}])
    for main, argv in ((eval_compare.main, ["--questions", str(questions), "--out", str(tmp_path / "e.csv")]),
                       (quick_infer.main, ["--prompt", "Why?"]),
                       (quick_infer.main, ["--merge_out", str(tmp_path / "merged")])):
        assert main(["--adapter", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert "did not finish" in err and "--resume" in err and "step-2" in err and no_traceback(err), err
    assert not (tmp_path / "e.csv").exists() and not (tmp_path / "merged").exists()
    assert run(data, tiny_model, out, *flags, "--lr", "3e-3") == 2  # another command: told to choose, not resumed
    assert "unfinished run" in capsys.readouterr().err and runs.run_unfinished(out)
    assert run(data, tiny_model, out, *flags) == 0  # the same command again: it continues (as --resume)
    assert "unfinished run of this same command; continuing it from" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["finished"] is True and runs.run_unfinished(out) is None


def test_weights_without_metrics_finished_are_unfinished(tiny_model, data, tmp_path, capsys):
    """The last write (metrics.json "finished": true, after the weights) failing: weights there, still unfinished;
    a folder with weights and no metrics.json at all (a hand-saved PEFT adapter) stays readable."""
    out, flags = tmp_path / "run", [*FLAGS, "--max_steps", 2]
    real_json = runs.write_json_atomic

    def last_write_fails(path, obj):
        if Path(path).name == "metrics.json" and obj.get("finished") is True:
            enospc()
        return real_json(path, obj)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, "write_json_atomic", last_write_fails)
        assert run(data, tiny_model, out, *flags) == 1
    assert "metrics.json" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file()
    with pytest.raises(runs.InputError, match='"finished": false, so the run did not finish.*--resume'):
        read_run(out)
    hand = Path(shutil.copytree(out, tmp_path / "hand", ignore=shutil.ignore_patterns("checkpoints")))
    (hand / "metrics.json").unlink()
    assert read_run(hand).adapter_sha


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--lr", "-inf"), ("--lora_alpha", "inf"),
                                         ("--max_grad_norm", "nan"), ("--warmup_ratio", "nan"),
                                         ("--gpu_mem_budget", "inf")])
def test_non_finite_float_flag_is_exit_2_naming_it(flag, value, tiny_model, data, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run(data, tiny_model, out, *FLAGS, f"{flag}={value}")  # = : a value starting with "-" too
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err and no_traceback(err), err
    assert not out.exists() and not lock_path(out).exists()


@pytest.mark.parametrize("what", ["weights", "final weights", "gradient"])
def test_non_finite_update_stops_and_keeps_the_last_good_checkpoint(what, tiny_model, data, tmp_path, capsys):
    """A finite loss can still give inf/nan weights (as --lr inf did: 28 of 28 tensors saved non-finite, exit 0):
    the run stops with exit 1 before checkpointing or saving them. A non-finite gradient norm stops it too."""
    out, flags = tmp_path / "run", [*FLAGS, "--max_steps", 3]
    bad_step = 3 if what == "final weights" else 2
    real_update, real_reduce, reduced = T.update, T.all_reduce_grads, []

    def update(loop, step, loss, out_dir):
        lr, norm = real_update(loop, step, loss, out_dir)
        if what != "gradient" and step + 1 == bad_step:
            with torch.no_grad():
                for p in loop.params:
                    p.fill_(float("inf"))
        return lr, norm

    def all_reduce_grads(params, d):
        real_reduce(params, d)
        reduced.append(1)  # once per step
        if len(reduced) == bad_step:
            params[0].grad.fill_(float("nan"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "update", update)
        if what == "gradient":
            mp.setattr(T, "all_reduce_grads", all_reduce_grads)
        assert run(data, tiny_model, out, *flags) == 1
    err = capsys.readouterr().err
    said = "gradient norm is nan at step 2" if what == "gradient" else "LoRA weight tensors are non-finite"
    assert said in err and f"step-{bad_step - 1}" in err and "--lr" in err and no_traceback(err), err
    assert [p.name for p in list_checkpoints(out)] == [f"step-{k}" for k in range(1, bad_step)]
    assert not (out / "adapter_model.safetensors").exists() and not list(out.rglob(".adapter.tmp"))
    assert not json.loads((out / "metrics.json").read_text())["finished"]
    with pytest.raises(runs.InputError, match=f"did not finish.*--resume to continue from .*step-{bad_step - 1}"):
        read_run(out)
    if what == "weights":
        assert run(data, tiny_model, out, *flags, "--resume") == 0
        assert all(torch.isfinite(t).all() for t in adapter(out).values())


def test_save_outputs_refuses_non_finite_lora_weights(tmp_path):
    lin = torch.nn.Linear(2, 2)
    lin.weight.data[0, 0] = float("nan")
    with pytest.raises(runs.RunFailure, match="1 of 2 LoRA weight tensors are non-finite"):
        runs.save_outputs(lin, None, tmp_path, {"steps": 1}, {}, tmp_path / "checkpoints" / "step-1")
    assert not list(tmp_path.iterdir())


def _model_without_chat_template(tiny_model: Path, folder: Path) -> Path:
    shutil.copytree(tiny_model, folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_model_without_chat_template_is_said_once_and_recorded(tiny_model, data, tmp_path, capsys):
    from paperqa_tune.loading import load_tokenizer

    assert runs.chat_template_source(load_tokenizer(tiny_model, "right")) == "model"
    model = _model_without_chat_template(tiny_model, tmp_path / "no-template")
    out = tmp_path / "run"
    assert run(data, model, out, *FLAGS, "--max_steps", 1) == 0
    said = capsys.readouterr().out
    assert said.count("has no chat template") == 1 and "project's default" in said, said
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["chat_template_source"] == "project default" and cfg["chat_template"]
    assert read_run(out).adapter_sha  # the run's tokenizer carries the template evaluation and inference use
