"""``twistd dsmt-agent``: options, the SQLite registry, and the daemon as a real process (kill -9 included)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
import requests
import zeep
from twisted.internet import defer, threads
from twisted.python import usage
from twisted.trial import unittest

from dsmt.server.agent import daemon
from dsmt.server.agent.core import MAX_SLOTS, NodeAd, RegistryError
from dsmt.server.agent.service import NAME, TNS
from dsmt.transports.soap import pki
from dsmt.transports.soap.wssec import Signer, SigningTransport, Verifier
from tests.support.processes import TWISTD, child_environment, free_port, start_twistd

from .support import NOW, parties, pem_key

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
WSDL_FILE = os.path.join(ROOT, "wsdl", "agent.wsdl")
#: Seconds the daemon may take to answer its first request.
STARTUP = 20


@pytest.fixture
def keys(tmp_path):
    from cryptography.hazmat.primitives import serialization
    agent = parties().agent
    (tmp_path / "agent.pem").write_bytes(agent.cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "agent.key").write_bytes(pem_key(agent))
    (tmp_path / "ca.pem").write_bytes(parties().ca.cert.public_bytes(serialization.Encoding.PEM))
    return ["--key", str(tmp_path / "agent.key"), "--cert", str(tmp_path / "agent.pem"), "--ca",
            str(tmp_path / "ca.pem"), "--http", "tcp:0:interface=127.0.0.1"]


# ------------------------------------------------------------------ options

def test_options_read_the_nodes_file(keys, tmp_path):
    nodes = tmp_path / "nodes"
    nodes.write_text("# node slots endpoint\n141.213.4.201 4 http://141.213.4.201:8091/nodemanager\n\n"
                     "Node2.Example. 1   # no endpoint yet\n")
    options = daemon.Options()
    options.parseOptions(keys + ["--nodes", str(nodes), "--ticket-validity", "600"])
    assert options["node-list"] == [("141.213.4.201", 4, "http://141.213.4.201:8091/nodemanager"),
                                    ("node2.example", 1, None)]
    assert options["ticket-validity"] == 600


@pytest.mark.parametrize("line, complaint", [
    ("10.0.0.1", "line 2: expected 'node slots [endpoint]', found 1 words"),
    ("10.0.0.1 four", "line 2: slots 'four' is not a whole number"),
    ("10.0.0.1 -1", "line 2: slots '-1' is not a whole number"),
    ("10.0.0.1 99999", "line 2: node 10.0.0.1: capacity must be a whole number of slots in 0..10000"),
    ("10.0.0.1 1 ftp://x/", "line 2: node 10.0.0.1: the endpoint 'ftp://x/' is not an http"),
    ("bad_host! 1", "line 2"),
])
def test_a_bad_nodes_line_is_a_usage_error_naming_it(keys, tmp_path, line, complaint):
    nodes = tmp_path / "nodes"
    nodes.write_text("10.0.0.2 1\n" + line + "\n")
    with pytest.raises(usage.UsageError, match=re.escape(complaint)):
        daemon.Options().parseOptions(keys + ["--nodes", str(nodes)])


def test_other_usage_errors(keys, tmp_path):
    with pytest.raises(usage.UsageError, match="the agent signs tickets: give --key and --cert"):
        daemon.Options().parseOptions(["--http", "tcp:0", "--allow-unsigned"])
    with pytest.raises(usage.UsageError, match="--ticket-validity must be 1..86400 seconds, not 0"):
        daemon.Options().parseOptions(keys + ["--ticket-validity", "0"])
    (tmp_path / "binary").write_bytes(b"\xff\xfe 1\n")
    with pytest.raises(usage.UsageError, match="not UTF-8"):
        daemon.Options().parseOptions(keys + ["--nodes", str(tmp_path / "binary")])
    with pytest.raises(usage.UsageError, match="No such file"):
        daemon.Options().parseOptions(keys + ["--nodes", str(tmp_path / "missing")])


# ------------------------------------------------------------------ the SQLite registry

def test_sqlite_registry_keeps_nodes_and_reservations_across_restarts(tmp_path):
    path = str(tmp_path / "agent.sqlite")
    registry = daemon.SqliteRegistry(path, lambda: NOW)
    with registry.atomic():
        registry.register("10.0.0.1", 2, "http://10.0.0.1:8091/nodemanager")
        registry.register("10.0.0.2", 1)
        registry.reserve("T-1", "10.0.0.1", NOW + 100)
        registry.reserve("T-2", "10.0.0.1", NOW + 10)
        registry.reserve("T-3", "10.0.0.2", NOW + 100)
    registry.release("T-3")
    registry.register("10.0.0.2", 3)  # capacity only: no endpoint given, none stored
    registry.close()  # as kill -9 would: nothing else is flushed

    again = daemon.SqliteRegistry(path, lambda: NOW)
    assert again.ads(NOW) == [NodeAd("10.0.0.2", 3, 3, None), NodeAd("10.0.0.1", 2, 0,
                                                                      "http://10.0.0.1:8091/nodemanager")]
    assert again.holds("T-1") and again.holds("T-2") and not again.holds("T-3")
    again.register("10.0.0.1", 1)  # fewer slots than reserved: full, not negative, and so after a restart
    again.close()
    later = daemon.SqliteRegistry(path, lambda: NOW + 50)  # T-2 ended while the agent was down
    assert not later.holds("T-2") and later.holds("T-1")
    assert later.free("10.0.0.1", NOW + 50) == 0 and later.capacity("10.0.0.1") == 1
    with pytest.raises(RegistryError):
        with later.atomic():
            later.register("10.0.0.9", 1)
            later.register("10.0.0.9", MAX_SLOTS + 1)
    later.close()
    assert "10.0.0.9" not in daemon.SqliteRegistry(path, lambda: NOW)  # the transaction was rolled back


# ------------------------------------------------------------------ the daemon as a real process

class AgentDaemonTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        pkidir = os.path.join(self.workdir, "pki")
        pki.create_ca(pkidir, "agent test CA", key_type="ec")  # valid now: the daemon runs on the wall clock
        self.agent_files = pki.issue_certificate(pkidir, "service", "agent", key_type="ec")
        self.user_files = pki.issue_certificate(pkidir, "user", "alice", key_type="ec")
        self.ca = os.path.join(pkidir, "ca.pem")
        self.nodes = os.path.join(self.workdir, "nodes")
        with open(self.nodes, "w") as handle:
            handle.write("10.0.0.1 2 http://10.0.0.1:8091/nodemanager\n10.0.0.2 1\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/agent"
        self.log = open(os.path.join(self.workdir, "agent.log"), "w+")
        self.addCleanup(self.log.close)

    def start_daemon(self):
        process, exited = start_twistd(self, [
            "dsmt-agent", "--key", self.agent_files.key, "--cert", self.agent_files.certificate, "--ca", self.ca,
            "--allow-unsigned", "--nodes", self.nodes, "--http", f"tcp:{self.port}:interface=127.0.0.1",
            "--db", "agent.sqlite"], cwd=self.workdir, log=self.log)
        self.process = process
        return process, exited

    def service(self, signed: bool):
        transport = zeep.Transport(timeout=5)
        if signed:
            transport = SigningTransport(transport, Signer.from_files(self.user_files.key, self.user_files.certificate),
                                         Verifier(pki.TrustStore.from_files(self.ca), purpose=pki.Purpose.SERVER))
        return zeep.Client(WSDL_FILE, transport=transport).create_service(f"{{{TNS}}}{NAME}", self.url)

    def answered(self, operation: str, *args, signed: bool = False):
        """Call until the daemon answers (it is starting), bounded by STARTUP seconds; in a thread."""
        def attempt():
            deadline = time.monotonic() + STARTUP
            while True:
                try:
                    return getattr(self.service(signed), operation)(*args)
                except requests.ConnectionError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        self.log.seek(0)
                        raise AssertionError(f"the agent did not answer within {STARTUP} s (exit status "
                                             f"{self.process.poll()}):\n{self.log.read()[-3000:]}")
                    time.sleep(0.1)
        return threads.deferToThread(attempt)

    @defer.inlineCallbacks
    def test_answers_getads_signed_and_not_and_keeps_reservations_after_kill_9(self):
        process, exited = self.start_daemon()
        ads = yield self.answered("GetAds")
        self.assertEqual([(ad.node, ad.slots, ad.free, ad.endpoint) for ad in ads],
                         [("10.0.0.1", 2, 2, "http://10.0.0.1:8091/nodemanager"), ("10.0.0.2", 1, 1, None)])
        tickets = yield self.answered("IssueTickets", "<slice><name>s1</name><numnodes>2</numnodes>"
                                                      "<leaselen>60</leaselen></slice>", signed=True)
        self.assertEqual(len(tickets), 2)
        process.send_signal(signal.SIGKILL)
        yield exited
        self.start_daemon()
        ads = yield self.answered("GetAds", signed=True)
        self.assertEqual([(ad.node, ad.free) for ad in ads], [("10.0.0.1", 1), ("10.0.0.2", 0)])

    @defer.inlineCallbacks
    def test_bad_options_stop_the_daemon_with_a_message(self):
        result = yield threads.deferToThread(
            subprocess.run, [str(TWISTD), "-n", "--pidfile=", "dsmt-agent", "--key", self.agent_files.key,
                             "--cert", self.agent_files.certificate, "--http", "tcp:0"],
            cwd=self.workdir, env=child_environment(), capture_output=True, text=True, timeout=30)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--ca is needed", result.stdout + result.stderr)
