"""Turns openstacksdk and keystoneauth failures into vmferry errors with a cause and a fix."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from keystoneauth1 import exceptions as ks_exceptions
from openstack import exceptions as sdk_exceptions

from vmferry.bus.errors import FerryError, PermanentError, RetryableError


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and what caused it (openstacksdk wraps keystoneauth's errors)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _status(exc: BaseException) -> int | None:
    for link in _chain(exc):
        code = getattr(link, "status_code", None) or getattr(link, "http_status", None)
        if code:
            return int(code)
    return None


def _details(exc: BaseException) -> str:
    details = getattr(exc, "details", None) or getattr(exc, "message", None) or str(exc)
    return str(details).strip()[:500]


def is_unauthorized(exc: BaseException) -> bool:
    """A 401: wrong credentials, or a token that expired or was revoked."""
    return any(isinstance(e, ks_exceptions.Unauthorized) for e in _chain(exc)) or _status(exc) == 401


@dataclass(frozen=True)
class _Failure:
    """What is known about one failed call."""

    exc: BaseException
    status: int | None
    detail: str
    doing: str
    cloud: str
    needs: str

    @property
    def conflict_on_value(self) -> bool:
        lowered = self.detail.lower()
        return self.status == 409 and any(w in lowered for w in ("in use", "already allocated", "exists"))


def _incomplete(f: _Failure) -> FerryError:
    return PermanentError(
        f"cloud {f.cloud!r} has incomplete credentials while {f.doing}: {f.detail}",
        "complete the auth section of the clouds.yaml entry (or the OS_* variables)",
    )


def _unreachable(f: _Failure) -> FerryError:
    return RetryableError(
        f"OpenStack endpoint of cloud {f.cloud!r} unreachable while {f.doing}: {f.detail}",
        "check auth_url and the service catalog endpoints, and that the APIs are up",
    )


def _refused_credentials(f: _Failure) -> FerryError:
    return PermanentError(
        f"OpenStack refused the credentials of cloud {f.cloud!r} while {f.doing}: {f.detail}",
        "fix the username/password or application credential of that cloud in clouds.yaml"
        " (or the OS_* variables); an expired application credential must be renewed",
    )


def _quota(f: _Failure) -> FerryError:
    return PermanentError(
        f"quota exceeded in cloud {f.cloud!r} while {f.doing}: {f.detail}",
        "raise the project's quota (openstack quota set) or free resources, then retry",
    )


def _forbidden(f: _Failure) -> FerryError:
    role = f.needs or "a role the cloud's policy allows for this call"
    return PermanentError(
        f"the credential of cloud {f.cloud!r} is not allowed to {f.doing}: {f.detail}",
        f"use a credential with {role}",
    )


def _permanent(cause: str, fix: str) -> Callable[[_Failure], FerryError]:
    return lambda f: PermanentError(f"{cause} in cloud {f.cloud!r} while {f.doing}: {f.detail}", fix)


def _retryable(cause: str, fix: str) -> Callable[[_Failure], FerryError]:
    return lambda f: RetryableError(
        f"{cause} in cloud {f.cloud!r} while {f.doing}: {f.detail}", fix, delay=5.0
    )


_TRANSPORT = (ks_exceptions.ConnectFailure, ks_exceptions.ConnectTimeout, ks_exceptions.DiscoveryFailure)
#: first match wins
_RULES: list[tuple[Callable[[_Failure], bool], Callable[[_Failure], FerryError]]] = [
    (
        lambda f: isinstance(f.exc, ks_exceptions.MissingRequiredOptions | ks_exceptions.NoMatchingPlugin),
        _incomplete,
    ),
    (lambda f: isinstance(f.exc, _TRANSPORT), _unreachable),
    (lambda f: is_unauthorized(f.exc), _refused_credentials),
    # Keystone answers 404 for an application credential that was deleted.
    (lambda f: f.status == 404 and "application credential" in f.detail.lower(), _refused_credentials),
    (lambda f: "quota" in f.detail.lower() or f.status == 413, _quota),
    (lambda f: f.status == 403, _forbidden),
    (lambda f: f.status == 404, _permanent("not found", "check the name or id")),
    (lambda f: f.status == 400, _permanent("request rejected", "fix the request")),
    (lambda f: f.conflict_on_value, _permanent("conflict", "free or change the conflicting value")),
    (lambda f: f.status == 409, _retryable("conflict", "retry later")),
    (
        lambda f: (f.status or 0) >= 500 or isinstance(f.exc, ks_exceptions.ConnectionError),
        _retryable("server error", "retry; check the service logs"),
    ),
    (lambda f: isinstance(f.exc, sdk_exceptions.ResourceTimeout), _retryable("timeout", "retry later")),
]


def ferry_error(exc: BaseException, doing: str, cloud: str, needs: str = "") -> FerryError:
    """The vmferry error for a failed call; ``needs`` names the role a 403 calls for, when known."""
    if isinstance(exc, FerryError):
        return exc
    failure = _Failure(exc, _status(exc), _details(exc), doing, cloud, needs)
    for matches, build in _RULES:
        if matches(failure):
            return build(failure)
    return _permanent("failure", "see the OpenStack service logs")(failure)
