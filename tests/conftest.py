"""Suite-wide test set-up.

Every test runs in its own temporary working directory, so files a test makes
with relative paths (trial's ``mktemp()`` among them) never land in the
repository.  ``PYTHONPATH`` entries are made absolute first, so processes the
tests start still import the same code from the new directory.  The
nats-server fixtures (``nats_server``, ``nats_cluster``) are available to every
test module.
"""
import os

import pytest

from tests.support.natsserver import nats_cluster, nats_server  # noqa: F401  (fixtures for every test)


def pytest_configure(config):
    entries = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    if entries:
        os.environ["PYTHONPATH"] = os.pathsep.join(os.path.abspath(entry) for entry in entries)


@pytest.fixture(autouse=True)
def _private_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
