"""Checks several functions make before doing work: has an operator cancelled this migration?"""

from __future__ import annotations

import logging

from vmferry.bus.handles import BusHandle

log = logging.getLogger(__name__)


async def is_cancelled(bus: BusHandle | None, vm_key: str, request_id: str, step: str) -> bool:
    """True when the VM's migration under ``request_id`` was cancelled (the step then does nothing).

    Without a bound bus (unit tests of a single handler) nothing is cancelled.
    """
    if bus is None or not bus.bound:
        return False
    state, _ = await bus.state.get(vm_key)
    cancelled = state.cancelled if state is not None else None
    if cancelled is None or cancelled.request_id != request_id:
        return False
    log.warning("%s: %s was cancelled under request %s; nothing to do", step, vm_key, request_id)
    return True
