"""The installation-status events of the DSMT overview's example, as PsEPR events.

Application XYZ is installed in slice ``xyz1`` on five nodes.  For every node,
in this order:

1. ``org.dsmt.component.sliver-mgr`` reports its managed
   ``org.dsmt.component.container``: requested → instantiated → initialized → running;
2. ``org.dsmt.component.sliver-bootstrap`` reports ``org.dsmt.component.deployment-agent``:
   requested → instantiated → initialized → installed → running;
3. the service planner sends ``APPCONFIG,<host>,XYZ,XYZ-proc`` on the
   deployment agent's command channel (field ``status``);
4. ``org.dsmt.component.deployment-agent`` reports ``XYZ``:
   requested → instantiated → initialized → running.

Every status event goes to ``/org/dsmt/ns/deployment/xyz1/<component>/status/``
for service ``xyz1_mgr``, with an attribute payload whose field is
``deployment-status`` and whose value is
``hostname=…,component=…,managed=…,slice=xyz1,status=…``.  The ``requested``
events of all nodes come first (the container manager asks for every sliver
at once), then each node's installation proceeds.

Four host names are the reference's; it names five nodes but lists four, so
the fifth is one more PlanetLab-style name.
"""
from __future__ import annotations

from dsmt.transports.psepr.event import Event

SLICE = "xyz1"
SERVICE = f"{SLICE}_mgr"
APPLICATION = "XYZ"
HOSTS = ("planetlab5.nbgisp.com", "planet-lab1.stanford.edu", "planetlab3.cs.cmu.edu", "planetlab-1.cn",
         "planetlab2.cs.princeton.edu")
#: Seconds a status value stays valid (status is re-sent before it lapses).
STATUS_EXPIRE = 90

STAGES = (
    ("org.dsmt.component.sliver-mgr", "org.dsmt.component.container",
     ("requested", "instantiated", "initialized", "running")),
    ("org.dsmt.component.sliver-bootstrap", "org.dsmt.component.deployment-agent",
     ("requested", "instantiated", "initialized", "installed", "running")),
    ("org.dsmt.component.deployment-agent", APPLICATION, ("requested", "instantiated", "initialized", "running")),
)


def status_channel(component: str) -> str:
    return f"/org/dsmt/ns/deployment/{SLICE}/{component}/status/"


COMMAND_CHANNEL = f"/org/dsmt/ns/deployment/{SLICE}/org.dsmt.component.deployment-agent/command/"


def status_event(host: str, component: str, managed: str, status: str) -> Event:
    value = f"hostname={host},component={component},managed={managed},slice={SLICE},status={status}"
    return Event.attribute(status_channel(component), "deployment-status", value, expire=STATUS_EXPIRE,
                           to_service=SERVICE, from_service=SERVICE, from_instance=host)


def appconfig_event(host: str) -> Event:
    return Event.attribute(COMMAND_CHANNEL, "status", f"APPCONFIG,{host},{APPLICATION},{APPLICATION}-proc",
                           to_service=SERVICE, from_service=SERVICE, from_instance="service-planner")


def node_sequence(host: str, *, skip_first_request: bool = False) -> list[Event]:
    """Every event one node goes through, in the reference's order."""
    events = []
    for component, managed, statuses in STAGES:
        if component == "org.dsmt.component.deployment-agent":
            events.append(appconfig_event(host))
        for status in statuses:
            if skip_first_request and component == STAGES[0][0] and status == "requested":
                continue
            events.append(status_event(host, component, managed, status))
    return events


def scenario(hosts=HOSTS) -> list[Event]:
    """The whole example: every node's ``requested``, then each node's installation."""
    first_component, first_managed, _ = STAGES[0]
    events = [status_event(host, first_component, first_managed, "requested") for host in hosts]
    for host in hosts:
        events += node_sequence(host, skip_first_request=True)
    return events
