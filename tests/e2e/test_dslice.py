"""The dslice HOWTO end to end: ``svm`` against real daemons (router, agent, node farms) as separate processes.

One testbed per module for the scenarios that do not interfere (each its own slice name); the scenarios
that need another shape (a full node, a 30-node farm killed mid-createslice) get their own.  Every
command's exit status and output lines are checked as the HOWTO and ``svm``'s docstring state them, over
HTTP and over PsEPR (same outputs apart from ordering).
"""
from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dsmt.client.testbed import Testbed, poll
from dsmt.server.slicemanager.slicedir import parse_lease_document
from dsmt.server.utctime import utc_text

pytestmark = pytest.mark.timeout(180)

TRANSPORTS = ("http", "psepr")
SLIVER_MGR = "org.dsmt.component.sliver-mgr"
#: Seconds a condition of the daemons (an expiry, a reaping) is waited for.
WAIT = 20.0
#: A real OpenSSH public key line (ed25519), and a second one.
KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBGJzoM3w5wUg3zCqBq9OdI8xZx2P+zXHqq3KX9fW6v9 alice@example"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMnKrxZ0vqQ4X3sYwEFpJ0hN1a0G3XkT0T6u3d8ZkR6m bob@example"


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    """5 nodes in 2 farms (farm0: n001..n003, farm1: n004, n005), room for every scenario's slices."""
    with Testbed(tmp_path_factory.mktemp("dslice"), nodes=5, farms=2, capacity=100) as testbed:
        yield testbed


def lines(result) -> list[str]:
    return result.stdout.splitlines()


def ok(result, status: int = 0):
    """``result`` after checking its exit status (the whole output in the message) and that no traceback leaked."""
    assert result.returncode == status, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    return result


def successes(nodes) -> list[str]:
    return sorted(f"Success on {node}" for node in nodes)


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def authorized_keys(bed, node, slice_name) -> list[str]:
    return (bed.sliver_dir(node, slice_name) / "home" / ".ssh" / "authorized_keys").read_text().splitlines()


def leases(directory: Path) -> dict:
    return {p.name: parse_lease_document(p.read_bytes(), str(p)) for p in directory.iterdir()
            if not p.name.startswith(".")}


# ------------------------------------------------------------------ the HOWTO, over both transports

TRANSCRIPTS: dict[str, list] = {}


def test_getads_lists_every_node_over_both_transports(bed):
    outputs = [ok(bed.svm("getads", transport=t)) for t in TRANSPORTS]
    for result in outputs:
        assert sorted(lines(result)) == sorted(bed.nodes)
        assert result.stderr == "getads: 5 found\n"
    assert lines(outputs[0]) == lines(outputs[1])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_slice_life_as_the_howto_tells_it(bed, transport, tmp_path):
    name = f"life-{transport}"
    spec = bed.write_spec(name, numnodes=5, leaselen=3600)
    transcript = TRANSCRIPTS.setdefault(transport, [])

    def run(*args, status=0):
        result = ok(bed.svm(*args, transport=transport), status)
        transcript.append((args[0], result.returncode, sorted(lines(result)), result.stderr))
        return result

    with bed.listen(f"/org/dsmt/ns/deployment/{name}/", user=f"{name}_mgr") as events:
        before = int(time.time())
        assert sorted(lines(run("createslice", spec))) == successes(bed.nodes)
        slice_dir = bed.slice_dir(name)
        assert files(slice_dir / "tickets") == [] and files(slice_dir / "leases") == []
        assert files(slice_dir / "vms") == sorted(bed.nodes)
        created = leases(slice_dir / "vms")
        public_key = (slice_dir / "slicekeypair" / "id_ed25519.pub").read_text().strip()
        for node in bed.nodes:
            assert authorized_keys(bed, node, name) == [public_key]
            assert created[node].expires_at >= before + 3600

        # addkey, delkey, nukekeys: authorized_keys in every sliver, the slice key always first
        key_a, key_b = tmp_path / "a.pub", tmp_path / "b.pub"
        key_a.write_text(KEY_A + "\n")
        key_b.write_text(KEY_B + "\n")
        assert sorted(lines(run("addkey", name, key_a))) == successes(bed.nodes)
        assert sorted(lines(run("addkey", name, key_b))) == successes(bed.nodes)
        for node in bed.nodes:
            assert authorized_keys(bed, node, name) == [public_key, KEY_A, KEY_B]
        assert sorted(lines(run("delkey", name, key_a))) == successes(bed.nodes)
        for node in bed.nodes:
            assert authorized_keys(bed, node, name) == [public_key, KEY_B]
        assert sorted(lines(run("nukekeys", name))) == successes(bed.nodes)
        for node in bed.nodes:
            assert authorized_keys(bed, node, name) == [public_key]

        # renewslice: each lease now ends leaselen after the renewal, later than before (renewed a second or
        # more after it was granted: the keys' commands took that long; the poll only makes sure)
        renewed_at = poll(lambda: int(time.time()) > max(lease.granted_at for lease in created.values())
                          and int(time.time()), WAIT, "a second after the grant")
        assert sorted(lines(run("renewslice", name))) == successes(bed.nodes)
        renewed = leases(slice_dir / "vms")
        for node in bed.nodes:
            assert renewed[node].expires_at >= renewed_at + 3600 > created[node].expires_at
            assert renewed[node].lease_id == created[node].lease_id

        # nodelist and expirations: local, from vms/
        assert lines(run("nodelist", name)) == bed.nodes
        assert lines(run("expirations", name)) == [
            f"Sliver for slice {name} expires {utc_text(renewed[node].expires_at)} on {node}" for node in bed.nodes]
        for line in lines(bed.svm("expirations", name)):
            assert re.fullmatch(rf"Sliver for slice {name} expires \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC on "
                                r"n00[1-5]\.farm[01]\.test", line)

        # deleteslice: every sliver, the slice directory
        assert sorted(lines(run("deleteslice", name))) == successes(bed.nodes)
        assert not slice_dir.exists()
        for node in bed.nodes:
            assert not bed.sliver_dir(node, name).exists()

        # reference 000's sliver-manager events, per node in order, then terminated on deleteslice
        got = events.wait_for(lambda got: sum("status=terminated" in e.payload.value for e in got) == 5)
    for node in bed.nodes:
        mine = [e for e in got if e.payload.value.startswith(f"hostname={node},")]
        assert [e.payload.value for e in mine] == [
            f"hostname={node},component={SLIVER_MGR},managed=org.dsmt.component.container,slice={name},"
            f"status={status}" for status in ("requested", "instantiated", "initialized", "running", "terminated")]
        for event in mine:
            assert event.channel == f"/org/dsmt/ns/deployment/{name}/{SLIVER_MGR}/status/"
            assert event.to_service == f"{name}_mgr"
            assert event.payload.field == "deployment-status"
    assert len(got) == 25


def test_http_and_psepr_give_the_same_outputs(bed):
    assert set(TRANSCRIPTS) == set(TRANSPORTS), "the slice-life tests ran first"

    def neutral(transcript):
        return [(command, status, [line.replace("life-http", "S").replace("life-psepr", "S") for line in out],
                 err.replace("life-http", "S").replace("life-psepr", "S"))
                for command, status, out, err in transcript]
    expirations = [i for i, step in enumerate(TRANSCRIPTS["http"]) if step[0] == "expirations"]
    http, psepr = neutral(TRANSCRIPTS["http"]), neutral(TRANSCRIPTS["psepr"])
    for i in expirations:   # the times differ between the two runs; the lines' shape was checked above
        http[i] = psepr[i] = None
    assert http == psepr


# ------------------------------------------------------------------ expiry: the reaper and svm clean

def test_an_expired_slice_is_reaped_on_the_nodes_and_removed_by_clean(bed):
    name = "shortlived"
    spec = bed.write_spec(name, numnodes=2, leaselen=2, ips=bed.farms[0].nodes[:2])
    with bed.listen(f"/org/dsmt/ns/deployment/{name}/", user=f"{name}_mgr") as events:
        assert sorted(lines(ok(bed.svm("createslice", spec)))) == successes(bed.farms[0].nodes[:2])
        nodes = bed.farms[0].nodes[:2]
        got = events.wait_for(lambda got: sum("status=terminated" in e.payload.value for e in got) == 2, WAIT)
    for node in nodes:
        assert not bed.sliver_dir(node, name).exists()
        assert [e.payload.value.rsplit("=", 1)[1] for e in got if e.payload.value.startswith(f"hostname={node},")] \
            == ["requested", "instantiated", "initialized", "running", "terminated"]
    poll(lambda: time.time() > max(lease.expires_at for lease in leases(bed.slice_dir(name) / "vms").values()),
         WAIT, "the leases' end")
    result = ok(bed.svm("clean"))
    assert f"Removed slice {name}" in lines(result)
    assert not bed.slice_dir(name).exists()
    assert ok(bed.svm("nodelist", name), 3).stderr.startswith("svm: error: ")


# ------------------------------------------------------------------ partial failures and resumption

def test_a_node_down_leaves_its_ticket_and_newleases_newvms_resume(bed):
    name = "partial"
    down, up = bed.farms[1].nodes, bed.farms[0].nodes
    bed.kill_farm(1)
    try:
        result = ok(bed.svm("-t", "10", "createslice", bed.write_spec(name, numnodes=5, leaselen=3600)), 1)
    finally:
        bed.restart_farm(1)
    out = sorted(lines(result))
    assert out[:len(down)] == [line for line in out if line.startswith("Error on ")]
    for node, line in zip(sorted(down), out[:len(down)]):
        assert line == f"Error on {node}: cannot reach {node}: Connection refused"
    assert out[len(down):] == successes(up)
    assert result.stderr == f"createslice {name}: 3 succeeded, 2 failed\n"
    slice_dir = bed.slice_dir(name)
    assert files(slice_dir / "tickets") == sorted(down)
    assert files(slice_dir / "vms") == sorted(up)

    tickets = sorted(str(p) for p in (slice_dir / "tickets").iterdir())
    assert sorted(lines(ok(bed.svm("newleases", name, *tickets)))) == successes(down)
    assert files(slice_dir / "tickets") == [] and files(slice_dir / "leases") == sorted(down)
    lease_files = sorted(str(p) for p in (slice_dir / "leases").iterdir())
    assert sorted(lines(ok(bed.svm("newvms", name, *lease_files)))) == successes(down)
    assert files(slice_dir / "leases") == [] and files(slice_dir / "vms") == sorted(bed.nodes)
    for node in bed.nodes:
        assert (bed.sliver_dir(node, name) / "home" / ".ssh" / "authorized_keys").exists()
    assert sorted(lines(ok(bed.svm("deleteslice", name)))) == successes(bed.nodes)


def test_a_node_down_at_step_3_keeps_its_lease_for_newvms(bed):
    name = "partial-vms"
    slice_dir = bed.slice_dir(name)
    node = bed.farms[1].nodes[0]
    ok(bed.svm("newtickets", bed.write_spec(name, numnodes=1, leaselen=3600, ips=[node])))
    ok(bed.svm("newleases", name, slice_dir / "tickets" / node))
    bed.kill_farm(1)
    try:
        result = ok(bed.svm("-t", "10", "newvms", name, slice_dir / "leases" / node), 1)
    finally:
        bed.restart_farm(1)
    assert lines(result) == [f"Error on {node}: cannot reach {node}: Connection refused"]
    assert files(slice_dir / "leases") == [node] and files(slice_dir / "vms") == []
    assert lines(ok(bed.svm("newvms", name, slice_dir / "leases" / node))) == [f"Success on {node}"]
    assert files(slice_dir / "vms") == [node]
    assert lines(ok(bed.svm("deleteslice", name))) == [f"Success on {node}"]


# ------------------------------------------------------------------ tickets a node refuses

def test_a_forged_ticket_is_refused_with_bad_signature(bed):
    name = "forged"
    first, second = bed.farms[0].nodes[:2]
    ok(bed.svm("newtickets", bed.write_spec(name, numnodes=1, leaselen=3600, ips=[first])))
    ticket = bed.slice_dir(name) / "tickets" / first
    original = ticket.read_bytes()
    # the ticket moved to another node: its node text edited, the signature left as it was
    forged = original.replace(f"<t:node>{first}</t:node>".encode(), f"<t:node>{second}</t:node>".encode())
    assert forged != original
    moved = bed.directory / "forged-ticket"
    moved.write_bytes(forged)
    result = ok(bed.svm("newleases", name, moved), 1)
    assert lines(result) == [f"Error on {second}: the ticket's digest does not match: it was changed after signing"]
    # more slots than the agent granted
    inflated = original.replace(b'name="slots">1<', b'name="slots">9<')
    assert inflated != original
    ticket.write_bytes(inflated)
    result = ok(bed.svm("newleases", name, ticket), 1)
    assert lines(result) == [f"Error on {first}: the ticket's digest does not match: it was changed after signing"]
    assert files(bed.slice_dir(name) / "tickets") == [first]   # kept for a retry, as any failure
    ticket.write_bytes(original)
    assert lines(ok(bed.svm("newleases", name, ticket))) == [f"Success on {first}"]
    ok(bed.svm("deleteslice", name))


def test_an_expired_ticket_is_refused(bed):
    """A ticket whose term ended (signed with the agent's own key, so only its term is wrong): the node
    manager allows DEFAULT_MAX_SKEW (60 s) of clock skew, so a real agent's short --ticket-validity would
    need a minute's wait; the refusal is the same."""
    from cryptography.hazmat.primitives import serialization
    from cryptography import x509
    from dsmt.server.agent.tickets import Ticket, sign_ticket, parse_ticket
    name = "stale"
    node = bed.farms[0].nodes[0]
    ok(bed.svm("newtickets", bed.write_spec(name, numnodes=1, leaselen=3600, ips=[node])))
    path = bed.slice_dir(name) / "tickets" / node
    issued = parse_ticket(path.read_bytes())
    now = int(time.time())
    key = serialization.load_pem_private_key((bed.pki / "service-agent.key").read_bytes(), None)
    cert = x509.load_pem_x509_certificate((bed.pki / "service-agent.pem").read_bytes())
    expired = Ticket("expired-ticket-1", name, node, {"slots": 1}, now - 600, now - 300, issued.issuer, 3600)
    path.write_bytes(sign_ticket(expired, key, cert))
    result = ok(bed.svm("newleases", name, path), 1)
    [line] = lines(result)
    assert re.fullmatch(rf"Error on {re.escape(node)}: ticket expired-ticket-1 expired at \S+ \(now \S+, clock skew "
                        r"allowed 60 s\)", line), line
    assert files(bed.slice_dir(name) / "tickets") == [node]
    ok(bed.svm("deleteslice", name))


def test_a_second_slice_of_the_same_name_on_a_node_is_refused(bed, tmp_path):
    """Another user directory asks for slice "twice" again: the agent issues, the node refuses (already-leased)."""
    node = bed.farms[0].nodes[0]
    spec = bed.write_spec("twice", numnodes=1, leaselen=3600, ips=[node])
    ok(bed.svm("createslice", spec))
    other = bed.svm("--dir", str(tmp_path / "other-home"), "createslice", spec)
    [line] = lines(ok(other, 1))
    lease = parse_lease_document((bed.slice_dir("twice") / "vms" / node).read_bytes())
    assert line == (f"Error on {node}: slice twice already holds lease {lease.lease_id} (expires "
                    f"{utc_text(lease.expires_at)}); renew it, or delete it first")
    ok(bed.svm("deleteslice", "twice"))


# ------------------------------------------------------------------ hostile input

HOSTILE_SPECS = {
    "dtd": (b'<?xml version="1.0"?><!DOCTYPE slice [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
            b"<slice><name>&b;</name><numnodes>1</numnodes><leaselen>60</leaselen></slice>",
            "slice spec has a DOCTYPE; DTDs and entity declarations are not allowed"),
    "huge": (b"<slice><name>big</name><numnodes>1</numnodes><leaselen>60</leaselen><ips>"
             + b" 10.0.0.1" * 40_000 + b"</ips></slice>", "{path} is over the limit of 262144 bytes"),
    "bad-name": (b"<slice><name>../etc</name><numnodes>1</numnodes><leaselen>60</leaselen></slice>",
                 "slice name '../etc' is not a valid login: it must be 1 to 32 characters, lower-case letters, "
                 "digits, '_' and '-', starting with a letter"),
    "reserved-name": (b"<slice><name>root</name><numnodes>1</numnodes><leaselen>60</leaselen></slice>",
                      "slice name 'root' is reserved (a system or service account)"),
    "too-long-lease": (b"<slice><name>longer</name><numnodes>1</numnodes><leaselen>1209601</leaselen></slice>",
                       "<leaselen> is 1209601 s; it must be between 1 and 1209600 s"),
    "not-xml": (b"\x00\xff garbage",
                "slice spec is not well-formed XML: Document is empty, line 1, column 1 (<string>, line 1)"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_SPECS))
def test_hostile_slice_files_are_refused_with_a_sentence(bed, case):
    data, sentence = HOSTILE_SPECS[case]
    path = bed.directory / f"hostile-{case}.xml"
    path.write_bytes(data)
    result = ok(bed.svm("createslice", path), 3)
    assert (result.stdout, result.stderr) == ("", f"svm: error: {sentence.format(path=path)}\n")
    assert not bed.slice_dir("big").exists() and not bed.slice_dir("longer").exists()


HOSTILE_KEYS = {
    "options": ('command="/bin/sh -c id",no-pty ' + KEY_A,
                "key line starts with authorized_keys options ('command=\"/bin/sh'); give the key alone: options "
                "are set by the node, not by a user key"),
    "two-lines": (KEY_A + "\n" + KEY_B, "the key file must hold exactly one OpenSSH public key line"),
    "not-a-key": ("hello world", "unknown key type 'hello'; accepted: ecdsa-sha2-nistp256, ecdsa-sha2-nistp384, "
                                 "ecdsa-sha2-nistp521, sk-ecdsa-sha2-nistp256@openssh.com, "
                                 "sk-ssh-ed25519@openssh.com, ssh-ed25519, ssh-rsa"),
    "truncated": (KEY_A[:40], "key data of this ssh-ed25519 key is malformed (Invalid data)"),
    "huge": ("ssh-ed25519 " + "A" * 20_000, "{path} is over the limit of 16384 bytes"),
}


def test_hostile_keys_are_refused_before_any_node_is_asked(bed, tmp_path):
    name = "keys"
    node = bed.farms[0].nodes[0]
    ok(bed.svm("createslice", bed.write_spec(name, numnodes=1, leaselen=3600, ips=[node])))
    for case, (text, sentence) in HOSTILE_KEYS.items():
        path = tmp_path / f"{case}.pub"
        path.write_text(text + "\n")
        result = ok(bed.svm("addkey", name, path), 3)
        assert (result.stdout, result.stderr) == ("", f"svm: error: {sentence.format(path=path)}\n"), case
    assert authorized_keys(bed, node, name) == [
        (bed.slice_dir(name) / "slicekeypair" / "id_ed25519.pub").read_text().strip()]
    assert files(bed.slice_dir(name) / "sshkeys") == []
    ok(bed.svm("deleteslice", name))


def test_usage_and_unknown_slice_errors(bed):
    result = ok(bed.svm("-p", "0", "getads"), 2)
    assert result.stderr == ("svm: argument -p: must be between 1 and 1024, not 0\n"
                             "usage: svm [options] COMMAND ARGS...   (svm --help)\n")
    result = ok(bed.svm("renewslice", "nosuchslice"), 3)
    assert result.stderr == f"svm: error: there is no slice nosuchslice in {bed.home}/slices\n"


# ------------------------------------------------------------------ a full node

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One node with one slot, HTTP only."""
    with Testbed(tmp_path_factory.mktemp("full"), nodes=1, capacity=1, transport_router=False) as testbed:
        yield testbed


def test_a_full_node_is_refused_by_the_agent_and_by_the_node_manager(small):
    node = small.nodes[0]
    ok(small.svm("createslice", small.write_spec("first", numnodes=1, leaselen=3600)))
    # the agent knows the slot is taken
    result = ok(small.svm("createslice", small.write_spec("second", numnodes=1, leaselen=3600)), 3)
    assert result.stderr == "svm: error: slice second needs 1 node; only 0 are available\n"
    # a second agent selling the same node does not: the node manager's admission control refuses
    other = small.add_agent("agent2")
    result = ok(small.svm("--agent", other, "createslice", small.directory / "second.xml"), 1)
    [line] = lines(result)
    assert line == f"Error on {node}: 1 slot asked, 1 of 1 in use"
    assert files(small.slice_dir("second") / "tickets") == [node]


# ------------------------------------------------------------------ kill -9 in the middle of createslice

@pytest.fixture(scope="module")
def big(tmp_path_factory):
    with Testbed(tmp_path_factory.mktemp("big"), nodes=30, transport_router=False) as testbed:
        yield testbed


def test_a_farm_killed_in_the_middle_of_createslice_restarts_consistent(big):
    name = "midway"
    slice_dir = big.slice_dir(name)
    spec = big.write_spec(name, numnodes=30, leaselen=3600)
    argv = ["-p", "1", "-t", "10", "createslice", spec]
    svm = subprocess.Popen([*big.svm_command(*argv)], cwd=big.directory, env=big.environment(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        poll(lambda: (slice_dir / "vms").is_dir() and len(files(slice_dir / "vms")) >= 5, WAIT,
             "five slivers created")
        big.kill_farm(0, signal.SIGKILL)
        out, err = svm.communicate(timeout=120)
    finally:
        if svm.poll() is None:
            svm.kill()
            svm.wait()
    assert svm.returncode == 1, out + err
    assert "Traceback" not in out + err
    vms = set(files(slice_dir / "vms"))
    assert 5 <= len(vms) < 30
    big.restart_farm(0)

    # consistent: every node is in exactly one of tickets/, leases/, vms/; a sliver only where a lease is held
    held = {kind: set(files(slice_dir / kind)) for kind in ("tickets", "leases", "vms")}
    assert sorted(held["tickets"] | held["leases"] | held["vms"]) == sorted(big.nodes)
    assert not (held["tickets"] & held["leases"]) and not (held["leases"] & held["vms"])
    for node in big.nodes:
        if big.sliver_dir(node, name).exists():
            assert node in held["vms"] | held["leases"], node
    for node in held["vms"]:
        assert big.sliver_dir(node, name).exists(), node

    if held["tickets"]:
        ok(big.svm("newleases", name, *sorted(slice_dir.joinpath("tickets").iterdir())))
    if files(slice_dir / "leases"):
        ok(big.svm("newvms", name, *sorted(slice_dir.joinpath("leases").iterdir())))
    assert files(slice_dir / "vms") == sorted(big.nodes)
    for node in big.nodes:
        assert (big.sliver_dir(node, name) / "home" / ".ssh" / "authorized_keys").exists()
    assert sorted(lines(ok(big.svm("deleteslice", name)))) == successes(big.nodes)
    assert not any(big.sliver_dir(node, name).exists() for node in big.nodes)
