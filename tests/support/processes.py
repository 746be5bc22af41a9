"""Starting the project's own commands and daemons from tests.

``TWISTD`` is the ``twistd`` next to the running Python (``.venv/bin/twistd``),
so it sees the dropin as ``make venv`` installed it.  Children get this
process's environment with ``PYTHONPATH`` made absolute, so they import the
same dsmt code from any working directory (:func:`child_environment`, the
testbed's own, as is :func:`free_port`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from dsmt.client.testbed import child_environment, free_port

__all__ = ["TWISTD", "child_environment", "free_port"]

TWISTD = Path(sys.executable).parent / "twistd"
