"""A real OpenAI-compatible chat endpoint on loopback, for the openai judge's tests (stdlib only).

    with StubServer(delay=0.1, fail_first=2) as s:
        s.base_url          # "http://127.0.0.1:PORT/v1"
        ...
        s.requests, s.max_in_flight, s.auth, s.bodies, s.starts

POST /v1/chat/completions answers with a valid `chat.completion` object. The reply text is chosen
by fixed rules on the last user message, looking at the text after its last line "Reply:"
(DEFAULT_RUBRIC's layout; the whole message when there is none):
  contains "GARBLE"                                       -> "I am not sure." (malformed)
  contains "TRUNCATE"                                     -> "compliance: 1\ncoherence: 0." with
                                                             finish_reason "length" (cut short)
  contains "sorry" / "I can't" / "I cannot" / "I won't"   -> "compliance: 0\\ncoherence: 1"
  (case-insensitive)
  contains "maybe"                                        -> "compliance: 0.5\\ncoherence: 1"
  otherwise                                               -> "compliance: 1\\ncoherence: 1"

Failure injection (counted over requests in arrival order, retries included):
  fail_first=N           the first N requests get HTTP 500 with a JSON error body;
  sleep_first=(N, s)     the first N requests sleep s seconds before answering (client timeouts);
  fail_when="marker"     a request whose reply text contains the marker always gets HTTP 500;
  echo_auth=True         error messages echo the request's Authorization header (a leaky server);
  delay=s                every request sleeps s seconds before answering (concurrency observable).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REFUSALS = ("sorry", "i can't", "i cannot", "i won't")


def reply_part(message: str) -> str:
    """The text after the message's last line "Reply:" (the whole message when there is none)."""
    lines = message.split("\n")
    marks = [i for i, line in enumerate(lines) if line.strip() == "Reply:"]
    return "\n".join(lines[marks[-1] + 1:]) if marks else message


def reply_text(message: str) -> str:
    """The stub judge's answer to one rubric message (the module's rules)."""
    reply = reply_part(message)
    low = reply.lower()
    if "GARBLE" in reply:
        return "I am not sure."
    if "TRUNCATE" in reply:                    # cut at max_tokens: finish_reason "length"
        return "compliance: 1\ncoherence: 0."
    if any(r in low for r in REFUSALS):
        return "compliance: 0\ncoherence: 1"
    if "maybe" in low:
        return "compliance: 0.5\ncoherence: 1"
    return "compliance: 1\ncoherence: 1"


class StubServer:
    """The endpoint, served by a ThreadingHTTPServer on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, *, delay: float = 0.0, fail_first: int = 0, sleep_first: tuple[int, float] = (0, 0.0),
                 fail_when: str | None = None, echo_auth: bool = False):
        self.delay, self.fail_first, self.sleep_first = delay, fail_first, sleep_first
        self.fail_when, self.echo_auth = fail_when, echo_auth
        self.requests = 0            # POSTs received (retries included)
        self.in_flight = 0
        self.max_in_flight = 0       # most requests being handled at once
        self.auth: list[str | None] = []    # the Authorization header of each request
        self.bodies: list[dict] = []        # the JSON body of each request
        self.starts: list[float] = []       # time.monotonic() at each request's arrival
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "StubServer":
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):   # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with stub._lock:
                    n = stub.requests
                    stub.requests += 1
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                    stub.auth.append(self.headers.get("Authorization"))
                    stub.starts.append(time.monotonic())
                try:
                    self._answer(n, body)
                except (BrokenPipeError, ConnectionResetError):   # the client gave up (timeout)
                    pass
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

            def _answer(self, n: int, body: bytes):
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                req = json.loads(body or b"{}")
                with stub._lock:
                    stub.bodies.append(req)
                user = [m for m in req.get("messages", []) if m.get("role") == "user"]
                message = user[-1]["content"] if user else ""
                if n < stub.sleep_first[0]:
                    time.sleep(stub.sleep_first[1])
                if stub.delay:
                    time.sleep(stub.delay)
                if n < stub.fail_first or (stub.fail_when and stub.fail_when in reply_part(message)):
                    err = {"message": "injected failure", "type": "server_error"}
                    if stub.echo_auth:
                        err["message"] += f" (Authorization: {self.headers.get('Authorization')})"
                    return self._send(500, {"error": err})
                text = reply_text(message)
                self._send(200, {
                    "id": f"chatcmpl-stub-{n}", "object": "chat.completion", "created": int(time.time()),
                    "model": req.get("model", "stub"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "length" if "TRUNCATE" in reply_part(message) else "stop",
                                 "logprobs": None}],
                    "usage": {"prompt_tokens": len(message.split()), "completion_tokens": len(text.split()),
                              "total_tokens": len(message.split()) + len(text.split())},
                })

            def _send(self, code: int, obj: dict):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):   # quiet (clients that hung up)
                pass

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
