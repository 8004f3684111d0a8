"""Talking to the LLM that writes the Q&A: any OpenAI-compatible server (through paperqa_tune.client, the one
client every LLM call shares) or a local transformers model (batched, through paperqa_tune.generation), one reply
cache for both, the run's request statistics and its cost estimate. Each backend takes a frozen settings object:

    OpenAIBackend(ClientSettings(model, api_key, base_url, timeout=600), Sampling(0.7, 2056, 0), cache)
    HFBackend(HFSettings(model, Sampling(0.7, 2056, 0), batch_size=16), cache)"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from paperqa_tune.cache import JsonlCache
from paperqa_tune.client import FORMAT_STEPS, ChatClient, ClientSettings, Outcome, format_of, request_params
from paperqa_tune.errors import InputError, RunFailure
from paperqa_tune.files import sha256_text

# Request defaults by server (see resolve_request_defaults). Hosted OpenAI answers fast and in parallel. A local
# server often has one slot: requests queue behind each other, so each needs a longer deadline, few may wait at
# once, and a reply should stop near the size of what was asked (a model that loops would otherwise run on to the
# cap at a few tokens per second).
HOSTED_DEFAULTS = {"max_tokens": 3000, "timeout": 120.0, "concurrency": 8}
LOCAL_TIMEOUT, LOCAL_CONCURRENCY = 600.0, 2
TOKENS_PER_ITEM, TOKENS_SLACK = 150, 256  # a pair: ~20-40 question tokens, 1-3 answer sentences, JSON keys


# USD per 1M (input, output) tokens, for the manifest's cost estimate only; --price_per_mtok overrides.
PRICES_PER_MTOK = {"gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00), "gpt-4.1-mini": (0.40, 1.60),
                   "gpt-4.1-nano": (0.10, 0.40), "gpt-4.1": (2.00, 8.00)}


def price_per_mtok(model: str, backend: str) -> tuple[float, float]:
    """USD per 1M (input, output) tokens of a known OpenAI model; 0 for anything else (local models, servers)."""
    return PRICES_PER_MTOK.get(model if backend == "openai" else "", (0.0, 0.0))


def cost_estimate(stats: "Stats", price: tuple[float, float]) -> dict:
    """The manifest's cost estimate: this run's fresh tokens, and all the replies used (cached ones too)."""
    def cost(prompt_tokens: int, completion_tokens: int) -> float:
        return round((prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6, 6)

    return {"price_per_mtok_in_out": list(price),
            "this_run": cost(stats.new_prompt_tokens, stats.new_completion_tokens),
            "all_replies_used": cost(stats.prompt_tokens, stats.completion_tokens)}


def sized_max_tokens(items_asked: int) -> int:
    """A reply budget for `items_asked` Q&A items: room for long ones, not for a reply that never stops."""
    return TOKENS_PER_ITEM * max(1, items_asked) + TOKENS_SLACK


def resolve_request_defaults(backend: str, base_url: str | None, items_asked: int) -> dict:
    """--max_tokens, --timeout and --concurrency for a run that did not give them. Hosted OpenAI (no --base_url):
    3000 tokens, 120 s, 8 in flight. A --base_url server: 600 s and 2 in flight (a one-slot server answers one
    request while the next waits, so each may wait a whole reply), and a reply budget sized to the items asked
    per request; so does --backend hf (its batch waits for its longest reply)."""
    local = base_url is not None
    out = dict(HOSTED_DEFAULTS)
    if local:
        out.update(timeout=LOCAL_TIMEOUT, concurrency=LOCAL_CONCURRENCY)
    if local or backend == "hf":
        out["max_tokens"] = sized_max_tokens(items_asked)
    return out


def cache_key(model: str, messages: list[dict], params: dict) -> str:
    return sha256_text(json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True,
                                  ensure_ascii=False))


class ResponseCache:
    """LLM replies as Outcomes, stored in the shared append-only JsonlCache keyed by hash(model, messages,
    params); a reply is on disk before anything else happens with it. Every reply that was paid for is kept,
    valid or not (its tokens were spent); whether a rerun uses it is decided on reading (`Backend.reuse`)."""

    def __init__(self, path: Path):
        self.store = JsonlCache(path)
        self.loaded = self.store.loaded

    def get(self, key: str) -> Outcome | None:
        e = self.store.get(key)
        if e is None:
            return None
        return Outcome(content=e.get("content"), finish_reason=e.get("finish_reason"), usage=e.get("usage") or {},
                       cached=True)

    def put(self, key: str, model: str, out: Outcome) -> None:
        self.store.put({"key": key, "model": model, "content": out.content, "finish_reason": out.finish_reason,
                        "usage": out.usage, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})


class Progress:
    """One tqdm bar per round of requests, showing pairs / rejects / tokens so far and the completion tokens per
    second of this round's fresh replies (cached ones cost no time), so a slow server shows early."""

    def __init__(self, stats: "Stats", file=None, clock=time.monotonic):
        self.stats, self.file, self.clock = stats, file, clock
        self.bar = None
        self.t0, self.tokens0 = clock(), 0

    def start(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self.close()
        self.t0, self.tokens0 = self.clock(), self.stats.new_completion_tokens
        self.bar = tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, file=self.file,
                        disable=None if self.file is None else False)

    def postfix(self) -> dict:
        s = self.stats
        rate = (s.new_completion_tokens - self.tokens0) / max(self.clock() - self.t0, 1e-6)
        return {"pairs": s.pairs, "rejects": s.rejects, "tokens": s.prompt_tokens + s.completion_tokens,
                "tok/s": f"{rate:.1f}"}

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(ordered_dict=self.postfix(), refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class Stats:
    pairs: int = 0
    rejects: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    new_prompt_tokens: int = 0
    new_completion_tokens: int = 0
    requests_sent: int = 0
    cache_hits: int = 0
    asked_again: int = 0
    failed: int = 0

    def add(self, out: Outcome) -> None:
        p, c = int(out.usage.get("prompt_tokens") or 0), int(out.usage.get("completion_tokens") or 0)
        self.prompt_tokens += p
        self.completion_tokens += c
        if out.cached:
            self.cache_hits += 1
        elif out.error is None:
            self.requests_sent += 1
            self.asked_again += out.retried
            self.new_prompt_tokens += p
            self.new_completion_tokens += c


class Backend:
    """What both LLM backends share: which cached replies are used as they are (--reuse_cache)."""

    reuse = "valid"

    def __init__(self):
        self.fresh: set[str] = set()  # keys answered in this run: never asked twice in one run

    def use_cached(self, key: str, k: int, hit: Outcome, usable) -> bool:
        if key in self.fresh or self.reuse == "all":
            return True
        return self.reuse == "valid" and (usable is None or usable(k, hit))


@dataclass(frozen=True)
class Sampling:
    """How replies are sampled, for either backend (part of every reply's cache key)."""
    temperature: float
    max_tokens: int
    seed: int | None


class OpenAIBackend(Backend):
    """Any OpenAI-compatible chat server through the shared client (paperqa_tune.client: one deadline per
    attempt for the whole reply, retries honouring Retry-After, the response format negotiated once by the
    first request: json_schema -> json_object+schema -> json_object -> none), with this run's reply cache.
    `format_used` and `format_note` say what was used and why."""

    name = "openai"

    def __init__(self, settings: ClientSettings, sampling: Sampling, cache: ResponseCache, reuse: str = "valid"):
        super().__init__()
        self.chat = ChatClient(settings)
        self.model, self.sampling = settings.model, sampling
        self.cache, self.reuse = cache, reuse

    @property
    def format_used(self) -> str:
        """The response format this run's requests use now: --response_format, or what it fell back to."""
        return self.chat.format_used

    @property
    def format_note(self) -> str | None:
        return self.chat.format_note

    def _base(self) -> dict:
        s = self.sampling
        return {"temperature": s.temperature, "max_tokens": s.max_tokens, "seed": s.seed}

    def _params(self, schema_name: str, schema: dict) -> dict:
        return self.chat.params(self._base(), schema_name, schema)

    def _lookup(self, messages, params, schema_name: str = "", schema: dict | None = None
                ) -> tuple[str, Outcome | None]:
        """(the key these params are cached under, the cached reply). Also found: a reply answered after a format
        fallback (a lower rung of FORMAT_STEPS), and one cached under the budget every server had before the
        defaults depended on it (3000 tokens) if it ended within this run's --max_tokens, so a rerun re-asks
        nothing."""
        key, asked, budget = cache_key(self.model, messages, params), format_of(params), params["max_tokens"]
        if schema is None:  # the schema the params carry (a lower rung with one needs it)
            rf = params.get("response_format") or {}
            schema_name = (rf.get("json_schema") or {}).get("name", schema_name)
            schema = rf.get("schema") or (rf.get("json_schema") or {}).get("schema") or {}
        base = {k: v for k, v in params.items() if k != "response_format"}
        for tokens in dict.fromkeys((budget, HOSTED_DEFAULTS["max_tokens"])):
            for fmt in FORMAT_STEPS[FORMAT_STEPS.index(asked):]:
                p = request_params({**base, "max_tokens": tokens}, fmt, schema_name, schema)
                hit = self.cache.get(cache_key(self.model, messages, p))
                if hit is not None and (tokens == budget or (hit.finish_reason != "length" and int(
                        hit.usage.get("completion_tokens") or 0) <= budget)):
                    return key, hit
        return key, None

    def lookup(self, messages: list[dict], schema_name: str, schema: dict) -> Outcome | None:
        """The cached reply to these messages, if any (nothing is sent)."""
        return self._lookup(messages, self._params(schema_name, schema), schema_name, schema)[1]

    async def preflight(self) -> None:
        await self.chat.preflight()

    async def _one(self, k, messages, schema_name, schema, on_done, usable) -> Outcome:
        key, hit = self._lookup(messages, self._params(schema_name, schema), schema_name, schema)
        if hit is None or not self.use_cached(key, k, hit, usable):
            retried = hit is not None

            def cached(params):  # looked up again once a slot is free: the format may have stepped down
                nonlocal retried
                key, hit = self._lookup(messages, params, schema_name, schema)
                if hit is not None and self.use_cached(key, k, hit, usable):
                    return hit
                retried = retried or hit is not None
                return None

            params, hit = await self.chat.request(messages, self._base(), schema_name, schema, cached)
            if not hit.cached and hit.error is None:
                key = cache_key(self.model, messages, params)
                hit.retried = retried
                self.cache.put(key, self.model, hit)  # durable before anything else happens
                self.fresh.add(key)
        on_done(k, hit)
        return hit

    async def complete(self, batch: list[list[dict]], schema_name: str, schema: dict, on_done,
                       usable=None) -> list[Outcome]:
        """Replies for every message list, in order; on_done(k, outcome) runs as each one arrives. usable(k, cached)
        says whether a cached reply passes validation (else it is asked again, see --reuse_cache)."""
        params = self._params(schema_name, schema)
        if not self.chat.checked and any(hit is None or not self.use_cached(key, k, hit, usable) for k, (key, hit)
                                         in enumerate(self._lookup(m, params, schema_name, schema) for m in batch)):
            await self.chat.preflight()
        watch = asyncio.create_task(self.chat.tell_if_silent())
        try:
            outs = list(await asyncio.gather(*(self._one(k, m, schema_name, schema, on_done, usable)
                                               for k, m in enumerate(batch))))
        finally:
            watch.cancel()
            await self.chat.aclose()  # before the event loop ends (a round's connections are not reused)
        if self.chat.fatal:
            raise self.chat.fatal
        if self.chat.gave_up:
            raise RunFailure(self.chat.gave_up)
        return outs


@dataclass(frozen=True)
class HFSettings:
    """A local transformers model's settings. shape: (items asked per request, turns per conversation) and
    max_chars ({"question": n, "answer": n}) are written into the schema (grammar.bounded)."""
    model: str
    sampling: Sampling
    batch_size: int = 16
    trust_remote_code: bool = False
    constrained: bool = True
    shape: tuple[int, int] = (1, 1)
    max_chars: dict[str, int] | None = None


class HFBackend(Backend):
    """A local transformers model: batched left-padded generation through the shared decoding loop (prompts
    rendered and tokenized as training renders them; a static KV cache and CUDA graphs on a GPU); each reply
    constrained to the request's JSON schema unless settings.constrained is False; replies go through the same
    cache."""

    name = "hf"
    progress: Progress | None = None  # the caller's bar for the round of requests: moved token by token
    quiet_every_s = 30.0  # without a live bar: a progress line on stderr this often while a batch decodes

    def __init__(self, settings: HFSettings, cache: ResponseCache, reuse: str = "valid"):
        import torch

        from paperqa_tune.generation import Decoding
        from paperqa_tune.distributed import default_device
        from paperqa_tune.loading import first_line, load_causal_lm, load_tokenizer

        super().__init__()
        model, batch_size, trust_remote_code = settings.model, settings.batch_size, settings.trust_remote_code
        constrained, shape, max_chars = settings.constrained, settings.shape, settings.max_chars
        sampling = settings.sampling
        temperature, max_tokens, seed = sampling.temperature, sampling.max_tokens, sampling.seed
        device = default_device()
        try:
            self.tok = load_tokenizer(model, padding_side="left", trust_remote_code=trust_remote_code)
            # device_map "auto" on GPUs: a generator model larger than one GPU is spread over all of them
            self.lm = load_causal_lm(model, torch.bfloat16 if device.type == "cuda" else torch.float32, device,
                                     quantized=False, trust_remote_code=trust_remote_code,
                                     device_map="auto" if device.type == "cuda" else None)
        except InputError as e:
            raise InputError(f"--model {model}: {e}") from None
        self.lm.eval()
        # The static cache (our loop): one allocation of prompt + max_tokens per row for each batch
        self.dec = Decoding(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature,
                            top_p=0.95, seed=seed)
        self.grammar = None
        if constrained:
            from paperqa_tune.qa.grammar import JsonGrammar

            vocab = self.lm.get_output_embeddings().weight.shape[0]  # the logits' width (may exceed the tokenizer)
            try:
                self.grammar = JsonGrammar(self.tok, vocab)
            except ImportError as e:
                raise InputError(f"constrained decoding needs xgrammar ({e}): pip install -r requirements.txt, or "
                                 "run with --no-constrained_decoding") from None
            except (RuntimeError, ValueError) as e:  # a tokenizer xgrammar cannot map to bytes
                raise InputError(f"--model {model}: xgrammar cannot read this tokenizer ({first_line(e)}); run with "
                                 "--no-constrained_decoding") from None
        self.model, self.batch_size, self.shape, self.max_chars = model, batch_size, shape, max_chars or {}
        self.cache, self.reuse = cache, reuse

    def _params(self, schema: dict | None = None) -> dict:
        """The cache key's params, as replies were cached before (+ the grammar when used: which schema)."""
        params = {"temperature": self.dec.temperature, "max_new_tokens": self.dec.max_new_tokens, "seed": self.dec.seed}
        if self.grammar is not None:
            params["grammar"] = {"json_schema": _schema_id(schema), "max_chars": self.max_chars}
        return params

    def lookup(self, messages: list[dict], schema_name: str, schema: dict) -> Outcome | None:
        return self.cache.get(cache_key(self.model, messages, self._params(schema)))

    def _generate(self, batch: list[list[dict]], schemas: list[dict], meter: "_DecodeMeter") -> list[Outcome]:
        from paperqa_tune.generation import chat_prompt_ids, generate_batch
        from paperqa_tune.qa.grammar import bounded

        prompts = [chat_prompt_ids(self.tok, m) for m in batch]  # exactly one BOS, decided per prompt
        constraint = None
        if self.grammar is not None:
            device = self.lm.get_output_embeddings().weight.device  # where the logits are
            constraint = self.grammar.batch([bounded(s, *self.shape, self.max_chars) for s in schemas],
                                            len(prompts), device)
        meter.start(prompts, self.dec.max_new_tokens)
        # seed: each batch samples the same way on a rerun, whatever came before it
        replies = generate_batch(self.lm, self.tok, prompts, self.dec, seed=self.dec.seed, constraint=constraint,
                                 streamer=meter)
        eos = self.tok.eos_token_id
        return [Outcome(content=text, finish_reason="stop" if eos in ids else "length",
                        usage={"prompt_tokens": len(prompt), "completion_tokens": n})
                for prompt, (text, n, ids) in zip(prompts, replies)]

    async def complete(self, batch: list[list[dict]], schema_name: str, schema: dict | list[dict], on_done,
                       usable=None) -> list[Outcome]:
        """Replies for every message list, in order, as OpenAIBackend.complete; `schema` is one for all requests or
        a list with one per request (prompts.request_schema: each request's own quota). While a batch decodes,
        `progress` (the caller's bar, when set) shows its tokens and tokens/s; without a live bar (stderr not a
        terminal) plain lines on stderr do."""
        schemas = schema if isinstance(schema, list) else [schema] * len(batch)
        keys = [cache_key(self.model, m, self._params(sc)) for m, sc in zip(batch, schemas)]
        results: list[Outcome | None] = [self.cache.get(k) for k in keys]
        retried = set()
        for i, r in enumerate(results):
            if r is not None and not self.use_cached(keys[i], i, r, usable):
                results[i] = None
                retried.add(i)
            elif r is not None:
                on_done(i, r)
        # Batches are fixed by the requests' order, not by what is cached: a rerun after a kill generates each
        # missing reply in the same batch (same shapes and padding, so the same numerics) as an uninterrupted run.
        starts = [s for s in range(0, len(batch), self.batch_size)
                  if any(results[i] is None for i in range(s, min(s + self.batch_size, len(batch))))]
        meter = _DecodeMeter(self.progress, self.tok.eos_token_id, len(starts), len(batch), self.quiet_every_s)
        for s in starts:
            idx = range(s, min(s + self.batch_size, len(batch)))
            for i, out in zip(idx, self._generate([batch[i] for i in idx], [schemas[i] for i in idx], meter)):
                if results[i] is not None:
                    continue  # cached and usable: kept as it was
                out.retried = i in retried
                self.cache.put(keys[i], self.model, out)
                self.fresh.add(keys[i])
                results[i] = out
                on_done(i, out)
            meter.batch_done(sum(r is not None for r in results))
        return results  # type: ignore[return-value]


def _schema_id(schema: dict | None) -> str:
    """How an hf cache key names the grammar's schema: "bounded" for the general pairs / conversations schemas
    (as replies were cached before per-request schemas), else a hash of the schema (prompts.request_schema)."""
    from paperqa_tune.qa.prompts import DIALOGUES_SCHEMA, PAIRS_SCHEMA

    if schema is None or schema in (PAIRS_SCHEMA, DIALOGUES_SCHEMA):
        return "bounded"
    return "sha256:" + sha256_text(json.dumps(schema, sort_keys=True))


class _DecodeMeter:
    """transformers' streamer protocol (put the prompt ids, then each step's tokens; end) for HFBackend's batches:
    counts the tokens of the rows still writing and shows them as they come, so a slow model (a CPU) is seen to
    move from the first batch on. With a live tqdm bar (Progress, stderr a terminal) it refreshes the bar's
    postfix at the first token and then every BAR_EVERY_S; otherwise it prints a line when a batch starts, every
    `every_s` while it decodes, and when it ends."""

    BAR_EVERY_S = 0.5

    def __init__(self, progress: Progress | None, eos: int, batches: int, total: int, every_s: float,
                 clock=time.monotonic, file=None):
        bar = progress.bar if progress is not None else None
        self.progress, self.live = progress, bar is not None and not getattr(bar, "disable", False)
        self.eos, self.batches, self.total, self.every_s, self.clock = eos, batches, total, every_s, clock
        self.file = file or sys.stderr
        self.n = self.rows = self.tokens = self.shown_at = 0
        self.t0 = 0.0
        self.writing: list[bool] = []

    def start(self, prompts: list[list[int]], max_new: int) -> None:
        self.n += 1
        self.rows, self.tokens, self.writing = len(prompts), 0, []
        self.t0 = self.shown_at = self.clock()
        if not self.live:
            widths = sorted(map(len, prompts))
            self._line(f"decoding {len(prompts)} request(s) (prompts of {widths[0]}-{widths[-1]} tokens, up to "
                       f"{max_new} new tokens each)")

    def put(self, value) -> None:
        if value.dim() == 2:  # the prompt ids: the batch starts
            self.writing = [True] * value.shape[0]
            return
        for row, token in enumerate(value.tolist()):
            if self.writing[row]:
                self.tokens += 1  # EOS counts, as in the reply's usage
                self.writing[row] = token != self.eos
        now = self.clock()
        if self.live and (self.tokens <= self.rows or now - self.shown_at >= self.BAR_EVERY_S):
            self.shown_at = now
            self.progress.bar.set_postfix(ordered_dict={**self.progress.postfix(), **self._figures(now)}, refresh=True)
        elif not self.live and now - self.shown_at >= self.every_s:
            self.shown_at = now
            f = self._figures(now)
            self._line(f"{f['batch_tokens']} tokens so far, {f['replies']} replies complete, {f['tok/s']} tok/s")

    def end(self) -> None:
        pass

    def batch_done(self, done: int) -> None:
        if not self.live:
            f = self._figures(self.clock())
            self._line(f"{f['batch_tokens']} tokens in {self.clock() - self.t0:.1f} s ({f['tok/s']} tok/s); "
                       f"{done}/{self.total} requests done")

    def _figures(self, now: float) -> dict:
        complete = sum(not w for w in self.writing)
        return {"batch": f"{self.n}/{self.batches}", "batch_tokens": self.tokens,
                "replies": f"{complete}/{self.rows}", "tok/s": f"{self.tokens / max(now - self.t0, 1e-6):.1f}"}

    def _line(self, text: str) -> None:
        print(f"hf batch {self.n}/{self.batches}: {text}", file=self.file, flush=True)
