"""Adapters to the systems vmferry talks to: vSphere (source), OpenStack (destination), the disk data
plane and guest conversion. Functions receive them as injected dependencies."""
