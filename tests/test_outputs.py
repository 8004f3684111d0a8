"""paperqa_tune.outputs.OutputSet: the guarantees every script's outputs rely on."""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import InputError
from paperqa_tune.outputs import OutputSet

ROOT = Path(__file__).resolve().parent.parent


def test_outputs_are_distinct_files_and_never_an_input(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with pytest.raises(InputError, match="--out and --eval_out are the same file"):
        OutputSet({"--out": a, "--eval_out": tmp_path / "." / "a.jsonl"})
    a.write_text("abstracts\n")
    with pytest.raises(InputError, match="also an input"):
        OutputSet({"--out": a, "--eval_out": b}, inputs=[a], overwrite=True)
    assert a.read_text() == "abstracts\n"
    with pytest.raises(InputError, match="is a folder"):
        OutputSet({"--out": tmp_path})
    with pytest.raises(InputError, match="is a file, not a folder"):
        OutputSet({"--out": a / "x.jsonl"})
    with pytest.raises(InputError, match="already exist"):
        OutputSet({"--out": a})


def test_failure_before_commit_leaves_previous_outputs_and_no_temp_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("old a")
    b.write_text("old b")
    with pytest.raises(RuntimeError):
        with OutputSet({"--out": a, "--eval_out": b}, overwrite=True) as outs:
            outs.stage("--out").write_text("new a")
            raise RuntimeError("disk full")
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_commit_replaces_all_and_releases_the_lock(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with OutputSet({"--out": a, "--manifest": b}) as outs:
        assert outs.lock_path.exists()
        outs.stage("--out").write_text("A")
        outs.stage("--manifest").write_text("M")
        outs.commit(order=["--out", "--manifest"])
    assert (a.read_text(), b.read_text()) == ("A", "M")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_live_run_holds_the_lock(tmp_path):
    a = tmp_path / "a"
    lock = tmp_path / ".a.lock"
    lock.write_text(str(os.getppid()))  # a live process other than this one
    with pytest.raises(InputError, match=rf"another run \(process {os.getppid()}\)"):
        with OutputSet({"--out": a}):
            pass
    assert lock.read_text() == str(os.getppid()) and not a.exists()


def test_a_killed_run_is_taken_over_and_its_interrupted_commit_completed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("old a")
    b.write_text("old b")
    dead = 2 ** 22 + 12345  # above the default pid_max of 4,194,304: no such process
    (tmp_path / ".a.lock").write_text(str(dead))
    # killed between the two renames of its commit: a is new, b's new file still waits under its temp name
    (tmp_path / f".b.{dead}.partial").write_text("new b")
    (tmp_path / ".a.commit.json").write_text(json.dumps([[str(tmp_path / f".a.{dead}.partial"), str(a)],
                                                          [str(tmp_path / f".b.{dead}.partial"), str(b)]]))
    a.write_text("new a")
    (tmp_path / f"..a.{dead}.partial.x1y2.tmp").write_text("litter of an atomic writer")
    with OutputSet({"--out": a, "--manifest": b}, overwrite=True):
        assert (a.read_text(), b.read_text()) == ("new a", "new b")  # the set is whole again, before anything else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    # without --overwrite the completed outputs of the killed run are not silently replaced
    (tmp_path / ".a.lock").write_text(str(dead))
    with pytest.raises(InputError, match="already exist"):
        with OutputSet({"--out": a, "--manifest": b}):
            pass
    # killed during its commit, rerun without --overwrite: the commit is completed, the run refused, no lock left
    (tmp_path / ".a.lock").write_text(str(dead))
    (tmp_path / f".b.{dead}.partial").write_text("newer b")
    (tmp_path / ".a.commit.json").write_text(json.dumps([[str(tmp_path / f".b.{dead}.partial"), str(b)]]))
    outs = OutputSet({"--out": a, "--manifest": b})
    with pytest.raises(InputError, match="already exist"):
        with outs:
            pass
    assert b.read_text() == "newer b" and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_weight_files_get_the_permissions_of_other_outputs(tiny_model):
    """safetensors writes weights 0600; every folder of weights the project writes is shared like its other outputs
    (the tiny model here; the run folder, checkpoints and --merge_out in their own tests)."""
    from common import output_mode

    modes = {f.name: f.stat().st_mode & 0o777 for f in tiny_model.iterdir() if f.is_file()}
    assert modes["model.safetensors"] == output_mode() and set(modes.values()) == {output_mode()}, modes


# --------------------------------------------------------------------------- the lock file (paperqa_tune.locks)
HOLD = ("import sys, time; sys.path.insert(0, sys.argv[2]); from paperqa_tune.locks import LockFile; "
        "LockFile(sys.argv[1], 'x').acquire(); print('held', flush=True); time.sleep(60)")


def test_a_second_holder_is_refused_until_the_first_is_gone(tmp_path):
    """A real second process holds the lock: refused, naming it and the lock; once it is killed, its lock is
    stale and taken over."""
    from paperqa_tune.locks import LockFile

    lock = tmp_path / "new" / ".out.lock"
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        assert lock.read_text() == f"{other.pid} {socket.gethostname()}\n"
        with pytest.raises(InputError, match=rf"another run \(process {other.pid}\) is writing the outputs: it holds "
                                             rf"the lock {re.escape(str(lock))}; wait for it to finish or"):
            LockFile(lock, "the outputs").acquire()
        assert lock.read_text().split()[0] == str(other.pid)  # not ours to remove
    finally:
        other.kill()
        other.wait()
    with LockFile(lock, "the outputs"):  # its process is gone: taken over
        assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    assert not lock.exists()


@pytest.mark.parametrize("text, age, held", [
    ("DEAD", 0, None), ("DEAD host-elsewhere", 0, "process DEAD on host-elsewhere"),  # cannot tell: refused
    ("", 0, "a run starting now"), ("", 60, None),  # empty: being written, unless it is old
    ("not a pid", 0, None), ("PPID", 0, "process PPID"),  # garbage is nobody's; a live pid alone: this host
])
def test_who_holds_a_lock(tmp_path, text, age, held):
    from paperqa_tune.locks import LockFile

    dead = 2 ** 22 + 12345  # above the default pid_max of 4,194,304: no such process
    fill = lambda s: s.replace("DEAD", str(dead)).replace("PPID", str(os.getppid()))  # noqa: E731
    lock = tmp_path / ".out.lock"
    lock.write_text(fill(text))
    os.utime(lock, (time.time() - age, time.time() - age))
    lf = LockFile(lock, "out")
    assert lf.holder() == (fill(held) if held else None)
    if held is None:  # stale: taken over
        with lf:
            assert lock.read_text().split()[0] == str(os.getpid())
    else:
        with pytest.raises(InputError, match=re.escape(f"another run ({fill(held)})")):
            lf.acquire()
        assert lock.read_text() == fill(text) and not lf.held


def test_folders_the_lock_created_are_removed_when_left_empty(tmp_path):
    from paperqa_tune.locks import LockFile

    lock = tmp_path / "a" / "b" / ".out.lock"
    with LockFile(lock, "out"):
        assert lock.is_file()
    assert not (tmp_path / "a").exists()  # both folders it made: gone
    with LockFile(lock, "out"):
        (tmp_path / "a" / "b" / "out").write_text("written")
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["out"]  # in use: kept, the lock gone
    (tmp_path / "a" / "b" / "out").unlink()
    with LockFile(lock, "out"):
        pass
    assert (tmp_path / "a" / "b").is_dir()  # it existed before: not the lock's to remove


def test_a_refused_or_failed_output_set_leaves_no_folder(tmp_path):
    a, b = tmp_path / "new" / "deeper" / "a", tmp_path / "other" / "b"
    with pytest.raises(RuntimeError):
        with OutputSet({"--out": a, "--eval_out": b}) as outs:
            outs.stage("--out").write_text("new a")
            outs.stage("--eval_out").write_text("new b")
            raise RuntimeError("bad input found late")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "new" / "deeper").mkdir(parents=True)
    (tmp_path / "new" / "deeper" / ".a.lock").write_text(str(os.getppid()))  # a live run holds it
    with pytest.raises(InputError, match="another run"):
        with OutputSet({"--out": a, "--eval_out": b}):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]
    (tmp_path / "new" / "deeper" / ".a.lock").unlink()
    with OutputSet({"--out": a, "--eval_out": b}) as outs:  # a run that writes keeps its folders
        outs.stage("--out").write_text("A")
        outs.stage("--eval_out").write_text("B")
        outs.commit()
    assert (a.read_text(), b.read_text()) == ("A", "B")


# --------------------------------------------------------------------------- symbolic links that loop
def test_a_looping_link_is_input_error_naming_it(tmp_path):
    from common import resolve_path

    loop = tmp_path / "loop.jsonl"
    loop.symlink_to("loop.jsonl")
    for path in (loop, loop / "below.jsonl"):
        with pytest.raises(InputError, match=rf"^--out {re.escape(str(path))}: a symbolic link that loops"):
            resolve_path(path, "--out")
        with pytest.raises(InputError, match="a symbolic link that loops"):
            OutputSet({"--out": path})
    with pytest.raises(InputError, match=rf"--input {re.escape(str(loop))}: a symbolic link that loops"):
        OutputSet({"--out": tmp_path / "a"}, inputs=[loop])
    assert resolve_path(tmp_path / "not_yet" / "x", "--out") == (tmp_path / "not_yet" / "x").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.jsonl"]


def test_eloop_from_the_os_is_exit_2_telling_to_fix_the_link(capsys):
    from common import run_main

    def opens_a_loop(argv):  # what Python 3.13 raises on open() of a looping link
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), "/data/loop.jsonl")
    assert run_main(opens_a_loop) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /data/loop.jsonl: a symbolic link that loops") and "fix the link" in err


# --------------------------------------------------------------------------- every script: bad input, no folder
def _fake_run(folder: Path) -> Path:
    """A run folder that reads as finished (no model is loaded before the questions are read)."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/no/such/model"}))
    (folder / "adapter_model.safetensors").write_bytes(b"not read before the questions")
    return folder


def test_eval_compare_bad_questions_into_a_new_folder_leaves_none(tmp_path, capsys):
    import eval_compare

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"bad json\n')
    run = _fake_run(tmp_path / "run")
    out = tmp_path / "new" / "deeper" / "evaluation.csv"
    assert eval_compare.main(["--adapter", str(run), "--questions", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:1: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # --rescore reads its questions file under the lock: the lock's folders go when it fails
    csv_in = tmp_path / "evaluation.csv"
    csv_in.write_text("id,type,question,reference,base_answer,finetuned_answer\nq1,factual,Q?,R.,A.,B.\n")
    assert eval_compare.main(["--rescore", str(csv_in), "--questions", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:1: malformed JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "evaluation.csv", "run"]


def test_quick_infer_bad_adapter_into_a_new_merge_folder_leaves_none(tmp_path, capsys):
    import quick_infer

    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    for adapter in (not_a_run, tmp_path / "missing"):
        out = tmp_path / "new" / "merged"
        assert quick_infer.main(["--adapter", str(adapter), "--merge_out", str(out)]) == 2
        assert str(adapter) in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_run"]
