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
    content_type: str = "application/json"  # of the body (a plain-text error page: "text/plain")


# Error replies as real servers send them (status, body; "{model}" is replaced by the request's model), from their
# source and bug reports: what generate_qa must tell apart (a refused response_format, a wrong model, anything else).
SERVER_ERRORS = {
    # vLLM: structured output it cannot compile is a 400; an unknown model a 404; both {"object": "error", ...}
    "vllm_schema_unsupported": (400, {"object": "error", "message": "The provided JSON schema contains features not "
                                      "supported by xgrammar.", "type": "BadRequestError", "param": None, "code": 400}),
    "vllm_model_not_found": (404, {"object": "error", "message": "The model `{model}` does not exist.",
                                   "type": "NotFoundError", "param": None, "code": 404}),
    "vllm_context_length": (400, {"object": "error", "message": "This model's maximum context length is 4096 tokens. "
                                  "However, you requested 5120 tokens (1024 in the messages, 4096 in the completion). "
                                  "Please reduce the length of the messages or completion.",
                                  "type": "BadRequestError", "param": None, "code": 400}),
    # llama.cpp's llama-server: older builds answer json_schema with a 500, newer ones 400 on a schema they
    # cannot turn into a grammar
    "llama_server_json_schema": (500, {"error": {"code": 500, "message": 'response_format type must be one of "text" '
                                                 'or "json_object", but got: json_schema', "type": "server_error"}}),
    "llama_server_schema_conversion": (400, {"error": {"code": 400, "message": "JSON schema conversion failed:\n"
                                                       'Unrecognized schema: {"enum": []}',
                                                       "type": "invalid_request_error"}}),
    # llama-cpp-python's server: its request model allows only "text" / "json_object", and its route handler turns
    # the validation error into a 500 carrying the pydantic message
    "llama_cpp_python_json_schema": (500, {"error": {
        "message": "[{'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), 'msg': \"Input should be "
                   "'text' or 'json_object'\", 'input': 'json_schema', 'ctx': {'expected': \"'text' or "
                   "'json_object'\"}}]", "type": "internal_server_error", "param": None, "code": None}}),
    "llama_cpp_python_model_not_found": (400, {"error": {"message": "The model `{model}` does not exist",
                                                         "type": "invalid_request_error", "param": None,
                                                         "code": "model_not_found"}}),
    # Ollama's OpenAI-compatible endpoint
    "ollama_model_not_found": (404, {"error": {"message": 'model "{model}" not found, try pulling it first',
                                               "type": "api_error", "param": None, "code": None}}),
    "ollama_bad_format": (400, {"error": {"message": 'invalid format: expected "json" or a JSON schema',
                                          "type": "invalid_request_error", "param": None, "code": None}}),
    # LM Studio refuses json_object (it wants json_schema), with a bare string as the error
    "lmstudio_json_object": (400, {"error": "'response_format.type' must be 'json_schema'"}),
    # OpenAI
    "openai_model_not_found": (404, {"error": {"message": "The model `{model}` does not exist or you do not have "
                                               "access to it.", "type": "invalid_request_error", "param": None,
                                               "code": "model_not_found"}}),
    "openai_schema_invalid": (400, {"error": {"message": "Invalid schema for response_format 'qa_pairs': In "
                                              "context=(), 'additionalProperties' is required to be supplied and to "
                                              "be false.", "type": "invalid_request_error",
                                              "param": "response_format", "code": None}}),
    "openai_json_schema_unsupported": (400, {"error": {"message": "Invalid parameter: 'response_format' of type "
                                                       "'json_schema' is not supported with this model.",
                                                       "type": "invalid_request_error", "param": "response_format",
                                                       "code": None}}),
    # transformers serve: HTTPException bodies are {"detail": ...}; an uncaught error is Starlette's plain text
    "transformers_serve_pinned": (400, {"detail": "Server is pinned to 'fake-model'; requested '{model}'."}),
    "transformers_serve_crash": (500, "Internal Server Error"),
}


def server_error(name: str, model: str = "fake-model", **kw) -> Reply:
    """The error reply SERVER_ERRORS[name], as that server sends it (kw: other Reply fields, e.g. retry_after)."""
    status, body = SERVER_ERRORS[name]
    if isinstance(body, str):
        return Reply(status=status, raw_body=body.encode(), content_type="text/plain; charset=utf-8", **kw)
    def fill(v):
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        return v.replace("{model}", model) if isinstance(v, str) else v
    return Reply(status=status, raw_body=json.dumps(fill(body)).encode(), **kw)


def default_responder(req: dict, n: int) -> Reply:
    return Reply(content="ok")


def json_object_only(responder: Callable[[dict, int], Reply],
                     free_text: Callable[[dict, int], Reply] | None = None) -> Callable[[dict, int], Reply]:
    """llama-cpp-python's server as a responder: response_format json_schema is refused as that server refuses it
    (SERVER_ERRORS["llama_cpp_python_json_schema"]: HTTP 500, "Input should be 'text' or 'json_object'"); json_object
    and no response_format are answered. The server constrains the reply only to a schema that rides inside
    json_object ({"type": "json_object", "schema": {...}}): such a request gets `responder`'s reply, any other one
    `free_text`'s (what the model writes unconstrained, e.g. a small model's prose; default: the responder's)."""
    def answer(req: dict, n: int) -> Reply:
        rf = req.get("response_format") or {}
        if rf.get("type") not in (None, "text", "json_object"):
            return server_error("llama_cpp_python_json_schema", req.get("model", "fake-model"))
        constrained = rf.get("type") == "json_object" and isinstance(rf.get("schema"), dict)
        return responder(req, n) if constrained or free_text is None else free_text(req, n)
    return answer


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

            def _send(self, status: int, body: bytes, headers: dict | None = None, trickle: float = 0.0,
                      content_type: str = "application/json"):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
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
                    self._send(reply.status, reply.raw_body, headers, reply.trickle, reply.content_type)
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
