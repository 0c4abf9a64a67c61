"""Translate what pyvmomi raises (vSphere faults, socket and TLS errors) into vmferry's errors.

Every translated error says what vmferry was doing, against which endpoint, what went wrong, and
what a human can do; ``RetryableError`` marks what may pass by itself (network, busy objects).
"""

from __future__ import annotations

import errno
import socket
import ssl
from http.client import HTTPException
from xml.parsers.expat import ExpatError

from pyVmomi import vim, vmodl

from vmferry.adapters.vsphere.tls import ThumbprintMismatchError
from vmferry.bus.errors import FerryError, PermanentError, RetryableError

#: another operation holds the object (a task, a lock): it passes
_BUSY: tuple[type[BaseException], ...] = (
    vim.fault.TaskInProgress,
    vim.fault.ConcurrentAccess,
    vim.fault.ResourceInUse,
    vim.fault.FileLocked,
)
#: vCenter or a host is in trouble for now
_SERVER_TROUBLE: tuple[type[BaseException], ...] = (
    vmodl.fault.HostCommunication,
    vim.fault.Timedout,
    vmodl.fault.SystemError,
    vmodl.fault.RequestCanceled,
)
#: faults that repeat on every attempt until someone changes something
_PERMANENT: tuple[type[BaseException], ...] = (
    vim.fault.InvalidPowerState,
    vim.fault.ToolsUnavailable,
    vim.fault.FileNotFound,
    vim.fault.NoDiskSpace,
    vim.fault.SnapshotFault,
    vim.fault.NotFound,
    vim.fault.InvalidName,
    vmodl.fault.InvalidArgument,
    vmodl.fault.InvalidRequest,
    vmodl.fault.NotSupported,
    vmodl.fault.NotImplemented,
    vmodl.fault.MethodNotFound,
    vmodl.fault.ManagedObjectNotFound,
)


def fault_text(fault: vmodl.MethodFault) -> str:
    """``FaultType: message [message keys]`` from a vSphere fault."""
    name = type(fault).__name__.rsplit(".", 1)[-1]
    message = (getattr(fault, "msg", None) or getattr(fault, "reason", None) or "").strip()
    keys = [m.key for m in (getattr(fault, "faultMessage", None) or []) if getattr(m, "key", None)]
    text = f"{name}: {message}" if message else name
    return f"{text} [{', '.join(keys)}]" if keys else text


def fault_keys(fault: vmodl.MethodFault) -> list[str]:
    """The message keys of a fault (ESXi's way of telling CBT errors apart)."""
    return [str(m.key) for m in (getattr(fault, "faultMessage", None) or []) if getattr(m, "key", None)]


def _moref(obj: object) -> str:
    return str(getattr(obj, "_moId", None) or obj)


def _no_permission(fault: vim.fault.NoPermission, text: str) -> PermanentError:
    privilege = getattr(fault, "privilegeId", "") or "?"
    obj = _moref(getattr(fault, "object", None))
    return PermanentError(
        f"{text} (privilege {privilege} missing on {obj})",
        f"grant {privilege} on {obj} (or a parent, propagating) to the vmferry user's role",
    )


#: (fault classes, retrying helps, fix) in the order they are tried
_CLASSES: tuple[tuple[tuple[type[BaseException], ...], bool, str], ...] = (
    (_PERMANENT, False, "see the vSphere message; retrying alone will not help"),
    (_BUSY, True, "another operation holds the object; vmferry retries later"),
    (_SERVER_TROUBLE, True, "vCenter or the VM's host is in trouble; vmferry retries later"),
)


def translate_fault(fault: vmodl.MethodFault, doing: str, where: str) -> FerryError:
    """A vSphere fault raised while ``doing`` something against ``where``, as a vmferry error."""
    text = f"vSphere {where}: {doing} failed: {fault_text(fault)}"
    if isinstance(fault, vim.fault.InvalidLogin):
        return PermanentError(
            f"vSphere {where}: login refused (wrong user or password)",
            "check the user and the password file of this source; vCenter may also lock the account"
            " after repeated failures",
        )
    if isinstance(fault, vim.fault.NotAuthenticated):
        return RetryableError(text, "the session was lost and a new login did not help; check the account")
    if isinstance(fault, vim.fault.NoPermission):
        return _no_permission(fault, text)
    for classes, retryable, fix in _CLASSES:
        if isinstance(fault, classes):
            return RetryableError(text, fix) if retryable else PermanentError(text, fix)
    return RetryableError(text, "retried automatically; if it persists, check the vSphere task list and logs")


def _dns_error(exc: socket.gaierror, where: str) -> FerryError:
    if exc.errno == socket.EAI_AGAIN:
        return RetryableError(
            f"vSphere {where}: DNS lookup failed for now ({exc.strerror})",
            "check the DNS servers of this machine; vmferry retries later",
        )
    return PermanentError(
        f"vSphere {where}: the host name does not resolve ({exc.strerror})",
        "fix the host of this source (a typo?) or add it to DNS / /etc/hosts",
    )


def _tls_error(exc: ssl.SSLError, where: str) -> FerryError:
    if isinstance(exc, ThumbprintMismatchError):
        return PermanentError(
            f"vSphere {where}: the server certificate's {exc.algorithm} thumbprint is {exc.actual},"
            f" not the pinned {exc.expected}; refusing to connect (a replaced certificate or an"
            " interception)",
            "verify the certificate out of band (vCenter appliance shell: `openssl x509 -noout -fingerprint"
            " -sha256 -in /etc/vmware-vpx/ssl/rui.crt`) and update this source's thumbprint if it is genuine",
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
        return PermanentError(
            f"vSphere {where}: the server certificate is not trusted ({reason})",
            "set this source's ca_file to the CA that signed it (vCenter: https://<vcenter>/certs/download.zip),"
            " or pin its thumbprint; use insecure only in labs",
        )
    return PermanentError(
        f"vSphere {where}: TLS handshake failed ({exc.reason or exc})",
        "check that host:port is the vSphere HTTPS endpoint and supports TLS 1.2 or later",
    )


def _network_error(exc: OSError, doing: str, where: str) -> FerryError:
    if isinstance(exc, socket.gaierror):
        return _dns_error(exc, where)
    if isinstance(exc, ssl.SSLError):
        return _tls_error(exc, where)
    if isinstance(exc, ConnectionRefusedError):
        return RetryableError(
            f"vSphere {where}: connection refused while {doing} (nothing listens on that port)",
            "check host and port of this source, and that vCenter/ESXi and its reverse proxy run",
        )
    if isinstance(exc, TimeoutError | socket.timeout):
        return RetryableError(
            f"vSphere {where}: no answer in time while {doing}",
            "check the network path (firewall, routing) to port 443 of vCenter/ESXi; retried later",
        )
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return RetryableError(
            f"vSphere {where}: host unreachable while {doing} ({exc.strerror})",
            "check routing and firewalls between this machine and vCenter/ESXi",
        )
    return RetryableError(
        f"vSphere {where}: the connection broke while {doing} ({type(exc).__name__}: {exc})",
        "retried automatically; check vCenter's health if it persists",
    )


def translate_error(exc: BaseException, doing: str, where: str) -> FerryError:
    """Any exception of a vSphere call as a vmferry error (FerryErrors pass unchanged)."""
    if isinstance(exc, FerryError):
        return exc
    if isinstance(exc, vmodl.MethodFault):
        return translate_fault(exc, doing, where)
    if isinstance(exc, OSError):
        return _network_error(exc, doing, where)
    if isinstance(exc, ExpatError):
        return PermanentError(
            f"vSphere {where}: the answer to {doing} is not vSphere SOAP ({exc})",
            "check that host:port is vCenter or ESXi (and not a proxy or another service)",
        )
    if isinstance(exc, HTTPException):
        return RetryableError(
            f"vSphere {where}: the connection broke while {doing} ({type(exc).__name__}: {exc})",
            "retried automatically; check vCenter's health if it persists",
        )
    return RetryableError(f"vSphere {where}: {doing} failed: {type(exc).__name__}: {exc}")
