"""The slice manager daemon with real processes: a signed CreateSlice, reference 003's events, node-exclude obeyed.

A testbed of four node managers, the agent, the router and ``twistd
dsmt-slicemanager``; a zeep client signs with the user's certificate and
verifies the signed replies.  A ``node-exclude`` command sent with ``psepr
send`` (as ``<slice>_mgr``) makes the container manager deselect that node,
delete its sliver, and select the fourth node in its place.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import zeep

from dsmt.client.testbed import Testbed, poll
from dsmt.server.contracts import wsdl_path
from dsmt.transports.soap.pki import Purpose, TrustStore
from dsmt.transports.soap.wssec import Signer, SigningTransport, Verifier
from dsmt.transports.soap.zeepsupport import client_settings

SLICE = "excl1"
CHANNEL = f"/org/dsmt/ns/deployment/{SLICE}/org.dsmt.component.container-mgr/"
USER = f"{SLICE}_mgr"


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    with Testbed(tmp_path_factory.mktemp("slicemanager"), nodes=4, slice_manager=True) as bed:
        yield bed


def client(bed) -> zeep.Client:
    transport = SigningTransport(zeep.Transport(timeout=60), Signer.from_files(str(bed.user_key), str(bed.user_cert)),
                                 Verifier(TrustStore.from_files(str(bed.ca)), purpose=Purpose.SERVER))
    made = zeep.Client(wsdl_path("slicemanager"), transport=transport, settings=client_settings())
    binding = next(b for b in made.wsdl.bindings.values() if "psepr" not in b.name.localname)
    return made.create_service(binding.name, bed.slice_manager_url)


def states(events, field):
    """(node, value) of each ``field`` event, in arrival order."""
    found = []
    for event in events:
        payload = event.payload
        if getattr(payload, "field", None) != field:
            continue
        pairs = dict(part.split("=", 1) for part in payload.value.split(","))
        found.append((pairs["hostname"], pairs["value"]))
    return found


def test_create_then_exclude_a_node(bed):
    service = client(bed)
    spec = f"<slice><name>{SLICE}</name><numnodes>3</numnodes><leaselen>600</leaselen></slice>"
    with bed.listen(CHANNEL, user=USER) as listener:
        report = service.CreateSlice(spec)
        assert report.ok, report.summary
        lines = sorted(result.line for result in report.result)
        assert len(lines) == 3 and all(line.startswith("Success on ") for line in lines), lines
        chosen = sorted(result.node for result in report.result)
        spare = (set(bed.nodes) - set(chosen)).pop()
        listener.wait_for(lambda got: sum(1 for _, v in states(got, "sliver-state") if v == "installed") >= 3)
        for node in chosen:  # each chosen node: selected, installing, installed — in that order
            seen = [value for host, value in states(listener.events(), "sliver-state") if host == node]
            assert seen == ["selected", "installing", "installed"], (node, seen)

        excluded = chosen[0]
        sent = subprocess.run(
            [sys.executable, "-m", "dsmt.client.psepr_cli", "send", CHANNEL, "--field", "node-exclude",
             "--value", f"hostname={excluded},slice={SLICE}", "--service", USER, "--user", USER,
             "--router", bed.router_url, "--password-file", str(bed.password_file)],
            env=bed.environment(), capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr

        def replaced(got):
            values = states(got, "sliver-state")
            return (excluded, "deselected") in values and (spare, "installed") in values
        listener.wait_for(replaced)

    assert not bed.sliver_dir(excluded, SLICE).exists()          # its sliver is gone
    assert bed.sliver_dir(spare, SLICE).exists()                  # the replacement's is made
    nodes = service.NodeList(SLICE)
    assert sorted(value for value in (nodes.value or [])) == sorted(set(chosen) - {excluded} | {spare})
    poll(lambda: service.DeleteSlice(SLICE).ok, 30, "the slice deleted")
