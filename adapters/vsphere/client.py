"""A synchronous vSphere session on pyvmomi: verified TLS, login from a password file, transparent
re-login when the session expires, keep-alive, PropertyCollector reads and task waits.

Everything here blocks; ``vmferry.adapters.vsphere.aio`` runs it in threads for asyncio code.
Reads go through the PropertyCollector only: pyvmomi's lazy accessors fetch one property per
round trip, and vcsim 0.24 crashes on unset ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from types import TracebackType
from typing import Any, TypeVar, cast

from pyVmomi import vim, vmodl
from pyVmomi.SoapAdapter import SoapStubAdapter, StubAdapterBase

from vmferry.adapters.vsphere.faults import translate_error
from vmferry.adapters.vsphere.settings import VsphereSettings
from vmferry.adapters.vsphere.tls import ssl_context
from vmferry.adapters.vsphere.vmomi import new, present
from vmferry.bus.errors import FerryError, PermanentError, RetryableError

log = logging.getLogger(__name__)

T = TypeVar("T")
PC = vmodl.query.PropertyCollector
#: methods that must not trigger a re-login when they fail with NotAuthenticated
_SESSION_METHODS = frozenset({"Login", "Logout", "LoginByToken", "RetrieveServiceContent"})
_DEFAULT_PAGE = 500
#: the session cookie of vCenter and ESXi SOAP sessions
SESSION_COOKIE = "vmware_soap_session"


@dataclass
class Record:
    """One object read through the PropertyCollector: its reference, properties and unreadable paths."""

    obj: Any
    props: dict[str, Any] = field(default_factory=dict)
    missing: dict[str, Any] = field(default_factory=dict)

    @property
    def moref(self) -> str:
        """The managed object id, e.g. ``vm-42``."""
        return str(self.obj._moId)

    @property
    def kind(self) -> str:
        """The managed object type, e.g. ``VirtualMachine``."""
        return str(self.obj._wsdlName)

    def get(self, path: str, default: Any = None) -> Any:
        """A property value, or ``default`` when it is unset or was not readable."""
        value = self.props.get(path)
        return default if value is None else value


class _SessionLostError(Exception):
    """A read came back with NotAuthenticated in its missing set (vcsim's way of saying so)."""


class _ReloginStub(StubAdapterBase):
    """Wraps pyvmomi's SOAP stub: on NotAuthenticated it logs in again once and repeats the call.

    pyvmomi's own SessionOrientedStub also retries any call after a socket error, which could run a
    non-idempotent method (CreateSnapshot) twice; this stub never repeats a call the server may
    have executed. Concurrent threads that hit an expired session log in only once.
    """

    def __init__(self, soap: Any, client: VsphereClient) -> None:
        cast("Any", super()).__init__(version=soap.version)
        self.soap = soap
        self._client = client

    def InvokeMethod(self, mo: Any, info: Any, args: Any) -> Any:  # pyvmomi's interface
        """Invoke ``info`` on ``mo``; re-login and repeat once if the session was lost."""
        generation = self._client.login_generation
        soap: Any = self.soap
        status, result = soap.InvokeMethod(mo, info, args, self)
        if (
            status != 200
            and isinstance(result, vim.fault.NotAuthenticated)
            and info.wsdlName not in _SESSION_METHODS
        ):
            self._client.relogin(generation)
            status, result = soap.InvokeMethod(mo, info, args, self)
        if status == 200:
            return result
        if isinstance(result, BaseException):
            raise result
        raise RetryableError(f"vSphere answered {info.wsdlName} with status {status} and no fault")

    def DropConnections(self) -> None:
        """Close the pooled HTTP connections."""
        cast("Any", self.soap).DropConnections()


class VsphereClient:
    """One logged-in session to vCenter or ESXi. Thread-safe; use as a context manager or call close()."""

    def __init__(self, settings: VsphereSettings) -> None:
        self.settings = settings
        self._stub: _ReloginStub | None = None
        self._content: vim.ServiceInstanceContent | None = None
        self._login_lock = threading.Lock()
        self._generation = 0
        self._stop = threading.Event()
        self._keepalive: threading.Thread | None = None

    # -- session -----------------------------------------------------------------------------

    @property
    def where(self) -> str:
        """The endpoint as messages name it."""
        settings = self.settings
        return f"{settings.name} ({settings.address})" if settings.label else settings.address

    @property
    def login_generation(self) -> int:
        """How many logins succeeded so far (1 after connect, +1 per re-login)."""
        return self._generation

    @property
    def content(self) -> vim.ServiceInstanceContent:
        """The ServiceContent (managers, root folder); connect() first."""
        if self._content is None:
            raise PermanentError(f"vSphere {self.where}: not connected", "call connect() first")
        return self._content

    @property
    def is_vcenter(self) -> bool:
        """True for vCenter, False for a standalone ESXi host."""
        return str(self.content.about.apiType) == "VirtualCenter"

    @property
    def _session_manager(self) -> vim.SessionManager:
        return present(self.content.sessionManager, "a session manager")

    def connect(self) -> VsphereClient:
        """Open the connection, check TLS, log in and start the keep-alive thread."""
        settings = self.settings
        soap = new(
            SoapStubAdapter,
            host=settings.host,
            port=settings.port,
            sslContext=ssl_context(settings),
            httpConnectionTimeout=settings.timeout,
            connectionPoolTimeout=-1,
        )
        stub = _ReloginStub(soap, self)
        try:
            instance = new(vim.ServiceInstance, "ServiceInstance", stub)
            self._content = instance.RetrieveServiceContent()
            self._stub = stub
            self.relogin(self._generation)
        except BaseException as exc:
            cast("Any", soap).DropConnections()
            self._stub = None
            raise translate_error(exc, "connecting", self.where) from None
        if settings.keepalive > 0:
            self._keepalive = threading.Thread(
                target=self._keep_alive, name=f"vsphere-keepalive-{settings.name}", daemon=True
            )
            self._keepalive.start()
        log.info("vSphere %s: logged in as %s (%s)", self.where, settings.user, self.content.about.fullName)
        return self

    def relogin(self, seen_generation: int) -> None:
        """Log in again unless another thread already did since ``seen_generation`` was read."""
        with self._login_lock:
            if self._generation != seen_generation:
                return
            self._login()
            self._generation += 1

    def _login(self) -> None:
        if self._stub is None:
            raise PermanentError(f"vSphere {self.where}: not connected", "call connect() first")
        manager = new(vim.SessionManager, self._session_manager._moId, self._stub.soap)
        try:
            manager.Login(self.settings.user, self.settings.read_password(), None)
        except FerryError:
            raise
        except BaseException as exc:
            # `from None`: the traceback of a failed login must not carry the password's frame
            raise translate_error(exc, "logging in", self.where) from None
        if self._generation:
            log.info("vSphere %s: session had expired; logged in again", self.where)

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.settings.keepalive):
            try:
                self.touch()
            except Exception as exc:  # a keep-alive must never kill the process
                log.warning("vSphere %s: keep-alive failed: %r", self.where, exc)

    def touch(self) -> None:
        """Use the session (resets its idle timer); log in again if the server has dropped it."""
        generation = self._generation
        if self.current_session() is None:
            self.relogin(generation)

    def current_session(self) -> vim.UserSession | None:
        """This connection's session as the server sees it (None when it has expired)."""
        spec = _filter([self._session_manager], vim.SessionManager, ["currentSession"])

        def once() -> list[Record]:
            try:
                return self._retrieve_once([spec])
            except _SessionLostError:  # vcsim's answer for a dead session
                return []

        records = self.call("reading the current session", once)
        session = records[0].get("currentSession") if records else None
        return cast("vim.UserSession | None", session)

    def close(self) -> None:
        """Stop the keep-alive, log out (best effort) and close the connections."""
        self._stop.set()
        if self._keepalive is not None:
            self._keepalive.join(timeout=5)
            self._keepalive = None
        stub, self._stub = self._stub, None
        if stub is None:
            return
        try:
            new(vim.SessionManager, self._session_manager._moId, stub.soap).Logout()
        except Exception as exc:  # already gone is fine
            log.debug("vSphere %s: logout: %s", self.where, exc)
        stub.DropConnections()

    def __enter__(self) -> VsphereClient:
        return self.connect() if self._stub is None else self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def session_cookie(self) -> str:
        """This session's ``vmware_soap_session="..."`` cookie, which the datastore ``/folder`` HTTP
        access accepts as login. A credential: hand it on by file or descriptor, never log it."""
        if self._stub is None:
            raise PermanentError(f"vSphere {self.where}: not connected", "call connect() first")
        header = str(getattr(self._stub.soap, "cookie", "") or "")
        morsel = SimpleCookie(header).get(SESSION_COOKIE)
        if morsel is None or not morsel.value:
            raise PermanentError(
                f"vSphere {self.where} gave this session no {SESSION_COOKIE} cookie",
                "use the vddk transport, or check that the endpoint is vCenter or ESXi",
            )
        return f'{SESSION_COOKIE}="{morsel.value}"'

    def bind(self, kind: type[T], moref: str) -> T:
        """A managed object reference of this session, e.g. ``bind(vim.VirtualMachine, "vm-42")``."""
        if self._stub is None:
            raise PermanentError(f"vSphere {self.where}: not connected", "call connect() first")
        return cast("T", cast("Any", kind)(moref, self._stub))

    # -- calls -------------------------------------------------------------------------------

    def call(self, doing: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one pyvmomi call; any failure becomes a FerryError that says what was being done."""
        try:
            return function(*args, **kwargs)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise translate_error(exc, doing, self.where) from exc

    def session_scoped(self, doing: str, function: Callable[[], T]) -> T:
        """Run ``function`` that creates session-scoped objects (views, collectors); if the session is
        lost meanwhile, those objects are gone with it, so log in again and run it once more."""
        generation = self._generation
        try:
            return function()
        except _SessionLostError:
            self.relogin(generation)
        except vmodl.fault.ManagedObjectNotFound:
            if self._generation == generation:
                raise
        try:
            return function()
        except _SessionLostError:
            raise RetryableError(
                f"vSphere {self.where}: the session was lost again while {doing}",
                "check vCenter's session limits and the account; retried later",
            ) from None

    # -- PropertyCollector ---------------------------------------------------------------------

    def retrieve(
        self,
        specs: Sequence[PC.FilterSpec],
        doing: str = "reading properties",
        page_size: int = _DEFAULT_PAGE,
    ) -> list[Record]:
        """RetrievePropertiesEx with ContinueRetrievePropertiesEx paging, as records."""
        return self.call(doing, self.session_scoped, doing, lambda: self._retrieve_once(specs, page_size))

    def _retrieve_once(self, specs: Sequence[PC.FilterSpec], page_size: int = _DEFAULT_PAGE) -> list[Record]:
        collector = self.content.propertyCollector
        records: list[Record] = []
        result = collector.RetrievePropertiesEx(list(specs), new(PC.RetrieveOptions, maxObjects=page_size))
        token: str | None = None
        try:
            while result is not None:
                records.extend(_record(content) for content in result.objects)
                token = result.token
                if not token:
                    break
                result = collector.ContinueRetrievePropertiesEx(token)
                token = None
        finally:
            if token:
                _cancel_quietly(collector, token)
        if any(isinstance(f, vim.fault.NotAuthenticated) for r in records for f in r.missing.values()):
            raise _SessionLostError
        return records

    def read(self, obj: Any, paths: Iterable[str], doing: str = "reading properties") -> Record:
        """Properties of one object (unset ones are absent)."""
        found = self.retrieve([_filter([obj], type(obj), list(paths))], doing)
        if not found:
            raise PermanentError(f"vSphere {self.where}: {doing}: {obj._moId} no longer exists")
        return found[0]

    def read_many(
        self, objs: Sequence[Any], kind: type, paths: Iterable[str], doing: str = "reading properties"
    ) -> dict[str, Record]:
        """Properties of many objects of one type in one call (missing objects are left out)."""
        if not objs:
            return {}
        records = self.retrieve([_filter(objs, kind, list(paths), report_missing=True)], doing)
        return {r.moref: r for r in records}

    def read_all(
        self, wanted: dict[type, list[str]], root: Any = None, doing: str = "reading the inventory"
    ) -> list[Record]:
        """Every object of the given types under ``root`` (default: the root folder), with its paths,
        in one traversal of a ContainerView (created and destroyed here)."""

        def once() -> list[Record]:
            views = present(self.content.viewManager, "a view manager")
            view = views.CreateContainerView(root or self.content.rootFolder, list(wanted), True)
            try:
                traverse = new(
                    PC.TraversalSpec, name="view", path="view", skip=False, type=vim.view.ContainerView
                )
                spec = new(
                    PC.FilterSpec,
                    objectSet=[new(PC.ObjectSpec, obj=view, skip=True, selectSet=[traverse])],
                    propSet=[new(PC.PropertySpec, type=k, pathSet=p, all=False) for k, p in wanted.items()],
                )
                return self._retrieve_once([spec])
            finally:
                _destroy_quietly(view)

        return self.call(doing, self.session_scoped, doing, once)

    # -- tasks -------------------------------------------------------------------------------

    def wait_for_task(self, task: vim.Task, doing: str, timeout: float, max_poll: float = 2.0) -> Any:
        """Wait until ``task`` ends by polling info.state through the PropertyCollector with backoff.

        Returns ``info.result``; a failed task raises its fault, translated. Only state, error and
        result are read: vcsim 0.24 puts snapshot references in ``info.entity``, which pyvmomi refuses.
        """
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            record = self.read(task, ("info.state", "info.error", "info.result"), f"{doing} (task status)")
            state = record.get("info.state")
            if state == vim.TaskInfo.State.success:
                return record.get("info.result")
            if state == vim.TaskInfo.State.error:
                error = record.get("info.error")
                if isinstance(error, BaseException):
                    raise translate_error(error, doing, self.where) from None
                raise RetryableError(f"vSphere {self.where}: {doing} failed without a reason ({task._moId})")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RetryableError(
                    f"vSphere {self.where}: {doing} did not finish within {timeout:.0f} s (task {task._moId}"
                    f" is {state})",
                    "look at the task in the vSphere client; vmferry retries and reuses what it finds",
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, max_poll)

    def run_task(self, doing: str, start: Callable[[], vim.Task], timeout: float) -> Any:
        """Start a task and wait for it; both steps' failures are translated."""
        task = self.call(doing, start)
        return self.wait_for_task(task, doing, timeout)


def _filter(objs: Sequence[Any], kind: type, paths: list[str], report_missing: bool = False) -> PC.FilterSpec:
    return new(
        PC.FilterSpec,
        objectSet=[new(PC.ObjectSpec, obj=o, skip=False) for o in objs],
        propSet=[new(PC.PropertySpec, type=kind, pathSet=paths, all=False)],
        reportMissingObjectsInResults=report_missing,
    )


def _record(content: PC.ObjectContent) -> Record:
    record = Record(content.obj)
    for prop in content.propSet:
        record.props[prop.name] = prop.val
    for missing in content.missingSet:
        record.missing[missing.path] = missing.fault
    return record


def _cancel_quietly(collector: PC, token: str) -> None:
    try:
        collector.CancelRetrievePropertiesEx(token)
    except Exception as exc:  # cleanup of a failed read
        log.debug("CancelRetrievePropertiesEx: %s", exc)


def _destroy_quietly(view: vim.view.View) -> None:
    try:
        view.DestroyView()
    except Exception as exc:  # the view dies with the session anyway
        log.debug("DestroyView: %s", exc)
