"""Talking to the LLM that writes the Q&A: any OpenAI-compatible server (async, with whole-reply deadlines and
our own retries) or a local transformers model (batched, through paperqa_tune.generation), one reply cache for
both, and the run's request statistics."""
from __future__ import annotations

import asyncio
import json
import random
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from common import InputError, RunFailure, sha256_text
from paperqa_tune.cache import JsonlCache
from paperqa_tune.safety import scrub

TIMEOUT_RETRIES = 1  # a request that timed out is asked again this many times (rate limits and 5xx: max_retries)
GIVE_UP_AFTER_TIMEOUTS = 3  # requests in a row that got no reply in time: the server is down, stop the run


@dataclass
class Outcome:
    content: str | None = None
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    error: str | None = None
    cached: bool = False
    retried: bool = False  # asked again because the cached reply failed validation (or --reuse_cache none)


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
    """One tqdm bar per round of requests, showing pairs / rejects / tokens so far."""

    def __init__(self, stats: "Stats"):
        self.stats = stats
        self.bar = None

    def start(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=desc, unit="req", disable=None, dynamic_ncols=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            s = self.stats
            self.bar.set_postfix(pairs=s.pairs, rejects=s.rejects, tokens=s.prompt_tokens + s.completion_tokens,
                                 refresh=False)

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


class OpenAIBackend(Backend):
    """Any OpenAI-compatible chat server through the official async client. The retries are ours (the client's
    are off): the client's timeout is per read, so a server trickling bytes would never time out; here every
    attempt has one deadline for the whole reply, and 429/5xx retries honour Retry-After as the client does."""

    name = "openai"

    def __init__(self, model, api_key, base_url, timeout, max_retries, concurrency, temperature, max_tokens, seed,
                 response_format, cache: ResponseCache, reuse: str = "valid"):
        import openai

        super().__init__()
        self.client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)
        self.api_key, self.timeout, self.max_retries = api_key, timeout, max_retries
        self.model, self.temperature, self.max_tokens, self.seed = model, temperature, max_tokens, seed
        self.response_format = response_format
        self.sem = asyncio.Semaphore(concurrency)
        self.cache, self.reuse = cache, reuse
        self.checked = False
        self.timeouts_in_a_row = 0
        self.gave_up: str | None = None

    def _clean(self, text: str | None) -> str | None:
        """Server-written text as we may store it: an error body or reply can echo the request's API key (scrubbed
        before any cut, so no prefix of the key survives)."""
        return scrub(text, self.api_key) if text else text

    def _params(self, schema_name: str, schema: dict) -> dict:
        p = {"temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed}
        if self.response_format == "json_schema":
            p["response_format"] = {"type": "json_schema",
                                    "json_schema": {"name": schema_name, "schema": schema, "strict": True}}
        elif self.response_format == "json_object":
            p["response_format"] = {"type": "json_object"}
        return p

    def _lookup(self, messages, params) -> tuple[str, Outcome | None]:
        key = cache_key(self.model, messages, params)
        hit = self.cache.get(key)
        if hit is None and "response_format" in params:  # answered earlier after a plain-JSON fallback
            plain = {k: v for k, v in params.items() if k != "response_format"}
            hit = self.cache.get(cache_key(self.model, messages, plain))
        return key, hit

    def lookup(self, messages: list[dict], schema_name: str, schema: dict) -> Outcome | None:
        """The cached reply to these messages, if any (nothing is sent)."""
        return self._lookup(messages, self._params(schema_name, schema))[1]

    async def preflight(self) -> None:
        """Fail fast, before any output, on a wrong URL or key (one cheap GET /models, no retries)."""
        import openai

        if self.checked:
            return
        self.checked = True
        limit = min(10.0, self.timeout)
        try:
            await asyncio.wait_for(self.client.with_options(timeout=limit).models.list(), limit)
        except (openai.APIConnectionError, asyncio.TimeoutError) as e:
            why = self._clean(str(e)) or f"no answer within {limit:g} s"
            raise InputError(f"cannot reach the server at {self.client.base_url} ({why}); start it or fix "
                             "--base_url") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise InputError(f"the server at {self.client.base_url} refused the API key ({e.status_code}); "
                             "check OPENAI_API_KEY") from None
        except openai.APIStatusError:
            pass  # some compatible servers have no /models; the chat requests will tell

    def _outcome(self, resp) -> Outcome:
        try:
            choice, u = (resp.choices or [None])[0], resp.usage
            return Outcome(content=self._clean(choice.message.content) if choice else None,
                           finish_reason=choice.finish_reason if choice else None,
                           usage={"prompt_tokens": u.prompt_tokens or 0,
                                  "completion_tokens": u.completion_tokens or 0} if u else {})
        except AttributeError:  # e.g. a proxy's HTML page instead of a completion
            return Outcome(error=f"unexpected response from the server: {self._clean(str(resp))[:200]!r}")

    async def _request(self, messages, params) -> Outcome:
        """One request with its retries: each attempt must be answered in full within --timeout; 429, 408/409,
        5xx and lost connections are retried up to --max_retries, timeouts TIMEOUT_RETRIES times. Raises
        BadRequestError (the caller may drop response_format); any other failure is an Outcome with the error."""
        import openai

        attempt = timeouts = 0
        while True:
            if self.gave_up:
                return Outcome(error=self.gave_up)
            wait = min(8.0, 0.5 * 2 ** attempt) * (1 - 0.25 * random.random())  # the client's own backoff
            try:
                resp = await asyncio.wait_for(
                    self.client.chat.completions.create(model=self.model, messages=messages, **params), self.timeout)
            except openai.BadRequestError:
                raise
            except (asyncio.TimeoutError, openai.APITimeoutError):
                timeouts += 1
                why = f"no complete reply within --timeout {self.timeout:g} s"
                retry = timeouts <= TIMEOUT_RETRIES and attempt < self.max_retries
                wait = 0.0
            except openai.APIStatusError as e:
                why = f"{type(e).__name__}: {self._clean(str(e))[:300]}"
                retry = (e.status_code in (408, 409, 429) or e.status_code >= 500) and attempt < self.max_retries
                after = _retry_after(e.response.headers)
                wait = after if after is not None and 0 <= after <= 60 else wait
            except openai.APIConnectionError as e:
                why, retry = f"{type(e).__name__}: {self._clean(str(e))[:300]}", attempt < self.max_retries
            except (openai.OpenAIError, ValueError) as e:  # ValueError: a malformed / truncated HTTP body
                why, retry = f"{type(e).__name__}: {self._clean(str(e))[:300]}", False
            else:
                self.timeouts_in_a_row = 0
                return self._outcome(resp)
            if retry:
                attempt += 1
                await asyncio.sleep(wait)
                continue
            if why.startswith("no complete reply"):
                self.timeouts_in_a_row += 1
                if self.timeouts_in_a_row >= GIVE_UP_AFTER_TIMEOUTS and not self.gave_up:
                    self.gave_up = (f"the server at {self.client.base_url} sent no complete reply within --timeout "
                                    f"{self.timeout:g} s to {self.timeouts_in_a_row} requests in a row (each tried "
                                    f"{timeouts} times); check that it is up, lower --concurrency or raise --timeout, "
                                    "then rerun the same command (answered requests come from the cache)")
            return Outcome(error=f"request failed after {attempt + 1} attempt(s): {why}")

    async def _one(self, k, messages, schema_name, schema, on_done, usable) -> Outcome:
        import openai

        key, hit = self._lookup(messages, self._params(schema_name, schema))
        if hit is None or not self.use_cached(key, k, hit, usable):
            retried = hit is not None
            async with self.sem:  # at most --concurrency requests in flight: all a kill can make us pay twice
                while True:
                    params = self._params(schema_name, schema)
                    key, hit = self._lookup(messages, params)
                    if hit is not None and self.use_cached(key, k, hit, usable):
                        break
                    retried = retried or hit is not None
                    try:
                        hit = await self._request(messages, params)
                    except openai.BadRequestError as e:
                        if "response_format" in params:
                            if self.response_format != "none":
                                print(f"note: the server refused response_format={self.response_format} "
                                      f"({e.status_code}); asking for plain JSON instead", file=sys.stderr)
                                self.response_format = "none"
                            continue
                        hit = Outcome(error=f"{type(e).__name__}: {self._clean(str(e))[:300]}")
                        break
                    if hit.error is None:
                        hit.retried = retried
                        self.cache.put(key, self.model, hit)  # durable before anything else happens
                        self.fresh.add(key)
                    break
        on_done(k, hit)
        return hit

    async def complete(self, batch: list[list[dict]], schema_name: str, schema: dict, on_done,
                       usable=None) -> list[Outcome]:
        """Replies for every message list, in order; on_done(k, outcome) runs as each one arrives. usable(k, cached)
        says whether a cached reply passes validation (else it is asked again, see --reuse_cache)."""
        params = self._params(schema_name, schema)
        if not self.checked and any(hit is None or not self.use_cached(key, k, hit, usable)
                                    for k, (key, hit) in enumerate(self._lookup(m, params) for m in batch)):
            await self.preflight()
        outs = list(await asyncio.gather(*(self._one(k, m, schema_name, schema, on_done, usable)
                                           for k, m in enumerate(batch))))
        if self.gave_up:
            raise RunFailure(self.gave_up)
        return outs


def _retry_after(headers) -> float | None:
    """Seconds a 429/503 asks us to wait (Retry-After or retry-after-ms), or None."""
    for name, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        try:
            return float(headers.get(name)) / divisor
        except (TypeError, ValueError):
            continue
    return None


class HFBackend(Backend):
    """A local transformers model: batched left-padded generation through the shared generation code (prompts
    rendered and tokenized as training renders them); replies go through the same cache."""

    name = "hf"

    def __init__(self, model, batch_size, temperature, max_tokens, seed, trust_remote_code, cache: ResponseCache,
                 reuse: str = "valid"):
        import torch

        from paperqa_tune.generation import Decoding
        from paperqa_tune.distributed import default_device
        from paperqa_tune.loading import load_causal_lm, load_tokenizer

        super().__init__()
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
        # The dynamic KV cache: a static one would reserve prompt + max_tokens (3000 by default) per prompt for
        # every batch up front, for replies that usually stop far sooner.
        self.dec = Decoding(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature,
                            top_p=0.95, seed=seed, cache="dynamic")
        self.model, self.batch_size = model, batch_size
        self.cache, self.reuse = cache, reuse

    def _params(self) -> dict:  # the cache key's params, as replies were cached before
        return {"temperature": self.dec.temperature, "max_new_tokens": self.dec.max_new_tokens, "seed": self.dec.seed}

    def lookup(self, messages: list[dict], schema_name: str, schema: dict) -> Outcome | None:
        return self.cache.get(cache_key(self.model, messages, self._params()))

    def _generate(self, batch: list[list[dict]]) -> list[Outcome]:
        from paperqa_tune.generation import chat_prompt_ids, generate_batch

        prompts = [chat_prompt_ids(self.tok, m) for m in batch]  # exactly one BOS, decided per prompt
        # seed: each batch samples the same way on a rerun, whatever came before it
        replies = generate_batch(self.lm, self.tok, prompts, self.dec, seed=self.dec.seed)
        eos = self.tok.eos_token_id
        return [Outcome(content=text, finish_reason="stop" if eos in ids else "length",
                        usage={"prompt_tokens": len(prompt), "completion_tokens": n})
                for prompt, (text, n, ids) in zip(prompts, replies)]

    async def complete(self, batch: list[list[dict]], schema_name: str, schema: dict, on_done,
                       usable=None) -> list[Outcome]:
        params = self._params()
        keys = [cache_key(self.model, m, params) for m in batch]
        results: list[Outcome | None] = [self.cache.get(k) for k in keys]
        retried = set()
        for i, r in enumerate(results):
            if r is not None and not self.use_cached(keys[i], i, r, usable):
                results[i] = None
                retried.add(i)
            elif r is not None:
                on_done(i, r)
        todo = [i for i, r in enumerate(results) if r is None]
        for s in range(0, len(todo), self.batch_size):
            idx = todo[s: s + self.batch_size]
            for i, out in zip(idx, self._generate([batch[i] for i in idx])):
                out.retried = i in retried
                self.cache.put(keys[i], self.model, out)
                self.fresh.add(keys[i])
                results[i] = out
                on_done(i, out)
        return results  # type: ignore[return-value]
