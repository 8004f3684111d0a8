"""Helpers for generate_qa.py's tests and benchmark: fake LLM replies, fault injection, synthetic abstracts.

The loopback server (fake_openai.py) calls a responder per request; the ones here read the paper out of
generate_qa.py's own prompt and answer with grounded pairs made by the offline generator, so replies
depend only on the request's content (a rerun or a retry gets the same reply).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import threading
from collections import Counter

from fake_openai import Reply
from paperqa_tune.qa.offline_qa import offline_pairs
from paperqa_tune.qa.prompts import JUDGE_SYSTEM, TYPES

# the abstract, or one section of the full text (<section name="method">...</section>)
_PAPER_RE = re.compile(r'^Paper: "(.*)" \(id (.*?)\)\n<(?:abstract|section name="(.*?)")>\n(.*?)\n</(?:abstract|section)>',
                       re.S)
# single pairs, or conversations (--turns N: "Over all turns together: 4 factual, ...; edge cases ...")
_QUOTA_RE = re.compile(r"(?:Write exactly \d+ question-answer pairs about this paper|Over all turns together): "
                       r"(.*?)[.;]\s")


def request_paper(req: dict) -> dict:
    """The paper and type quotas a generation request asks about (repair requests carry the same first turn)."""
    user = req["messages"][1]["content"]
    m = _PAPER_RE.match(user)
    title, pid, section, abstract = m.group(1), m.group(2), m.group(3) or "abstract", m.group(4)
    quotas = {t: 0 for t in TYPES}
    for part in _QUOTA_RE.search(user).group(1).split(", "):
        k, t = part.split(" ")
        quotas[t] = int(k)
    return {"id": pid, "title": "" if title == "(untitled)" else title, "abstract": abstract, "quotas": quotas,
            "section": section}


def good_reply(req: dict) -> str:
    p = request_paper(req)
    pairs = offline_pairs(p, p["quotas"])
    return json.dumps({"pairs": [{"type": x["type"], "question": x["question"], "answer": x["answer"]} for x in pairs]})


def is_judge(req: dict) -> bool:
    return req["messages"][0]["content"] == JUDGE_SYSTEM


def request_hash(req: dict) -> str:
    return hashlib.sha256(json.dumps(req["messages"], sort_keys=True).encode()).hexdigest()


def pairs_responder(delay: float = 0.0):
    return lambda req, n: Reply(content=good_reply(req), delay=delay)


class FaultyResponder:
    """About `rate` of first attempts fail in one of six ways, chosen from the request's hash.

    Papers in `always_500` fail every attempt (the client's retries run out); papers in `always_garbage`
    answer prose every time (the repair retry fails too). Everything is a function of the request, so
    the set of failures is the same on every run.
    """

    KINDS = ("429", "500", "timeout", "malformed_body", "truncated_json", "garbage")

    def __init__(self, rate=0.3, always_500=(), always_garbage=(), timeout_delay=1.0):
        self.rate, self.always_500, self.always_garbage = rate, set(always_500), set(always_garbage)
        self.timeout_delay = timeout_delay
        self.attempts: Counter = Counter()
        self.injected: Counter = Counter()
        self._lock = threading.Lock()

    def __call__(self, req: dict, n: int) -> Reply:
        key = request_hash(req)
        with self._lock:
            attempt = self.attempts[key]
            self.attempts[key] += 1
        pid = request_paper(req)["id"]
        if pid in self.always_500:
            return self._count("always_500", Reply(status=500, retry_after=0.01))
        if pid in self.always_garbage:
            return self._count("always_garbage", Reply(content="Error: the model is overloaded, try again later."))
        num = re.search(r"(\d+)$", pid)
        if num and self.rate == 0.3:  # papers ..0-..2 of every ten fail, cycling through every kind of failure
            k = int(num.group(1))
            fail, kind = k % 10 < 3, self.KINDS[(3 * (k // 10) + k % 10) % len(self.KINDS)]
        else:
            fail, kind = int(key[:8], 16) / 0xFFFFFFFF < self.rate, self.KINDS[int(key[8:16], 16) % len(self.KINDS)]
        if attempt == 0 and len(req["messages"]) == 2 and fail:
            if kind == "429":
                return self._count(kind, Reply(status=429, retry_after=0.01))
            if kind == "500":
                return self._count(kind, Reply(status=500, retry_after=0.01))
            if kind == "timeout":
                return self._count(kind, Reply(content=good_reply(req), delay=self.timeout_delay))
            if kind == "malformed_body":
                return self._count(kind, Reply(raw_body=b'{"id": "chatcmpl-x", "choices": [{"index": 0, "mess'))
            if kind == "truncated_json":
                return self._count(kind, Reply(content=good_reply(req)[:120], finish_reason="length"))
            return self._count(kind, Reply(content="Sure! Here are some questions about the paper: 1. What is it?"))
        return Reply(content=good_reply(req))

    def _count(self, kind: str, reply: Reply) -> Reply:
        with self._lock:
            self.injected[kind] += 1
        return reply


# --------------------------------------------------------------------------- synthetic abstracts
_SYLLABLES = ["ka", "lo", "mi", "ren", "tus", "vo", "zel", "dra", "qui", "bar", "nex", "sol", "tri", "ume", "fa", "gor"]
_TASKS = ["machine translation", "question answering", "summarization", "code generation", "speech recognition",
          "image captioning", "entity linking", "dependency parsing", "dialogue state tracking", "text retrieval",
          "table reasoning", "math word problems", "protein folding", "recommendation", "molecule design"]
_PARTS = ["sparse attention", "contrastive pretraining", "adapter layers", "curriculum sampling", "label smoothing",
          "retrieval augmentation", "mixture-of-experts routing", "quantized weights", "distillation losses",
          "rotary embeddings", "prefix tuning", "data deduplication", "gradient checkpointing", "beam reranking"]
_DATA = ["WMT14", "SQuAD", "CNN/DailyMail", "HumanEval", "LibriSpeech", "MS-COCO", "GLUE", "Natural Questions",
         "GSM8K", "MMLU", "TriviaQA", "XSum"]
_ADJ = ["cheap", "robust", "scalable", "frugal", "faithful", "modular", "sparse", "adaptive", "unified", "lean"]
_NOUN = ["adaptation", "transfer", "alignment", "compression", "specialization", "tuning", "grounding", "routing"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def synthetic_abstracts(n: int, seed: int = 0) -> list[dict]:
    """n made-up abstracts of 6 sentences with made-up names (for throughput tests; no real paper is described)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, other = _word(rng), _word(rng)
        task, data = rng.choice(_TASKS), rng.choice(_DATA)
        a, b = rng.sample(_PARTS, 2)
        gain, size = round(rng.uniform(0.5, 9.5), 1), rng.choice([7, 13, 30, 65, 175])
        abstract = (f"Large models for {task} remain expensive to adapt to new domains such as {other.lower()} corpora. "
                    f"We propose {name}, a method that combines {a} with {b} to reduce the cost of adaptation. "
                    f"{name} is trained on {data} with a frozen {size}B parameter backbone. "
                    f"Experiments show that {name} improves accuracy by {gain} points over strong baselines. "
                    f"The method also reduces memory use during fine-tuning. "
                    f"These results suggest that {a} is a practical alternative to full fine-tuning for {task}.")
        title = f"{name}: {rng.choice(_ADJ).title()} {rng.choice(_NOUN).title()} of {other} Models for {task.title()}"
        out.append({"id": f"synth-{i:04d}", "title": title, "abstract": abstract})
    return out


# --------------------------------------------------------------------------- loopback arXiv API
class LoopbackServer:
    """A ThreadingHTTPServer on 127.0.0.1 with `handler`, serving while the `with` block runs."""

    def _serve(self, handler) -> None:
        from http.server import ThreadingHTTPServer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


class ArxivFeedServer(LoopbackServer):
    """Serves a recorded Atom feed as the arXiv API would: `id_list` filters entries, `start` and
    `max_results` page through them, and opensearch:totalResults tells the client how many there are."""

    def __init__(self, feed_path):
        from http.server import BaseHTTPRequestHandler
        from urllib.parse import parse_qs, urlparse

        text = open(feed_path, encoding="utf-8").read()
        self.entries = re.findall(r"  <entry>.*?</entry>\n", text, re.S)
        head, tail = text.split(self.entries[0], 1)[0], "</feed>\n"
        self.urls: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.urls.append(self.path)
                q = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
                entries = outer.entries
                if q.get("id_list"):
                    want = {re.sub(r"v\d+$", "", i) for i in q["id_list"].split(",")}
                    entries = [e for e in entries if re.search(r"<id>http://arxiv.org/abs/(.*?)(v\d+)?</id>", e).group(1) in want]
                start, size = int(q.get("start", 0)), int(q.get("max_results", 10))
                page = entries[start: start + size]
                body = re.sub(r"(<opensearch:totalResults[^>]*>)\d+", rf"\g<1>{len(entries)}", head) + "".join(page) + tail
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/atom+xml; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._serve(Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/query"
