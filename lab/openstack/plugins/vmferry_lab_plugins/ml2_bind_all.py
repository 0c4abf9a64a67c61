"""An ML2 mechanism driver that binds every port on any host, so Nova can boot without a network agent.

Neutron's agent-based drivers need a live agent heartbeat and its `test` driver fails inside a real
server; this driver binds the first segment offered as an OVS port and marks the port ACTIVE.
"""

from __future__ import annotations

from typing import Any

from neutron_lib import constants  # type: ignore[import-untyped]
from neutron_lib.api.definitions import portbindings  # type: ignore[import-untyped]
from neutron_lib.plugins.ml2 import api  # type: ignore[import-untyped]


class BindAllMechanismDriver(api.MechanismDriver):  # type: ignore[misc]
    """Bind each port to the first segment it can use, with no agent behind it."""

    def initialize(self) -> None:
        """Nothing to set up: no agent, no backend."""

    def bind_port(self, context: Any) -> None:
        """Complete the binding on the first offered segment (ML2 calls this once a host is set)."""
        for segment in context.segments_to_bind:
            context.set_binding(
                segment[api.ID],
                portbindings.VIF_TYPE_OVS,
                {portbindings.CAP_PORT_FILTER: True, portbindings.OVS_HYBRID_PLUG: False},
                status=constants.PORT_STATUS_ACTIVE,
            )
            return
