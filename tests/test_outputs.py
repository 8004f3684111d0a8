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


# --------------------------------------------------------------------------- issue 24: commits cut short by a kill
def _journal(folder: Path, first: str, command, moves) -> None:
    from paperqa_tune.outputs import command_digest

    (folder / f".{first}.commit.json").write_text(json.dumps({"command": command_digest(command), "moves": moves}))


def test_a_commit_of_the_same_command_cut_short_is_finished_not_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    dead = 2 ** 22 + 12345
    (tmp_path / ".a.lock").write_text(f"{dead} {socket.gethostname()}")
    a.write_text("new a")  # renamed before the kill; b still under its temp name, the old b already removed
    (tmp_path / f".b.{dead}.partial").write_text("new b")
    _journal(tmp_path, "a", {"cmd": 1}, [[str(tmp_path / f".a.{dead}.partial"), str(a)],
                                         [str(tmp_path / f".b.{dead}.partial"), str(b)]])
    outs = OutputSet({"--out": a, "--manifest": b}, command={"cmd": 1})  # no overwrite: not refused
    with outs:
        assert outs.finished_earlier and (a.read_text(), b.read_text()) == ("new a", "new b")
        assert "nothing was redone" in outs.finished_note()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    # whole now, and not cut short: another run of the same command needs --overwrite, like any finished set
    with pytest.raises(InputError, match="already exist"):
        OutputSet({"--out": a, "--manifest": b}, command={"cmd": 1})
    # another command's commit cut short: completed as that run wrote it, then refused, saying so
    (tmp_path / f".b.{dead}.partial").write_text("other b")
    _journal(tmp_path, "a", {"cmd": 2}, [[str(tmp_path / f".b.{dead}.partial"), str(b)]])
    with pytest.raises(InputError, match="another command was stopped .* pass --overwrite"):
        with OutputSet({"--out": a, "--manifest": b}, command={"cmd": 1}):
            pass
    assert b.read_text() == "other b" and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_run_killed_after_its_commit_but_holding_the_lock_counts_as_finished(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with OutputSet({"--out": a, "--manifest": b}, command=["x"]) as outs:
        for name in ("--out", "--manifest"):
            outs.stage(name).write_text("new")
        outs.commit()
        held = (tmp_path / ".a.lock").read_text()
    assert held.split()[2:] and held.split()[2].startswith("committed:")  # the lock said so before its release
    dead = 2 ** 22 + 12345
    (tmp_path / ".a.lock").write_text(f"{dead} {socket.gethostname()} {held.split()[2]}")  # killed right there
    outs = OutputSet({"--out": a, "--manifest": b}, command=["x"])
    with outs:
        assert outs.finished_earlier
    (tmp_path / ".a.lock").write_text(f"{dead} {socket.gethostname()} {held.split()[2]}")
    with pytest.raises(InputError, match="another command .* pass --overwrite"):
        OutputSet({"--out": a, "--manifest": b}, command=["y"]).lock()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_an_output_staged_but_not_written_leaves_no_older_one_beside_the_new_set(tmp_path):
    """A chart not drawn (no matplotlib) must not leave the previous run's chart beside the new data."""
    a, chart, b = tmp_path / "a", tmp_path / "chart.png", tmp_path / "b"
    for p in (a, chart, b):
        p.write_text("old")
    with OutputSet({"--out": a, "chart": chart, "--manifest": b}, overwrite=True) as outs:
        outs.stage("--out").write_text("new")
        outs.stage("chart")  # asked for, never written
        outs.stage("--manifest").write_text("new")
        outs.commit()
    assert (a.read_text(), b.read_text(), chart.exists()) == ("new", "new", False)


def test_the_journal_holds_absolute_paths(tmp_path, monkeypatch):
    """A run given relative paths, killed in its commit, is completed by a rerun from another folder."""
    import paperqa_tune.outputs as outputs_mod

    class Killed(BaseException):
        pass

    def killed(moves):
        raise Killed

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    outs = OutputSet({"--out": "a", "--manifest": "b"})
    outs.lock()
    for name in ("--out", "--manifest"):
        outs.stage(name).write_text("new")
    monkeypatch.setattr(outputs_mod.OutputSet, "_apply", staticmethod(killed))
    with pytest.raises(Killed):
        outs.commit()
    monkeypatch.undo()
    journal = json.loads((tmp_path / ".a.commit.json").read_text())
    assert all(Path(p).is_absolute() for move in journal["moves"] for p in move)
    outs._lock.held = False  # the killed run's lock stays, its process "gone": taken over as stale below
    (tmp_path / ".a.lock").write_text(f"{2 ** 22 + 12345} {socket.gethostname()}")
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(InputError, match="already exist"):  # no command given: completed, then refused
        OutputSet({"--out": tmp_path / "a", "--manifest": tmp_path / "b"}).lock()
    assert (tmp_path / "a").read_text() == (tmp_path / "b").read_text() == "new"


EVAL_SET = ("evaluation.csv", "evaluation_for_marking.csv", "summary.json", "results_bar.png")


def _eval_set(folder: Path) -> dict[str, bytes | None]:
    return {n: (folder / n).read_bytes() if (folder / n).exists() else None for n in EVAL_SET}


def _hand_made_csv(path: Path) -> None:
    import csv

    rows = [{"id": f"q{i}", "type": ["factual", "conceptual", "unanswerable"][i % 3],
             "question": f"What does paper {i} find?", "reference": f"Paper {i} finds a gain of {i} points.",
             "base_answer": f"It finds {i} points." if i % 2 else "I don't know.",
             "finetuned_answer": f"Paper {i} finds a gain of {i} points."} for i in range(6)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_eval_compare_rescore_killed_at_every_write_then_the_same_command_completes(tmp_path, capsys, monkeypatch):
    """`eval_compare.py --rescore evaluation.csv --f1_threshold 0.9` (in place, over an earlier rescored set) killed
    with SIGKILL just before each of its writes: the four outputs are the old set or the new one (a mix only under
    the commit journal, and then without summary.json), and the same command run again exits 0 with the bytes of
    an uninterrupted run and nothing else left behind."""
    import shutil

    import eval_compare
    import killpoints

    d = tmp_path / "eval"
    d.mkdir()
    _hand_made_csv(d / "evaluation.csv")
    monkeypatch.chdir(ROOT)
    assert eval_compare.main(["--rescore", str(d / "evaluation.csv")]) == 0
    old = _eval_set(d)
    keep = tmp_path / "old"
    shutil.copytree(d, keep)
    cmd = ["eval_compare.py", "--rescore", str(d / "evaluation.csv"), "--f1_threshold", "0.9"]
    proc, events = killpoints.count(cmd, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    new = _eval_set(d)
    assert new != old and None not in new.values()
    finished = 0
    for k in range(1, len(events) + 1):
        where = f"killed before write {k} {events[k - 1]}"
        shutil.rmtree(d)
        shutil.copytree(keep, d)
        killed = killpoints.run(cmd, kill_at=k, cwd=ROOT)
        assert killed.returncode == -9, f"{where}: {killed.returncode} {killed.stderr[-2000:]}"
        got, journal = _eval_set(d), (d / ".evaluation.csv.commit.json").exists()
        if got not in (old, new):
            assert journal and got["summary.json"] is None, f"{where}: a mix without a journal, or with a summary"
            assert all(got[n] in (old[n], new[n]) for n in EVAL_SET if n != "summary.json"), where
        capsys.readouterr()
        assert eval_compare.main(cmd[1:]) == 0, f"{where}: {capsys.readouterr().err[-2000:]}"
        err = capsys.readouterr().err
        assert _eval_set(d) == new, where
        assert sorted(p.name for p in d.iterdir()) == sorted(EVAL_SET), (where, sorted(p.name for p in d.iterdir()))
        finished += "nothing was redone" in err
    assert finished >= 4  # every rename of the commit was a kill point
