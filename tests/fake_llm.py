"""A scripted OpenAI-compatible chat server on localhost, for offline OpenEvolve tests.

It answers `POST /v1/chat/completions` with the first scripted reply whose trigger text occurs in
the prompt's "# Current Program" section (the whole last user message if it has none), else with
the default reply; `GET /v1/models` lists one model (or answers `models_status`, to stand for a
server without that route or one that refuses the key, or redirects to `models_redirect`), and
any other GET answers 404. Every chat request body is kept in `requests`, the headers of every
GET in `get_headers`. With `certificate` (a PEM certificate and key) it speaks HTTPS.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["ScriptedLLM", "diff_reply"]


def diff_reply(search: str, replace: str, explanation: str = "A scripted change.") -> str:
    """An LLM answer holding one SEARCH/REPLACE block in OpenEvolve's diff format."""
    return (
        f"{explanation}\n\n<<<<<<< SEARCH\n{search.rstrip()}\n=======\n{replace.rstrip()}\n"
        ">>>>>>> REPLACE\n"
    )


class ScriptedLLM:
    """Context manager: a chat server on 127.0.0.1 with a free port; `base_url` ends in /v1.

    Args:
        rules: (trigger, reply) pairs; the first whose trigger is in the prompt answers.
        default: the reply when no trigger matches.
        models_status: the HTTP status of `GET /v1/models` (200: a list of one model).
        models_redirect: a URL that `GET /v1/models` redirects to (302) instead.
        certificate: (certificate file, key file) to serve HTTPS with; None: plain HTTP.
    """

    def __init__(self, rules: list[tuple[str, str]], default: str, models_status: int = 200,
                 models_redirect: str | None = None,
                 certificate: tuple[Path, Path] | None = None) -> None:
        self.rules = rules
        self.default = default
        self.models_status = models_status
        self.models_redirect = models_redirect
        self.requests: list[dict[str, Any]] = []
        self.get_headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._scheme = "http"
        if certificate is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*certificate)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self._scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> ScriptedLLM:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reply_to(self, body: dict[str, Any]) -> str:
        """The reply for a request: matched against the prompt's current program if it has one."""
        prompt = body["messages"][-1]["content"]
        with self._lock:
            self.requests.append(body)
        # The heading line alone: "# Current Program Information" comes first and is not it.
        current = prompt.split("# Current Program\n", 1)[-1].split("\n```\n", 1)[0]
        for trigger, reply in self.rules:
            if trigger in current:
                return reply
        return self.default

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, payload: dict[str, Any], status: int = 200) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                with server._lock:
                    server.get_headers.append(dict(self.headers))
                if self.path.split("?")[0].rstrip("/") != "/v1/models":
                    self._send({"error": {"message": f"no route {self.path}"}}, 404)
                elif server.models_redirect is not None:
                    self.send_response(302)
                    self.send_header("Location", server.models_redirect)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif server.models_status != 200:
                    self._send({"error": {"message": "scripted status"}}, server.models_status)
                else:
                    self._send({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

            def do_POST(self) -> None:
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send({"error": {"message": f"no route {self.path}"}}, 404)
                    return
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                content = server.reply_to(body)
                self._send({
                    "id": f"chatcmpl-{len(server.requests)}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "scripted"),
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })

        return Handler
