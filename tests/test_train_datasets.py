"""paperqa_tune.train.chats.build_samples through `datasets` (worker processes + on-disk cache, used from CACHE_MIN_CHATS
chats on): the very samples, report and errors of the plain in-process loop, a cache that is reused only for the
same data, tokenizer and --max_seq_len, and a run that survives an unusable cache folder."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

from pathlib import Path

import pytest

import generate_qa
from common import InputError, chat_text, encode_text
from paperqa_tune.train import chats as C
from paperqa_tune.loading import load_tokenizer
from paperqa_tune.train import tokenized
from paperqa_tune.train.packing import IGNORE

ROOT = Path(__file__).resolve().parent.parent
SYS = "You answer questions about papers."
TURNS = [("What does QLoRA quantise?", "The frozen base model, to 4-bit NF4."),
         ("And what is trained?", "Only the low-rank adapters."),
         ("Which optimizer pages its state?", "Paged AdamW, in 8 bits.")]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model, "right")  # as train_qlora_hf.py loads it


def chat(n_turns, system=True, answer_words=0):
    msgs = [{"role": "system", "content": SYS}] if system else []
    for q, a in TURNS[:n_turns]:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a + " word" * answer_words}]
    return msgs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """generate_qa's offline pairs from the sample abstracts, plus multi-turn chats (some trimmed to fit) and
    chats too long for MAX_LEN (dropped)."""
    d = tmp_path_factory.mktemp("data")
    out = d / "qa.jsonl"
    assert generate_qa.main(["--backend", "offline", "--input", str(ROOT / "data" / "sample_abstracts.jsonl"),
                             "--out", str(out), "--eval_papers", "0", "--seed", "0"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()][:120]
    extra = [{"messages": chat(3)}, {"messages": chat(2, system=False)}, {"messages": chat(1, answer_words=300)},
             {"messages": chat(3, answer_words=70)}, {"text": "<|system|>s<|user|>q<|assistant|>a"}]
    return write_jsonl(d / "mixed.jsonl", rows[:60] + extra + rows[60:] + extra)


MAX_LEN = 300  # the generated pairs fit (<= 264 tokens); the 300-word answer does not; 3 long exchanges lose one


def reference_build_samples(tok, chats, max_seq_len, path):
    """build_samples as it was before `datasets` (one loop in this process): the yardstick."""
    samples, too_long, trimmed, longest = [], [], 0, 0
    for c in chats:
        try:
            s, n_dropped = C.fit_chat(tok, c["messages"], max_seq_len)
        except ValueError as e:
            raise InputError(f"{path}:{c['line']}: {e}") from None
        if s is None:
            too_long.append(c["line"])
            longest = max(longest, len(encode_text(tok, chat_text(tok, c["messages"]))))
            continue
        if not any(lab != IGNORE for lab in s["labels"]):
            raise InputError(f"{path}:{c['line']}: no assistant token to train on after rendering")
        trimmed += n_dropped > 0
        samples.append({**s, "line": c["line"], "group": c["group"], "type": c["type"], "turn_types": c["turn_types"],
                        "messages": c["messages"]})
    report = {"n_records": len(chats), "dropped_too_long": len(too_long), "dropped_lines": too_long[:20],
              "longest_dropped": longest, "trimmed_earlier_turns": trimmed}
    return samples, report


def cache_files(d):
    return sorted(p.name for p in d.glob("*.arrow")) if d.is_dir() else []


def test_datasets_path_gives_exactly_the_samples_of_the_plain_loop(tok, data, tmp_path, capsys):
    chats = C.load_chats(data)
    want = reference_build_samples(tok, chats, MAX_LEN, data)
    assert want[1]["dropped_too_long"] == 2 and want[1]["trimmed_earlier_turns"] >= 2  # the data covers both
    assert C.build_samples(tok, chats, MAX_LEN, data) == want  # small data: tokenized in this process
    got = C.build_samples(tok, chats, MAX_LEN, data, num_proc=2, cache_dir=tmp_path / "c", cache_min_chats=0)
    assert got == want
    assert len(cache_files(tmp_path / "c")) == 2  # one Arrow file per worker
    assert "warning" not in capsys.readouterr().err  # no fallback to the plain loop
    assert all(type(t) is int for s in got[0] for t in s["input_ids"] + s["labels"])


def test_cache_is_read_back_only_for_the_same_data_tokenizer_and_length(tok, data, tmp_path, monkeypatch):
    chats, cache = C.load_chats(data), tmp_path / "c"
    kw = {"num_proc": 1, "cache_dir": cache, "cache_min_chats": 0}
    want = C.build_samples(tok, chats, MAX_LEN, data, **kw)
    first = cache_files(cache)
    assert len(first) == 1

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(C, "_tokenize_record", no_tokenizing)
    assert C.build_samples(tok, chats, MAX_LEN, data, **kw) == want  # a rerun reads the cache
    other_tok = copy.deepcopy(tok)
    other_tok.chat_template = tok.chat_template.replace("<|assistant|>", "<|assistant|> ")
    edited = copy.deepcopy(chats)
    edited[0]["messages"][-1]["content"] += " More."
    for args in [(tok, chats, MAX_LEN + 1), (other_tok, chats, MAX_LEN), (tok, edited, MAX_LEN)]:
        with pytest.raises(AssertionError, match="tokenized again"):
            C.build_samples(*args, data, **kw)
    assert cache_files(cache) == first


def test_bad_record_is_the_same_input_error_on_both_paths(tok, data, tmp_path):
    """A template that never renders the answers: the first such record is named by file:line, as before."""
    blind = copy.deepcopy(tok)
    blind.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}"
                           "{% endfor %}")
    chats = C.load_chats(data)
    with pytest.raises(InputError) as want:
        reference_build_samples(blind, chats, MAX_LEN, data)
    assert f"{data}:1: cannot locate assistant turn" in str(want.value)
    with pytest.raises(InputError) as plain:
        C.build_samples(blind, chats, MAX_LEN, data)
    with pytest.raises(InputError) as via_datasets:
        C.build_samples(blind, chats, MAX_LEN, data, num_proc=2, cache_dir=tmp_path / "c", cache_min_chats=0)
    assert str(plain.value) == str(via_datasets.value) == str(want.value)
    with pytest.raises(InputError, match=r"every sample is longer than --max_seq_len=8 tokens \(longest \d+\)"):
        C.build_samples(tok, chats, 8, data, num_proc=1, cache_dir=tmp_path / "c", cache_min_chats=0)


def test_unusable_cache_folder_costs_the_cache_not_the_run(tok, data, tmp_path, capsys):
    chats = C.load_chats(data)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    got = C.build_samples(tok, chats, MAX_LEN, data, num_proc=1, cache_dir=not_a_dir / "c", cache_min_chats=0)
    assert got == reference_build_samples(tok, chats, MAX_LEN, data)
    assert "warning: cannot use the tokenization cache" in capsys.readouterr().err


def test_default_workers_share_the_cpus_among_local_ranks(monkeypatch):
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert tokenized.default_num_proc(10**7) == cpus and tokenized.default_num_proc(1500) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus * 2))
    assert tokenized.default_num_proc(10**7) == 1


def run_inspect(script, data, model, tmp, env_extra=None):
    """`script --inspect 1` as a user runs it (functions sent to worker processes), datasets' cache in tmp/hf."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf"), "LOCAL_WORLD_SIZE": "1", **(env_extra or {}),
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "0"}  # datasets' bar on stderr says when it tokenized
    return subprocess.run([sys.executable, str(script), "--jsonl", str(data), "--model", str(model), "--out",
                           str(tmp / "o"), "--inspect", "1"], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def big_run(tiny_model, tmp_path_factory):
    """train_qlora_hf.py --inspect on CACHE_MIN_CHATS chats (so tokenized through datasets, into its cache)."""
    tmp = tmp_path_factory.mktemp("big")
    rows = [{"messages": chat(1 + i % 2)} for i in range(tokenized.CACHE_MIN_CHATS)]
    for i, r in enumerate(rows):
        r["messages"][1]["content"] += f" ({i})"
    data = write_jsonl(tmp / "big.jsonl", rows)
    return tmp, data, run_inspect(ROOT / "train_qlora_hf.py", data, tiny_model, tmp)


def test_script_tokenizes_large_data_in_workers_into_the_datasets_cache(big_run):
    """As a script, CACHE_MIN_CHATS chats: --inspect works and the cache lands under $HF_DATASETS_CACHE."""
    tmp, _, r = big_run
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--- line 1:" in r.stdout and "(0)" in r.stdout
    assert cache_files(tmp / "hf" / tokenized.TOKENIZED_CACHE_DIR)


def test_editing_the_script_keeps_the_tokenized_cache(big_run, tiny_model, monkeypatch):
    """The cache key hashes the code that tokenizes (paperqa_tune/train/chats.py), not the script: a copy of
    train_qlora_hf.py with other help text reads back what the original tokenized (minutes on a real dataset)."""
    tmp, data, first = big_run
    assert first.returncode == 0, first.stderr[-2000:]
    cache = tmp / "hf" / tokenized.TOKENIZED_CACHE_DIR
    before = cache_files(cache)
    assert before and f"tokenizing {tokenized.CACHE_MIN_CHATS} chats" in first.stderr  # the first run tokenized
    script = (ROOT / "train_qlora_hf.py").read_text(encoding="utf-8")
    edited = script.replace('"print N rendered samples', '"show N rendered samples')
    assert edited != script
    copy_dir = tmp / "edited"
    copy_dir.mkdir()
    (copy_dir / "train_qlora_hf.py").write_text(edited, encoding="utf-8")
    r = run_inspect(copy_dir / "train_qlora_hf.py", data, tiny_model, tmp,
                    {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == first.stdout
    assert "tokenizing" not in r.stderr and cache_files(cache) == before  # read back, not tokenized again

    seen = []  # and the code the key does hash: the module that tokenizes
    monkeypatch.setattr(C, "tokenize_cached", lambda *a, sources, **k: seen.append(sources))  # None: plain loop
    C.build_samples(load_tokenizer(tiny_model, "right"), C.load_chats(data), MAX_LEN, data, cache_min_chats=0)
    assert seen == [[C.__file__]]
