"""TLS for vSphere connections: verify against a CA bundle, or pin the certificate's thumbprint.

Pinning is checked inside the TLS handshake of *every* connection pyvmomi opens (its pool opens
new ones at any time), by a socket class that compares the peer certificate's digest.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from typing import ClassVar

from vmferry.adapters.vsphere.settings import THUMBPRINT_ALGORITHMS, VsphereSettings

log = logging.getLogger(__name__)


def format_thumbprint(der: bytes, algorithm: str) -> str:
    """A thumbprint as vSphere shows it: upper-case hex pairs joined by colons."""
    return _pairs(hashlib.new(algorithm, der).hexdigest())


def _pairs(hex_digest: str) -> str:
    upper = hex_digest.upper()
    return ":".join(upper[i : i + 2] for i in range(0, len(upper), 2))


class ThumbprintMismatchError(ssl.SSLCertVerificationError):
    """The server's certificate is not the pinned one; ``actual`` is its thumbprint (same digest)."""

    def __init__(self, expected: str, actual: str, algorithm: str) -> None:
        super().__init__(f"certificate {algorithm} thumbprint {actual} is not the pinned {expected}")
        self.expected = expected
        self.actual = actual
        self.algorithm = algorithm


class _PinnedSocket(ssl.SSLSocket):
    """An SSLSocket that checks the peer certificate against ``expected`` right after the handshake."""

    expected: ClassVar[str] = ""

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        der = self.getpeercert(binary_form=True)
        algorithm = THUMBPRINT_ALGORITHMS[len(self.expected)]
        actual = hashlib.new(algorithm, der or b"").hexdigest()
        if not der or not hmac.compare_digest(actual, self.expected):
            raise ThumbprintMismatchError(_pairs(self.expected), _pairs(actual), algorithm)


def ssl_context(settings: VsphereSettings) -> ssl.SSLContext:
    """The client context: pinned thumbprint, CA bundle (or system store), or, if asked, no checks."""
    if settings.thumbprint:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the pin replaces CA and hostname checks
        context.sslsocket_class = type("PinnedSocket", (_PinnedSocket,), {"expected": settings.thumbprint})
        return context
    if settings.insecure:
        log.warning(
            "vSphere source %s: TLS certificate NOT verified (insecure: true); "
            "set ca_file or thumbprint instead",
            settings.name,
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
