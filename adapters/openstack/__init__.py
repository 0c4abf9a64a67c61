"""The OpenStack destination of a migration, on openstacksdk behind an asyncio facade.

* ``client``: auth (clouds.yaml cloud, OS_* environment or application credential), the async
  facade ``OpenStackAdapter`` (every SDK call in a worker thread), error mapping, backoff waits.
* ``volumes``: volumes found or created by identity metadata, CBT state, guest image metadata.
* ``devices``: where an attached volume appears on the conversion host.
* ``flavors``: the flavor policy (closest fit, explicit map or a created flavor), never undersized.
* ``network``: Neutron ports by MAC and network, fixed IPs, security groups.
* ``compute``: attach/detach, boot-from-volume servers found by identity metadata, ACTIVE waits.
* ``preflight``: quota, volume type, network, MAC, IP and flavor checks as ``Finding``s.
* ``teardown``: removes exactly what vmferry created for a VM, with a dry-run listing.
"""

from vmferry.adapters.openstack.client import CloudAuth, OpenStackAdapter
from vmferry.adapters.openstack.model import VmSpec

__all__ = ["CloudAuth", "OpenStackAdapter", "VmSpec"]
