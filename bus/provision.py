"""Declares streams, the state bucket and every durable consumer up front (``vmferry provision``).

Idempotent: what exists with the wanted configuration is left alone, what drifted is updated,
what is missing is created. Consumers are never created lazily by the runner (KEDA scales on them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError

from vmferry.bus.errors import NotProvisionedError
from vmferry.bus.function import FunctionDef
from vmferry.bus.naming import Naming

Action = Literal["created", "updated", "unchanged"]

#: Built-in consumers the runtime itself needs besides the registered functions.
TRACKER = "tracker"
DEADLETTER = "deadletter"


@dataclass(frozen=True)
class Limits:
    """Retention and safety settings of what provisioning declares."""

    duplicate_window_s: float = 3600.0
    event_max_age_s: float = 90 * 24 * 3600.0
    dlq_max_age_s: float = 365 * 24 * 3600.0
    state_history: int = 16
    replicas: int = 1
    tracker_ack_wait_s: float = 30.0


@dataclass(frozen=True)
class Change:
    """One thing provisioning looked at and what it did."""

    kind: Literal["stream", "bucket", "objects", "consumer"]
    name: str
    action: Action


def stream_configs(naming: Naming, limits: Limits) -> list[api.StreamConfig]:
    """The event, dead-letter and advisory streams."""
    common: dict[str, Any] = {
        "storage": api.StorageType.FILE,
        "retention": api.RetentionPolicy.LIMITS,
        "num_replicas": limits.replicas,
        "allow_direct": True,
    }
    return [
        api.StreamConfig(
            name=naming.stream,
            description="vmferry events: the audit log and replay source of every VM",
            subjects=[naming.events_wildcard],
            duplicate_window=limits.duplicate_window_s,
            max_age=limits.event_max_age_s,
            **common,
        ),
        api.StreamConfig(
            name=naming.dlq_stream,
            description="vmferry dead letters: messages no function could process",
            subjects=[naming.dlq_wildcard],
            duplicate_window=limits.duplicate_window_s,
            max_age=limits.dlq_max_age_s,
            **common,
        ),
        api.StreamConfig(
            name=naming.advisory_stream,
            description="max-deliveries advisories of the event stream, kept until handled",
            subjects=[naming.advisory_subject],
            max_age=limits.dlq_max_age_s,
            **common,
        ),
    ]


def consumer_config(naming: Naming, function: FunctionDef[Any]) -> api.ConsumerConfig:
    """The durable pull consumer of one function."""
    return api.ConsumerConfig(
        durable_name=naming.durable(function.name),
        description=function.description or f"vmferry function {function.name}",
        filter_subject=naming.consumer_filter(function.consumes),
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=function.ack_wait,
        max_deliver=function.max_deliver,
        max_ack_pending=max(function.concurrency * 4, 64),
    )


def system_consumer_configs(naming: Naming, limits: Limits) -> list[tuple[str, api.ConsumerConfig]]:
    """The tracker (state projection over all events) and the dead-letter handler."""
    return [
        (
            naming.stream,
            api.ConsumerConfig(
                durable_name=naming.durable(TRACKER),
                description="vmferry per-VM state projection",
                filter_subject=naming.events_wildcard,
                deliver_policy=api.DeliverPolicy.ALL,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=limits.tracker_ack_wait_s,
                max_deliver=-1,
                max_ack_pending=2048,
            ),
        ),
        (
            naming.advisory_stream,
            api.ConsumerConfig(
                durable_name=naming.durable(DEADLETTER),
                description="vmferry dead-lettering of exhausted messages",
                filter_subject=naming.advisory_subject,
                deliver_policy=api.DeliverPolicy.ALL,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=30.0,
                max_deliver=-1,
                max_ack_pending=256,
            ),
        ),
    ]


_STREAM_FIELDS = (
    "subjects", "storage", "retention", "duplicate_window", "max_age", "num_replicas",
    "allow_direct", "description",
)  # fmt: skip
_CONSUMER_FIELDS = (
    "filter_subject", "ack_wait", "max_deliver", "max_ack_pending", "description", "ack_policy",
)  # fmt: skip


def _differs(current: Any, wanted: Any, fields: Iterable[str]) -> bool:
    return any(getattr(wanted, f) != getattr(current, f) for f in fields if getattr(wanted, f))


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> Change:
    name = config.name or ""
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(config)
        return Change("stream", name, "created")
    if _differs(info.config, config, _STREAM_FIELDS):
        await js.update_stream(config)
        return Change("stream", name, "updated")
    return Change("stream", name, "unchanged")


async def _ensure_consumer(js: JetStreamContext, stream: str, config: api.ConsumerConfig) -> Change:
    name = config.durable_name or ""
    try:
        info = await js.consumer_info(stream, name)
    except NotFoundError:
        await js.add_consumer(stream, config)
        return Change("consumer", name, "created")
    if not _differs(info.config, config, _CONSUMER_FIELDS):
        return Change("consumer", name, "unchanged")
    try:
        await js.add_consumer(stream, config)
    except BadRequestError as exc:
        raise NotProvisionedError(
            f"consumer {name} cannot be updated in place: {exc.description}",
            f"stop its runners, delete it (nats consumer rm {stream} {name}) and provision again",
        ) from exc
    return Change("consumer", name, "updated")


async def _ensure_bucket(js: JetStreamContext, naming: Naming, limits: Limits) -> Change:
    bucket = naming.state_bucket
    try:
        info = await js.stream_info(f"KV_{bucket}")
    except NotFoundError:
        await js.create_key_value(
            api.KeyValueConfig(
                bucket=bucket,
                description="vmferry per-VM migration state",
                history=limits.state_history,
                storage=api.StorageType.FILE,
                replicas=limits.replicas,
            )
        )
        return Change("bucket", bucket, "created")
    if info.config.max_msgs_per_subject != limits.state_history:
        config = info.config
        config.max_msgs_per_subject = limits.state_history
        await js.update_stream(config)
        return Change("bucket", bucket, "updated")
    return Change("bucket", bucket, "unchanged")


async def _ensure_checkpoint_bucket(js: JetStreamContext, naming: Naming, limits: Limits) -> Change:
    bucket = naming.checkpoint_bucket
    try:
        await js.stream_info(f"KV_{bucket}")
    except NotFoundError:
        await js.create_key_value(
            api.KeyValueConfig(
                bucket=bucket,
                description="vmferry copy checkpoints (resume after a crash)",
                history=1,
                storage=api.StorageType.FILE,
                replicas=limits.replicas,
            )
        )
        return Change("bucket", bucket, "created")
    return Change("bucket", bucket, "unchanged")


async def _ensure_log_store(js: JetStreamContext, naming: Naming, limits: Limits) -> Change:
    bucket = naming.log_bucket
    try:
        await js.stream_info(f"OBJ_{bucket}")
    except NotFoundError:
        await js.create_object_store(
            bucket,
            api.ObjectStoreConfig(
                bucket=bucket,
                description="vmferry logs of long steps (conversion), linked from events",
                storage=api.StorageType.FILE,
                replicas=limits.replicas,
                ttl=limits.event_max_age_s,
            ),
        )
        return Change("objects", bucket, "created")
    return Change("objects", bucket, "unchanged")


async def provision(
    js: JetStreamContext,
    naming: Naming,
    functions: Iterable[FunctionDef[Any]],
    limits: Limits | None = None,
) -> list[Change]:
    """Declare everything the runtime needs; returns what was created, updated or left alone."""
    limits = limits or Limits()
    changes = [await _ensure_stream(js, config) for config in stream_configs(naming, limits)]
    changes.append(await _ensure_bucket(js, naming, limits))
    changes.append(await _ensure_checkpoint_bucket(js, naming, limits))
    changes.append(await _ensure_log_store(js, naming, limits))
    for stream, config in system_consumer_configs(naming, limits):
        changes.append(await _ensure_consumer(js, stream, config))
    for function in functions:
        changes.append(await _ensure_consumer(js, naming.stream, consumer_config(naming, function)))
    return changes


async def require_consumer(js: JetStreamContext, stream: str, durable: str) -> None:
    """Fail with an actionable error when a consumer was not provisioned."""
    try:
        await js.consumer_info(stream, durable)
    except NotFoundError:
        raise NotProvisionedError(
            f"consumer {durable} on stream {stream} does not exist",
            "run `vmferry provision` (with the same function list) before starting runners",
        ) from None
