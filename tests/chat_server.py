"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for the endpoint and translator tests."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server:
    """Answers POST /v1/chat/completions from a script: each entry is (status, headers, body) or
    "echo"; once the script is used up, every request is answered by "echo": a 200 whose content is
    `reply(last message's content)` ("reply: " + the content by default)."""

    def __init__(self, script=(), reply=lambda content: "reply: " + content):
        self.script = list(script)
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                step = outer.script.pop(0) if outer.script else "echo"
                if step == "echo":
                    step = (
                        200,
                        {},
                        {"choices": [{"message": {"content": reply(body["messages"][-1]["content"])}}]},
                    )
                status, headers, payload = step
                data = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def fake_time():
    now = [0.0]
    waits = []

    def sleep(s):
        waits.append(s)
        now[0] += s

    return sleep, (lambda: now[0]), waits


def serve():
    """Body of a `server` fixture: yields a factory of scripted servers, closes them afterwards."""
    servers = []

    def make(script=(), **kw):
        servers.append(Server(script, **kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()
