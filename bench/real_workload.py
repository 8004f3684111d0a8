"""Workload "real" for bench_train.py: the pipeline's own Q&A records, with Zephyr-7B-beta's token counts modelled.

The records come from generate_qa.py run in-process, offline backend, on data/sample_abstracts.jsonl (seed 0, every
other flag at its default): 396 single-turn train records (3 papers held out for evaluation). The GPU machine has no
Zephyr tokenizer (no model hub), so each record's token count is modelled piece by piece from its rendered chat

    <s><|system|>\\n{sys}</s>\\n<|user|>\\n{q}</s>\\n<|assistant|>\\n{a}</s>\\n

* text (system prompt, question, answer): ceil(chars / CHARS_PER_TOKEN) tokens;
* template pieces: their real token counts in Zephyr's tokenizer (Mistral-7B-v0.1's 32k SentencePiece, legacy
  mode), see TEMPLATE_TOKENS: BOS 1; "<|system|>" 5 and "<|user|>" 5 ('<' '|' 'user' '|' '>'), "<|assistant|>" 6
  ('<' '|' 'ass' 'istant' '|' '>'); the newline after a marker 1 (<0x0A>); "</s>" 1 (the EOS special token); the
  newline after "</s>" 2 ('▁' '<0x0A>': SentencePiece puts its word-start piece after a special token).
  So 29 tokens of template per single-turn record.
* token ids are random (seeded), but the same text gets the same ids (every record shares the system prompt and the
  markers, as in the real data); labels are -100 everywhere except each assistant answer and the "</s>" after it,
  exactly what train_qlora_hf.py trains (the template's newline after that "</s>" is glue, not trained).

CHARS_PER_TOKEN = 4.5 is measured, not guessed: Mistral-7B-v0.1's own SentencePiece model (the `tokenizer.model.v1`
that the mistral-common wheel ships; Zephyr-7B-beta uses the same vocabulary) on exactly these 396 records gives
4.53 characters per token over the message texts (system prompt 4.75, questions 4.13, answers 4.53) and a mean of
136.5 tokens per record including the template; this model gives 138.4. The usual 3.6-4.0 for English in a 32k
vocabulary would give 152-166 tokens: these texts are plain English prose (the abstracts are written in our own
words, few digits or symbols), which the vocabulary covers well. Fewer tokens per sample is the harder case for a
speed-up (short steps are host-bound), so the measured figure is also the conservative one.

Answers: the offline generator's answers are extractive, one sentence of the abstract (78%) or two (22%), mean 20.3
words / 134 characters / ~30 tokens. An LLM backend is asked for "1-3 sentences" (paperqa_tune/qa/prompts.py) and
usually writes two full sentences, so its answers are typically 1.5-2.5x longer. --real-answer-scale X multiplies
each answer's modelled token count by X (default 1.0 = as generated; 2.0 = a typical LLM-written answer); the
bench's table and JSON name the scale used.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import tempfile
import zlib
from pathlib import Path

import torch

CHARS_PER_TOKEN = 4.5
# token counts of the template pieces in Zephyr-7B-beta's tokenizer (see the module docstring)
TEMPLATE_TOKENS = {"bos": 1, "<|system|>": 5, "<|user|>": 5, "<|assistant|>": 6, "marker_newline": 1, "eos": 1,
                   "eos_newline": 2}
ROLE_MARKER = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SOURCE = "data/sample_abstracts.jsonl"
SMOKE_PAPERS = 4            # smoke: generate from the first 4 abstracts (1 held out), ...
SMOKE_SAMPLES = 24          # ... keep 24 records ...
SMOKE_SHRINK = 4            # ... with a quarter of the modelled text tokens (short, for the CPU)


def generate_records(root: Path, smoke: bool = False, seed: int = 0) -> tuple[list[dict], str]:
    """generate_qa.main in-process into a temp dir; returns (train records, generate_qa's summary lines)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import generate_qa

    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        src = root / SOURCE
        argv = ["--backend", "offline", "--out", f"{tmp}/qa.jsonl", "--seed", str(seed)]
        if smoke:
            lines = [ln for ln in src.read_text().splitlines() if ln.strip()][:SMOKE_PAPERS]
            src = Path(tmp) / "abstracts.jsonl"
            src.write_text("\n".join(lines) + "\n")
            argv += ["--eval_papers", "1"]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = generate_qa.main(["--input", str(src), *argv])
        if rc != 0:
            raise RuntimeError(f"generate_qa exited {rc}:\n{buf.getvalue()[-3000:]}")
        records = [json.loads(ln) for ln in Path(f"{tmp}/qa.jsonl").read_text().splitlines() if ln.strip()]
    summary = "\n".join(ln for ln in buf.getvalue().splitlines() if ln.startswith(("generate_qa:", "pairs:")))
    return (records[:SMOKE_SAMPLES] if smoke else records), summary


def text_tokens(text: str, chars_per_token: float) -> int:
    return math.ceil(len(text) / chars_per_token) if text else 0


def _ids(key: str, n: int, vocab: int, seed: int) -> list[int]:
    """n random ids in [3, vocab) that depend only on (key, seed): the same text gets the same ids."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()) * 1000 + seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def model_sample(messages: list[dict], vocab: int, bos_id: int, eos_id: int, chars_per_token: float,
                 answer_scale: float, seed: int, uid: str) -> dict:
    """input_ids and labels of one record rendered with Zephyr's template, token counts modelled."""
    t = TEMPLATE_TOKENS
    ids, labels = [bos_id], [-100]
    for i, m in enumerate(messages):
        marker = ROLE_MARKER[m["role"]]
        head = _ids(marker, t[marker] + t["marker_newline"], vocab, seed)
        n = text_tokens(m["content"], chars_per_token)
        trained = m["role"] == "assistant"
        if trained:
            n = math.ceil(n * answer_scale)
            body = _ids(f"{uid}/{i}/{m['content']}", n, vocab, seed)  # answers are unique
        else:
            body = _ids(m["content"], n, vocab, seed)  # the shared system prompt: the same ids in every record
        tail = [eos_id] + _ids("</s>\n", t["eos_newline"], vocab, seed)
        ids += head + body + tail
        labels += [-100] * len(head) + (body + [eos_id] if trained else [-100] * (len(body) + 1)) \
            + [-100] * t["eos_newline"]
    return {"input_ids": ids, "labels": labels}


def build(root: Path, vocab: int, bos_id: int, eos_id: int, smoke: bool = False, answer_scale: float = 1.0,
          chars_per_token: float = CHARS_PER_TOKEN, seed: int = 0) -> tuple[list[dict], dict]:
    """(samples, description) of the workload; the description goes into the bench's JSON and table."""
    records, summary = generate_records(root, smoke, seed=0)
    cpt = chars_per_token * (SMOKE_SHRINK if smoke else 1)
    samples = [model_sample(r["messages"], vocab, bos_id, eos_id, cpt, answer_scale, seed + 7,
                            str((r.get("meta") or {}).get("id", k)))
               for k, r in enumerate(records)]
    lengths = [len(s["input_ids"]) for s in samples]
    trained = [sum(1 for x in s["labels"][1:] if x != -100) for s in samples]
    answers = [m for r in records for m in r["messages"] if m["role"] == "assistant"]
    desc = {"source": f"generate_qa.py --backend offline --input {SOURCE} --seed 0" + (
                f" (smoke: first {SMOKE_PAPERS} abstracts, --eval_papers 1, {SMOKE_SAMPLES} records)" if smoke else ""),
            "generate_qa": summary, "records": len(records), "chars_per_token": chars_per_token,
            "answer_scale": answer_scale, "template_tokens": TEMPLATE_TOKENS,
            "mean_tokens": sum(lengths) / len(lengths), "min_tokens": min(lengths), "max_tokens": max(lengths),
            "mean_trained_tokens": sum(trained) / len(trained), "total_tokens": sum(lengths),
            "total_trained_tokens": sum(trained),
            "mean_answer_chars": sum(len(m["content"]) for m in answers) / max(1, len(answers))}
    if smoke:
        desc["smoke_chars_per_token"] = cpt
    return samples, desc


def describe(desc: dict) -> str:
    return (f"real: {desc['records']} records from {desc['source']}; modelled {desc['mean_tokens']:.1f} tokens/sample "
            f"(min {desc['min_tokens']}, max {desc['max_tokens']}; {desc['mean_trained_tokens']:.1f} trained), "
            f"{desc['chars_per_token']} chars/token, answers x{desc['answer_scale']:g}"
            f"{' (as generated)' if desc['answer_scale'] == 1 else ' (lengthened to model LLM-written answers)'}")
