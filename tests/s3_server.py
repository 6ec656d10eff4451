"""A loopback S3-compatible server for tests: moto's standalone server in its own process,
on a port the OS picks, with a counter of the object bytes it sends.

Run as ``python tests/s3_server.py [ADDRESS]``: listens on ADDRESS (default 127.0.0.1; the
downtime benchmark gives a simulated machine's own address), prints the port on its first
line, serves until killed. ``GET /__scalai/counts`` answers ``{"get_bytes": N, "gets": K}`` (body bytes of the
object GETs served since the last ``POST /__scalai/reset``): what the server itself sent,
independent of what the client says it read.
"""

from __future__ import annotations

import json
import sys
import threading


class Counting:
    """WSGI middleware counting the body bytes of successful object GETs."""

    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()
        self.get_bytes = self.gets = 0

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/__scalai/counts":
            body = json.dumps({"get_bytes": self.get_bytes, "gets": self.gets}).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if path == "/__scalai/reset":
            with self.lock:
                self.get_bytes = self.gets = 0
            start_response("204 No Content", [])
            return [b""]
        status = {}

        def capture(s, headers, exc_info=None):
            status["code"] = int(s.split()[0])
            return start_response(s, headers, exc_info)

        chunks = list(self.app(environ, capture))
        if environ["REQUEST_METHOD"] == "GET" and status.get("code") in (200, 206) and path.count("/") >= 2:
            with self.lock:
                self.get_bytes += sum(len(c) for c in chunks)
                self.gets += 1
        return chunks


def main() -> None:
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = Counting(DomainDispatcherApplication(create_backend_app))
    server = make_server(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1", 0, app, threaded=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
