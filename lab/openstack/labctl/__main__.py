"""Command line of the lab controller: ``python -m labctl {start --venv DIR | stop | status}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from labctl import lab


def main() -> int:
    """Dispatch to start, stop or status."""
    parser = argparse.ArgumentParser(prog="labctl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("start", help="start the lab (or reuse it); print clouds.yaml's path")
    commands.add_parser("stop", help="stop the processes this lab started")
    commands.add_parser("status", help="show the lab's processes; exit 0 running, 3 stopped, 1 partial")
    parser.add_argument("--venv", type=Path, help="the lab's virtualenv (start only)")
    args = parser.parse_args()
    if args.command == "start":
        if args.venv is None:
            parser.error("start needs --venv")
        return lab.start(args.venv)
    if args.command == "stop":
        return lab.stop()
    return lab.status()


if __name__ == "__main__":
    sys.exit(main())
