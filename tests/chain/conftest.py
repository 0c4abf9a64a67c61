"""The whole chain needs every real component: NATS (tests/conftest.py), vcsim-ferry and the lab."""

from __future__ import annotations

from tests.openstack.conftest import openstack_lab
from tests.vsphere.conftest import vcsim_binary

__all__ = ["openstack_lab", "vcsim_binary"]
