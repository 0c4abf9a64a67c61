"""Load an OpenStack service's WSGI application under gunicorn with the lab's config files.

Several services parse ``sys.argv`` for ``--config-file`` (uwsgi's ``--pyargv``); gunicorn's own
arguments would confuse them, so argv is replaced by the files listed in VMFERRY_LAB_CONFIG_FILES.
Use as ``gunicorn 'vmferry_lab_plugins.wsgi:load("cinder.wsgi.api", "cinder-api")'``.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def load(module: str, prog: str) -> Any:
    """Import ``module`` with argv set to the lab's config files and return its ``application``."""
    files = [f for f in os.environ.get("VMFERRY_LAB_CONFIG_FILES", "").split(os.pathsep) if f]
    sys.argv = [prog] + [arg for path in files for arg in ("--config-file", path)]
    return importlib.import_module(module).application
