"""Small typed helpers over pyvmomi: build data objects and references without untyped calls.

pyvmomi 9 ships type stubs, but its constructors take untyped ``**kwargs``, which ``mypy --strict``
refuses to call from typed code; going through ``Any`` once here keeps the rest of the adapter typed.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from vmferry.bus.errors import PermanentError

T = TypeVar("T")


def new(kind: type[T], *args: Any, **kwargs: Any) -> T:
    """``kind(*args, **kwargs)`` for a pyvmomi data object or managed object reference."""
    return cast("T", cast("Any", kind)(*args, **kwargs))


def present(value: T | None, what: str) -> T:
    """``value``, or a clear error when the server left out something vSphere always has."""
    if value is None:
        raise PermanentError(f"the vSphere endpoint did not report {what}", "is this vCenter or ESXi?")
    return value


def moref_of(obj: Any) -> str:
    """The managed object id (``vm-42``) of a reference."""
    return str(obj._moId)
