"""``psepr``: send, listen and query PsEPR channels from a shell.

::

    psepr passwd xyz1_mgr < password.txt >> accounts       # make an accounts-file line
    psepr listen /org/dsmt/ns/deployment/xyz1/ --count 5 --format text
    psepr send /org/dsmt/ns/deployment/xyz1/app/status/ --field deployment-status --value status=running
    psepr send /org/x/ --payload payload.xml                # any payload type
    psepr query /org/dsmt/ns/deployment/xyz1/               # last values, from PLDB

Router address and credentials come from flags or the environment:
``--router`` / ``PSEPR_ROUTER`` (``psepr://host:port`` or ``nats://host:port``,
comma-separated for failover; default ``psepr://127.0.0.1:23345``),
``--user`` / ``PSEPR_USER``, ``--password-file`` or ``PSEPR_PASSWORD``,
``--instance`` / ``PSEPR_INSTANCE`` (default: this host's name).

Exit status: 0 success; 1 a listen or query that ended without what it waited
for; 2 usage or input error; 3 router unreachable; 4 login refused;
5 the router refused a lease.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_LOGIN, EXIT_LEASE = 0, 1, 2, 3, 4, 5
#: Seconds ``psepr query`` waits for PLDB's answer by default.
QUERY_TIMEOUT = 10.0


class CliError(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psepr", description="Send, listen and query PsEPR channels.",
                                     epilog="Exit status: 0 ok, 1 incomplete, 2 usage, 3 unreachable, "
                                            "4 login refused, 5 lease refused.")
    sub = parser.add_subparsers(dest="command", required=True)

    def connection_flags(p):
        p.add_argument("--router", default=os.environ.get("PSEPR_ROUTER", "psepr://127.0.0.1:23345"),
                       help="psepr://host:port or nats://host:port, comma-separated for failover")
        p.add_argument("--user", default=os.environ.get("PSEPR_USER", "psepr-cli"), help="service name to log in as")
        p.add_argument("--password-file", help="file whose first line is the password (else $PSEPR_PASSWORD)")
        p.add_argument("--instance", default=os.environ.get("PSEPR_INSTANCE", os.uname().nodename),
                       help="instance name (default: host name)")

    p = sub.add_parser("passwd", help="read a password from stdin, print an accounts-file line")
    p.add_argument("name", help="service name")

    p = sub.add_parser("listen", help="print events sent to a channel and below")
    p.add_argument("channel")
    p.add_argument("--type", dest="payload_type", help="only this payload type (namespace)")
    p.add_argument("--count", type=int, help="stop after N events")
    p.add_argument("--seconds", type=float, help="stop after S seconds")
    p.add_argument("--format", choices=("xml", "text", "json"), default="text")
    connection_flags(p)

    p = sub.add_parser("send", help="send one event")
    p.add_argument("channel")
    p.add_argument("--field")
    p.add_argument("--value")
    p.add_argument("--expire", type=int, help="attribute expire, seconds")
    p.add_argument("--payload", metavar="FILE", help="send this <payload> XML instead of field/value")
    p.add_argument("--service", dest="to_service", help="deliver only to this service")
    p.add_argument("--to-instance", dest="to_instance", help="deliver only to this instance")
    connection_flags(p)

    p = sub.add_parser("query", help="ask PLDB for the last values under a channel")
    p.add_argument("channel")
    p.add_argument("--field", help="only this field")
    p.add_argument("--pldb-channel", default="/org/dsmt/ns/pldb/query/", help="PLDB's query channel")
    p.add_argument("--timeout", type=float, default=QUERY_TIMEOUT, help="seconds to wait for the answer")
    p.add_argument("--format", choices=("text", "json"), default="text")
    connection_flags(p)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "passwd":
            return _passwd(args)
        return _run_reactor(args)
    except CliError as exc:
        print(f"psepr: {exc}", file=sys.stderr)
        return exc.status


def _passwd(args) -> int:
    from dsmt.transports.psepr.accounts import AccountsError, passwd_line
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CliError("empty password", EXIT_USAGE)
    try:
        print(passwd_line(args.name, password))
    except AccountsError as exc:
        raise CliError(str(exc), EXIT_USAGE)
    return EXIT_OK


def _password(args) -> str | None:
    from dsmt.transports.psepr.accounts import read_password
    if args.password_file:
        try:
            return read_password(args.password_file)
        except OSError as exc:
            raise CliError(f"cannot read password file: {exc.strerror}: {args.password_file}", EXIT_USAGE)
    return read_password(None)


def _run_reactor(args) -> int:
    from dsmt.transports.psepr.channel import ChannelError, validate_channel
    from dsmt.transports.psepr.client import PsEPRConnection
    try:
        validate_channel(args.channel)
        connection = PsEPRConnection.from_urls(args.router, service=args.user, password=_password(args),
                                               instance=args.instance)
    except (ChannelError, ValueError) as exc:
        raise CliError(str(exc), EXIT_USAGE)
    event = _event_to_send(args) if args.command == "send" else None

    from twisted.internet import reactor, defer
    from twisted.python.failure import Failure
    outcome = {}

    async def run():
        try:
            await _connect(connection)
            if args.command == "listen":
                outcome["status"] = await _listen(args, connection, reactor)
            elif args.command == "send":
                connection.send(event)
                await connection.flush()
                outcome["status"] = EXIT_OK
            else:
                outcome["status"] = await _query(args, connection, reactor)
        except CliError as exc:
            outcome["error"] = exc
        finally:
            connection.close()

    def finished(result):
        if isinstance(result, Failure):
            outcome.setdefault("error", CliError(f"unexpected error: {result.getErrorMessage()}", EXIT_INCOMPLETE))
        reactor.callLater(0, reactor.stop)

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()).addBoth(finished))
    reactor.run(installSignalHandlers=True)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("status", EXIT_INCOMPLETE)


async def _connect(connection):
    from dsmt.transports.psepr.client import ConnectFailed, LoginFailed
    try:
        await connection.connect(retry=False)
    except ConnectFailed as exc:
        raise CliError(str(exc), EXIT_UNREACHABLE)
    except LoginFailed as exc:
        raise CliError(str(exc), EXIT_LOGIN)


def _event_to_send(args):
    from dsmt.transports.psepr.event import Event, EventError, OpaquePayload
    try:
        if args.payload:
            if args.field or args.value is not None:
                raise CliError("give either --payload or --field/--value, not both", EXIT_USAGE)
            with open(args.payload, "rb") as handle:
                payload = OpaquePayload.from_xml(handle.read(2 * 1024 * 1024))
            return Event(args.channel, payload, to_service=args.to_service, to_instance=args.to_instance,
                         from_service=args.user, from_instance=args.instance)
        if not args.field or args.value is None:
            raise CliError("send needs --field and --value (or --payload FILE)", EXIT_USAGE)
        return Event.attribute(args.channel, args.field, args.value, expire=args.expire,
                               to_service=args.to_service, to_instance=args.to_instance,
                               from_service=args.user, from_instance=args.instance)
    except OSError as exc:
        raise CliError(f"cannot read payload file: {exc.strerror}: {args.payload}", EXIT_USAGE)
    except EventError as exc:
        raise CliError(f"invalid event: {exc}", EXIT_USAGE)


async def _await_lease(lease):
    from dsmt.transports.psepr.client import LeaseRefused
    try:
        await lease.ready
    except LeaseRefused as exc:
        raise CliError(f"lease on {lease.channel} refused: {exc}", EXIT_LEASE)


async def _listen(args, connection, reactor) -> int:
    from twisted.internet import defer
    done = defer.Deferred()
    received = [0]

    def show(event):
        print(format_event(event, args.format), flush=True)
        received[0] += 1
        if args.count and received[0] >= args.count and not done.called:
            done.callback(None)

    lease = connection.lease(args.channel, 3600, args.payload_type, callback=show)
    await _await_lease(lease)
    print(f"psepr: listening on {args.channel} (lease {lease.granted} s)", file=sys.stderr, flush=True)
    timer = reactor.callLater(args.seconds, lambda: done.called or done.callback(None)) if args.seconds else None
    await done
    if timer is not None and timer.active():
        timer.cancel()
    if args.count and received[0] < args.count:
        print(f"psepr: received {received[0]} of {args.count} events", file=sys.stderr)
        return EXIT_INCOMPLETE
    return EXIT_OK


async def _query(args, connection, reactor) -> int:
    from dsmt.client.pldb import query_pldb
    result = await query_pldb(connection, args.channel, field=args.field, pldb_channel=args.pldb_channel,
                              timeout=args.timeout,
                              malformed=lambda exc: print(f"psepr: ignoring a malformed PLDB reply: {exc}",
                                                          file=sys.stderr))
    if result.parts_expected is None:
        print(f"psepr: no answer from PLDB on {args.pldb_channel} within {args.timeout:g} s", file=sys.stderr)
        return EXIT_INCOMPLETE
    for attr in result.attrs:
        if args.format == "json":
            print(json.dumps({"channel": attr.channel, "field": attr.field, "value": attr.value,
                              "time": attr.time, "from_service": attr.from_service,
                              "from_instance": attr.from_instance, "expire": attr.expire}))
        else:
            print(f"{attr.channel} {attr.field}={attr.value} (from {attr.from_service or '-'}"
                  f"/{attr.from_instance or '-'})")
    if not result.complete:
        print(f"psepr: only {result.parts_received} of {result.parts_expected} answer parts arrived",
              file=sys.stderr)
        return EXIT_INCOMPLETE
    return EXIT_OK


def format_event(event, style: str) -> str:
    """One event as the ``--format`` asks: ``xml`` (the event document), ``text`` or ``json`` (one line)."""
    from dsmt.transports.psepr.event import AttributePayload, LeasePayload, event_to_xml
    if style == "xml":
        return event_to_xml(event).decode("utf-8")
    payload = event.payload
    record = {"channel": event.channel, "type": event.payload_type, "from_service": event.from_service,
              "from_instance": event.from_instance, "to_service": event.to_service,
              "to_instance": event.to_instance}
    if isinstance(payload, AttributePayload):
        record.update(field=payload.field, value=payload.value, expire=payload.expire)
    elif isinstance(payload, LeasePayload):
        record.update(identifier=payload.identifier, duration=payload.duration, op=payload.op)
    else:
        record.update(xml=payload.xml.decode("utf-8"))
    if style == "json":
        return json.dumps(record)
    sender = f"{event.from_service or '-'}/{event.from_instance or '-'}"
    if isinstance(payload, AttributePayload):
        return f"{event.channel} {payload.field}={payload.value} (from {sender})"
    return f"{event.channel} [{event.payload_type}] (from {sender}) {record.get('xml', '')}"


if __name__ == "__main__":
    sys.exit(main())
