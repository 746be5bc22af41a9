"""Publish the xyz1 installation-status scenario to a PsEPR router, paced like a live install.

    python examples/xyz1_publisher.py --router psepr://127.0.0.1:23345 --password-file pw [--interval 0.05]

Logs in as ``xyz1_mgr``; exits 0 once every event was handled by the router
(a flush round trip), 3 if the router is unreachable, 4 if the login is refused.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from twisted.internet import defer, task  # noqa: E402

from dsmt.transports.psepr.client import ConnectFailed, LoginFailed, PsEPRConnection  # noqa: E402
from xyz1_status_events import SERVICE, scenario  # noqa: E402


async def publish(reactor, args) -> int:
    with open(args.password_file, encoding="utf-8") as handle:
        password = handle.readline().rstrip("\n")
    connection = PsEPRConnection.from_urls(args.router, service=SERVICE, password=password,
                                           instance="xyz1-publisher", reactor=reactor)
    try:
        await connection.connect(retry=False)
    except ConnectFailed as exc:
        print(f"publisher: {exc}", file=sys.stderr)
        return 3
    except LoginFailed as exc:
        print(f"publisher: {exc}", file=sys.stderr)
        return 4
    events = scenario()
    for event in events:
        connection.send(event)
        await task.deferLater(reactor, args.interval, lambda: None)
    await connection.flush()
    connection.close()
    print(f"publisher: sent {len(events)} events", file=sys.stderr)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--router", required=True)
    parser.add_argument("--password-file", required=True)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between events")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(publish(reactor, args)).addCallback(
        lambda status: sys.exit(status) if status else None))


if __name__ == "__main__":
    main()
