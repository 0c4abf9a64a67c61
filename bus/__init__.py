"""The messaging runtime: NATS connection, provisioning, CloudEvents codec, function runner, state, replay.

Nothing here knows about VMware or OpenStack; functions and adapters build on it.
"""
