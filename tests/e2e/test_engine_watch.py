"""Engines in slivers, for real: forked from the node manager's fork server, and started again by the node
manager when one dies while it runs (kill -9), reporting ``failed`` then its installation again."""
import os
import signal

import pytest

from dsmt.client.testbed import Testbed, poll
from dsmt.server.nodemanager.sliver import process_alive

BOOTSTRAP = "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-bootstrap/status/"


def statuses(events, node):
    return [event.payload.value.rsplit("status=", 1)[1] for event in events
            if event.payload.field == "deployment-status" and f"hostname={node}," in event.payload.value]


def engine_record(bed, node):
    try:
        pid, started = (bed.sliver_dir(node, "xyz1") / "home" / ".dsmt" / "engine.pid").read_text().split()
    except (OSError, ValueError):
        return None
    return int(pid), started


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as handle:
        text = handle.read()
    return int(text[text.rindex(b")") + 2:].split()[1])


@pytest.mark.timeout(120)
def test_a_killed_engine_is_forked_again_and_reports_its_way_back(tmp_path):
    with Testbed(tmp_path / "bed", nodes=1, engines=True, engine_args=["--engine-watch", "0.2"]) as bed:
        node = bed.farms[0].nodes[0]
        with bed.listen(BOOTSTRAP, "xyz1_mgr") as listener:
            spec = bed.write_spec("xyz1", numnodes=1, leaselen=3600)
            result = bed.svm("createslice", spec)
            assert result.returncode == 0, result.stdout + result.stderr
            listener.wait_for(lambda events: statuses(events, node)[-1:] == ["running"])
            pid, started = engine_record(bed, node)
            farm = bed.farms[0].daemon.process.pid
            fork_server = parent_of(pid)
            assert fork_server != farm and parent_of(fork_server) == farm      # forked, not exec'd by the farm

            os.kill(pid, signal.SIGKILL)
            events = listener.wait_for(lambda events: statuses(events, node)[-6:] == [
                "failed", "requested", "instantiated", "initialized", "installed", "running"])
            assert statuses(events, node).count("failed") == 1
            new_pid, _ = engine_record(bed, node)
            assert new_pid != pid and not process_alive(pid, started)
            assert parent_of(new_pid) == fork_server
            poll(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the killed engine reaped")
