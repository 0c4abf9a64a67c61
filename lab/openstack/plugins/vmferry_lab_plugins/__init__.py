"""The lab's own OpenStack plugins: a file-backed Cinder driver, a port-binding ML2 driver, WSGI loaders.

They run inside the OpenStack services (put on their PYTHONPATH by lab/openstack/start), never in vmferry.
"""
