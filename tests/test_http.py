"""The HTTP CloudEvents endpoint: request ingress into JetStream and hosted handlers (Knative style)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import msgspec
import pytest
from aiohttp import web
from nats.aio.client import Client
from nats.js import JetStreamContext

from tests.helpers import events_of, eventually, running
from vmferry.bus.cloudevents import encode, structured
from vmferry.bus.http import HttpReceiver
from vmferry.bus.naming import Naming
from vmferry.cli.requests import build_request, request_event
from vmferry.functions import Dependencies, build_registry

REQUESTED = "io.vmferry.migration.requested.v1"
ACCEPTED = "io.vmferry.migration.accepted.v1"
FAILED = "io.vmferry.migration.failed.v1"
REGISTRY = build_registry(Dependencies(frozenset({"vc"}), frozenset({"lab"})))


def _request_event(request_id: str, source: str = "vc") -> tuple[dict[str, str], bytes]:
    request = build_request({}, request_id=request_id, source=source, destination="lab", vm_names=("web 01",))
    headers, body = encode(request_event(request, source="/tests/http"))
    http_headers = {k: v for k, v in headers.items() if k.startswith("ce-") and k != "ce-datacontenttype"}
    return http_headers | {"Content-Type": "application/json"}, body


@pytest.fixture
async def endpoint(nc: Client, naming: Naming, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    hosted = REGISTRY.select(request.param) if getattr(request, "param", None) else []
    runner = web.AppRunner(HttpReceiver(nc, naming, hosted).app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


async def _post(url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as response:
        return response.status, await response.json()


async def test_ingress_publishes_requests_once(js: JetStreamContext, naming: Naming, endpoint: str) -> None:
    async with running(js, naming, REGISTRY.select(["intake"])):
        headers, body = _request_event("h1")
        status, answer = await _post(endpoint, headers, body)
        assert status == 202 and answer["key"] == "req-h1" and answer["duplicate"] is False
        status, again = await _post(endpoint, headers, body)
        assert status == 202 and again["duplicate"] is True
        await eventually(lambda: events_of(js, naming, "req-h1", ACCEPTED))
    assert len(await events_of(js, naming, "req-h1", REQUESTED)) == 1


async def test_structured_mode_and_bad_input(js: JetStreamContext, naming: Naming, endpoint: str) -> None:
    async with running(js, naming, REGISTRY.select(["intake"])):
        request = build_request({}, request_id="h2", source="vc", destination="lab", vm_names=("a",))
        body = structured(request_event(request))
        status, _ = await _post(endpoint, {"Content-Type": "application/cloudevents+json"}, body)
        assert status == 202
        status, error = await _post(endpoint, {"Content-Type": "application/json"}, b"{}")
        assert status == 400 and "not a CloudEvent" in str(error["error"]) and error["fix"]
        headers, good = _request_event("h3")
        broken = msgspec.json.encode({**msgspec.json.decode(good), "password": "x"})
        status, error = await _post(endpoint, headers, broken)
        assert status == 400 and "secrets never travel" in str(error["error"])
        await eventually(lambda: events_of(js, naming, "req-h2", ACCEPTED))
    assert not await events_of(js, naming, "req-h3")  # nothing half-published


@pytest.mark.parametrize("endpoint", [["intake"]], indirect=True)
async def test_hosted_function_runs_the_same_handler(
    js: JetStreamContext, naming: Naming, endpoint: str
) -> None:
    async with running(js, naming, []):
        status, answer = await _post(endpoint, *_request_event("h4"))
        assert status == 200 and answer["handled_by"] == "intake"
        status, error = await _post(endpoint, *_request_event("h5", source="nope"))
        assert status == 422 and "'nope'" in str(error["error"])
        await eventually(lambda: events_of(js, naming, "req-h4", ACCEPTED))
        failed = await eventually(lambda: events_of(js, naming, "req-h5", FAILED))
    assert failed[0].event is not None and failed[0].event.data.step == "intake"  # type: ignore[attr-defined]


async def test_health(endpoint: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(endpoint + "healthz") as response:
        assert response.status == 200 and (await response.json()) == {"nats": True}
