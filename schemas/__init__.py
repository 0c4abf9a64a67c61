"""The contract: typed, frozen payloads of every event, the migration request and the per-VM state.

Nothing in this package performs I/O; it only describes and validates data.
"""
