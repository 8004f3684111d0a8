"""Talking to the LLM that writes the Q&A: any OpenAI-compatible server (async, with whole-reply deadlines and
our own retries) or a local transformers model (batched, through paperqa_tune.generation), one reply cache for
both, and the run's request statistics."""
from __future__ import annotations

import asyncio
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from paperqa_tune.errors import InputError, RunFailure

from paperqa_tune.files import sha256_text
from paperqa_tune.cache import JsonlCache
from paperqa_tune.safety import scrub

TIMEOUT_RETRIES = 1  # a request that timed out is asked again this many times (rate limits and 5xx: max_retries)
GIVE_UP_AFTER_TIMEOUTS = 3  # requests in a row that got no reply in time: the server is down, stop the run
SLOW_FIRST_ANSWER_S = 60.0  # no answer at all this long after the first request: say so once (slow or stuck server)
FORMAT_STEPS = ("json_schema", "json_object", "none")  # what --response_format falls back through, in order

# Request defaults by server (see resolve_request_defaults). Hosted OpenAI answers fast and in parallel. A local
# server often has one slot: requests queue behind each other, so each needs a longer deadline, few may wait at
# once, and a reply should stop near the size of what was asked (a model that loops would otherwise run on to the
# cap at a few tokens per second).
HOSTED_DEFAULTS = {"max_tokens": 3000, "timeout": 120.0, "concurrency": 8}
LOCAL_TIMEOUT, LOCAL_CONCURRENCY = 600.0, 2
TOKENS_PER_ITEM, TOKENS_SLACK = 150, 256  # a pair: ~20-40 question tokens, 1-3 answer sentences, JSON keys

# What servers answer when they refuse a structured-output request (vLLM, llama.cpp's server, llama-cpp-python,
# Ollama, LM Studio, OpenAI: the error names the field, the schema or the grammar it could not build), and when
# the model name is wrong (vLLM / OpenAI / llama-cpp-python "The model `x` does not exist", Ollama 'model "x" not
# found, try pulling it first', transformers serve "Server is pinned to 'x'").
_FORMAT_RE = re.compile(r"response_format|json[_ ]?schema|json[_ ]?object|\bschema\b|grammar|structured output|"
                        r"guided|xgrammar|outlines|llguidance", re.I)
_FORMAT_WORD_RE = re.compile(r"\bformat\b", re.I)  # too common to trust in a 500 (a crash's traceback text)
_MODEL_RE = re.compile(r"\bmodel\b.{0,120}?\b(?:not found|does not exist|doesn't exist|not exist|no such|"
                       r"is not (?:available|loaded|served))|\bunknown model\b|\bno such model\b|\bpinned to\b|"
                       r"\btry pulling\b|\bno models? loaded\b", re.I | re.S)


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


def classify_error(status: int, text: str, asked_format: bool) -> str:
    """What an error reply to a chat request is about, from its status and what the server wrote: "url" or
    "model" (every request would fail the same way), "format" (the response_format the request asked for), or
    "other"."""
    if _MODEL_RE.search(text) and status in (400, 404, 422):
        return "model"
    if status == 404:
        return "url"
    if asked_format and ((status in (400, 422) and _FORMAT_WORD_RE.search(text)) or
                         (status in (400, 422, 500) and _FORMAT_RE.search(text))):
        return "format"
    return "other"


class FormatRefused(Exception):
    """The server refused the request's response_format (confirmed: its error says so; else an unexplained
    400/422 to the run's first request, to be tested by asking once without it)."""

    def __init__(self, status: int, said: str, confirmed: bool):
        super().__init__(said)
        self.status, self.said, self.confirmed = status, said, confirmed


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


class OpenAIBackend(Backend):
    """Any OpenAI-compatible chat server through the official async client. The retries are ours (the client's
    are off): the client's timeout is per read, so a server trickling bytes would never time out; here every
    attempt has one deadline for the whole reply, and 429/5xx retries honour Retry-After as the client does.

    The run's first request sent is a probe: the others wait for its answer, which settles the response format
    (json_schema -> json_object -> none, stepping down only when the server's error is about the format), so a
    refusal costs one request, not one per request in flight. `format_used` and `format_note` say what was used
    and why."""

    name = "openai"

    def __init__(self, model, api_key, base_url, timeout, max_retries, concurrency, temperature, max_tokens, seed,
                 response_format, cache: ResponseCache, reuse: str = "valid", model_flag: str = "--model"):
        import openai

        super().__init__()
        self.client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)
        self.api_key, self.timeout, self.max_retries = api_key, timeout, max_retries
        self.model, self.temperature, self.max_tokens, self.seed = model, temperature, max_tokens, seed
        self.model_flag = model_flag  # the flag that named this model, for the message when the server lacks it
        self.response_format = response_format
        self.format_note: str | None = None  # why the format in use is not the one asked for (None: it is)
        self.sem = asyncio.Semaphore(concurrency)
        self.cache, self.reuse = cache, reuse
        self.checked = False
        self.served: list[str] = []  # model ids the server lists (GET /models), for a wrong --model's message
        self.timeouts_in_a_row = 0
        self.gave_up: str | None = None
        self.fatal: InputError | None = None  # every request would fail the same way (wrong --model or URL)
        self.probing = False
        self.decided = asyncio.Event()  # set once the probe has its answer; no event loop is bound until awaited
        if response_format == "none":
            self.decided.set()
        self.in_flight = self.answers = 0
        self.told_slow = False

    @property
    def format_used(self) -> str:
        """The response format this run's requests use now: --response_format, or what it fell back to."""
        return self.response_format

    def _clean(self, text: str | None) -> str | None:
        """Server-written text as we may store it: an error body or reply can echo the request's API key (scrubbed
        before any cut, so no prefix of the key survives)."""
        return scrub(text, self.api_key) if text else text

    def _said(self, e) -> str:
        """What the server wrote in an error reply, on one line, scrubbed: its message (OpenAI's and most servers'
        {"error": {"message"}}, FastAPI's {"detail"}, LM Studio's {"error": "..."}), else the whole body."""
        body = e.body
        if isinstance(body, dict):
            said = body.get("message") or body.get("detail") or body.get("error") or body
            said = said if isinstance(said, str) else json.dumps(said, ensure_ascii=False)
            if isinstance(body.get("param"), str) and body["param"] not in said:
                said += f" (param: {body['param']})"
        elif isinstance(body, str) and body.strip():
            said = body
        else:
            said = str(e)
        return " ".join(self._clean(said).split())

    def _params(self, schema_name: str, schema: dict) -> dict:
        p = {"temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed}
        if self.response_format == "json_schema":
            p["response_format"] = {"type": "json_schema",
                                    "json_schema": {"name": schema_name, "schema": schema, "strict": True}}
        elif self.response_format == "json_object":
            p["response_format"] = {"type": "json_object"}
        return p

    def _lookup(self, messages, params) -> tuple[str, Outcome | None]:
        """(the key these params are cached under, the cached reply). Also found: a reply answered after a format
        fallback (json_object, none), and one cached under the budget every server had before the defaults
        depended on it (3000 tokens) if it ended within this run's --max_tokens, so a rerun re-asks nothing."""
        key, asked, budget = cache_key(self.model, messages, params), _format_of(params), params["max_tokens"]
        for tokens in dict.fromkeys((budget, HOSTED_DEFAULTS["max_tokens"])):
            for fmt in FORMAT_STEPS[FORMAT_STEPS.index(asked):]:
                p = params if fmt == asked else _relevel(params, fmt)
                hit = self.cache.get(cache_key(self.model, messages, {**p, "max_tokens": tokens}))
                if hit is not None and (tokens == budget or (hit.finish_reason != "length" and int(
                        hit.usage.get("completion_tokens") or 0) <= budget)):
                    return key, hit
        return key, None

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
            page = await asyncio.wait_for(self.client.with_options(timeout=limit).models.list(), limit)
            self.served = [m.id for m in getattr(page, "data", None) or [] if isinstance(getattr(m, "id", None), str)]
        except (openai.APIConnectionError, asyncio.TimeoutError) as e:
            why = self._clean(str(e)) or f"no answer within {limit:g} s"
            raise InputError(f"cannot reach the server at {self.client.base_url} ({why}); start it or fix "
                             "--base_url") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise InputError(f"the server at {self.client.base_url} refused the API key ({e.status_code}); "
                             "check OPENAI_API_KEY") from None
        except (openai.APIStatusError, openai.APIResponseValidationError, ValueError):
            pass  # some compatible servers have no /models (or an odd one); the chat requests will tell

    def _outcome(self, resp) -> Outcome:
        try:
            choice, u = (resp.choices or [None])[0], resp.usage
            return Outcome(content=self._clean(choice.message.content) if choice else None,
                           finish_reason=choice.finish_reason if choice else None,
                           usage={"prompt_tokens": u.prompt_tokens or 0,
                                  "completion_tokens": u.completion_tokens or 0} if u else {})
        except AttributeError:  # e.g. a proxy's HTML page instead of a completion
            return Outcome(error=f"unexpected response from the server: {self._clean(str(resp))[:200]!r}")

    def _give_up_on(self, kind: str, status: int, said: str) -> str:
        """Set the run's fatal input error for a wrong model or URL (every request would fail alike)."""
        url = self.client.base_url
        if kind == "model":
            served = f"; it serves: {', '.join(self.served[:10])}" if self.served else ""
            msg = (f"{self.model_flag} {self.model}: the server at {url} does not serve this model (HTTP {status}: "
                   f"{said[:300]}){served}; fix {self.model_flag} (or --base_url if this is the wrong server)")
        else:
            msg = (f"the server at {url} answered HTTP {status} to a chat request ({said[:300]}): check --base_url "
                   f"(an OpenAI-compatible server's usually ends in /v1) and {self.model_flag} {self.model}")
        if self.fatal is None:
            self.fatal = InputError(msg)
        return msg

    async def _request(self, messages, params, probe: bool = False) -> Outcome:
        """One request with its retries: each attempt must be answered in full within --timeout; 429, 408/409,
        5xx and lost connections are retried up to --max_retries, timeouts TIMEOUT_RETRIES times. Raises
        FormatRefused when the server's error is about the response format (the probe: also an unexplained
        400/422); any other failure is an Outcome whose error carries what the server said."""
        import openai

        attempt = timeouts = 0
        while True:
            if self.gave_up or self.fatal:
                return Outcome(error=self.gave_up or str(self.fatal))
            wait = min(8.0, 0.5 * 2 ** attempt) * (1 - 0.25 * random.random())  # the client's own backoff
            self.in_flight += 1
            try:
                resp = await asyncio.wait_for(
                    self.client.chat.completions.create(model=self.model, messages=messages, **params), self.timeout)
            except (asyncio.TimeoutError, openai.APITimeoutError):
                timeouts += 1
                why = f"no complete reply within --timeout {self.timeout:g} s"
                retry = timeouts <= TIMEOUT_RETRIES and attempt < self.max_retries
                wait = 0.0
            except openai.APIStatusError as e:
                self.answers += 1
                said = self._said(e)
                kind = classify_error(e.status_code, said, "response_format" in params)
                if kind in ("model", "url"):
                    return Outcome(error=self._give_up_on(kind, e.status_code, said))
                if kind == "format" or (probe and "response_format" in params and e.status_code in (400, 422)):
                    raise FormatRefused(e.status_code, said, confirmed=kind == "format") from None
                why = f"{type(e).__name__} (HTTP {e.status_code}): {said[:300]}"
                retry = (e.status_code in (408, 409, 429) or e.status_code >= 500) and attempt < self.max_retries
                after = _retry_after(e.response.headers)
                wait = after if after is not None and 0 <= after <= 60 else wait
            except openai.APIConnectionError as e:
                why, retry = f"{type(e).__name__}: {self._clean(str(e))[:300]}", attempt < self.max_retries
            except (openai.OpenAIError, ValueError) as e:  # ValueError: a malformed / truncated HTTP body
                self.answers += 1
                why, retry = f"{type(e).__name__}: {self._clean(str(e))[:300]}", False
            else:
                self.answers += 1
                self.timeouts_in_a_row = 0
                return self._outcome(resp)
            finally:
                self.in_flight -= 1
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

    def _fall_back(self, asked: str, to: str, status: int, said: str, how: str = "") -> None:
        """Use `to` from now on instead of `asked` (once: a request that was refused the same format after another
        one had already moved on changes nothing), and say so once."""
        if asked != self.response_format or FORMAT_STEPS.index(to) <= FORMAT_STEPS.index(asked):
            return
        self.response_format = to
        using = "no response_format (the prompt still asks for JSON)" if to == "none" else to
        note = (f"the server at {self.client.base_url} refused response_format={asked} (HTTP {status}: "
                f"{said[:200]}){how}; using {using}")
        self.format_note = note if self.format_note is None else f"{self.format_note}; then {note}"
        print(f"note: {note}", file=sys.stderr)

    async def _turn(self) -> bool:
        """True for the run's first request to be sent (the probe); any other waits until the probe is answered."""
        if self.decided.is_set():
            return False
        if not self.probing:
            self.probing = True
            return True
        await self.decided.wait()
        return False

    async def _ask(self, messages, params, probe: bool) -> tuple[dict, Outcome]:
        """(the params answered, the outcome) for one request, stepping the response format down while the server
        refuses it. The probe tests an unexplained 400/422 by asking once without response_format: answered, the
        format was the problem; refused again, it was not, and the format stays."""
        while True:
            try:
                return params, await self._request(messages, params, probe)
            except FormatRefused as e:
                asked = _format_of(params)
                if e.confirmed:  # step down; the format in use may already be lower (another request's refusal)
                    self._fall_back(asked, FORMAT_STEPS[FORMAT_STEPS.index(asked) + 1], e.status, e.said)
                    params = _relevel(params, self.response_format)
                    continue
                plain = _relevel(params, "none")
                out = await self._request(messages, plain)
                if out.error is None:
                    self._fall_back(asked, "none", e.status, e.said, ", and the same request without it was answered")
                    return plain, out
                return params, Outcome(error=f"{out.error} (with response_format={asked}: HTTP {e.status}: "
                                             f"{e.said[:200]})")

    async def _one(self, k, messages, schema_name, schema, on_done, usable) -> Outcome:
        key, hit = self._lookup(messages, self._params(schema_name, schema))
        if hit is None or not self.use_cached(key, k, hit, usable):
            retried, probe = hit is not None, False
            async with self.sem:  # at most --concurrency requests in flight: all a kill can make us pay twice
                try:
                    while True:
                        params = self._params(schema_name, schema)
                        key, hit = self._lookup(messages, params)
                        if hit is not None and self.use_cached(key, k, hit, usable):
                            break
                        if not probe and not self.decided.is_set():
                            probe = await self._turn()
                            if not probe:
                                continue  # waited for the probe: the format may have changed, look again
                        retried = retried or hit is not None
                        params, hit = await self._ask(messages, params, probe)
                        if hit.error is None:
                            key = cache_key(self.model, messages, params)
                            hit.retried = retried
                            self.cache.put(key, self.model, hit)  # durable before anything else happens
                            self.fresh.add(key)
                        break
                finally:
                    if probe:
                        self.decided.set()
        on_done(k, hit)
        return hit

    async def _tell_if_silent(self) -> None:
        """Once per run: no answer at all after SLOW_FIRST_ANSWER_S while requests wait, so the user learns of a
        slow or stuck server now, not at the first timeout."""
        await asyncio.sleep(SLOW_FIRST_ANSWER_S)
        if not self.answers and self.in_flight and not self.told_slow:
            self.told_slow = True
            print(f"note: no answer yet from the server at {self.client.base_url} after {SLOW_FIRST_ANSWER_S:g} s "
                  f"({self.in_flight} request(s) in flight, --timeout {self.timeout:g} s each); a slow or one-slot "
                  "server answers one request at a time: lower --concurrency or raise --timeout if requests time "
                  "out", file=sys.stderr)

    async def complete(self, batch: list[list[dict]], schema_name: str, schema: dict, on_done,
                       usable=None) -> list[Outcome]:
        """Replies for every message list, in order; on_done(k, outcome) runs as each one arrives. usable(k, cached)
        says whether a cached reply passes validation (else it is asked again, see --reuse_cache)."""
        params = self._params(schema_name, schema)
        if not self.checked and any(hit is None or not self.use_cached(key, k, hit, usable)
                                    for k, (key, hit) in enumerate(self._lookup(m, params) for m in batch)):
            await self.preflight()
        watch = asyncio.create_task(self._tell_if_silent())
        try:
            outs = list(await asyncio.gather(*(self._one(k, m, schema_name, schema, on_done, usable)
                                               for k, m in enumerate(batch))))
        finally:
            watch.cancel()
        if self.fatal:
            raise self.fatal
        if self.gave_up:
            raise RunFailure(self.gave_up)
        return outs


def _format_of(params: dict) -> str:
    return (params.get("response_format") or {}).get("type", "none")


def _relevel(params: dict, fmt: str) -> dict:
    """`params` asking for `fmt` instead, a format below theirs (json_object or none: no schema needed)."""
    out = {k: v for k, v in params.items() if k != "response_format"}
    if fmt == "json_object":
        out["response_format"] = {"type": "json_object"}
    return out


def _retry_after(headers) -> float | None:
    """Seconds a 429/503 asks us to wait (Retry-After or retry-after-ms), or None."""
    for name, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        try:
            return float(headers.get(name)) / divisor
        except (TypeError, ValueError):
            continue
    return None


class HFBackend(Backend):
    """A local transformers model: batched left-padded generation through the shared decoding loop (prompts
    rendered and tokenized as training renders them; a static KV cache and CUDA graphs on a GPU); each reply
    constrained to the request's JSON schema unless constrained=False; replies go through the same cache.
    shape: (items asked per request, turns per conversation) and max_chars ({"question": n, "answer": n}) are
    written into the schema (grammar.bounded)."""

    name = "hf"
    progress: Progress | None = None  # the caller's bar for the round of requests: moved token by token
    quiet_every_s = 30.0  # without a live bar: a progress line on stderr this often while a batch decodes

    def __init__(self, model, batch_size, temperature, max_tokens, seed, trust_remote_code, cache: ResponseCache,
                 reuse: str = "valid", constrained: bool = True, shape: tuple[int, int] = (1, 1),
                 max_chars: dict[str, int] | None = None):
        import torch

        from paperqa_tune.generation import Decoding
        from paperqa_tune.distributed import default_device
        from paperqa_tune.loading import first_line, load_causal_lm, load_tokenizer

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
