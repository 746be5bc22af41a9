"""The directory sandbox: layout and modes, keys, limits, processes, crash recovery, hostile names and links."""
from __future__ import annotations

import os
import resource
import select
import signal
import stat
import subprocess
import sys
import time

import pytest

from dsmt.server.nodemanager import sliver as sliver_module
from dsmt.server.nodemanager.sliver import DirectorySandbox, RecoveryReport, ResourceLimits, SliverError
from dsmt.server.nodemanager.sshkeys import generate_slice_keypair, parse_public_key

#: Bound on waiting for a test's child to report (it takes tens of milliseconds).
REPORT_TIMEOUT = 10.0


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "slivers")


@pytest.fixture
def sandbox(root):
    box = DirectorySandbox(root)
    box.recover()
    yield box
    for name in box.list():                  # never leave a process behind, even when a test fails
        box.stop(name)


def user_key(comment="user"):
    return parse_public_key(generate_slice_keypair("x").public_line.rsplit(" ", 1)[0] + " " + comment)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def code_of(call, *args) -> tuple[str, str]:
    with pytest.raises(SliverError) as info:
        call(*args)
    return info.value.code, info.value.reason


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether ``pid`` exits within ``within`` seconds (a SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read()
    except FileNotFoundError:
        return False
    return text[text.rindex(b")") + 2:].split()[0] != b"Z"


def read_fifo(path: str) -> str:
    """Read what a child writes to the FIFO at ``path`` (bounded wait)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        data, deadline = b"", time.monotonic() + REPORT_TIMEOUT
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the child did not report in time"
            if select.select([fd], [], [], remaining)[0]:
                data += os.read(fd, 4096)
        return data.decode()
    finally:
        os.close(fd)


def run_python(box, slice_name, code, **kw) -> int:
    return box.start(slice_name, [sys.executable, "-c", code], **kw)


def report(box, slice_name, expression, **kw) -> str:
    """Run ``print(expression)`` in the sliver and return the output (through a FIFO in its home)."""
    fifo = os.path.join(box.home(slice_name), "report.fifo")
    os.mkfifo(fifo)
    try:
        run_python(box, slice_name, "import os, resource, sys\n"
                   f"with open('report.fifo', 'w') as out: out.write(repr({expression}) + '\\n')", **kw)
        return read_fifo(fifo).strip()
    finally:
        box.stop(slice_name)
        os.unlink(fifo)


# -- lifecycle, layout, modes --------------------------------------------------------------------------

def test_create_list_exists_delete(sandbox, root):
    assert sandbox.list() == [] and not sandbox.exists("alice")
    sandbox.create("bob", None)
    sandbox.create("alice", generate_slice_keypair("alice"))
    assert sandbox.list() == ["alice", "bob"]
    assert sandbox.exists("alice")
    assert sandbox.home("alice") == os.path.join(root, "alice", "home")
    assert code_of(sandbox.create, "alice", None) == (
        "exists", "slice 'alice' already has a sliver on this node")
    sandbox.delete("alice")
    assert sandbox.list() == ["bob"] and not sandbox.exists("alice")
    assert sorted(os.listdir(root)) == ["bob"]
    assert code_of(sandbox.delete, "alice") == ("no-sliver", "slice 'alice' has no sliver on this node")
    assert code_of(sandbox.home, "alice")[0] == "no-sliver"
    assert code_of(sandbox.keys, "alice")[0] == "no-sliver"
    sandbox.create("alice", None)                       # a deleted slice can come back
    assert sandbox.list() == ["alice", "bob"]


def test_layout_and_modes(sandbox, root):
    pair = generate_slice_keypair("alice")
    previous = os.umask(0)                               # modes must not depend on the umask
    try:
        sandbox.create("alice", pair)
    finally:
        os.umask(previous)
    top = os.path.join(root, "alice")
    ssh = os.path.join(top, "home", ".ssh")
    for directory in (top, os.path.join(top, "home"), ssh, os.path.join(top, "logs"), os.path.join(top, "run")):
        assert mode(directory) == 0o700, directory
    assert mode(os.path.join(ssh, "authorized_keys")) == 0o600
    assert mode(os.path.join(ssh, "id_ed25519")) == 0o600
    assert mode(os.path.join(ssh, "id_ed25519.pub")) == 0o644
    with open(os.path.join(ssh, "id_ed25519"), "rb") as handle:
        assert handle.read().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    with open(os.path.join(ssh, "authorized_keys")) as handle:
        assert handle.read() == pair.public_line + "\n"
    assert sorted(os.listdir(ssh)) == ["authorized_keys", "id_ed25519", "id_ed25519.pub"]   # no temp files


def test_create_without_keypair_has_empty_authorized_keys(sandbox, root):
    sandbox.create("bob", None)
    ssh = os.path.join(root, "bob", "home", ".ssh")
    assert sorted(os.listdir(ssh)) == ["authorized_keys"]
    assert os.path.getsize(os.path.join(ssh, "authorized_keys")) == 0
    assert sandbox.keys("bob") == []


def test_create_refuses_mismatched_keypair_and_leaves_nothing(sandbox, root):
    pair, other = generate_slice_keypair("a"), generate_slice_keypair("b")
    mixed = type(pair)(private_openssh=pair.private_openssh, public_line=other.public_line)
    code, reason = code_of(sandbox.create, "alice", mixed)
    assert code == "backend" and "does not match the slice public key" in reason
    assert os.listdir(root) == []


# -- keys ---------------------------------------------------------------------------------------------

def authorized_lines(root, slice_name):
    with open(os.path.join(root, slice_name, "home", ".ssh", "authorized_keys")) as handle:
        return handle.read().splitlines()


def test_keys_add_del_nuke(sandbox, root):
    pair = generate_slice_keypair("alice")
    sandbox.create("alice", pair)
    first, second = user_key("first"), user_key("second")
    assert sandbox.add_key("alice", first) == 1
    assert sandbox.add_key("alice", first) == 1                       # the same key twice: one line
    assert sandbox.add_key("alice", parse_public_key(first.line.rsplit(" ", 1)[0] + " renamed")) == 1
    assert sandbox.add_key("alice", second) == 2
    assert sandbox.keys("alice") == [first, second]
    assert authorized_lines(root, "alice") == [pair.public_line, first.line, second.line]
    slice_key = parse_public_key(pair.public_line)
    assert sandbox.add_key("alice", slice_key) == 2                   # already authorised: no-op
    assert sandbox.del_key("alice", slice_key) == 2                   # not a user key: stays
    assert sandbox.del_key("alice", first) == 1
    assert sandbox.del_key("alice", first) == 1                       # absent: no change
    assert authorized_lines(root, "alice") == [pair.public_line, second.line]
    assert sandbox.nuke_keys("alice") == 0
    assert authorized_lines(root, "alice") == [pair.public_line]      # the slice key survives a nuke
    assert sandbox.keys("alice") == []
    assert sorted(os.listdir(os.path.join(root, "alice", "home", ".ssh"))) == [
        "authorized_keys", "id_ed25519", "id_ed25519.pub"]
    assert mode(os.path.join(root, "alice", "home", ".ssh", "authorized_keys")) == 0o600


def test_too_many_keys(sandbox, monkeypatch):
    monkeypatch.setattr(sliver_module, "MAX_USER_KEYS", 2)
    sandbox.create("alice", None)
    sandbox.add_key("alice", user_key("1"))
    sandbox.add_key("alice", user_key("2"))
    assert code_of(sandbox.add_key, "alice", user_key("3")) == (
        "too-many-keys", "sliver 'alice' already has 2 user keys, the most allowed; delete one first")
    assert len(sandbox.keys("alice")) == 2


def test_damaged_authorized_keys_reported_and_nuke_repairs(sandbox, root):
    pair = generate_slice_keypair("alice")
    sandbox.create("alice", pair)
    with open(os.path.join(root, "alice", "home", ".ssh", "authorized_keys"), "a") as handle:
        handle.write('command="/bin/sh" ssh-ed25519 AAAA\n')
    code, reason = code_of(sandbox.keys, "alice")
    assert code == "backend" and reason.startswith("line 2 of alice/home/.ssh/authorized_keys is not a valid key")
    assert sandbox.nuke_keys("alice") == 0
    assert authorized_lines(root, "alice") == [pair.public_line]


# -- processes and limits -------------------------------------------------------------------------------

def test_start_environment_cwd_and_limits(root):
    box = DirectorySandbox(root, limits=ResourceLimits(open_files=64, file_size_bytes=1 << 20, cpu_seconds=30))
    box.recover()
    box.create("alice", None)
    home = box.home("alice")
    assert report(box, "alice", "resource.getrlimit(resource.RLIMIT_NOFILE)") == "(64, 64)"
    assert report(box, "alice", "resource.getrlimit(resource.RLIMIT_FSIZE)") == repr((1 << 20, 1 << 20))
    assert report(box, "alice", "resource.getrlimit(resource.RLIMIT_CPU)") == "(30, 30)"
    assert report(box, "alice", "(os.getcwd(), os.environ['HOME'], os.environ['USER'], os.environ['EXTRA'])",
                  env={"EXTRA": "1"}) == repr((home, home, "alice", "1"))
    assert report(box, "alice", "os.getpgrp() == os.getpid() == os.getsid(0)") == "True"


def test_unlimited_by_default(sandbox):
    sandbox.create("alice", None)
    assert report(sandbox, "alice", "resource.getrlimit(resource.RLIMIT_NOFILE)") == repr(
        resource.getrlimit(resource.RLIMIT_NOFILE))


def test_processes_limit_refused_for_a_shared_uid(root):
    with pytest.raises(ValueError, match="RLIMIT_NPROC"):
        DirectorySandbox(root, limits=ResourceLimits(processes=10))
    with pytest.raises(ValueError, match="open_files"):
        ResourceLimits(open_files=-1)


def test_output_goes_to_the_log(sandbox, root):
    sandbox.create("alice", None)
    pid = run_python(sandbox, "alice", "import sys; print('out'); print('err', file=sys.stderr)")
    sandbox._children["alice"][pid].wait(timeout=REPORT_TIMEOUT)
    log = os.path.join(root, "alice", "logs", os.path.basename(sys.executable) + ".log")
    with open(log) as handle:
        assert sorted(handle.read().split()) == ["err", "out"]
    assert mode(log) == 0o600


def test_start_refusals(sandbox, root):
    sandbox.create("alice", None)
    code, reason = code_of(sandbox.start, "alice", ["no-such-command-here"])
    assert (code, reason) == ("backend", "cannot start 'no-such-command-here' in sliver 'alice': "
                                         "No such file or directory")
    assert os.listdir(os.path.join(root, "alice", "run")) == []        # no record of a process that never ran
    assert code_of(sandbox.start, "alice", [])[1] == "a command must be a non-empty list of strings"
    assert "HOME is set by the sliver" in code_of(sandbox.start, "alice", ["true"], {"HOME": "/"})[1]
    assert "NUL" in code_of(sandbox.start, "alice", ["tr\0ue"])[1]
    assert code_of(sandbox.start, "nobody-here", ["true"])[0] == "no-sliver"


def test_stop_kills_groups_and_reaps(sandbox, root):
    sandbox.create("alice", None)
    pids = [run_python(sandbox, "alice", "import time; time.sleep(60)") for _ in range(2)]
    assert sorted(os.listdir(os.path.join(root, "alice", "run"))) == sorted(f"{pid}.pid" for pid in pids)
    assert all(alive(pid) for pid in pids)
    assert sandbox.stop("alice") == 2
    assert not any(alive(pid) for pid in pids)
    for pid in pids:                                                  # reaped: not even a zombie
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert os.listdir(os.path.join(root, "alice", "run")) == []
    assert sandbox.stop("alice") == 0


def test_delete_kills_every_process_of_the_sliver(sandbox, root):
    sandbox.create("alice", None)
    fifo = os.path.join(sandbox.home("alice"), "pids.fifo")
    os.mkfifo(fifo)
    pid = run_python(sandbox, "alice", (
        "import subprocess, sys, time\n"
        "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "with open('pids.fifo', 'w') as out: out.write(f'{grandchild.pid}\\n')\n"
        "time.sleep(60)\n"))
    grandchild = int(read_fifo(fifo))
    assert alive(pid) and alive(grandchild)
    sandbox.delete("alice")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert gone(grandchild)
    assert sandbox.list() == [] and os.listdir(root) == []


def test_stop_kills_a_process_that_left_the_slivers_groups_but_works_inside_it(sandbox, root):
    # a supervisor in the sliver (the deployment engine) starts its children in sessions of their own
    sandbox.create("alice", None)
    fifo = os.path.join(sandbox.home("alice"), "pids.fifo")
    os.mkfifo(fifo)
    pid = run_python(sandbox, "alice", (
        "import subprocess, sys, time\n"
        "stray = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
        "with open('pids.fifo', 'w') as out: out.write(f'{stray.pid}\\n')\n"
        "time.sleep(60)\n"))
    stray = int(read_fifo(fifo))
    assert alive(pid) and alive(stray) and os.getpgid(stray) != pid
    sandbox.stop("alice")
    assert gone(stray)


def test_a_reused_group_number_is_never_signalled(sandbox, root):
    sandbox.create("alice", None)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        with open(os.path.join(root, "alice", "run", f"{stranger.pid}.pid"), "w") as handle:
            handle.write(f"{stranger.pid} 1\n")                         # another process's start time
        assert sandbox.stop("alice") == 0
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


# -- crash recovery -------------------------------------------------------------------------------------

def test_recover_removes_leftovers(sandbox, root):
    sandbox.create("alice", None)
    sandbox.create("bob", None)
    pid = run_python(sandbox, "bob", "import time; time.sleep(60)")
    os.makedirs(os.path.join(root, ".creating-carol", "home", ".ssh"))              # crash during create
    os.rename(os.path.join(root, "bob"), os.path.join(root, ".deleting-bob-0a1b2c3d"))   # crash during delete
    os.symlink("/", os.path.join(root, "link"))
    with open(os.path.join(root, "stray"), "w"):
        pass
    os.mkdir(os.path.join(root, "Not-A-Slice"))
    fresh = DirectorySandbox(root)                                    # as after a restart
    report_ = fresh.recover()
    assert report_ == RecoveryReport(
        removed=(".creating-carol", ".deleting-bob-0a1b2c3d"), slivers=("alice",),
        ignored=(("Not-A-Slice", "not a valid slice name"), ("link", "a symbolic link, never followed"),
                 ("stray", "not a directory")))
    assert sorted(os.listdir(root)) == ["Not-A-Slice", "alice", "link", "stray"]
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL                     # the leftover's process was killed
    sandbox._children.pop("bob", None)
    assert fresh.recover() == RecoveryReport(removed=(), slivers=("alice",), ignored=report_.ignored)


def test_failed_create_leaves_no_directory(sandbox, root, monkeypatch):
    def broken(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(DirectorySandbox, "_write_authorized", broken)
    code, reason = code_of(sandbox.create, "alice", None)
    assert code == "backend" and "No space left on device" in reason
    assert os.listdir(root) == []


def test_root_missing(root):
    box = DirectorySandbox(root)
    reason = f"sliver root {root} is missing"
    assert code_of(box.list) == ("backend", reason)
    assert code_of(box.exists, "alice") == ("backend", reason)
    assert code_of(box.create, "alice", None) == ("backend", reason)
    assert box.recover() == RecoveryReport()
    assert mode(root) == 0o700
    box.create("alice", None)
    assert box.list() == ["alice"]


# -- hostile names and links ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "..", ".", "", "a/b", "/etc", "Alice", "root", ".creating-x",
                                  "x" * 33, "alice\0", None])
def test_hostile_slice_names(sandbox, root, name):
    for call, args in ((sandbox.create, (name, None)), (sandbox.exists, (name,)), (sandbox.delete, (name,)),
                       (sandbox.home, (name,)), (sandbox.add_key, (name, user_key())),
                       (sandbox.start, (name, ["true"])), (sandbox.stop, (name,))):
        code, reason = code_of(call, *args)
        assert code == "invalid-name", (call, reason)
        assert "slice name" in reason
    assert os.listdir(root) == []


def test_symlinked_slice_directory_is_refused(sandbox, root, tmp_path):
    outside = tmp_path / "outside"
    (outside / "home" / ".ssh").mkdir(parents=True)
    (outside / "run").mkdir()
    os.symlink(outside, os.path.join(root, "evil"))
    for call, args in ((sandbox.exists, ("evil",)), (sandbox.delete, ("evil",)), (sandbox.home, ("evil",)),
                       (sandbox.add_key, ("evil", user_key())), (sandbox.nuke_keys, ("evil",)),
                       (sandbox.start, ("evil", ["true"])), (sandbox.stop, ("evil",))):
        code, reason = code_of(call, *args)
        assert code == "backend" and "symbolic link" in reason, (call, reason)
    assert code_of(sandbox.create, "evil", None)[0] == "backend"
    assert sandbox.list() == []
    assert os.listdir(outside / "home" / ".ssh") == [] and outside.exists()
    assert os.path.islink(os.path.join(root, "evil"))


def test_symlink_planted_inside_a_sliver_is_not_followed(sandbox, root, tmp_path):
    sandbox.create("alice", None)
    outside = tmp_path / "outside"
    outside.mkdir()
    ssh = os.path.join(root, "alice", "home", ".ssh")
    os.rename(ssh, ssh + ".old")
    os.symlink(outside, ssh)                                           # what a sliver's own process could do
    code, reason = code_of(sandbox.add_key, "alice", user_key())
    assert code == "backend" and "alice/home/.ssh of sliver 'alice' is a symbolic link" in reason
    assert os.listdir(outside) == []
    os.unlink(ssh)
    os.rename(ssh + ".old", ssh)
    authorized = os.path.join(ssh, "authorized_keys")
    os.unlink(authorized)
    os.symlink(outside / "target", authorized)
    code, reason = code_of(sandbox.keys, "alice")
    assert code == "backend" and "is a symbolic link; refusing to read it" in reason
    assert code_of(sandbox.add_key, "alice", user_key())[0] == "backend"
    assert sandbox.nuke_keys("alice") == 0                             # replaces the link, never writes through it
    assert not (outside / "target").exists()
    assert not os.path.islink(authorized)
