"""An S3 proxy on loopback that holds a Delta commit open: run as a process of its own.

    python held_commit_proxy.py UPSTREAM PORT CONTROL_DIR

Every request is forwarded to UPSTREAM unchanged (moto does not check signatures, so the Host header
may differ). The first write of a Delta log entry (a PUT under `_delta_log/` ending in `.json`) is
held: the proxy creates CONTROL_DIR/held, waits until CONTROL_DIR/release exists, then forwards it.
So a test can read the atlas while a commit's data files are written but its log entry is not.
A process, not a thread: some delta-rs calls hold the GIL while waiting for the server.
"""
from __future__ import annotations

import http.client
import os
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def make_handler(upstream: str, control: str):
    target = urllib.parse.urlsplit(upstream)
    lock = threading.Lock()
    state = {"held": False}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

        def _forward(self) -> None:
            body = self._body()
            path = urllib.parse.urlsplit(self.path).path
            if self.command == "PUT" and "/_delta_log/" in path and path.endswith(".json"):
                with lock:
                    hold, state["held"] = not state["held"], True
                if hold:
                    with open(os.path.join(control, "held"), "w") as f:
                        f.write(path)
                    deadline = time.monotonic() + 60
                    while not os.path.exists(os.path.join(control, "release")) and time.monotonic() < deadline:
                        time.sleep(0.01)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                             headers=headers)
                response = conn.getresponse()
                data = response.read()
            finally:
                conn.close()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            # A HEAD response has no body but carries the object's size: pass the server's length on
            # (s3fs reads a written file's size from it, and the commit records that size).
            length = response.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length if length is not None else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


def main() -> None:
    upstream, port, control = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(upstream, control))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
