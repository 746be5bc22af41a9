"""The per-user slice directory: layout, atomic writes, hostile names and files, clean by time."""
from __future__ import annotations

import os

import pytest

from dsmt.server.agent.tickets import sign_ticket
from dsmt.server.slicemanager import slicedir
from dsmt.server.slicemanager.calls import LeaseInfo
from dsmt.server.slicemanager.slicedir import LEASES, TICKETS, VMS, SliceDirectory, SliceDirectoryError, \
    lease_document, parse_lease_document, write_atomic

from ..agent.support import NOW, parties, ticket

NODE = "141.213.4.201"


def lease(node=NODE, slice_name="oceanstore", expires=NOW + 3600, **changes) -> LeaseInfo:
    fields = dict(lease_id="L-1", ticket_id="T-1", slice=slice_name, node=node, slots=1, granted_at=NOW,
                  expires_at=expires, leaselen=3600)
    fields.update(changes)
    return LeaseInfo(**fields)


def signed(**changes) -> bytes:
    party = parties().agent
    return sign_ticket(ticket(party, **changes), party.key, party.cert)


@pytest.fixture
def directory(tmp_path):
    return SliceDirectory(str(tmp_path / "home"))


def test_home_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DSMT_HOME", str(tmp_path / "x"))
    assert SliceDirectory().slices_path == str(tmp_path / "x" / "slices")
    monkeypatch.delenv("DSMT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert SliceDirectory().home == str(tmp_path / "h" / ".dsmt")


def test_layout_and_round_trips(directory):
    files = directory.slice("oceanstore").create()
    for sub in ("tickets", "leases", "vms", "sshkeys", "slicekeypair"):
        assert os.path.isdir(os.path.join(files.path, sub))
    assert os.stat(files.path).st_mode & 0o777 == 0o700
    data = signed()
    files.put_ticket(NODE, data)
    assert files.ticket(NODE) == data and files.nodes(TICKETS) == [NODE]
    assert os.stat(files.node_path(TICKETS, NODE)).st_mode & 0o777 == 0o600
    files.put_lease(VMS, lease())
    assert files.lease(VMS, NODE) == lease()
    files.add_endpoints({NODE: "http://127.0.0.1:1/nodemanager", "10.0.0.2": "http://127.0.0.1:2/nodemanager"})
    files.add_endpoints({NODE: "http://127.0.0.1:3/nodemanager"})
    assert files.endpoints() == {NODE: "http://127.0.0.1:3/nodemanager", "10.0.0.2": "http://127.0.0.1:2/nodemanager"}
    with open(os.path.join(files.path, "nodes")) as handle:
        assert handle.read() == f"10.0.0.2 http://127.0.0.1:2/nodemanager\n{NODE} http://127.0.0.1:3/nodemanager\n"
    files.write_spec(b"<slice/>")
    assert files.spec() == b"<slice/>"
    files.save_keypair(b"PRIVATE", "ssh-ed25519 AAAA x")
    assert files.keypair_files() == (b"PRIVATE", "ssh-ed25519 AAAA x")
    fp = "SHA256:" + "a+b/" * 10 + "xyz"
    files.put_user_key(fp, "ssh-ed25519 AAAA u")
    assert files.user_keys() == ["ssh-ed25519 AAAA u"]
    files.remove_user_key(fp)
    assert files.user_keys() == []
    assert directory.names() == ["oceanstore"]


def test_nodes_sorted_numerically_and_junk_ignored(directory):
    files = directory.slice("oceanstore").create()
    for node in ("10.0.0.10", "10.0.0.9", "node.example"):
        files.put_lease(LEASES, lease(node))
    for junk in (".tmp-abc", "Node.Example", "README"):
        open(os.path.join(files.path, LEASES, junk), "w").close()
    os.mkdir(os.path.join(files.path, LEASES, "10.0.0.1"))     # a directory named like a node
    assert files.nodes(LEASES) == ["10.0.0.9", "10.0.0.10", "node.example"]


@pytest.mark.parametrize("name", ["../etc", "..", ".", "a/b", "", "Node.Example", "10.0.0.1\x00", "/etc/passwd",
                                  "010.0.0.1", "x" * 300])
def test_hostile_node_names_refused(directory, name):
    files = directory.slice("oceanstore").create()
    with pytest.raises(SliceDirectoryError) as exc:
        files.put_ticket(name, b"x")
    assert exc.value.code == "bad-name"
    assert os.listdir(os.path.join(files.path, TICKETS)) == []


@pytest.mark.parametrize("name", ["../x", "Oceanstore", "root", "", "a" * 40])
def test_hostile_slice_names_refused(directory, name):
    with pytest.raises(SliceDirectoryError) as exc:
        directory.slice(name)
    assert exc.value.code == "bad-name"


def test_symlink_and_oversized_files_refused(directory, tmp_path):
    files = directory.slice("oceanstore").create()
    secret = tmp_path / "secret"
    secret.write_bytes(b"top secret")
    os.symlink(secret, files.node_path(TICKETS, NODE))
    with pytest.raises(SliceDirectoryError) as exc:
        files.ticket(NODE)
    assert exc.value.code == "bad-file" and "symbolic link" in exc.value.reason
    assert files.nodes(TICKETS) == []                          # listings skip symlinks too
    with open(files.node_path(VMS, NODE), "wb") as handle:
        handle.write(b"<" * (slicedir.MAX_LEASE_BYTES + 1))
    with pytest.raises(SliceDirectoryError) as exc:
        files.lease(VMS, NODE)
    assert exc.value.code == "bad-file" and "limit" in exc.value.reason


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    path = str(tmp_path / "f")
    write_atomic(path, b"old")

    def crash(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_atomic(path, b"new")
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["f"]                       # no temporary file left behind


def test_write_error_is_precise(directory, monkeypatch):
    files = directory.slice("oceanstore").create()
    monkeypatch.setattr(slicedir, "write_atomic", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(SliceDirectoryError) as exc:
        files.put_lease(LEASES, lease())
    assert exc.value.code == "io" and "No space left" in exc.value.reason


@pytest.mark.parametrize("data, words", [
    (b"", "XML"),
    (b"<!DOCTYPE x [<!ENTITY a 'b'>]><x/>", "DOCTYPE"),
    (b"<lease/>", "root"),
    (lease_document(lease()).replace(b"<l:slots>1", b"<l:slots>-1"), "whole number"),
    (lease_document(lease()).replace(b"<l:node>141.213.4.201", b"<l:node>../x"), "node address"),
    (lease_document(lease()).replace(b"<l:slice>oceanstore", b"<l:slice>root"), "reserved"),
    (lease_document(lease()).replace(b"<l:leaseId>L-1", b"<l:leaseId>"), "id"),
    (lease_document(lease()).replace(b"</l:lease>", b"<l:extra/></l:lease>"), "exactly"),
    (b"<l:lease xmlns:l='http://dsmt.org/ns/lease'>" + b"<l:x>" * 10 + b"</l:x>" * 10 + b"</l:lease>", "deep"),
])
def test_bad_lease_documents(data, words):
    with pytest.raises(SliceDirectoryError) as exc:
        parse_lease_document(data)
    assert exc.value.code == "bad-file" and words in str(exc.value.reason)


def test_lease_file_for_another_node_refused(directory):
    files = directory.slice("oceanstore").create()
    files.put_lease(VMS, lease("10.0.0.2"))
    os.rename(files.node_path(VMS, "10.0.0.2"), files.node_path(VMS, NODE))
    with pytest.raises(SliceDirectoryError, match="10.0.0.2"):
        files.lease(VMS, NODE)


def test_bad_nodes_file(directory):
    files = directory.slice("oceanstore").create()
    with open(os.path.join(files.path, "nodes"), "w") as handle:
        handle.write(f"{NODE} http://a/\n../x http://b/\n")
    with pytest.raises(SliceDirectoryError, match="line 2"):
        files.endpoints()
    with pytest.raises(SliceDirectoryError):
        files.add_endpoints({NODE: "http://a b/"})


def test_clean_by_time(directory):
    soon = directory.slice("soon").create()          # ticket valid until NOW + 3600
    soon.put_ticket(NODE, signed(slice_name="soon"))
    leased = directory.slice("leased").create()      # lease until NOW + 7200, vm expired
    leased.put_lease(LEASES, lease(slice_name="leased", expires=NOW + 7200))
    leased.put_lease(VMS, lease("10.0.0.2", slice_name="leased", expires=NOW - 1))
    vm = directory.slice("vm").create()
    vm.put_lease(VMS, lease(slice_name="vm", expires=NOW + 100))
    empty = directory.slice("empty").create()
    corrupt = directory.slice("corrupt").create()
    with open(corrupt.node_path(VMS, NODE), "wb") as handle:
        handle.write(b"not a lease")
    os.mkdir(os.path.join(directory.slices_path, "Not-A-Slice"))      # not ours: never touched
    os.mkdir(os.path.join(directory.slices_path, ".trash-old-1234"))  # a killed clean's leftover

    assert directory.clean(NOW) == ["corrupt", "empty"]
    assert directory.names() == ["leased", "soon", "vm"]
    assert sorted(os.listdir(directory.slices_path)) == ["Not-A-Slice", "leased", "soon", "vm"]
    assert directory.clean(NOW + 100) == ["vm"]
    assert directory.clean(NOW + 3600) == ["soon"]
    assert directory.clean(NOW + 7199) == []
    assert directory.clean(NOW + 7200) == ["leased"]
    assert empty.exists() is False


def test_clean_without_a_home_is_empty(tmp_path):
    assert SliceDirectory(str(tmp_path / "none")).clean(NOW) == []
