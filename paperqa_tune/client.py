"""One way to talk to an OpenAI-compatible chat server, for every caller: the LLM that writes the Q&A
(generate_qa.py), its curation judge, and the evaluation's judge (eval_compare.py).

    client = ChatClient(ClientSettings(model="gpt-4o-mini", api_key=key, base_url=None, timeout=120))
    params, out = await client.request(messages, {"temperature": 0, "max_tokens": 300}, "verdict", schema)

What it does that the openai client does not: every attempt has one deadline for the whole reply (the client's
timeout is per read, so a server trickling bytes would never time out); 429, 408/409, 5xx and lost connections
are retried with the client's own backoff and the server's Retry-After; an error reply is classified (a wrong
model or URL stops every request, a refused response format steps down, anything else is a failed request with
the server's words); and the response format is negotiated once per client: the first request sent is a probe
the others wait for, stepping down json_schema -> json_object+schema -> json_object -> none only while the
server's error is about the format.

Nothing here raises for a failed request: the Outcome says why, and `fatal` / `gave_up` say when every further
request would fail alike (the caller decides whether that ends its run)."""
from __future__ import annotations

import asyncio
import json
import random
import re
import sys
from dataclasses import dataclass, field

from paperqa_tune.errors import InputError
from paperqa_tune.safety import scrub

TIMEOUT_RETRIES = 1  # a request that timed out is asked again this many times (rate limits and 5xx: max_retries)
GIVE_UP_AFTER_TIMEOUTS = 3  # requests in a row that got no reply in time: the server is down, stop asking
SLOW_FIRST_ANSWER_S = 60.0  # no answer at all this long after the first request: say so once (slow or stuck server)
# What a request asks for, most constrained first. json_object+schema is llama-cpp-python's way: its server
# refuses type json_schema (HTTP 500, "Input should be 'text' or 'json_object'") but constrains the reply to a
# schema that rides inside json_object; a server that ignores the extra field still gets plain json_object.
FORMAT_STEPS = ("json_schema", "json_object+schema", "json_object", "none")

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


@dataclass
class Outcome:
    content: str | None = None
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    error: str | None = None
    cached: bool = False
    retried: bool = False  # asked again because the cached reply failed validation (or --reuse_cache none)


@dataclass(frozen=True)
class Flags:
    """The command-line flags a caller's settings came from, named in what the user is told to fix."""
    model: str = "--model"
    base_url: str = "--base_url"
    timeout: str = "--timeout"
    retries: str = "--max_retries"
    concurrency: str = "--concurrency"


@dataclass(frozen=True)
class ClientSettings:
    model: str
    api_key: str = field(repr=False)  # never printed, logged or stored
    base_url: str | None = None
    timeout: float = 120.0            # seconds for one attempt, from sending it to the reply's last byte
    max_retries: int = 4              # retries on 429 / 408 / 409 / 5xx / lost connections (timeouts: TIMEOUT_RETRIES)
    concurrency: int = 8              # requests in flight at once
    response_format: str = "json_schema"  # the first of FORMAT_STEPS to ask for
    flags: Flags = Flags()


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


def server_said(e, api_key: str | None) -> str:
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
    return " ".join(scrub(said, api_key).split())


def request_params(base: dict, fmt: str, schema_name: str, schema: dict) -> dict:
    """`base` (temperature, max_tokens, ...) asking for the response format `fmt` of FORMAT_STEPS."""
    p = dict(base)
    if fmt == "json_schema":
        p["response_format"] = {"type": "json_schema",
                                "json_schema": {"name": schema_name, "schema": schema, "strict": True}}
    elif fmt == "json_object+schema":
        p["response_format"] = {"type": "json_object", "schema": schema}
    elif fmt == "json_object":
        p["response_format"] = {"type": "json_object"}
    return p


def format_of(params: dict) -> str:
    """Which of FORMAT_STEPS these request params ask for."""
    rf = params.get("response_format") or {}
    if rf.get("type") == "json_object" and "schema" in rf:
        return "json_object+schema"
    return rf.get("type", "none")


def _relevel(params: dict, fmt: str) -> dict:
    """`params` asking for `fmt` instead (a rung below theirs), the schema taken from what they carry."""
    rf = params.get("response_format") or {}
    schema = rf.get("schema") or (rf.get("json_schema") or {}).get("schema") or {}
    base = {k: v for k, v in params.items() if k != "response_format"}
    return request_params(base, fmt, (rf.get("json_schema") or {}).get("name", ""), schema)


def _retry_after(headers) -> float | None:
    """Seconds a 429/503 asks us to wait (Retry-After or retry-after-ms), or None."""
    for name, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        try:
            return float(headers.get(name)) / divisor
        except (TypeError, ValueError):
            continue
    return None


class FormatRefused(Exception):
    """The server refused the request's response_format (confirmed: its error says so; else an unexplained
    400/422 to the first request, to be tested by asking once without it)."""

    def __init__(self, status: int, said: str, confirmed: bool):
        super().__init__(said)
        self.status, self.said, self.confirmed = status, said, confirmed


class ChatClient:
    """Requests to one model on one server, with the settings' deadline, retries and concurrency, and the
    response format negotiated once for all of them (`format_used`, and `format_note` saying why it is not the
    one asked for). Usable from several event loops in turn (one asyncio.run each): the loop-bound parts are
    made anew in each."""

    def __init__(self, settings: ClientSettings):
        import openai

        self.settings, s = settings, settings
        self.client = openai.AsyncOpenAI(api_key=s.api_key, base_url=s.base_url, timeout=s.timeout, max_retries=0)
        self.base_url = self.client.base_url
        self.response_format = s.response_format
        self.format_note: str | None = None  # why the format in use is not the one asked for (None: it is)
        self.checked = False
        self.served: list[str] = []  # model ids the server lists (GET /models), for a wrong model's message
        self.timeouts_in_a_row = 0
        self.gave_up: str | None = None
        self.fatal: InputError | None = None  # every request would fail the same way (wrong model or URL)
        self.probing, self.probed = False, s.response_format == "none"
        self.in_flight = self.answers = 0
        self.told_slow = False
        self._loop = self._sem = self._decided = None
        self._unused = True  # the HTTP client made above has not been bound to an event loop yet

    @property
    def format_used(self) -> str:
        """The response format requests use now: the one asked for, or what it fell back to."""
        return self.response_format

    def params(self, base: dict, schema_name: str, schema: dict) -> dict:
        return request_params(base, self.response_format, schema_name, schema)

    def _bind(self) -> None:
        """The loop-bound parts for the running event loop (a new loop: a new HTTP client, semaphore and event)."""
        import openai

        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        if not self._unused:
            s = self.settings
            self.client = openai.AsyncOpenAI(api_key=s.api_key, base_url=s.base_url, timeout=s.timeout, max_retries=0)
        self._unused = False
        self._loop, self._sem, self._decided = loop, asyncio.Semaphore(self.settings.concurrency), asyncio.Event()
        if self.probed:
            self._decided.set()

    async def aclose(self) -> None:
        """Close the HTTP connections of this event loop's client (before the loop ends: an open connection
        collected after it would complain that the loop is closed); a later request opens new ones."""
        if self._loop is asyncio.get_running_loop():
            await self.client.close()
            self._loop = None

    def _clean(self, text: str | None) -> str | None:
        """Server-written text as we may store it: an error body or reply can echo the request's API key (scrubbed
        before any cut, so no prefix of the key survives)."""
        return scrub(text, self.settings.api_key) if text else text

    async def preflight(self) -> None:
        """Fail fast on a wrong URL or key (one cheap GET /models, no retries): raises InputError."""
        import openai

        if self.checked:
            return
        self._bind()
        self.checked = True
        limit, flags = min(10.0, self.settings.timeout), self.settings.flags
        try:
            page = await asyncio.wait_for(self.client.with_options(timeout=limit).models.list(), limit)
            self.served = [m.id for m in getattr(page, "data", None) or [] if isinstance(getattr(m, "id", None), str)]
        except (openai.APIConnectionError, asyncio.TimeoutError) as e:
            why = self._clean(str(e)) or f"no answer within {limit:g} s"
            raise InputError(f"cannot reach the server at {self.base_url} ({why}); start it or fix "
                             f"{flags.base_url}") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise InputError(f"the server at {self.base_url} refused the API key ({e.status_code}); "
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
        """Set the fatal input error for a wrong model or URL (every request would fail alike)."""
        flags, model = self.settings.flags, self.settings.model
        if kind == "model":
            served = f"; it serves: {', '.join(self.served[:10])}" if self.served else ""
            msg = (f"{flags.model} {model}: the server at {self.base_url} does not serve this model (HTTP {status}: "
                   f"{said[:300]}){served}; fix {flags.model} (or {flags.base_url} if this is the wrong server)")
        else:
            msg = (f"the server at {self.base_url} answered HTTP {status} to a chat request ({said[:300]}): check "
                   f"{flags.base_url} (an OpenAI-compatible server's usually ends in /v1) and {flags.model} {model}")
        if self.fatal is None:
            self.fatal = InputError(msg)
        return msg

    def _timed_out(self, timeouts: int) -> None:
        """Count a request that got no reply in time; GIVE_UP_AFTER_TIMEOUTS in a row: stop asking."""
        self.timeouts_in_a_row += 1
        if self.timeouts_in_a_row >= GIVE_UP_AFTER_TIMEOUTS and not self.gave_up:
            s, f = self.settings, self.settings.flags
            self.gave_up = (f"the server at {self.base_url} sent no complete reply within {f.timeout} {s.timeout:g} s "
                            f"to {self.timeouts_in_a_row} requests in a row (each tried {timeouts} times); check that "
                            f"it is up, lower {f.concurrency} or raise {f.timeout}, then rerun the same command "
                            "(answered requests come from the cache)")

    async def _attempts(self, messages, params, probe: bool = False) -> Outcome:
        """One request with its retries: each attempt must be answered in full within the timeout; 429, 408/409,
        5xx and lost connections are retried up to max_retries, timeouts TIMEOUT_RETRIES times. Raises
        FormatRefused when the server's error is about the response format (the probe: also an unexplained
        400/422); any other failure is an Outcome whose error carries what the server said."""
        import openai

        s, attempt, timeouts = self.settings, 0, 0
        while True:
            if self.gave_up or self.fatal:
                return Outcome(error=self.gave_up or str(self.fatal))
            wait = min(8.0, 0.5 * 2 ** attempt) * (1 - 0.25 * random.random())  # the client's own backoff
            self.in_flight += 1
            try:
                resp = await asyncio.wait_for(
                    self.client.chat.completions.create(model=s.model, messages=messages, **params), s.timeout)
            except (asyncio.TimeoutError, openai.APITimeoutError):
                timeouts += 1
                why = f"no complete reply within {s.flags.timeout} {s.timeout:g} s"
                retry, wait = timeouts <= TIMEOUT_RETRIES and attempt < s.max_retries, 0.0
            except openai.APIStatusError as e:
                self.answers += 1
                said = server_said(e, s.api_key)
                kind = classify_error(e.status_code, said, "response_format" in params)
                if kind in ("model", "url"):
                    return Outcome(error=self._give_up_on(kind, e.status_code, said))
                if kind == "format" or (probe and "response_format" in params and e.status_code in (400, 422)):
                    raise FormatRefused(e.status_code, said, confirmed=kind == "format") from None
                why = f"{type(e).__name__} (HTTP {e.status_code}): {said[:300]}"
                retry = (e.status_code in (408, 409, 429) or e.status_code >= 500) and attempt < s.max_retries
                after = _retry_after(e.response.headers)
                wait = after if after is not None and 0 <= after <= 60 else wait
            except openai.APIConnectionError as e:
                why, retry = f"{type(e).__name__}: {self._clean(str(e))[:300]}", attempt < s.max_retries
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
                self._timed_out(timeouts)
            return Outcome(error=f"request failed after {attempt + 1} attempt(s): {why}")

    def _fall_back(self, asked: str, to: str, status: int, said: str, how: str = "") -> None:
        """Use `to` from now on instead of `asked` (once: a request that was refused the same format after another
        one had already moved on changes nothing), and say so once."""
        if asked != self.response_format or FORMAT_STEPS.index(to) <= FORMAT_STEPS.index(asked):
            return
        self.response_format = to
        using = "no response_format (the prompt still asks for JSON)" if to == "none" else to
        note = (f"the server at {self.base_url} refused response_format={asked} (HTTP {status}: "
                f"{said[:200]}){how}; using {using}")
        self.format_note = note if self.format_note is None else f"{self.format_note}; then {note}"
        print(f"note: {note}", file=sys.stderr)

    async def _turn(self) -> bool:
        """True for the first request to be sent (the probe); any other waits until the probe is answered."""
        if self._decided.is_set():
            return False
        if not self.probing:
            self.probing = True
            return True
        await self._decided.wait()
        return False

    async def _negotiate(self, messages, params, probe: bool) -> tuple[dict, Outcome]:
        """(the params answered, the outcome) for one request, stepping the response format down while the server
        refuses it. The probe tests an unexplained 400/422 by asking once without response_format: answered, the
        format was the problem; refused again, it was not, and the format stays."""
        while True:
            try:
                return params, await self._attempts(messages, params, probe)
            except FormatRefused as e:
                asked = format_of(params)
                if e.confirmed:  # step down; the format in use may already be lower (another request's refusal)
                    self._fall_back(asked, FORMAT_STEPS[FORMAT_STEPS.index(asked) + 1], e.status, e.said)
                    params = _relevel(params, self.response_format)
                    continue
                plain = _relevel(params, "none")
                out = await self._attempts(messages, plain)
                if out.error is None:
                    self._fall_back(asked, "none", e.status, e.said, ", and the same request without it was answered")
                    return plain, out
                return params, Outcome(error=f"{out.error} (with response_format={asked}: HTTP {e.status}: "
                                             f"{e.said[:200]})")

    async def request(self, messages: list[dict], base: dict, schema_name: str, schema: dict,
                      cached=None) -> tuple[dict, Outcome]:
        """(the params answered, the outcome) of one chat request: `base` params (temperature, max_tokens, ...)
        with the response format in use. cached(params) -> Outcome | None: a reply already paid for under these
        params, looked up once a slot is free and again after waiting for the probe (the format may have
        changed); a hit is returned as it is, nothing sent."""
        self._bind()
        probe = False
        async with self._sem:  # at most `concurrency` requests in flight: all a kill can make us pay twice
            try:
                while True:
                    params = self.params(base, schema_name, schema)
                    hit = cached(params) if cached is not None else None
                    if hit is not None:
                        return params, hit
                    if not probe and not self._decided.is_set():
                        probe = await self._turn()
                        if not probe:
                            continue  # waited for the probe: the format may have changed, look again
                    return await self._negotiate(messages, params, probe)
            finally:
                if probe:
                    self.probed = True
                    self._decided.set()

    async def tell_if_silent(self) -> None:
        """Once: no answer at all after SLOW_FIRST_ANSWER_S while requests wait, so the user learns of a slow or
        stuck server now, not at the first timeout. Run it as a task beside the requests; cancel it after."""
        await asyncio.sleep(SLOW_FIRST_ANSWER_S)
        if not self.answers and self.in_flight and not self.told_slow:
            self.told_slow = True
            s, f = self.settings, self.settings.flags
            print(f"note: no answer yet from the server at {self.base_url} after {SLOW_FIRST_ANSWER_S:g} s "
                  f"({self.in_flight} request(s) in flight, {f.timeout} {s.timeout:g} s each); a slow or one-slot "
                  f"server answers one request at a time: lower {f.concurrency} or raise {f.timeout} if requests "
                  "time out", file=sys.stderr)
