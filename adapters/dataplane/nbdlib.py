"""Access to Debian's libnbd Python binding (python3-libnbd) behind typed interfaces.

The binding is not on PyPI (the PyPI name ``nbd`` is an unrelated notebook tool); ``scripts/setup-dataplane``
exposes Debian's module to the venv. Importing it lazily keeps the rest of the package usable without it.
"""

# ruff: noqa: D102 - the Protocols mirror libnbd's documented C API one to one

from __future__ import annotations

import contextlib
import errno as errno_module
import importlib
from collections.abc import Callable
from functools import cache
from types import ModuleType
from typing import Any, Protocol, cast

from vmferry.adapters.dataplane.errors import LibnbdUnavailableError

STATE_HOLE = 1
STATE_ZERO = 2
BASE_ALLOCATION = "base:allocation"

CompletionCallback = Callable[[Any], int]
ExtentCallback = Callable[[str, int, list[int], Any], int]


class NbdBuffer(Protocol):
    """An ``nbd.Buffer`` sharing memory with a bytearray slice, filled by ``aio_pread``."""

    def is_zero(self, offset: int = 0, size: int = -1) -> bool: ...

    def size(self) -> int: ...


class NbdHandle(Protocol):
    """The subset of ``nbd.NBD`` the data plane uses (names and arguments as in libnbd 1.14)."""

    def add_meta_context(self, name: str) -> None: ...
    def connect_uri(self, uri: str) -> None: ...
    def get_size(self) -> int: ...
    def get_block_size(self, size_type: int) -> int: ...
    def can_meta_context(self, name: str) -> bool: ...
    def can_multi_conn(self) -> bool: ...
    def can_flush(self) -> bool: ...
    def can_zero(self) -> bool: ...
    def is_read_only(self) -> bool: ...
    def block_status(self, count: int, offset: int, extent: ExtentCallback, flags: int = 0) -> None: ...
    def aio_pread(
        self, buf: NbdBuffer, offset: int, completion: CompletionCallback | None = None, flags: int = 0
    ) -> int: ...
    def aio_in_flight(self) -> int: ...
    def aio_is_dead(self) -> bool: ...
    def poll(self, timeout: int) -> int: ...
    def pread(self, count: int, offset: int, flags: int = 0) -> bytes: ...
    def pwrite(self, buf: Any, offset: int, flags: int = 0) -> None: ...
    def zero(self, count: int, offset: int, flags: int = 0) -> None: ...
    def flush(self, flags: int = 0) -> None: ...
    def shutdown(self, flags: int = 0) -> None: ...
    def set_pread_initialize(self, request: bool) -> None: ...
    def get_version(self) -> str: ...


@cache
def load() -> ModuleType:
    """Import the binding once, or explain how to get it."""
    try:
        return importlib.import_module("nbd")
    except ImportError as error:
        raise LibnbdUnavailableError(
            f"the libnbd Python binding cannot be imported ({error})",
            "install Debian's python3-libnbd and expose it to the venv with scripts/setup-dataplane "
            "(needs the CPython version Debian builds it for, 3.11 on Debian 12); "
            "do not pip install 'nbd', an unrelated package",
        ) from error


def available() -> bool:
    """True when the binding can be imported."""
    try:
        load()
    except LibnbdUnavailableError:
        return False
    return True


def version() -> str:
    """The libnbd library version, e.g. ``1.14.2``."""
    return new_handle().get_version()


def new_handle() -> NbdHandle:
    """A fresh, unconnected handle."""
    return cast(NbdHandle, load().NBD())


def buffer_over(view: memoryview) -> NbdBuffer:
    """An ``nbd.Buffer`` sharing ``view``'s memory, so reads land there without a copy."""
    return cast(NbdBuffer, load().Buffer.from_buffer(view))


def error_type() -> type[Exception]:
    """``nbd.Error``, raised by failing libnbd calls."""
    return cast(type[Exception], load().Error)


def connect(uri: str, *, block_status: bool = False) -> NbdHandle:
    """A handle connected to ``uri``, asking for the ``base:allocation`` context when wanted."""
    handle = new_handle()
    if block_status:
        handle.add_meta_context(BASE_ALLOCATION)
    handle.connect_uri(uri)
    return handle


def shutdown_quietly(handle: NbdHandle) -> None:
    """Disconnect politely, ignoring errors of an already dead connection (the binding closes the
    handle itself when the object is released)."""
    with contextlib.suppress(Exception):  # the connection may be gone; dropping the handle is left
        handle.shutdown()


def errno_of(error: BaseException) -> int | None:
    """The numeric errno of an ``nbd.Error`` (libnbd reports it by name)."""
    name = getattr(error, "errno", None)
    if isinstance(name, int):
        return name
    if isinstance(name, str):
        value = getattr(errno_module, name, None)
        return value if isinstance(value, int) else None
    return None
