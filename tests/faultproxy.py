"""An HTTP proxy in front of the S3 server that injects the faults object storage really shows:
``503 SlowDown`` (throttling), ``500 InternalError`` and connections reset mid-request.

    python tests/faultproxy.py UPSTREAM_PORT LISTEN_PORT EVERY COUNTER_FILE [ALWAYS]

Every EVERY-th request gets a fault (cycling 503, 500, reset); the rest are forwarded unchanged.
A request whose path contains ALWAYS gets 503 every time (an object that keeps failing).
The number of injected faults is written to COUNTER_FILE after each one.
"""

from __future__ import annotations

import http.client
import itertools
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
            b"<Message>We encountered an internal error. Please try again.</Message></Error>")


def main() -> None:
    upstream, listen, every, counter = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    always = sys.argv[5] if len(sys.argv) > 5 else None
    seq, lock = itertools.count(1), threading.Lock()
    faults = itertools.cycle(["503", "500", "reset"])
    injected = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            """The request body; HTTP chunked uploads (the AWS SDK's aws-chunked PUTs) de-chunked."""
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()

        def _any(self) -> None:
            body = self._body()
            with lock:
                n = next(seq)
                fault = "503" if always and always in self.path else next(faults) if n % every == 0 else None
                if fault:
                    injected[0] += 1
                    with open(counter + ".tmp", "w") as f:  # replaced whole: a reader never sees it empty
                        f.write(str(injected[0]))
                    os.replace(counter + ".tmp", counter)
            if fault == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.connection.close()
                self.close_connection = True
                return
            if fault:
                payload = SLOW_DOWN if fault == "503" else INTERNAL
                self.send_response(int(fault))
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":  # a body after a HEAD reply corrupts the next reply on the connection
                    self.wfile.write(payload)
                return
            conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=30)
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("connection", "transfer-encoding", "content-length", "expect")}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                    self.send_header(k, v)
            # HEAD: the object's size is the upstream's Content-Length (there is no body to count)
            self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                             else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

    ThreadingHTTPServer(("127.0.0.1", listen), Handler).serve_forever()


if __name__ == "__main__":
    main()
