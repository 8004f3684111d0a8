"""Batched generation for every stage that generates: evaluation, terminal inference and generate_qa.py's
local-model backend. Prompts are rendered exactly as training renders them (messages.chat_text + encode_text:
the tokenizer's chat template, exactly one BOS)."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

from paperqa_tune.errors import InputError

from paperqa_tune.messages import chat_text, encode_text, qa_messages
from paperqa_tune import engine
from paperqa_tune.engine import left_pad

_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Decoding:
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    cache: str = "static"           # KV cache allocated once per batch (our loop, engine.py); "dynamic": generate's
    compile: bool = False           # torch.compile the decoding step through model.generate (static cache)
    cuda_graphs: bool = True        # static cache on a GPU: replay the one-token step as a CUDA graph
    said: set = field(default_factory=set, compare=False, repr=False)  # notes already on stderr in this run

    def note_once(self, text: str) -> None:
        if text not in self.said:
            self.said.add(text)
            print(f"note: {text}", file=sys.stderr)

    def key(self) -> dict:
        """What changes the answers (for cache keys): the sampling settings only when sampling."""
        k = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            k.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return k

    def kwargs(self, tokenizer) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        if self.min_new_tokens:
            kw["min_new_tokens"] = self.min_new_tokens
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        else:  # silence the model's own sampling defaults, which greedy decoding ignores
            kw.update(temperature=None, top_p=None, top_k=None)
        if self.cache == "static" or self.compile:
            kw["cache_implementation"] = "static"
            # transformers compiles the decoding step whenever the cache is static on a GPU, unless told not to
            kw["disable_compile"] = not self.compile
        return kw


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat up to the assistant header, as training renders it."""
    return encode_text(tokenizer, chat_text(tokenizer, messages, add_generation_prompt=True))


def prompt_ids(tokenizer, question: str, system: str | None, history: list[dict] = ()) -> list[int]:
    """One question in the training format: system (if any), the conversation's earlier turns (a follow-up
    question's history), the user turn, then the assistant header."""
    return chat_prompt_ids(tokenizer, qa_messages(question, system=system, history=history))


def too_long(n_prompt: int, max_new_tokens: int, limit: int | None) -> str | None:
    """Why a prompt of n_prompt tokens cannot be answered with up to max_new_tokens more by a model that
    attends over `limit` positions (config.max_position_embeddings), or None when it fits (or no limit is known)."""
    if limit is None or n_prompt + max_new_tokens <= limit:
        return None
    return (f"too long: prompt {n_prompt} tokens + --max_new_tokens {max_new_tokens} > the model's {limit} "
            "positions")


def skip_too_long(prompts: dict[str, list[int]], max_new_tokens: int, limit: int | None,
                  model_name: str) -> dict[str, str]:
    """id -> why, for the prompts (id -> token ids) that with max_new_tokens more would not fit the model's
    `limit` positions: never to be answered (a model past its positions writes garbage, or fails), with a
    warning on stderr. InputError when that is every prompt."""
    skipped = {i: why for i, p in prompts.items() if (why := too_long(len(p), max_new_tokens, limit))}
    if not skipped:
        return {}
    listed = "; ".join(f"{i}: {why}" for i, why in list(skipped.items())[:5]) + (" ..." if len(skipped) > 5 else "")
    if len(skipped) == len(prompts):
        raise InputError(f"every question is too long for {model_name} with --max_new_tokens {max_new_tokens} "
                         f"({listed}); lower --max_new_tokens or shorten the questions")
    print(f"warning: {len(skipped)} of {len(prompts)} question(s) skipped, not answered and not scored, because "
          f"they do not fit the model ({listed}); their rows say so in the CSV's 'skipped' column and summary.json "
          "counts them under skipped_too_long", file=sys.stderr)
    return skipped


def undecodable(text: str) -> str | None:
    """Where `text` holds bytes that were not UTF-8 (Python keeps them as lone surrogates: command-line
    arguments, or stdin read with errors="surrogateescape"), e.g. "byte 0xff at character 6"; None if clean.
    Such text cannot be tokenized or written as UTF-8."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    code = ord(m.group(0))
    return (f"byte 0x{code - 0xdc00:02x}" if 0xdc80 <= code <= 0xdcff else "a lone surrogate") + \
        f" at character {m.start()}"


def generate_batch(model, tokenizer, batch: list[list[int]], dec: Decoding, streamer=None,
                   seed: int | None = None, constraint=None) -> list[tuple[str, int, list[int]]]:
    """Answers for a batch of prompt ids: [(text, generated tokens incl. EOS, token ids)]. A reply without EOS
    used all max_new_tokens. seed: when sampling, draw from a generator state seeded with it alone (the same
    replies on a rerun, whatever ran before); the caller's random state is left as it was. constraint: a
    grammar.BatchGrammar for this batch (every reply a prefix of its JSON schema).

    The static cache runs our own loop (engine.decode: one CUDA graph per batch on a GPU); the dynamic cache,
    --compile and architectures the loop does not know run model.generate."""
    import contextlib

    import torch

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    local_rng = seed is not None and dec.do_sample
    unfit = "--cache dynamic" if dec.cache != "static" else "--compile" if dec.compile else \
        engine.supports(model, max(map(len, batch)) + dec.max_new_tokens)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if local_rng \
            else contextlib.nullcontext(), torch.inference_mode():
        if local_rng:
            torch.manual_seed(seed)
        if unfit is None:
            rows = engine.decode(model, batch, dec, tokenizer.pad_token_id, eos, streamer, constraint,
                                 dec.cuda_graphs)
        else:
            if dec.cache == "static" and not dec.compile:
                dec.note_once(f"decoding through model.generate: {unfit}")
            ids, mask = left_pad(batch, tokenizer.pad_token_id, device)
            extra = {"logits_processor": [constraint.hf_processor()]} if constraint is not None else {}
            out = model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **dec.kwargs(tokenizer),
                                 **extra)
            rows = out[:, ids.shape[1]:].tolist()
    rows = [row[:row.index(eos) + 1] if eos in row else row for row in rows]  # what follows EOS is padding
    return [(tokenizer.decode(row, skip_special_tokens=True).strip(), len(row), row) for row in rows]
