"""Batched generation for every stage that generates: evaluation, terminal inference and generate_qa.py's
local-model backend. Prompts are rendered exactly as training renders them (messages.chat_text + encode_text:
the tokenizer's chat template, exactly one BOS)."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

from paperqa_tune.errors import InputError

from paperqa_tune.messages import chat_stops, chat_text, encode_text, qa_messages
from paperqa_tune import engine
from paperqa_tune.engine import left_pad

_SURROGATE = re.compile("[\ud800-\udfff]")
# Against loops: what a small model decoding greedily needs when its generation_config.json sets no penalty of
# its own (SmolLM2-135M-Instruct looped on about a third of the questions without; see resolve_repetition_penalty).
DEFAULT_REPETITION_PENALTY = 1.1


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
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or answer (transformers' rule)
    stop_strings: tuple = ()        # an answer ends before the first of these it writes (chat_stops)
    penalty_from: str = field(default="", compare=False)  # where repetition_penalty came from (for the record)
    said: set = field(default_factory=set, compare=False, repr=False)  # notes already on stderr in this run

    def note_once(self, text: str) -> None:
        if text not in self.said:
            self.said.add(text)
            print(f"note: {text}", file=sys.stderr)

    def key(self) -> dict:
        """What changes the answers (for cache keys): the sampling settings only when sampling."""
        k = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens, "do_sample": self.do_sample}
        if self.repetition_penalty != 1.0:  # absent when off: the keys of answers cached before it stay valid
            k["repetition_penalty"] = self.repetition_penalty
        if self.stop_strings:
            k["stop_strings"] = list(self.stop_strings)
        if self.do_sample:
            k.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return k

    def record(self) -> dict:
        """What summary.json and quick_infer say about the decoding: key() with the penalty always named."""
        return {**self.key(), "repetition_penalty": self.repetition_penalty,
                "repetition_penalty_from": self.penalty_from, "stop_strings": list(self.stop_strings)}

    def kwargs(self, tokenizer) -> dict:
        """model.generate's arguments (stop strings aside: they need the tokenizer, _generate)."""
        eos = chat_stops(tokenizer)["eos_token_ids"]
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": eos if len(eos) > 1 else eos[0]}
        if self.min_new_tokens:
            kw["min_new_tokens"] = self.min_new_tokens
        kw["repetition_penalty"] = self.repetition_penalty
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        else:  # silence the model's own sampling defaults, which greedy decoding ignores
            kw.update(temperature=None, top_p=None, top_k=None)
        if self.cache == "static" or self.compile:
            kw["cache_implementation"] = "static"
            # transformers compiles the decoding step whenever the cache is static on a GPU, unless told not to
            kw["disable_compile"] = not self.compile
        return kw


def resolve_repetition_penalty(flag: float | None, model_generation: dict) -> tuple[float, str]:
    """The repetition penalty to decode with and where it came from: the flag when given, else the base model's
    generation_config.json (`model_generation`, loading.generation_defaults) when it sets one, else
    DEFAULT_REPETITION_PENALTY."""
    if flag is not None:
        return flag, "--repetition_penalty"
    if isinstance(model_generation.get("repetition_penalty"), (int, float)):
        return float(model_generation["repetition_penalty"]), "the model's generation_config.json"
    return DEFAULT_REPETITION_PENALTY, "the project default"


def add_repetition_penalty_flag(add) -> None:
    """--repetition_penalty, the same in eval_compare.py and quick_infer.py (`add`: a parser's add_argument)."""
    from paperqa_tune.cli import finite_float

    add("--repetition_penalty", type=finite_float, default=None,
        help="divide the scores of tokens already in the prompt or answer by this (transformers' rule) against "
             "answers that loop; 1 = off (default: the base model's generation_config.json value, else "
             f"{DEFAULT_REPETITION_PENALTY})")


def repetition_penalty_problem(value: float | None) -> str | None:
    return None if value is None or value > 0 else "--repetition_penalty must be > 0 (1 = off)"


def run_decoding(run, tokenizer, penalty_flag: float | None, **settings) -> Decoding:
    """The Decoding of a run's answers (evaluation, inference): `settings` as given, the repetition penalty
    resolved (flag, the base model's generation_config.json, the project default) and the run's stop strings."""
    from paperqa_tune.loading import generation_defaults
    from paperqa_tune.runs import decoding_stop_strings

    penalty, source = resolve_repetition_penalty(penalty_flag, generation_defaults(run.base_model))
    return Decoding(**settings, repetition_penalty=penalty, penalty_from=source,
                    stop_strings=decoding_stop_strings(run, tokenizer))


class StopText:
    """Which rows of a batch have written a stop string, token by token (engine.decode's `stop` protocol:
    accept(tokens) -> rows that must stop). Each row's newest tokens are decoded (special tokens kept) over a
    window long enough for the longest stop string; a row that wrote an EOS is left alone."""

    def __init__(self, tokenizer, stops, rows: int, eos_ids=()):
        self.tok, self.stops, self.eos = tokenizer, tuple(stops), set(eos_ids)
        self.rows = [[] for _ in range(rows)]
        self.ended: set[int] = set()
        self.window = max(map(len, self.stops)) + 8  # tokens: each decodes to at least one byte

    def accept(self, tokens: list[int]) -> list[int]:
        hit = []
        for i, t in enumerate(tokens):
            if i in self.ended:
                continue
            if t in self.eos:
                self.ended.add(i)
                continue
            self.rows[i].append(t)
            tail = self.tok.decode(self.rows[i][-self.window:], skip_special_tokens=False)
            if any(s in tail for s in self.stops):
                self.ended.add(i)
                hit.append(i)
        return hit


def cut_at_stop(tokenizer, row: list[int], stops) -> tuple[str, list[int]]:
    """An answer's text and token ids, cut where it first writes a stop string: the text before it, the tokens
    up to the one that completed it."""
    text = tokenizer.decode(row, skip_special_tokens=True)
    if not stops or not any(s in tokenizer.decode(row, skip_special_tokens=False) for s in stops):
        return text.strip(), row
    watch = StopText(tokenizer, stops, 1)
    row = row[:next((k + 1 for k, t in enumerate(row) if watch.accept([t])), len(row))]
    text = tokenizer.decode(row, skip_special_tokens=False)
    text = text[:min(text.find(s) for s in stops if s in text)]
    # the special tokens before the stop go as decode(skip_special_tokens=True) drops them
    specials = [t for t in tokenizer.all_special_tokens if t]
    for t in specials:
        text = text.replace(t, "")
    return text.strip(), row


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
    eos = chat_stops(tokenizer)["eos_token_ids"]
    stop = StopText(tokenizer, dec.stop_strings, len(batch), eos) if dec.stop_strings else None
    local_rng = seed is not None and dec.do_sample
    unfit = "--cache dynamic" if dec.cache != "static" else "--compile" if dec.compile else \
        engine.supports(model, max(map(len, batch)) + dec.max_new_tokens)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if local_rng \
            else contextlib.nullcontext(), torch.inference_mode():
        if local_rng:
            torch.manual_seed(seed)
        if unfit is None:
            rows = engine.decode(model, batch, dec, tokenizer.pad_token_id, eos, streamer, constraint,
                                 dec.cuda_graphs, stop)
        else:
            if dec.cache == "static" and not dec.compile:
                dec.note_once(f"decoding through model.generate: {unfit}")
            rows = _generate(model, tokenizer, batch, dec, streamer, constraint)
    out = []
    for row in rows:
        end = next((k for k, t in enumerate(row) if t in eos), None)
        row = row[:end + 1] if end is not None else row  # what follows EOS is padding
        text, row = cut_at_stop(tokenizer, row, dec.stop_strings)
        out.append((text, len(row), row))
    return out


def stop_criteria(tokenizer, stops, rows: int):
    """A model.generate stopping criterion for `stops`: transformers' StopStringCriteria, or, for a vocabulary it
    cannot index (a word-level tokenizer: "substring not found" while it builds its tables), StopText watching
    each row's decoded tail. The answer is cut at the stop string afterwards either way (cut_at_stop)."""
    import torch
    from transformers import StoppingCriteria, StopStringCriteria

    try:
        return StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stops))
    except ValueError:
        pass

    class _Watch(StoppingCriteria):
        def __init__(self):
            self.watch = StopText(tokenizer, stops, rows)

        def __call__(self, input_ids, scores, **kwargs):
            hit = set(self.watch.accept(input_ids[:, -1].tolist()))
            return torch.tensor([i in hit for i in range(input_ids.shape[0])], device=input_ids.device)

    return _Watch()


def _generate(model, tokenizer, batch: list[list[int]], dec: Decoding, streamer, constraint) -> list[list[int]]:
    """The generated ids of model.generate for left-padded prompts (its repetition penalty, like ours, skips the
    padding), stopping at dec.stop_strings too."""
    from transformers import StoppingCriteriaList

    ids, mask = left_pad(batch, tokenizer.pad_token_id, next(model.parameters()).device)
    extra = {"logits_processor": [constraint.hf_processor()]} if constraint is not None else {}
    if dec.stop_strings:
        extra.update(stopping_criteria=StoppingCriteriaList([stop_criteria(tokenizer, dec.stop_strings, len(batch))]))
    out = model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **dec.kwargs(tokenizer), **extra)
    return out[:, ids.shape[1]:].tolist()
