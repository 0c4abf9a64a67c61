"""vmferry: migrate VMware vSphere virtual machines to OpenStack with functions chained on NATS JetStream.

The code lives in the repository's top-level folders (``schemas/``, ``bus/``, ``functions/``,
``adapters/``, ``cli/``), which this package maps into the ``vmferry`` namespace.
"""

__version__ = "0.1.0"
