"""vmferry's test suite."""
