"""A model-file server on 127.0.0.1 for the cellpose download tests (never the internet)."""

from __future__ import annotations

import http.server
import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest


class _LoopbackServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        # HTTPServer.server_bind asks for the host's fully qualified name: a reverse DNS lookup
        # that can take seconds on a machine without DNS. The name is not needed here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]


@pytest.fixture
def weight_server() -> Iterator:
    """``serve(files) -> (url_base, requests)``: an HTTP server in a thread answering
    ``GET /<name>`` with ``files[name]`` (bytes) and 404 otherwise; ``requests`` lists the
    paths asked for."""
    servers = []

    def serve(files: dict[str, bytes]):
        requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                requests.append(self.path)
                body = files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404, "no such model")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep the test output clean
                pass

        srv = _LoopbackServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_port}", requests

    yield serve
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def stalled_host() -> Iterator[str]:
    """A URL whose TCP connection never completes: a listener with a full backlog that never
    accepts (what an unreachable host looks like to ``connect``)."""
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    port = lst.getsockname()[1]
    # Fill the accept queue so that further SYNs are dropped and connect() waits.
    fillers = []
    for _ in range(4):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    yield f"http://127.0.0.1:{port}/models"
    for s in fillers:
        s.close()
    lst.close()
