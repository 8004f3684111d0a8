"""A scriptable OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

The real `openai` client talks to it over loopback, so retries, timeouts and parsing are the
client's own. A test sets `server.responder`, a function (request_json, request_number) -> Reply.

    with FakeOpenAI() as srv:
        srv.responder = lambda req, n: Reply(content='{"pairs": []}')
        client = openai.OpenAI(base_url=srv.base_url, api_key="test")
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Reply:
    content: str | None = None          # assistant message content (normal 200 reply)
    status: int = 200                   # HTTP status; 429 / 500 to inject failures
    retry_after: float | None = None    # Retry-After header (seconds) for 429/503
    delay: float = 0.0                  # seconds to wait before answering (latency / timeouts)
    raw_body: bytes | None = None       # send these bytes verbatim (malformed / truncated JSON)
    finish_reason: str = "stop"
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 100, "completion_tokens": 50})
    trickle: float = 0.0                # send the body one byte every `trickle` seconds (a server that never times out)
    echo_auth: bool = False             # put the request's Authorization header into the error message / content


def default_responder(req: dict, n: int) -> Reply:
    return Reply(content="ok")


class FakeOpenAI:
    def __init__(self, responder: Callable[[dict, int], Reply] = default_responder, models=("fake-model",)):
        self.responder = responder
        self.models = list(models)
        self.requests: list[dict] = []       # every chat request body received, in order
        self.headers: list[dict] = []        # their HTTP headers (names lower-cased), in the same order
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None, trickle: float = 0.0):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    if trickle:
                        for i in range(len(body)):
                            self.wfile.write(body[i: i + 1])
                            self.wfile.flush()
                            time.sleep(trickle)
                    else:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before we answered

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    data = {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "test"}
                                                       for m in outer.models]}
                    self._send(200, json.dumps(data).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                with outer._lock:
                    outer.requests.append(body)
                    outer.headers.append({k.lower(): v for k, v in self.headers.items()})
                    n = len(outer.requests)
                reply = outer.responder(body, n)
                if reply.delay:
                    time.sleep(reply.delay)
                headers = {}
                if reply.retry_after is not None:
                    headers["Retry-After"] = str(reply.retry_after)
                if reply.raw_body is not None:
                    self._send(reply.status, reply.raw_body, headers, reply.trickle)
                    return
                echo = f" (request had Authorization: {self.headers.get('Authorization')})" if reply.echo_auth else ""
                if reply.status != 200:
                    err = {"error": {"message": f"injected {reply.status}{echo}", "type": "test", "code": None}}
                    self._send(reply.status, json.dumps(err).encode(), headers, reply.trickle)
                    return
                content = reply.content + echo if echo and reply.content is not None else reply.content
                data = {
                    "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "fake-model"),
                    "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {**reply.usage, "total_tokens": sum(reply.usage.values())},
                }
                self._send(200, json.dumps(data).encode(), headers, reply.trickle)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def count(self) -> int:
        return len(self.requests)

    def start(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve_forever_cli() -> None:
    """`python tests/fake_openai.py --latency 1` : run a server for benchmarks / manual runs."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--content", default='{"pairs": []}')
    a = p.parse_args()
    srv = FakeOpenAI(lambda req, n: Reply(content=a.content, delay=a.latency)).start()
    print(srv.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    serve_forever_cli()
