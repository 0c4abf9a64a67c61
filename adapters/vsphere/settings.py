"""How to reach one vSphere endpoint (vCenter or standalone ESXi): address, user, password file, trust.

The password itself is never held here: only the path of a file that holds it, read at each login.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmferry.bus.errors import PermanentError

if TYPE_CHECKING:  # the CLI config module is only needed for its type
    from vmferry.cli.config import SourceConfig

_HEX = re.compile(r"^[0-9a-f]+$")
#: digest name by length of the hex thumbprint
THUMBPRINT_ALGORITHMS = {40: "sha1", 64: "sha256", 128: "sha512"}


def normalize_thumbprint(value: str) -> str:
    """Lower-case hex without separators; SHA-1, SHA-256 or SHA-512 of the certificate (DER)."""
    cleaned = value.strip().lower().replace(":", "").replace(" ", "").replace("-", "")
    if not _HEX.match(cleaned) or len(cleaned) not in THUMBPRINT_ALGORITHMS:
        raise PermanentError(
            f"thumbprint {value!r} is not a SHA-1, SHA-256 or SHA-512 certificate fingerprint",
            "give it as hex pairs, e.g. the output of "
            "`openssl x509 -noout -fingerprint -sha256 -in vcenter.pem`",
        )
    return cleaned


@dataclass(frozen=True)
class VsphereSettings:
    """One endpoint; TLS is verified against ``ca_file`` (or the system store) unless pinned or insecure."""

    host: str
    user: str
    password_file: Path
    port: int = 443
    #: PEM bundle of the CA(s) that signed the server certificate; None means the system store
    ca_file: Path | None = None
    #: pin the server certificate instead of trusting a CA (hostname and CA are then not checked)
    thumbprint: str | None = None
    #: no certificate check at all; only for labs, and logged as a warning at every connect
    insecure: bool = False
    #: socket timeout of each SOAP call, seconds
    timeout: float = 120.0
    #: seconds between keep-alive calls; vCenter drops idle sessions after 30 min by default
    keepalive: float = 600.0
    #: a name for messages (the configured source name)
    label: str = ""

    def __post_init__(self) -> None:
        if not self.host:
            raise PermanentError("the vSphere source has no host", "set sources.<name>.host")
        if not self.user:
            raise PermanentError(
                f"the vSphere source {self.name} has no user", f"set sources.{self.label or '<name>'}.user"
            )
        if self.thumbprint is not None:
            object.__setattr__(self, "thumbprint", normalize_thumbprint(self.thumbprint))

    @property
    def name(self) -> str:
        """How messages refer to this endpoint."""
        return self.label or f"{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """host:port for messages."""
        return f"{self.host}:{self.port}"

    def read_password(self) -> str:
        """The password from its file (trailing newline dropped); errors never include the content."""
        try:
            text = self.password_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise PermanentError(
                f"cannot read the password of vSphere source {self.name} from {self.password_file}:"
                f" {exc.strerror}",
                "create the file (mode 0600) holding only the password, or fix password_file",
            ) from None
        password = text.rstrip("\r\n")
        if not password:
            raise PermanentError(
                f"the password file {self.password_file} of vSphere source {self.name} is empty",
                "write the password into it (one line, mode 0600)",
            )
        return password


def settings_from_source(name: str, source: SourceConfig) -> VsphereSettings:
    """Build settings from a configured ``sources.<name>`` entry of the vmferry configuration."""
    if not source.password_file:
        raise PermanentError(
            f"source {name!r} has no password_file",
            f"set sources.{name}.password_file to a 0600 file holding the vSphere password",
        )
    return VsphereSettings(
        host=source.host,
        user=source.user,
        password_file=Path(source.password_file).expanduser(),
        port=source.port,
        ca_file=Path(source.ca_file).expanduser() if source.ca_file else None,
        thumbprint=source.thumbprint,
        insecure=source.insecure,
        label=name,
    )
