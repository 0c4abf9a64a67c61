"""The ``vmferry`` command line: configuration loading, wiring of functions, and the commands."""
