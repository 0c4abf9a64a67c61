"""A small HTTPS server for tests: serves one disk image at a datastore-style /folder URL with HTTP range
requests, and only to a client presenting the expected session cookie and basic-auth credentials."""

from __future__ import annotations

import base64
import re
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it doubles as the CA file clients trust)."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


class DiskServer:
    """Serves ``image`` at ``path`` on 127.0.0.1 over TLS; counts requests and refused requests."""

    def __init__(self, image: Path, path: str, cookie: str, user: str, password: str, folder: Path) -> None:
        self.image = image
        self.path = path
        self.expected_cookie = cookie
        self.expected_auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.requests = 0
        self.refused = 0
        key, self.certificate = make_certificate(folder)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certificate, key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> DiskServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self
        size = self.image.stat().st_size

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:
                """Quiet."""

            def _allowed(self) -> bool:
                server.requests += 1
                target = urlsplit(self.path)
                if target.path != server.path:
                    self.send_error(404)
                    return False
                if (
                    self.headers.get("Cookie") != server.expected_cookie
                    or self.headers.get("Authorization") != server.expected_auth
                ):
                    server.refused += 1
                    self.send_error(401)
                    return False
                return True

            def do_HEAD(self) -> None:
                if self._allowed():
                    self.send_response(200)
                    self.send_header("Content-Length", str(size))
                    self.send_header("Accept-Ranges", "bytes")
                    self.end_headers()

            def do_GET(self) -> None:
                if not self._allowed():
                    return
                match = _RANGE.match(self.headers.get("Range", ""))
                start, end = (0, size - 1) if match is None else (int(match[1]), int(match[2] or size - 1))
                end = min(end, size - 1)
                with server.image.open("rb") as handle:
                    handle.seek(start)
                    body = handle.read(end - start + 1)
                self.send_response(206 if match else 200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                if match:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                self.wfile.write(body)

        return Handler
