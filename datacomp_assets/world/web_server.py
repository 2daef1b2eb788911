"""A local HTTP server for the synthetic web, so the pool is fetched by img2dataset over real HTTP.

Images are rendered on request from (namespace, index): nothing is stored, and every URL stays valid
as long as the server runs with the same ``WebConfig``. Samples with a fault (``WebConfig.faults``)
misbehave the way web hosts do: ``dead_link`` answers 404, ``slow`` answers after
``WebConfig.slow_seconds``, ``redirect`` answers 302 to the same path with ``?redirected=1`` (served
normally), ``corrupt``/``truncated``/``poisoned`` send the bytes of ``synthetic_web.served_bytes``.
``refused`` is no server behaviour: the index points those URLs at a port where nothing listens. The transient
faults (``unavailable``: 503, ``stalled``: an answer after ``slow_seconds``) hit only the first
``WebConfig.transient_failures`` requests for a sample that this server has seen; ``requests`` counts them all.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from datacomp_assets.world.web import TRANSIENT_FAULT_KINDS, WebConfig, sample, served_bytes

# /images/{namespace}/{index}.jpg; namespaces are simple names so URLs need no escaping.
IMAGE_PATH = re.compile(r"^/images/([A-Za-z0-9_\-]+)/(\d+)\.jpg$")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def image_url(base_url: str, index: int, namespace: str = "pool") -> str:
    """The URL at which the server serves sample `index` of `namespace`."""
    return f"{base_url}/images/{namespace}/{index}.jpg"


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 refuses connections when img2dataset opens dozens at once.
    request_queue_size = 256
    daemon_threads = True  # a hung client must not block stop()


class RequestCounter:
    """Requests per (namespace, index), counted across the server's threads."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()

    def add(self, key: tuple[str, int]) -> int:
        """Count one more request for `key`; return how many there have been, this one included."""
        with self._lock:
            self._counts[key] += 1
            return self._counts[key]

    def snapshot(self) -> Counter[tuple[str, int]]:
        with self._lock:
            return Counter(self._counts)


def _handler_for(config: WebConfig, requests: RequestCounter) -> type[BaseHTTPRequestHandler]:
    class SyntheticWebHandler(BaseHTTPRequestHandler):
        # HTTP/1.1 keeps connections alive between img2dataset's requests.
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            match = IMAGE_PATH.match(self.path.split("?", 1)[0])
            if match is None:
                self._send(404, b"not found", "text/plain")
                return
            namespace, index = match.group(1), int(match.group(2))
            s = sample(index, config, namespace)
            attempt = requests.add((namespace, index))
            if s.fault in TRANSIENT_FAULT_KINDS and attempt <= config.transient_failures:
                if s.fault == "unavailable":
                    self._send(503, b"busy, try again later", "text/plain")
                    return
                time.sleep(config.slow_seconds)  # stalled: the client has given up by now
            if s.fault == "dead_link":
                self._send(404, b"not found", "text/plain")
                return
            if s.fault == "slow":
                time.sleep(config.slow_seconds)  # the client has given up by now
            if s.fault == "redirect" and "?" not in self.path:
                self._send(302, b"", "text/plain", location=f"{match.group(0)}?redirected=1")
                return
            self._send(200, served_bytes(s), "text/html" if s.fault == "corrupt" else "image/jpeg")

        def _send(self, status: int, body: bytes, content_type: str, location: str | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if location is not None:
                    self.send_header("Location", location)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # a client that timed out hung up: nothing to answer

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass  # one line per image would flood the logs of a 100k-image download

    return SyntheticWebHandler


class SyntheticWebServer:
    """Serves the synthetic web from a background thread; use as a context manager or start()/stop()."""

    def __init__(self, config: WebConfig = WebConfig(), host: str = "127.0.0.1", port: int = 0):
        self.config = config
        self.host = host
        self.port = port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._requests = RequestCounter()

    @property
    def requests(self) -> Counter[tuple[str, int]]:
        """How many requests each (namespace, index) got from this server, so far."""
        return self._requests.snapshot()

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server is not started")
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    def start(self) -> "SyntheticWebServer":
        if self._httpd is not None:
            return self
        self._httpd = _Server((self.host, self.port), _handler_for(self.config, self._requests))
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="synthetic-web",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd, self._thread = None, None

    def __enter__(self) -> "SyntheticWebServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
