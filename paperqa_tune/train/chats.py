"""Chats -> training samples: each record's messages rendered with the tokenizer's own chat template, token ids
with exactly one BOS, and labels that train only the assistant answers (each turn's end-of-turn token included);
and how that looks to a person (--inspect: trained tokens marked).

Everything the tokenized-data cache depends on in code lives here (with messages.py's rendering and packing.IGNORE):
build_samples names this module as the cache key's source, so editing a script (its help text, the loop) keeps
the cache, and editing how chats are tokenized starts a new one.
"""
from __future__ import annotations

import sys
from pathlib import Path

from paperqa_tune.errors import InputError

from paperqa_tune.files import os_error_text, read_jsonl

from paperqa_tune.messages import DEFAULT_SYSTEM_PROMPT, chat_text, encode_text, record_messages
from paperqa_tune.train.packing import IGNORE
from paperqa_tune.safety import chat_structure
from paperqa_tune.train.samples import histogram_lines, marked_text
from paperqa_tune.train.tokenized import CACHE_MIN_CHATS, default_num_proc, tokenize_cached


def load_chats(path, system_prompt: str | None = None) -> list[dict]:
    """Read the training file into [{"line", "messages", "group"}]; bad records raise InputError with file:line.

    A record without a system turn gets one: `system_prompt` (--system_prompt), else DEFAULT_SYSTEM_PROMPT. So
    every chat is trained with an explicit system prompt that run_config.json records and evaluation and
    inference send too; a template that writes its own default when a chat has none (SmolLM2's "You are a
    helpful AI assistant named SmolLM...") never supplies one at one stage and not at another."""
    chats = []
    for lineno, rec in read_jsonl(path):
        try:
            messages = record_messages(rec)
            _check_turn_order(messages)
        except ValueError as e:
            raise InputError(f"{path}:{lineno}: {e}; each record needs 'messages' or a 'text' with "
                             "<|system|>/<|user|>/<|assistant|> markers and at least one assistant answer") from None
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt or DEFAULT_SYSTEM_PROMPT}] + messages
        meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
        chats.append({"line": lineno, "messages": messages, "group": str(meta.get("paper_id", f"line{lineno}")),
                      "type": str(meta.get("type") or "unknown"),
                      "turn_types": [t for t in meta.get("turn_types") or [] if isinstance(t, str)]})
    if not chats:
        raise InputError(f"{path}: no records (the file is empty); generate data with generate_qa.py first")
    return chats


def _check_turn_order(messages: list[dict]) -> None:
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        raise ValueError("a system turn may only come first")
    turns = roles[1:] if roles[0] == "system" else roles
    for i, role in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(f"turns must alternate user/assistant starting with user, got {'/'.join(turns)}")


def _assistant_char_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of the text to train on: each assistant answer plus the end-of-turn token after it.

    The prompt up to an answer is the chat before it rendered with the generation prompt, and the answer
    ends where the chat up to it ends: so the spans are right for whatever template the tokenizer has.
    Whitespace the template writes after the end-of-turn token is glue, not part of the answer.
    """
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = chat_text(tokenizer, messages[:i], add_generation_prompt=True)
        upto = chat_text(tokenizer, messages[: i + 1])
        if len(upto) > len(before) and text.startswith(before) and text.startswith(upto):
            start, end = len(before), len(before) + len(upto[len(before):].rstrip())
        else:  # a template that renders earlier turns differently once more follow: find the answer itself
            start = text.find(m["content"], cursor)
            if start < 0:
                raise ValueError(f"cannot locate assistant turn {i} in the rendered chat")
            end = start + len(m["content"])
            eos = tokenizer.eos_token or ""
            if eos and text.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return spans


def _token_offsets(tokenizer, text: str, ids: list[int], spans) -> list[tuple[int, int]]:
    """Character span of each of `ids` (encode_text's output) in `text`; (0, 0) for tokens added outside it."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        inner, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):
        # A slow tokenizer has no offsets: tokenize prompt and answer pieces apart, which is exact when
        # the pieces add up to the whole (each token then gets its piece's span).
        inner = tokenizer(text, add_special_tokens=False)["input_ids"]
        cuts = sorted({0, len(text), *[x for span in spans for x in span]})
        pieced, offsets = [], []
        for a, b in zip(cuts, cuts[1:]):
            toks = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            pieced += toks
            offsets += [(a, b)] * len(toks)
        if pieced != inner:
            raise ValueError("cannot align answer tokens with this slow tokenizer; use a fast tokenizer")
    for k in range(len(ids) - len(inner) + 1):
        if ids[k:k + len(inner)] == inner:
            return [(0, 0)] * k + offsets + [(0, 0)] * (len(ids) - k - len(inner))
    raise ValueError("tokenizer output with special tokens does not contain the plain tokenization")


def _tokenize_detail(tokenizer, messages: list[dict], max_seq_len: int | None = None) -> dict | None:
    text = chat_text(tokenizer, messages)
    ids = encode_text(tokenizer, text)
    if max_seq_len is not None and len(ids) > max_seq_len:
        return None
    spans = _assistant_char_spans(tokenizer, messages, text)
    offsets = _token_offsets(tokenizer, text, ids, spans)
    # A token is trained when it overlaps an answer span: a token straddling the prompt/answer boundary
    # carries answer text the model must produce.
    labels = [t if a < b and any(a < e and b > s for s, e in spans) else IGNORE for t, (a, b) in zip(ids, offsets)]
    return {"text": text, "input_ids": ids, "labels": labels, "offsets": offsets}


def tokenize_chat(tokenizer, messages: list[dict], max_seq_len: int) -> dict | None:
    """input_ids (exactly one BOS) and labels (-100 except each assistant answer and its </s>); None if too long."""
    d = _tokenize_detail(tokenizer, messages, max_seq_len)
    return None if d is None else {"input_ids": d["input_ids"], "labels": d["labels"]}


def fit_chat(tokenizer, messages: list[dict], max_seq_len: int) -> tuple[dict | None, int]:
    """tokenize_chat, dropping whole earlier user/assistant exchanges until the chat fits.

    Returns (sample or None, exchanges dropped). An answer is never cut: a last exchange that does not fit
    alone drops the sample.
    """
    dropped = 0
    while True:
        sample = tokenize_chat(tokenizer, messages, max_seq_len)
        if sample is not None or sum(m["role"] == "assistant" for m in messages) < 2:
            return sample, dropped
        first = 1 if messages[0]["role"] == "system" else 0
        messages = messages[:first] + messages[first + 2:]
        dropped += 1


def check_chat_structure(tokenizer, chats: list[dict], path) -> None:
    """Refuse (exit 2, every such record named) a message whose content holds a role marker or one of the
    tokenizer's special tokens: the template would render it as chat structure, e.g. an answer with
    "</s><|user|>" as a fake turn learned as the model's own tokens."""
    bad, specials = [], tokenizer.all_special_tokens  # a property that builds the list on each call
    for c in chats:
        marks = [(i, m["role"], chat_structure(m["content"], specials))
                 for i, m in enumerate(c["messages"])]
        bad += [(c["line"], f"messages[{i}] ({role}) contains {mark!r}") for i, role, mark in marks if mark][:1]
    if bad:
        more = f" ({len(bad)} records: lines {', '.join(str(n) for n, _ in bad[:20])})" if len(bad) > 1 else ""
        raise InputError(f"{path}:{bad[0][0]}: {bad[0][1]}, which the chat template would render as chat structure "
                         f"(a fake turn trained as the model's own){more}; remove or rewrite such records")


def _tokenize_record(tokenizer, messages: list[dict], max_seq_len: int) -> dict:
    """fit_chat's outcome as plain values: input_ids and labels ([] when the chat does not fit), fits, the
    exchanges dropped, the whole chat's length when it does not fit, and the error ("" if none)."""
    try:
        s, dropped = fit_chat(tokenizer, messages, max_seq_len)
        full_len = 0 if s is not None else len(encode_text(tokenizer, chat_text(tokenizer, messages)))
    except ValueError as e:
        return {"input_ids": [], "labels": [], "fits": False, "dropped": 0, "full_len": 0, "error": str(e)}
    return {"input_ids": s["input_ids"] if s else [], "labels": s["labels"] if s else [], "fits": s is not None,
            "dropped": dropped, "full_len": full_len, "error": ""}


def _tokenize_batch(batch: dict, tokenizer, max_seq_len: int) -> dict:
    """datasets.map's function: chats -> _tokenize_record's columns, the labels stored as a trained mask."""
    rows = [_tokenize_record(tokenizer, m, max_seq_len) for m in batch["messages"]]
    out = {k: [r[k] for r in rows] for k in ("input_ids", "fits", "dropped", "full_len", "error")}
    out["trained"] = [[label != IGNORE for label in r["labels"]] for r in rows]
    return out


def build_samples(tokenizer, chats: list[dict], max_seq_len: int, path, num_proc: int | None = None,
                  cache_dir: Path | None = None, cache_min_chats: int = CACHE_MIN_CHATS) -> tuple[list[dict], dict]:
    """Chats -> training samples (input_ids, labels, line, group, type, messages) and a report of what was
    dropped or trimmed; a bad record is InputError naming file:line. From cache_min_chats chats on, tokenizing
    goes through datasets (num_proc processes, default_num_proc when None; cached in cache_dir, datasets' cache
    folder when None) with the very same samples and errors."""
    check_chat_structure(tokenizer, chats, path)
    results = None
    if len(chats) >= cache_min_chats:
        try:
            # the key hashes this module (not the calling script): code that does not tokenize keeps the cache
            results = tokenize_cached(_tokenize_batch, tokenizer, chats, max_seq_len,
                                      num_proc or default_num_proc(len(chats)), cache_dir, sources=[__file__])
        except OSError as e:  # an unwritable or full cache folder costs the cache, not the run
            print(f"warning: cannot use the tokenization cache ({os_error_text(e)}); tokenizing in this process",
                  file=sys.stderr)
    if results is None:  # lazily, so the first bad record stops it
        results = (_tokenize_record(tokenizer, c["messages"], max_seq_len) for c in chats)
    samples, too_long, trimmed, longest = [], [], 0, 0
    for c, r in zip(chats, results):
        if r["error"]:
            raise InputError(f"{path}:{c['line']}: {r['error']}")
        if not r["fits"]:
            too_long.append(c["line"])
            longest = max(longest, r["full_len"])
            continue
        if r["labels"].count(IGNORE) == len(r["labels"]):
            raise InputError(f"{path}:{c['line']}: no assistant token to train on after rendering")
        trimmed += r["dropped"] > 0
        samples.append({"input_ids": r["input_ids"], "labels": r["labels"], "line": c["line"], "group": c["group"],
                        "type": c["type"], "turn_types": c["turn_types"], "messages": c["messages"]})
    report = {"n_records": len(chats), "dropped_too_long": len(too_long), "dropped_lines": too_long[:20],
              "longest_dropped": longest, "trimmed_earlier_turns": trimmed}
    if not samples:
        raise InputError(f"{path}: every sample is longer than --max_seq_len={max_seq_len} tokens "
                         f"(longest {longest}); raise --max_seq_len")
    return samples, report


def print_inspect(tokenizer, samples: list[dict], report: dict, n: int, max_seq_len: int) -> None:
    """What is trained on (train_qlora_hf.py --inspect): the first n samples rendered with their trained tokens
    marked, then token counts and a length histogram of all of them (report: build_samples')."""
    n = min(n, len(samples))
    print(f"{n} of {len(samples)} samples as the model sees them; ⟦trained⟧ tokens are marked "
          "(everything else has label -100)\n")
    for s in samples[:n]:
        d = _tokenize_detail(tokenizer, s["messages"])
        n_tr = sum(l != IGNORE for l in d["labels"])
        print(f"--- line {s['line']}: {len(d['input_ids'])} tokens, {n_tr} trained "
              f"({sum(m['role'] == 'assistant' for m in s['messages'])} assistant turn(s))")
        print(marked_text(d["text"], d["input_ids"], d["labels"], d["offsets"], tokenizer.bos_token_id))
    lengths = [len(s["input_ids"]) for s in samples]
    trained = sum(sum(l != IGNORE for l in s["labels"]) for s in samples)
    print(f"samples: {len(samples)} kept of {report['n_records']} records; {report['dropped_too_long']} dropped "
          f"as longer than --max_seq_len={max_seq_len}; {report['trimmed_earlier_turns']} lost earlier turns")
    print(f"tokens: {sum(lengths):,} in, {trained:,} trained ({trained / sum(lengths):.1%}); "
          f"length min {min(lengths)}, median {sorted(lengths)[len(lengths) // 2]}, max {max(lengths)}")
    print("length histogram (tokens):", *histogram_lines(lengths), sep="\n")

