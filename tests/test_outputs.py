"""paperqa_tune.outputs.OutputSet: the guarantees every script's outputs rely on."""
from __future__ import annotations

import json
import os

import pytest

from common import InputError
from paperqa_tune.outputs import OutputSet


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
