"""Tokenizing a large training file once: `datasets.map` in worker processes, the result kept in Arrow files named
by everything it depends on, read back on a rerun or a --resume of the same data.

Used by paperqa_tune.train.chats.build_samples from CACHE_MIN_CHATS chats on; smaller data is tokenized in the training
process, uncached (little to win). Measured on 240,000 chats (20k abstracts' worth, 2 shared cores): 13 minutes in
one process, 7.7 with 2 workers, 23 s from the cache; peak memory 2.6 GB, 2.9 GB with datasets.
"""
from __future__ import annotations

import os
from pathlib import Path

from paperqa_tune.train.packing import IGNORE

CACHE_MIN_CHATS = 2000
TOKENIZED_CACHE_DIR = "paperqa_tune_tokenized"  # in datasets' cache folder ($HF_DATASETS_CACHE)
COLUMNS = ("fits", "dropped", "full_len", "error")  # besides input_ids and the trained mask


def cache_key(tokenizer, chats: list[dict], max_seq_len: int, sources: list) -> str:
    """What the tokenized data depends on: the chats, the tokenizer (vocabulary, special tokens, chat template),
    --max_seq_len, the library versions, and the code that tokenizes (`sources`, plus messages.py and packing.py:
    any edit of them starts a new cache)."""
    import hashlib
    import json

    import tokenizers
    import transformers
    from datasets.fingerprint import Hasher

    from paperqa_tune import messages
    from paperqa_tune.train import packing

    messages.ensure_chat_template(tokenizer)  # as chat_text does: the key sees the template the chats are rendered with
    h = hashlib.sha256()
    for part in ("v1", str(max_seq_len), Hasher.hash(tokenizer), transformers.__version__, tokenizers.__version__):
        h.update(part.encode() + b"\0")
    for src in (*sources, messages.__file__, packing.__file__):
        h.update(Path(src).read_bytes())
    for k in range(0, len(chats), 1000):
        h.update(json.dumps([c["messages"] for c in chats[k:k + 1000]]).encode())
    return h.hexdigest()[:32]


def default_num_proc(n_chats: int) -> int:
    """Tokenizing processes: the CPUs this process may use, shared by the ranks on this machine (torchrun sets
    LOCAL_WORLD_SIZE), at least 1000 chats each."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(1, min(cpus // ranks, n_chats // 1000))


def _arrow_lists(column) -> list[list]:
    """A list column of an Arrow record batch as Python lists: one tolist() of the values, cut at the offsets
    (ten times faster than converting list by list)."""
    offsets = column.offsets.to_numpy()
    flat = column.flatten().to_numpy(zero_copy_only=False).tolist()
    start = int(offsets[0])
    return [flat[a - start:b - start] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _read_rows(table):
    """The tokenized table's rows as dicts (input_ids, labels, COLUMNS), a record batch at a time. The labels are
    rebuilt onto the ids' own int objects, as in-process tokenizing builds them: the samples take no more memory
    than ones tokenized in the training process."""
    for batch in table.to_batches(max_chunksize=10_000):
        ids, trained = _arrow_lists(batch.column("input_ids")), _arrow_lists(batch.column("trained"))
        rest = {k: batch.column(k).to_pylist() for k in COLUMNS}
        for i, row_ids in enumerate(ids):
            yield {"input_ids": row_ids, "labels": [t if m else IGNORE for t, m in zip(row_ids, trained[i])],
                   **{k: v[i] for k, v in rest.items()}}


def tokenize_cached(batch_fn, tokenizer, chats: list[dict], max_seq_len: int, num_proc: int,
                    cache_dir: Path | None, sources: list):
    """batch_fn({"messages": [...]}, tokenizer=, max_seq_len=) -> columns input_ids, trained (bool mask), COLUMNS,
    over every chat through datasets.map in num_proc processes, kept in Arrow files named by cache_key (in
    cache_dir, else datasets' cache folder): the same chats with the same tokenizer are read back, not tokenized
    again. Yields one row dict per chat, in order."""
    import datasets

    key = cache_key(tokenizer, chats, max_seq_len, sources)
    cache_dir = Path(cache_dir or Path(datasets.config.HF_DATASETS_CACHE) / TOKENIZED_CACHE_DIR)
    cache_dir.mkdir(parents=True, exist_ok=True)
    v = datasets.Value
    features = datasets.Features({"input_ids": datasets.Sequence(v("int32")), "trained": datasets.Sequence(v("bool")),
                                  "fits": v("bool"), "dropped": v("int32"), "full_len": v("int32"),
                                  "error": v("string")})
    out = datasets.Dataset.from_dict({"messages": [c["messages"] for c in chats]}).map(
        batch_fn, batched=True, num_proc=num_proc if num_proc > 1 else None, remove_columns=["messages"],
        fn_kwargs={"tokenizer": tokenizer, "max_seq_len": max_seq_len}, features=features,
        cache_file_name=str(cache_dir / f"{key}.arrow"), new_fingerprint=key, desc=f"tokenizing {len(chats)} chats")
    return _read_rows(out.with_format("arrow")[:])
