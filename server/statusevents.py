"""The DSMT status protocol's events: one builder per event of references 000 and 003.

Every event here is an attribute event for service ``<slice>_mgr`` (both ``to``
and ``from``; the sender's host is the ``from`` instance):

* :func:`deployment_status` — an install monitor's report (reference 000):
  channel ``/org/dsmt/ns/deployment/<slice>/<component>/status/``, field
  ``deployment-status``, value
  ``hostname=<host>,component=<component>,managed=<managed>,slice=<slice>,status=<status>``.
* :func:`sliver_state` — the container manager's view of one node (reference
  003): channel ``…/org.dsmt.component.container-mgr/status/<host>/``, field
  ``sliver-state``, value ``hostname=<host>,slice=<slice>,value=<state>``.
* :func:`node_list` — the container manager's node set: channel
  ``…/org.dsmt.component.container-mgr/``, field ``node-list``, value
  ``node/STATUS,node/STATUS,…``.
* :func:`node_exclude` — the command the container manager listens for: channel
  ``…/org.dsmt.component.container-mgr/``, field ``node-exclude``, value
  ``hostname=<host>,slice=<slice>``; :func:`parse_node_exclude` reads one back
  strictly (exactly those two pairs, at most :data:`MAX_COMMAND_VALUE_CHARS`).
* :func:`parse_pairs` reads the ``key=value,…`` values back (what a listener or
  the ``node-exclude`` command handler needs).

Values never contain ``,`` or ``=`` inside a part: host names, slice names and
component names cannot (checked here, so a hostile name cannot forge a pair).

Limit: :data:`STATUS_EXPIRE` — seconds a status value stays valid; senders
re-send status before it lapses, so late listeners (and PLDB) see the current
state and a dead sender's state ages out.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from dsmt.transports.psepr.event import Event

__all__ = [
    "STATUS_EXPIRE", "INSTALL_STATES", "SLIVER_STATES", "NODE_LIST_STATES", "SLIVER_MGR", "CONTAINER",
    "SLIVER_BOOTSTRAP", "DEPLOYMENT_AGENT", "CONTAINER_MGR", "StatusValueError", "manager_service",
    "status_channel", "deployment_status", "sliver_state", "sliver_state_channel", "node_list",
    "container_mgr_channel", "parse_pairs", "format_pairs", "NODE_EXCLUDE", "MAX_COMMAND_VALUE_CHARS",
    "node_exclude", "parse_node_exclude",
]

#: Seconds a status value stays valid: long enough for a re-send every minute to keep it fresh, short
#: enough that a node that died is seen as gone within two minutes.
STATUS_EXPIRE = 90

#: Installation states of reference 000 (``undefined`` is what a listener knows before any event).
INSTALL_STATES = ("requested", "instantiated", "initialized", "installed", "running", "failed", "terminated",
                  "undefined")
#: Container states of reference 003's ``sliver-state``.
SLIVER_STATES = ("selected", "installing", "installed", "failed", "deselected")
#: Node statuses of reference 003's ``node-list``.
NODE_LIST_STATES = ("selected", "creating", "initializing", "running", "not-responding", "timeout-creating",
                    "deselected")

SLIVER_MGR = "org.dsmt.component.sliver-mgr"
CONTAINER = "org.dsmt.component.container"
SLIVER_BOOTSTRAP = "org.dsmt.component.sliver-bootstrap"
DEPLOYMENT_AGENT = "org.dsmt.component.deployment-agent"
CONTAINER_MGR = "org.dsmt.component.container-mgr"

#: The field of reference 003's command to the container manager.
NODE_EXCLUDE = "node-exclude"
#: Longest ``node-exclude`` value read: ``hostname=`` + a 253-character DNS name + ``,slice=`` + a
#: 32-character slice name is 301 characters; 512 leaves room for spacing, and a megabyte of hostile
#: value is refused before it is split.
MAX_COMMAND_VALUE_CHARS = 512

#: What may appear inside one ``key=value`` part: no separators, no spaces, no control characters.
_PART = re.compile(r"[A-Za-z0-9._:@+~\-]{1,255}\Z")


class StatusValueError(ValueError):
    """A name or state that cannot be written into a status value (or a value that cannot be read)."""


def _checked(what: str, text: str) -> str:
    if not isinstance(text, str) or not _PART.match(text):
        raise StatusValueError(f"{what} {str(text)[:60]!r} is not 1-255 of letters, digits and . _ : @ + ~ -")
    return text


def _one_of(what: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise StatusValueError(f"{what} {str(value)[:40]!r} is not one of {', '.join(allowed)}")
    return value


def manager_service(slice_name: str) -> str:
    """The service name of a slice's managers: ``<slice>_mgr`` (reference 003, revision 1.2)."""
    return f"{_checked('slice', slice_name)}_mgr"


def format_pairs(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{_checked('key', key)}={_checked(key, value)}" for key, value in pairs)


def parse_pairs(value: str) -> dict[str, str]:
    """``a=1,b=2`` → ``{"a": "1", "b": "2"}``; a part without ``=``, an empty or repeated key raises."""
    pairs: dict[str, str] = {}
    for part in value.split(","):
        key, sep, text = part.strip().partition("=")
        if not sep or not key:
            raise StatusValueError(f"{part[:60]!r} is not key=value")
        if key in pairs:
            raise StatusValueError(f"key {key[:40]!r} appears twice")
        pairs[key] = text
    return pairs


def status_channel(slice_name: str, component: str) -> str:
    return f"/org/dsmt/ns/deployment/{_checked('slice', slice_name)}/{_checked('component', component)}/status/"


def _event(channel: str, field: str, value: str, slice_name: str, sender: str) -> Event:
    service = manager_service(slice_name)
    return Event.attribute(channel, field, value, expire=STATUS_EXPIRE, to_service=service, from_service=service,
                           from_instance=sender)


def deployment_status(slice_name: str, host: str, component: str, managed: str, status: str) -> Event:
    """An install monitor's ``deployment-status`` event (reference 000), sent from ``host``."""
    _one_of("status", status, INSTALL_STATES)
    value = format_pairs((("hostname", host), ("component", component), ("managed", managed),
                          ("slice", slice_name), ("status", status)))
    return _event(status_channel(slice_name, component), "deployment-status", value, slice_name, host)


def container_mgr_channel(slice_name: str) -> str:
    return f"/org/dsmt/ns/deployment/{_checked('slice', slice_name)}/{CONTAINER_MGR}/"


def sliver_state_channel(slice_name: str, host: str) -> str:
    return f"{container_mgr_channel(slice_name)}status/{_checked('hostname', host)}/"


def sliver_state(slice_name: str, host: str, state: str, *, sender: str) -> Event:
    """The container manager's ``sliver-state`` for ``host`` (reference 003), sent from ``sender``."""
    _one_of("sliver state", state, SLIVER_STATES)
    value = format_pairs((("hostname", host), ("slice", slice_name), ("value", state)))
    return _event(sliver_state_channel(slice_name, host), "sliver-state", value, slice_name, sender)


def node_list(slice_name: str, nodes: Mapping[str, str], *, sender: str) -> Event:
    """The container manager's ``node-list`` (reference 003): ``node/STATUS`` for each node, in the given order."""
    parts = []
    for node, status in nodes.items():
        parts.append(f"{_checked('node', node)}/{_one_of('node status', status, NODE_LIST_STATES)}")
    return _event(container_mgr_channel(slice_name), "node-list", ",".join(parts), slice_name, sender)


def node_exclude(slice_name: str, host: str, *, sender: str) -> Event:
    """The ``node-exclude`` command (reference 003): asks ``slice_name``'s container manager to drop ``host``."""
    value = format_pairs((("hostname", host), ("slice", slice_name)))
    return _event(container_mgr_channel(slice_name), NODE_EXCLUDE, value, slice_name, sender)


_EXCLUDE_KEYS = ("hostname", "slice")


def parse_node_exclude(value: str) -> tuple[str, str]:
    """``(hostname, slice)`` of a ``node-exclude`` value, else raise :class:`StatusValueError`.

    Strict: at most :data:`MAX_COMMAND_VALUE_CHARS`, exactly the pairs ``hostname`` and ``slice`` (an
    extra pair such as ``hostname=a,b=c`` is refused, not ignored), each value a valid part.
    """
    if not isinstance(value, str):
        raise StatusValueError(f"node-exclude value must be text, not {type(value).__name__}")
    if len(value) > MAX_COMMAND_VALUE_CHARS:
        raise StatusValueError(f"node-exclude value is longer than {MAX_COMMAND_VALUE_CHARS} characters")
    pairs = parse_pairs(value)
    extra = [key for key in pairs if key not in _EXCLUDE_KEYS]
    if extra:
        raise StatusValueError(f"node-exclude value has unexpected key {extra[0][:40]!r}; "
                               "only hostname and slice are allowed")
    missing = [key for key in _EXCLUDE_KEYS if key not in pairs]
    if missing:
        raise StatusValueError(f"node-exclude value has no {missing[0]}=")
    return _checked("hostname", pairs["hostname"]), _checked("slice", pairs["slice"])
