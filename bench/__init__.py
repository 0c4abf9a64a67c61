"""Benchmarks of vmferry against reference tools measured in the same run (ratios, not timed tests)."""
