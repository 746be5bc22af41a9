"""Starting the project's own commands and daemons from tests.

``TWISTD`` is the ``twistd`` next to the running Python (``.venv/bin/twistd``),
so it sees the dropin as ``make venv`` installed it.  Children get this
process's environment with ``PYTHONPATH`` made absolute, so they import the
same dsmt code from any working directory.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

TWISTD = Path(sys.executable).parent / "twistd"


def child_environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    env.update(extra)
    return env


def free_port() -> int:
    """A port nothing listens on right now (bound by the kernel's choice, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
