"""``dsmtc``: create a slice and install an application on it, with live per-node progress.

::

    dsmtc create SPEC.xml                            svm createslice (the same lines and summary)
    dsmtc deploy SLICE DESCRIPTOR [--param N=V]...   Deploy on every engine of the slice (PsEPR multicast)
    dsmtc status SLICE                               the current state, from PLDB: node × component table
    dsmtc watch SLICE [--until running] [--timeout S]  the live table, updated as events arrive, then a recap
    dsmtc command SLICE VERB HOST APP [TARGET]       send a command on the slice's command channel
    dsmtc plan SLICE PLAN.xml [--dry-run]            run a deployment plan across the slice's nodes

Global options (before the command), as ``svm``'s: ``--router URL`` (or ``$PSEPR_ROUTER``),
``--password-file F`` (else ``$PSEPR_PASSWORD``) — the password of the slice's account
``<slice>_mgr``, which ``dsmtc`` logs in as (``--user`` to override): a slice's events reach that
account only, and its engines answer on PsEPR service ``deployment.<slice>``; ``--dir DIR`` (the
slice directory home: the slice's nodes are the files of ``slices/<slice>/vms/``); ``--cert F --key
F --ca F`` (sign requests, verify signed replies); ``--agent URL``, ``--transport`` (``create``
only); ``-p N`` calls at once; ``-t SECONDS`` longest wait for each node's answer (``deploy``
default :data:`DEPLOY_TIMEOUT`, ``plan`` the same, ``status`` :data:`QUERY_TIMEOUT` for PLDB).

Output: ``deploy`` prints ``Success on NODE`` / ``Error on NODE: REASON`` as each engine answers,
then a summary on standard error; ``plan`` prints its steps, batches and node results as they
happen, then ``PlanReport.summary()`` on standard error; ``watch`` redraws its table in place
when standard output is a terminal (ANSI), else prints one line per change (``NODE COMPONENT
MANAGED: OLD -> NEW``), and ends with a recap.  Errors of the command itself:
``dsmtc: error: REASON`` on standard error.

The table (:class:`SliceTable`, :func:`render_table`, :func:`recap`) is a fold of reference 000's
``deployment-status`` events (or PLDB's last values of them) and is pure: events in, lines out.
Events that are not well-formed statuses of *this* slice are ignored and counted, never trusted:
another field or slice, a channel that is not the component's status channel, a sender instance that
is not the host it reports on, an unknown state, malformed or oversized values, more than
:data:`MAX_ROWS` nodes or :data:`MAX_COLUMNS` components.

Exit status:

====  ==========================================================================
0     done: every node succeeded (``watch --until running``: every node's
      application is running; ``status``: PLDB answered and nothing failed)
1     the command ran but some node failed (``watch --until running``: timed out,
      interrupted, or every node settled with some failed; ``plan``: not complete)
2     usage error (unknown command, missing argument, bad option, bad command grammar)
3     failure before the nodes: router unreachable, login refused, unknown slice,
      unreadable or invalid file, no answer from PLDB
====  ==========================================================================
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from twisted.internet import defer

from dsmt.server.refusal import Refusal
from dsmt.server.slicemanager.spec import MAX_NUMNODES, SliceSpecError, check_slice_name, normalize_node_address
from dsmt.server.statusevents import (
    DEPLOYMENT_AGENT, INSTALL_STATES, SLIVER_BOOTSTRAP, SLIVER_MGR, StatusValueError, manager_service, parse_pairs,
    status_channel,
)

__all__ = [
    "main", "execute", "EXIT_OK", "EXIT_NODE_FAILED", "EXIT_USAGE", "EXIT_FAILED", "DEPLOY_TIMEOUT", "QUERY_TIMEOUT",
    "MAX_ROWS", "MAX_COLUMNS", "MAX_STATUS_CHARS", "STATUS_FIELD", "Observation", "Change", "SliceTable",
    "read_status", "fold", "render_table", "change_line", "recap", "verdict", "slice_channel", "Display",
]

EXIT_OK, EXIT_NODE_FAILED, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3
#: Seconds ``deploy`` (and each plan batch) waits for an engine's answer by default: Deploy answers once
#: downloads, installs and health checks are done; five minutes covers a large package on a slow link.
DEPLOY_TIMEOUT = 300.0
#: Seconds ``status`` waits for PLDB's answer by default (``psepr query``'s own default).
QUERY_TIMEOUT = 10.0
#: Seconds ``watch`` waits for PLDB's last values before it shows live events only: short, because a watch
#: without PLDB still works (the engines re-send their status every minute).
SEED_TIMEOUT = 2.0
#: Longest wait accepted for ``-t`` / ``--timeout``: a day; a watch meant to run longer is run without one.
MAX_TIMEOUT = 86400.0
#: Most calls at once: as ``svm`` (each holds a file descriptor).
MAX_PARALLELISM = 1024
#: Most nodes (rows) a table keeps: a slice's own maximum; events naming further nodes are ignored.
MAX_ROWS = MAX_NUMNODES
#: Most components (columns): reference 000 has three reporters per node; 8 leaves room for third-party
#: ones and keeps the table on a screen — a flood of invented component names is ignored.
MAX_COLUMNS = 8
#: Longest status value read: five pairs with a 253-character host and four ≤ 64-character names are
#: under 500 characters; 1024 leaves room and refuses a hostile megabyte before it is split.
MAX_STATUS_CHARS = 1024
#: The field of reference 000's status events.
STATUS_FIELD = "deployment-status"
#: The pairs of a status value, in the reference's order.
STATUS_KEYS = ("hostname", "component", "managed", "slice", "status")
#: Column titles of the reporters reference 000 names, in its order.
KNOWN_COLUMNS = {SLIVER_MGR: "container", SLIVER_BOOTSTRAP: "engine", DEPLOYMENT_AGENT: "application"}
RUNNING, FAILED = "running", "failed"

_EPILOG = ("exit status: 0 every node succeeded; 1 some node failed (or not running in time); 2 usage error; "
           "3 failure before the nodes (router, login, slice, file)")


# =============================================================== the table: a pure fold of status events

@dataclass(frozen=True)
class Observation:
    """One status report read from an event: ``node`` (normalised) says ``component`` manages ``managed``
    and it is ``status``."""

    node: str
    component: str
    managed: str
    status: str


@dataclass(frozen=True)
class Change:
    """A cell that changed: ``old`` is None the first time the node's component is heard of."""

    node: str
    component: str
    managed: str
    old: str | None
    new: str


def slice_channel(slice_name: str) -> str:
    """``/org/dsmt/ns/deployment/<slice>/``: every status and command of a slice (the name checked)."""
    return f"/org/dsmt/ns/deployment/{check_slice_name(slice_name)}/"


def _parts(item) -> tuple[Any, Any, Any, Any]:
    """(channel, field, value, sender instance) of a PsEPR event or a PLDB attribute."""
    payload = getattr(item, "payload", None)
    source = payload if payload is not None else item
    return (getattr(item, "channel", None), getattr(source, "field", None), getattr(source, "value", None),
            getattr(item, "from_instance", None))


def read_status(slice_name: str, item) -> Observation | None:
    """The :class:`Observation` in ``item`` (an :class:`~dsmt.transports.psepr.event.Event` or a PLDB
    ``PldbAttr``), or None when it is not a well-formed status of ``slice_name`` (module docstring).
    Never raises."""
    try:
        channel, field, value, sender = _parts(item)
        if field != STATUS_FIELD or not isinstance(value, str) or len(value) > MAX_STATUS_CHARS:
            return None
        pairs = parse_pairs(value)
        if tuple(sorted(pairs)) != tuple(sorted(STATUS_KEYS)) or pairs["slice"] != slice_name:
            return None
        if pairs["status"] not in INSTALL_STATES:
            return None
        node = normalize_node_address(pairs["hostname"])
        if channel != status_channel(slice_name, pairs["component"]):
            return None
        status_channel(slice_name, pairs["managed"])     # the same rule for the managed name's text
        if sender is not None and sender != pairs["hostname"] and sender != node:
            return None                                     # one host cannot report on another
        return Observation(node, pairs["component"], pairs["managed"], pairs["status"])
    except (StatusValueError, SliceSpecError, ValueError, TypeError, AttributeError):
        return None


class SliceTable:
    """Node × component → (managed, status), folded from status events (:meth:`apply`).

    ``nodes`` given up front (the slice's vms) are rows from the start, in their order; nodes heard of
    later are appended.  Columns: the reporters of reference 000 in its order, then others as first seen.
    ``ignored`` counts the ``deployment-status`` events :meth:`apply` refused (other fields, such as the
    commands on the command channel, are passed over without counting).  No I/O, no clock.
    """

    def __init__(self, slice_name: str, nodes: Iterable[str] = ()):
        self.slice = check_slice_name(slice_name)
        self.nodes: list[str] = []
        self.components: list[str] = []
        self.cells: dict[tuple[str, str], tuple[str, str]] = {}
        self.ignored = 0
        for node in nodes:
            self._row(normalize_node_address(node))

    def _row(self, node: str) -> bool:
        if node in self.nodes:
            return True
        if len(self.nodes) >= MAX_ROWS:
            return False
        self.nodes.append(node)
        return True

    def _column(self, component: str) -> bool:
        if component in self.components:
            return True
        if len(self.components) >= MAX_COLUMNS:
            return False
        self.components.append(component)
        order = list(KNOWN_COLUMNS)
        self.components.sort(key=lambda c: (order.index(c) if c in order else len(order)))
        return True

    def apply(self, item) -> Change | None:
        """Fold one event (or PLDB attribute) in; the :class:`Change` it made, or None (ignored or unchanged)."""
        if _parts(item)[1] != STATUS_FIELD:
            return None                          # a command or another field: not the table's, not hostile
        seen = read_status(self.slice, item)
        if seen is None:
            self.ignored += 1
            return None
        if seen.node not in self.nodes and len(self.nodes) >= MAX_ROWS \
                or seen.component not in self.components and len(self.components) >= MAX_COLUMNS:
            self.ignored += 1
            return None
        self._row(seen.node)
        self._column(seen.component)
        key = (seen.node, seen.component)
        old = self.cells.get(key)
        if old == (seen.managed, seen.status):
            return None
        self.cells[key] = (seen.managed, seen.status)
        return Change(seen.node, seen.component, seen.managed, old[1] if old else None, seen.status)

    def status(self, node: str, component: str) -> str | None:
        cell = self.cells.get((node, component))
        return cell[1] if cell else None

    def managed(self, component: str) -> str | None:
        """What ``component`` manages on most nodes (the application's name for the deployment agent)."""
        names = [managed for (_, c), (managed, _) in self.cells.items() if c == component]
        return max(set(names), key=names.count) if names else None

    def title(self, component: str) -> str:
        if component == DEPLOYMENT_AGENT:
            return self.managed(component) or KNOWN_COLUMNS[component]
        return KNOWN_COLUMNS.get(component) or component


def fold(slice_name: str, items: Iterable, nodes: Iterable[str] = ()) -> SliceTable:
    """The :class:`SliceTable` of ``items`` (events or PLDB attributes) in order."""
    table = SliceTable(slice_name, nodes)
    for item in items:
        table.apply(item)
    return table


def render_table(table: SliceTable) -> list[str]:
    """The table as aligned lines: a header (``node``, then each column's title), one row per node
    (``-`` where nothing was heard)."""
    titles = [table.title(c) for c in table.components] or [KNOWN_COLUMNS[DEPLOYMENT_AGENT]]
    rows = [[node] + [table.status(node, c) or "-" for c in table.components] + (["-"] if not table.components
                                                                                  else [])
            for node in table.nodes]
    widths = [max(len(row[i]) for row in [["node"] + titles] + rows) for i in range(len(titles) + 1)]
    return ["  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip()
            for row in [["node"] + titles] + rows]


def change_line(change: Change) -> str:
    """One line per change (``watch`` when standard output is not a terminal)."""
    return f"{change.node} {change.component} {change.managed}: {change.old or '-'} -> {change.new}"


def _application(table: SliceTable, node: str) -> str | None:
    return table.status(node, DEPLOYMENT_AGENT)


def verdict(table: SliceTable) -> str | None:
    """``running`` when every node's application is running; ``failed`` when every node has settled
    (application running, or some component failed) and some failed; None while any node is still on
    its way, or before any node is known."""
    if not table.nodes:
        return None
    failed = [node for node in table.nodes if any(table.status(node, c) == FAILED for c in table.components)]
    running = [node for node in table.nodes if _application(table, node) == RUNNING and node not in failed]
    if len(running) == len(table.nodes):
        return RUNNING
    if len(running) + len(failed) == len(table.nodes):
        return FAILED
    return None


def recap(table: SliceTable) -> list[str]:
    """The end of a watch: the final table, then a count per application state and every node not running."""
    lines = render_table(table)
    name = table.managed(DEPLOYMENT_AGENT) or "the application"
    counts: dict[str, int] = {}
    for node in table.nodes:
        state = _application(table, node) or "unknown"
        counts[state] = counts.get(state, 0) + 1
    shown = ", ".join(f"{count} {state}" for state, count in sorted(counts.items(), key=lambda kv: -kv[1]))
    lines.append(f"{name} on {len(table.nodes)} node(s) of slice {table.slice}: {shown or 'nothing heard'}")
    for node in table.nodes:
        if _application(table, node) != RUNNING:
            where = [f"{table.title(c)} {table.status(node, c)}" for c in table.components if table.status(node, c)]
            lines.append(f"  {node}: {', '.join(where) or 'nothing heard'}")
    if table.ignored:
        lines.append(f"({table.ignored} event(s) ignored: not statuses of slice {table.slice})")
    return lines


class Display:
    """Where ``watch`` draws: on a terminal the table is redrawn in place (cursor up over the previous
    drawing, erase below, draw); elsewhere each change is one line."""

    def __init__(self, stream, tty: bool):
        self.stream, self.tty = stream, tty
        self._drawn = 0

    def show(self, table: SliceTable, change: Change | None) -> None:
        if self.tty:
            lines = render_table(table)
            prefix = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
            self.stream.write(prefix + "\n".join(lines) + "\n")
            self._drawn = len(lines)
        elif change is not None:
            self.stream.write(change_line(change) + "\n")
        self.stream.flush()

    def finish(self, table: SliceTable) -> None:
        if self.tty and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
        self.stream.write("\n".join(recap(table)) + "\n")
        self.stream.flush()


# =============================================================== arguments

class UsageError(Exception):
    """A bad option value, argument or combination (exit 2)."""


class Failed(Exception):
    """The command failed before or instead of reaching the nodes (exit 3)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _bounded(kind, low, high, what):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not low <= value <= high or (kind is float and value <= 0):    # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}, not {text}")
        return value
    return convert


_seconds = _bounded(float, 0.0, MAX_TIMEOUT, "a number of seconds")
_parallelism = _bounded(int, 1, MAX_PARALLELISM, "a whole number")


def _parameter(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"a parameter is name=value, not {text[:80]!r}")
    return name, value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsmtc", description="Create a slice and install an application on it.", epilog=_EPILOG)
    parser.add_argument("-p", dest="parallelism", type=_parallelism, default=None, metavar="N",
                        help="calls at once (default: svm's for create, 32 otherwise)")
    parser.add_argument("-t", dest="timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="longest wait for each node's answer")
    parser.add_argument("--router", default=os.environ.get("PSEPR_ROUTER"), metavar="URL", help="PsEPR router")
    parser.add_argument("--user", metavar="NAME", help="PsEPR account to log in as (default <slice>_mgr)")
    parser.add_argument("--password-file", metavar="F", help="file whose first line is the PsEPR password")
    parser.add_argument("--cert", metavar="F", help="our certificate (PEM)")
    parser.add_argument("--key", metavar="F", help="our private key (PEM)")
    parser.add_argument("--ca", metavar="F", help="CA certificate(s) to trust (PEM)")
    parser.add_argument("--dir", metavar="DIR", help="slice directory home (default $DSMT_HOME or ~/.dsmt)")
    parser.add_argument("--agent", metavar="URL", help="the agent's URL (create; default $DSMT_AGENT)")
    parser.add_argument("--transport", choices=("http", "psepr"), default="http", help="create's transport")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("create", help="create a slice (svm createslice)", epilog=_EPILOG)
    p.add_argument("spec", metavar="SPEC.xml")
    p = sub.add_parser("deploy", help="deploy a descriptor on every engine of a slice", epilog=_EPILOG)
    p.add_argument("slice", metavar="SLICE")
    p.add_argument("descriptor", metavar="DESCRIPTOR")
    p.add_argument("--param", dest="params", type=_parameter, action="append", default=[], metavar="NAME=VALUE")
    p = sub.add_parser("status", help="current state from PLDB", epilog=_EPILOG)
    p.add_argument("slice", metavar="SLICE")
    p.add_argument("--pldb-channel", default="/org/dsmt/ns/pldb/query/", help="PLDB's query channel")
    p = sub.add_parser("watch", help="live per-node, per-component table", epilog=_EPILOG)
    p.add_argument("slice", metavar="SLICE")
    p.add_argument("--until", choices=(RUNNING,), help="stop once every node's application is running")
    p.add_argument("--pldb-channel", default="/org/dsmt/ns/pldb/query/",
                   help="PLDB's query channel (the table starts from its last values)")
    p.add_argument("--timeout", type=_seconds, metavar="S", help="stop after S seconds")
    p = sub.add_parser("command", help="send a command on the slice's command channel", epilog=_EPILOG)
    p.add_argument("slice", metavar="SLICE")
    p.add_argument("words", nargs="+", metavar="VERB HOST APP [TARGET]")
    p = sub.add_parser("plan", help="run a deployment plan on the slice's nodes", epilog=_EPILOG)
    p.add_argument("slice", metavar="SLICE")
    p.add_argument("plan", metavar="PLAN.xml")
    p.add_argument("--dry-run", action="store_true", help="print the calls a run would make; call nothing")
    return parser


def parse_arguments(argv) -> argparse.Namespace:
    """Parsed and checked arguments, else UsageError (exit 2)."""
    args = _parser().parse_args(argv)
    if (args.cert is None) != (args.key is None):
        raise UsageError("dsmtc: --cert and --key go together")
    if getattr(args, "slice", None) is not None:
        try:
            check_slice_name(args.slice)
        except SliceSpecError as exc:
            raise UsageError(f"dsmtc: {exc}") from None
    if args.command == "deploy":
        names = [name for name, _ in args.params]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise UsageError(f"dsmtc: parameter {twice[0]!r} is given twice")
    if args.command == "command":
        args.value = command_value(args.words)
    if args.command in ("deploy", "status", "watch", "command") or args.command == "plan" and not args.dry_run:
        if not args.router:
            raise UsageError(f"dsmtc: {args.command} reaches the slice over PsEPR: give --router URL "
                             "(or $PSEPR_ROUTER)")
    return args


def command_value(words: Sequence[str]) -> str:
    """The command line of ``VERB HOST APP [TARGET]`` (or one ``VERB,HOST,…`` word), checked against the
    grammar of ``dsmt.server.deployment.commands``; UsageError naming the problem."""
    from dsmt.server.deployment.commands import CommandError, parse_command
    try:
        if not (len(words) == 1 and "," in words[0] or 3 <= len(words) <= 4):
            raise UsageError("dsmtc: command takes VERB HOST APP [TARGET] (e.g. APPCONFIG node1.example.org XYZ "
                             "XYZ-proc)")
        return parse_command(",".join(words)).text()     # the host normalised, as the engines compare it
    except CommandError as exc:
        raise UsageError(f"dsmtc: invalid command ({exc.code}): {exc.reason}") from None


def svm_argv(args) -> list[str]:
    """``svm``'s arguments for ``dsmtc create`` (the same flags, ``createslice``)."""
    argv = []
    for flag, value in (("-p", args.parallelism), ("-t", args.timeout), ("--agent", args.agent),
                        ("--router", args.router), ("--password-file", args.password_file), ("--cert", args.cert),
                        ("--key", args.key), ("--ca", args.ca), ("--dir", args.dir)):
        if value is not None:
            argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return argv + ["--transport", args.transport, "createslice", args.spec]


# =============================================================== running

def slice_nodes(args, *, required: bool = True) -> list[str]:
    """The slice's nodes: the files of ``slices/<slice>/vms/``.  Failed when the slice is unknown or (when
    ``required``) has no sliver."""
    from dsmt.server.slicemanager.slicedir import SliceDirectory, SliceDirectoryError
    try:
        files = SliceDirectory(args.dir).slice(args.slice)
        if not files.exists():
            if required:
                raise Failed(f"no slice {args.slice} in {files.path} (create it first: dsmtc create SPEC.xml)")
            return []
        nodes = files.nodes("vms")
    except SliceDirectoryError as exc:
        raise Failed(exc.reason) from None
    if required and not nodes:
        raise Failed(f"slice {args.slice} has no sliver ({os.path.join(files.path, 'vms')} is empty)")
    return nodes


def _read(path: str, limit: int) -> bytes:
    from dsmt.server.slicemanager.slicedir import SliceDirectoryError, read_user_file
    try:
        return read_user_file(path, limit)
    except SliceDirectoryError as exc:
        raise Failed(exc.reason) from None


def connect_psepr(args) -> defer.Deferred:
    """A logged-in PsEPRConnection as ``--user`` or ``<slice>_mgr``; Failed when the router cannot be reached
    or refuses the login."""
    from dsmt.transports.psepr.accounts import read_password
    from dsmt.transports.psepr.client import ConnectFailed, LoginFailed, PsEPRConnection
    try:
        password = read_password(args.password_file)
    except OSError as exc:
        return defer.fail(Failed(f"cannot read the password file {args.password_file}: {exc.strerror or exc}"))
    try:
        connection = PsEPRConnection.from_urls(args.router, service=args.user or manager_service(args.slice),
                                               instance=f"dsmtc-{os.getpid()}", password=password)
    except ValueError as exc:
        return defer.fail(Failed(str(exc)))

    def refused(failure):
        failure.trap(ConnectFailed, LoginFailed)
        connection.close()
        what = "cannot reach the PsEPR router" if failure.check(ConnectFailed) else "the PsEPR router refused the login"
        raise Failed(f"{what}: {failure.getErrorMessage()}")
    return connection.connect(retry=False).addCallbacks(lambda _: connection, refused)


class _Session:
    """One command's PsEPR connection and, when needed, its SOAP transport; closed at the end."""

    def __init__(self, args, connect):
        self.args, self._connect = args, connect
        self.connection = self.transport = None

    async def open(self, soap: bool = False):
        self.connection = await self._connect(self.args)
        if soap:
            from dsmt.server.slicemanager.remote import signing_parts
            from dsmt.transports.psepr_soap import PsEPRTransport
            try:
                signer, verifier = signing_parts(self.args.cert, self.args.key, self.args.ca)
            except (OSError, ValueError) as exc:
                raise Failed(f"cannot load the signing files: {exc}") from None
            self.transport = PsEPRTransport(self.connection, timeout=self.args.timeout or DEPLOY_TIMEOUT,
                                            signer=signer, verifier=verifier)
            await self.transport.start()
        return self

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.connection is not None:
            self.connection.close()


def _say(stream, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


def outcome_line(node: str, result) -> str:
    """``Success on NODE`` or ``Error on NODE: REASON`` for a plan ``NodeResult``."""
    return f"Success on {node}" if result.status == "ok" else f"Error on {node}: {result.reason}"


async def _deploy(args, session: _Session, out, err) -> int:
    from dsmt.server.deployment.descriptor import MAX_DESCRIPTOR_BYTES, DescriptorError, parse_descriptor
    from dsmt.server.deployment.orchestrate import DEFAULT_PARALLELISM, node_result
    from dsmt.server.deployment.remote import PsEPREngineCalls
    from dsmt.server.slicemanager.calls import NodeRequest
    nodes = slice_nodes(args)
    data = _read(args.descriptor, MAX_DESCRIPTOR_BYTES)
    try:
        application = parse_descriptor(data).application.name
    except DescriptorError as exc:
        if exc.code != "unknown-action":      # an engine may have a plugin for it: let the engines judge
            raise Failed(f"invalid descriptor ({exc.code}): {exc.reason}") from None
        application = "the application"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise Failed("the descriptor is not UTF-8 text") from None
    await session.open(soap=True)
    calls = PsEPREngineCalls(session.transport, args.slice)
    request = {"descriptor": data, "parameters": dict(args.params)}
    results = {}

    def arrived(node, outcome):
        results[node] = node_result(outcome)
        _say(out, outcome_line(node, results[node]))
    await calls.run("Deploy", [NodeRequest(node, "", request) for node in nodes],
                    parallelism=args.parallelism or DEFAULT_PARALLELISM, timeout=args.timeout or DEPLOY_TIMEOUT,
                    on_result=arrived)
    failed = sum(1 for result in results.values() if result.status != "ok")
    _say(err, f"deploy {application} on {args.slice}: {len(results) - failed} succeeded, {failed} failed")
    return EXIT_OK if not failed else EXIT_NODE_FAILED


async def _status(args, session: _Session, out, err) -> int:
    from dsmt.client.pldb import query_pldb
    nodes = slice_nodes(args, required=False)
    await session.open()
    result = await query_pldb(session.connection, slice_channel(args.slice), pldb_channel=args.pldb_channel,
                              timeout=args.timeout or QUERY_TIMEOUT)
    if result.parts_expected is None:
        raise Failed(f"no answer from PLDB on {args.pldb_channel} within {args.timeout or QUERY_TIMEOUT:g} s")
    table = fold(args.slice, result.attrs, nodes)
    for line in render_table(table):
        _say(out, line)
    if not result.complete:
        _say(err, f"dsmtc: only {result.parts_received} of {result.parts_expected} answer parts arrived")
    failed = [node for node in table.nodes if any(table.status(node, c) == FAILED for c in table.components)]
    _say(err, f"status {args.slice}: {len(table.nodes)} node(s), {len(failed)} with a failed component")
    return EXIT_OK if result.complete and not failed else EXIT_NODE_FAILED


async def _watch(args, session: _Session, out, err, interrupted: defer.Deferred, tty: bool, reactor) -> int:
    from dsmt.transports.psepr.client import LeaseRefused
    from dsmt.transports.psepr.event import ATTRIBUTE_NS
    table = SliceTable(args.slice, slice_nodes(args, required=False))
    display = Display(out, tty)
    done = defer.Deferred()
    ended = {}

    def end(why: str) -> None:
        if not done.called:
            ended["why"] = why
            done.callback(None)

    held: list | None = []                    # live events held back while PLDB's last values are folded in

    def received(event) -> None:
        if held is not None:
            held.append(event)
            return
        change = table.apply(event)
        if change is not None:
            display.show(table, change)
            if args.until and verdict(table) is not None:
                end(verdict(table))

    await session.open()
    lease = session.connection.lease(slice_channel(args.slice), 3600, ATTRIBUTE_NS, callback=received)
    try:
        await lease.ready
    except LeaseRefused as exc:
        raise Failed(f"the router refused a lease on {slice_channel(args.slice)}: {exc}") from None
    await session.connection.flush()          # the grant is routed: events sent from now on reach us
    _say(err, f"dsmtc: watching {slice_channel(args.slice)} as {args.user or manager_service(args.slice)}")
    # A late watcher starts from PLDB's last values (when a PLDB answers in time), then the events that
    # arrived meanwhile, in order: the table never goes back to an older state.
    from dsmt.client.pldb import query_pldb
    try:
        known = await query_pldb(session.connection, slice_channel(args.slice), pldb_channel=args.pldb_channel,
                                 timeout=SEED_TIMEOUT)
        for attr in sorted(known.attrs, key=lambda attr: attr.time):
            table.apply(attr)
    except Exception as exc:  # no PLDB is fine: the engines re-send their status within a minute
        _say(err, f"dsmtc: no last values from PLDB ({exc}); waiting for status events")
    pending, held = held, None
    for event in pending:
        table.apply(event)
    display.show(table, None)
    if args.until and verdict(table) is not None:
        end(verdict(table))
    timer = reactor.callLater(args.timeout, end, "timeout") if args.timeout else None
    interrupted.addCallback(lambda _: end("interrupted"))
    await done
    if timer is not None and timer.active():
        timer.cancel()
    lease.release()
    display.finish(table)
    why = ended["why"]
    if not args.until:
        return EXIT_OK
    if why != RUNNING:
        _say(err, f"dsmtc: not every node's application is running ({why})")
    return EXIT_OK if why == RUNNING else EXIT_NODE_FAILED


async def _command(args, session: _Session, out, err) -> int:
    from dsmt.server.deployment.commands import COMMAND_FIELD, command_channel
    from dsmt.transports.psepr.event import Event
    await session.open()
    service = manager_service(args.slice)
    channel = command_channel(args.slice)
    session.connection.send(Event.attribute(channel, COMMAND_FIELD, args.value, to_service=service))
    await session.connection.flush()
    _say(out, f"Sent {args.value} on {channel}")
    return EXIT_OK


async def _plan(args, session: _Session, out, err) -> int:
    from dsmt.server.deployment.orchestrate import DEFAULT_PARALLELISM, Orchestrator
    from dsmt.server.deployment.plan import PlanError, dry_run, read_descriptors, read_plan
    from dsmt.server.deployment.remote import PsEPREngineCalls
    nodes = slice_nodes(args)
    try:
        plan = read_plan(args.plan)
        descriptors = read_descriptors(plan, os.path.dirname(os.path.abspath(args.plan)))
        if args.dry_run:
            for line in dry_run(plan, nodes):
                _say(out, line)
            return EXIT_OK
    except PlanError as exc:
        raise Failed(f"invalid plan ({exc.code}): {exc.reason}") from None
    await session.open(soap=True)

    def progress(event) -> None:
        if event.kind == "step":
            _say(out, f"step {event.step}: {len(event.nodes)} node(s)")
        elif event.kind == "batch":
            _say(out, f"step {event.step} batch {event.batch}: {', '.join(event.nodes)}")
        elif event.kind == "node":
            _say(out, f"step {event.step}: {outcome_line(event.node, event.result)}")
        elif event.kind == "stopped":
            _say(out, f"step {event.step}: over its max-failures; the plan stops")
    orchestrator = Orchestrator(PsEPREngineCalls(session.transport, args.slice),
                                parallelism=args.parallelism or DEFAULT_PARALLELISM,
                                timeout=args.timeout or DEPLOY_TIMEOUT, on_event=progress)
    try:
        report = await orchestrator.run(plan, nodes, descriptors)
    except PlanError as exc:
        raise Failed(f"the plan does not fit slice {args.slice} ({exc.code}): {exc.reason}") from None
    for line in report.summary():
        _say(err, line)
    return EXIT_OK if report.complete else EXIT_NODE_FAILED


def execute(argv, *, stdout=None, stderr=None, connect: Callable[[Any], defer.Deferred] = connect_psepr,
            interrupted: defer.Deferred | None = None, tty: bool | None = None, reactor=None) -> defer.Deferred:
    """Run one dsmtc command other than ``create`` inside a running reactor: ``Deferred[exit status]``.
    ``connect(args)`` gives the logged-in PsEPR connection; ``interrupted`` fires to end a ``watch``;
    ``tty`` (default: whether ``stdout`` is a terminal) chooses the in-place table."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        args = parse_arguments(argv)
    except UsageError as exc:
        return defer.succeed(_usage(err, exc))
    except SystemExit as exc:              # --help
        return defer.succeed(exc.code if isinstance(exc.code, int) else EXIT_USAGE)
    if args.command == "create":
        return defer.succeed(_usage(err, UsageError("dsmtc: create runs through svm's core: use main()")))
    if reactor is None:
        from twisted.internet import reactor
    if tty is None:
        tty = bool(getattr(out, "isatty", lambda: False)())
    session = _Session(args, connect)

    async def run() -> int:
        try:
            if args.command == "deploy":
                return await _deploy(args, session, out, err)
            if args.command == "status":
                return await _status(args, session, out, err)
            if args.command == "watch":
                return await _watch(args, session, out, err, interrupted or defer.Deferred(), tty, reactor)
            if args.command == "command":
                return await _command(args, session, out, err)
            return await _plan(args, session, out, err)
        except (Failed, Refusal) as exc:
            _say(err, f"dsmtc: error: {getattr(exc, 'reason', None) or exc}")
            return EXIT_FAILED
        finally:
            session.close()
    return defer.ensureDeferred(run())


def _usage(err, exc: UsageError) -> int:
    _say(err, str(exc))
    _say(err, "usage: dsmtc [options] COMMAND ARGS...   (dsmtc --help)")
    return EXIT_USAGE


def main(argv=None, *, make_calls=None, stdout=None, stderr=None) -> int:
    """Run one dsmtc command; return the exit status (module docstring).  ``create`` is ``svm``'s
    ``createslice`` (``make_calls`` as ``svm.main``'s)."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        args = parse_arguments(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        return _usage(err, exc)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "create":
        from dsmt.client import svm
        kwargs = {"make_calls": make_calls} if make_calls is not None else {}
        return svm.main(svm_argv(args), stdout=out, stderr=err, **kwargs)

    from twisted.internet import reactor
    interrupted = defer.Deferred()

    def on_signal(number, frame):
        reactor.callFromThread(lambda: interrupted.called or interrupted.callback(None))
    box: list = []
    running = execute(argv if argv is not None else sys.argv[1:], stdout=out, stderr=err, interrupted=interrupted)
    running.addBoth(box.append)
    if not box:
        previous = signal.signal(signal.SIGINT, on_signal)
        running.addBoth(lambda _: reactor.callLater(0, reactor.stop))
        try:
            reactor.run(installSignalHandlers=False)
        finally:
            signal.signal(signal.SIGINT, previous)
    result = box[0] if box else EXIT_FAILED
    if hasattr(result, "getErrorMessage"):
        _say(err, f"dsmtc: error: unexpected failure: {result.getErrorMessage()}")
        return EXIT_FAILED
    return result


if __name__ == "__main__":
    sys.exit(main())
