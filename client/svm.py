"""``svm``: create, manage and delete slices — the dslice service manager's commands.

::

    svm getads [AGENT]                       nodes the agent advertises
    svm createslice FILE                     tickets, leases and slivers for the slice XML in FILE
    svm deleteslice SLICE                    delete every sliver, release unused tickets, forget the slice
    svm addkey SLICE KEYFILE                 let the owner of this OpenSSH public key log in as SLICE
    svm delkey SLICE KEYFILE                 revoke it
    svm nukekeys SLICE                       revoke every user key
    svm renewslice SLICE                     renew every lease for the slice's lease length, from now
    svm nodelist SLICE                       nodes where the slice has a sliver (local)
    svm expirations SLICE                    when each sliver expires (local)
    svm clean                                forget slices with nothing valid left (local)
    svm newtickets FILE                      step 1 of createslice only
    svm newleases SLICE TICKETFILE...        step 2 (retry: svm newleases S ~/.dsmt/slices/S/tickets/*)
    svm newvms SLICE LEASEFILE...            step 3 (retry: svm newvms S ~/.dsmt/slices/S/leases/*)

Options (before the command): ``-p N`` node calls at once (default 16, at
most :data:`MAX_PARALLELISM`); ``-t SECONDS`` longest wait for each node
(default: the transport's own); ``--agent URL`` (or ``$DSMT_AGENT``; a bare
host name means ``http://HOST/agent``); ``--transport http|psepr``;
``--router URL --psepr-service NAME --password-file F`` (PsEPR login);
``--cert F --key F --ca F`` (PEM: our certificate and key, for signed
requests and TLS, and the CA to trust); ``--dir DIR`` (default
``$DSMT_HOME`` or ``~/.dsmt``).

Output: ``Success on NODE`` / ``Error on NODE: REASON`` on standard output as
each node answers (createslice: one line per node, its first failing step),
then a one-line summary on standard error; errors of the command itself on
standard error as ``svm: error: REASON``.

Exit status:

====  =====================================================================
0     every node succeeded (a local command did what it was asked)
1     the command ran but some node failed (retry as the HOWTO says)
2     usage error (unknown command, missing argument, bad option value)
3     agent or local failure: nothing was done on the nodes (agent refused
      or unreachable, invalid spec, unreadable file, unknown slice…)
====  =====================================================================

The transports come from :func:`make_calls`, which imports
``dsmt.server.slicemanager.remote`` only when a command needs the network.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from twisted.internet import defer

from dsmt.server.refusal import Refusal
from dsmt.server.slicemanager.calls import CallOptions
from dsmt.server.slicemanager.core import SliceManager, expiration_line, result_line
from dsmt.server.slicemanager.slicedir import MAX_KEY_BYTES, SliceDirectory, SliceDirectoryError, read_user_file
from dsmt.server.slicemanager.spec import MAX_SPEC_BYTES

__all__ = ["main", "make_calls", "EXIT_OK", "EXIT_NODE_FAILED", "EXIT_USAGE", "EXIT_FAILED", "MAX_PARALLELISM"]

EXIT_OK, EXIT_NODE_FAILED, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3
#: Most node calls at once: each holds a connection (a file descriptor); 1024 is the usual default
#: per-process descriptor limit, so more could only fail.
MAX_PARALLELISM = 1024
#: Longest per-node timeout accepted: an hour — a ticket's default term, after which waiting is pointless.
MAX_TIMEOUT = 3600.0
AGENT_ENV = "DSMT_AGENT"

#: Commands that talk to no service.
LOCAL_COMMANDS = frozenset({"nodelist", "expirations", "clean"})
#: Commands that must reach the agent.
AGENT_COMMANDS = frozenset({"getads", "createslice", "newtickets"})

_EPILOG = ("exit status: 0 all nodes succeeded; 1 some node failed; 2 usage error; "
           "3 agent or local failure (nothing done on the nodes)")


class UsageError(Exception):
    """A bad option value or argument combination (exit 2)."""


def _parallelism(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= MAX_PARALLELISM:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_PARALLELISM}, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= MAX_TIMEOUT:      # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {MAX_TIMEOUT:g} seconds, not {text}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="svm", description="Create, manage and delete slices.", epilog=_EPILOG)
    parser.add_argument("-p", dest="parallelism", type=_parallelism, default=16, metavar="N",
                        help="node calls at once (default 16)")
    parser.add_argument("-t", dest="timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="longest wait for each node")
    parser.add_argument("--agent", default=os.environ.get(AGENT_ENV), metavar="URL",
                        help=f"the agent's URL (default ${AGENT_ENV})")
    parser.add_argument("--transport", choices=("http", "psepr"), default="http")
    parser.add_argument("--router", default=os.environ.get("PSEPR_ROUTER"), metavar="URL", help="PsEPR router")
    parser.add_argument("--psepr-service", default=os.environ.get("PSEPR_USER", "svm"), metavar="NAME",
                        help="PsEPR service name to log in as (default svm)")
    parser.add_argument("--password-file", metavar="F", help="file whose first line is the PsEPR password")
    parser.add_argument("--cert", metavar="F", help="our certificate (PEM)")
    parser.add_argument("--key", metavar="F", help="our private key (PEM)")
    parser.add_argument("--ca", metavar="F", help="CA certificate(s) to trust (PEM)")
    parser.add_argument("--dir", metavar="DIR", help="slice directory home (default $DSMT_HOME or ~/.dsmt)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name, help_text, *arguments):
        p = sub.add_parser(name, help=help_text, epilog=_EPILOG)
        for argument, kwargs in arguments:
            p.add_argument(argument, **kwargs)
    slice_arg = ("slice", {"metavar": "SLICE"})
    command("getads", "nodes the agent advertises", ("agent_arg", {"nargs": "?", "metavar": "AGENT"}))
    command("createslice", "tickets, leases and slivers for a slice XML file", ("file", {"metavar": "FILE"}))
    command("deleteslice", "delete the slice everywhere", slice_arg)
    command("addkey", "add a user's OpenSSH public key", slice_arg, ("keyfile", {"metavar": "KEYFILE"}))
    command("delkey", "remove a user's OpenSSH public key", slice_arg, ("keyfile", {"metavar": "KEYFILE"}))
    command("nukekeys", "remove every user key", slice_arg)
    command("renewslice", "renew every lease", slice_arg)
    command("nodelist", "nodes with a sliver (local)", slice_arg)
    command("expirations", "sliver expiry times (local)", slice_arg)
    command("clean", "forget slices with nothing valid left (local)")
    command("newtickets", "step 1: tickets for a slice XML file", ("file", {"metavar": "FILE"}))
    command("newleases", "step 2: redeem ticket files", slice_arg, ("files", {"nargs": "+", "metavar": "FILE"}))
    command("newvms", "step 3: create slivers from lease files", slice_arg,
            ("files", {"nargs": "+", "metavar": "FILE"}))
    return parser


def agent_url(text: str) -> str:
    """``text`` if it is an http(s) URL; a bare ``host[:port]`` becomes ``http://host[:port]/agent``."""
    if "://" in text:
        if not text.startswith(("http://", "https://")):
            raise UsageError(f"svm: the agent must be an http:// or https:// URL, not {text[:100]!r}")
        return text
    if not text or any(c in text for c in "/?#@") or any(c.isspace() for c in text):
        raise UsageError(f"svm: {text[:100]!r} is neither a URL nor a host name")
    return f"http://{text}/agent"


def call_options(args) -> CallOptions:
    """The adapter options of parsed arguments (checked for combinations that cannot work)."""
    if (args.cert is None) != (args.key is None):
        raise UsageError("svm: --cert and --key go together")
    agent = args.agent_arg if getattr(args, "agent_arg", None) else args.agent
    agent = agent_url(agent) if agent else None
    if args.transport == "http" and agent is None and args.command in AGENT_COMMANDS:
        raise UsageError(f"svm: {args.command} needs the agent: give --agent URL or set ${AGENT_ENV}")
    if args.transport == "psepr" and not args.router:
        raise UsageError("svm: --transport psepr needs --router URL (or $PSEPR_ROUTER)")
    return CallOptions(transport=args.transport, agent_url=agent, router=args.router,
                       psepr_service=args.psepr_service, password_file=args.password_file, cert=args.cert,
                       key=args.key, ca=args.ca, timeout=args.timeout)


def make_calls(args):
    """``(AgentCalls, NodeCalls, close)`` for ``args``: ``dsmt.server.slicemanager.remote.make_calls(CallOptions)``."""
    from dsmt.server.slicemanager import remote
    return remote.make_calls(call_options(args))


class _NoCalls:
    """Stands in for the services in local commands: any use is a bug."""

    def __getattr__(self, name):
        raise AssertionError(f"a local command used the network ({name})")


def _wait(deferred):
    """The result of ``deferred``, running the reactor only if it has not fired yet."""
    box = []
    deferred.addBoth(box.append)
    if not box:
        from twisted.internet import reactor
        deferred.addBoth(lambda _: reactor.stop())
        reactor.run()
    result = box[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def main(argv=None, *, make_calls=make_calls, stdout=None, stderr=None, clock=time.time) -> int:
    """Run one svm command; return the exit status (see the module docstring)."""
    out, err = stdout or sys.stdout, stderr or sys.stderr

    def say(stream, text):
        stream.write(text + "\n")
        stream.flush()
    try:
        args = _parser().parse_args(argv)
        options = call_options(args)
    except UsageError as exc:
        say(err, str(exc))
        say(err, "usage: svm [options] COMMAND ARGS...   (svm --help)")
        return EXIT_USAGE
    except SystemExit as exc:          # --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    del options                         # checked; make_calls builds its own from args

    def failed(reason: str) -> int:
        say(err, f"svm: error: {reason}")
        return EXIT_FAILED

    try:
        directory = SliceDirectory(args.dir)
        command = args.command
        spec = key = None
        if command in ("createslice", "newtickets"):
            spec = read_user_file(args.file, MAX_SPEC_BYTES)
        if command in ("addkey", "delkey"):
            key = read_user_file(args.keyfile, MAX_KEY_BYTES).decode("utf-8", "replace")
    except SliceDirectoryError as exc:
        return failed(exc.reason)

    close = None
    if command in LOCAL_COMMANDS:
        agent = nodes = _NoCalls()
    else:
        try:
            agent, nodes, close = make_calls(args)
        except ImportError as exc:
            return failed(f"the remote transports cannot be loaded ({exc})")
        except (Refusal, OSError, ValueError) as exc:
            return failed(getattr(exc, "reason", None) or str(exc))

    manager = SliceManager(agent, nodes, directory, clock=clock, parallelism=args.parallelism,
                           timeout=args.timeout, on_result=lambda node, outcome: say(out, result_line(node, outcome)))
    run = {
        "getads": lambda: manager.getads(),
        "createslice": lambda: manager.createslice(spec),
        "newtickets": lambda: manager.newtickets(spec),
        "deleteslice": lambda: manager.deleteslice(args.slice),
        "addkey": lambda: manager.addkey(args.slice, key),
        "delkey": lambda: manager.delkey(args.slice, key),
        "nukekeys": lambda: manager.nukekeys(args.slice),
        "renewslice": lambda: manager.renewslice(args.slice),
        "nodelist": lambda: manager.nodelist(args.slice),
        "expirations": lambda: manager.expirations(args.slice),
        "clean": lambda: manager.clean(),
        "newleases": lambda: manager.newleases(args.slice, args.files),
        "newvms": lambda: manager.newvms(args.slice, args.files),
    }[command]
    running = run()
    if close is not None:  # release connections (treq's pool, the PsEPR login) before the reactor stops
        running.addBoth(lambda result: defer.maybeDeferred(close).addBoth(lambda _: result))
    report = _wait(running)

    if command == "getads":
        for ad in report.values:
            say(out, ad.node)
    elif command == "nodelist":
        for node in report.values:
            say(out, node)
    elif command == "expirations":
        for node, outcome in report.outcomes.items():
            if hasattr(outcome, "expires_at"):
                say(out, expiration_line(report.slice, node, outcome.expires_at))
            else:
                say(out, result_line(node, outcome))
    elif command == "clean":
        for name in report.values:
            say(out, f"Removed slice {name}")
    if report.error is not None:
        return failed(report.error.reason)
    say(err, report.summary())
    return EXIT_OK if report.ok else EXIT_NODE_FAILED


if __name__ == "__main__":
    sys.exit(main())
