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

__all__ = ["TWISTD", "child_environment", "free_port", "start_twistd"]

TWISTD = Path(sys.executable).parent / "twistd"


def start_twistd(case, argv, *, cwd, log):
    """``twistd -n <argv>`` as a child of trial test ``case``, output to ``log``; (process, Deferred of its exit).
    The child is killed at the test's cleanup if it still runs."""
    import subprocess

    from twisted.internet import threads
    process = subprocess.Popen([str(TWISTD), "-n", "--pidfile=", "--logfile=-", *argv], cwd=cwd,
                               env=child_environment(), stdout=log, stderr=subprocess.STDOUT)
    exited = threads.deferToThread(process.wait)

    def stop():
        if process.poll() is None:
            process.kill()
        return exited
    case.addCleanup(stop)
    return process, exited
