"""Control of the OpenStack lab: start, stop and status of Keystone, Glance, Placement, Cinder, Neutron, Nova.

Run through lab/openstack/start, stop and status; ``python -m labctl`` with lab/openstack on sys.path.
"""
