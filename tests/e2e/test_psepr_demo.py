"""`make demo`'s script end to end (router, listener and publisher as separate processes), and the
event contract of the DSMT overview's installation example, checked on what the listener received."""
import subprocess
import sys
from pathlib import Path

from dsmt.transports.psepr.event import ATTRIBUTE_NS, parse_event

ROOT = Path(__file__).resolve().parents[2]

# The contract, written out for one node (the reference's table): component, managed, status.
CONTRACT_ONE_NODE = [
    ("org.dsmt.component.sliver-mgr", "org.dsmt.component.container", s)
    for s in ("requested", "instantiated", "initialized", "running")
] + [
    ("org.dsmt.component.sliver-bootstrap", "org.dsmt.component.deployment-agent", s)
    for s in ("requested", "instantiated", "initialized", "installed", "running")
] + [("APPCONFIG", None, None)] + [
    ("org.dsmt.component.deployment-agent", "XYZ", s) for s in ("requested", "instantiated", "initialized", "running")
]


def test_demo_runs_and_the_listener_sees_the_reference_sequence(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "psepr_status_demo.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[demo] OK" in result.stdout
    lines = (tmp_path / ".demo" / "xyz1-events.xml").read_text().splitlines()
    events = [parse_event(line.encode()) for line in lines]
    hosts = ["planetlab5.nbgisp.com", "planet-lab1.stanford.edu", "planetlab3.cs.cmu.edu", "planetlab-1.cn",
             "planetlab2.cs.princeton.edu"]
    assert len(events) == 14 * len(hosts)
    # every node's 'requested' from the sliver manager comes first
    assert [e.payload.value.split(",")[0] for e in events[:5]] == [f"hostname={h}" for h in hosts]
    for host in hosts:
        mine = [e for e in events if f"hostname={host}," in e.payload.value or f",{host}," in e.payload.value]
        observed = []
        for event in mine:
            assert event.to_service == "xyz1_mgr" and event.payload_type == ATTRIBUTE_NS
            if event.payload.field == "status":
                assert event.channel == "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.deployment-agent/command/"
                assert event.payload.value == f"APPCONFIG,{host},XYZ,XYZ-proc"
                observed.append(("APPCONFIG", None, None))
                continue
            assert event.payload.field == "deployment-status"
            fields = dict(part.split("=", 1) for part in event.payload.value.split(","))
            assert list(fields) == ["hostname", "component", "managed", "slice", "status"]
            assert fields["slice"] == "xyz1" and fields["hostname"] == host
            assert event.channel == f"/org/dsmt/ns/deployment/xyz1/{fields['component']}/status/"
            observed.append((fields["component"], fields["managed"], fields["status"]))
        assert observed == CONTRACT_ONE_NODE, host
