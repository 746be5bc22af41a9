"""``make demo``: the PsEPR event service working for real, end to end.

Starts, as separate processes,

1. a PsEPR router (``twistd -n psepr-router``) on a free loopback port, with an
   accounts file made by ``psepr passwd``;
2. a listener (``psepr listen /org/dsmt/ns/deployment/xyz1/ --format xml``)
   logged in as ``xyz1_mgr``;
3. a publisher of the installation-status events of application XYZ in slice
   ``xyz1`` on five nodes (``examples/xyz1_publisher.py``),

then prints what the listener received, node by node, stops everything and
exits 0 — or 1, naming what went wrong.  Everything it writes (accounts, logs,
the raw events received in ``xyz1-events.xml``) stays in ``.demo/``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from xyz1_status_events import HOSTS, SERVICE, SLICE, scenario  # noqa: E402

from dsmt.transports.psepr.event import parse_event  # noqa: E402

BIN = Path(sys.executable).parent
WORK = Path.cwd() / ".demo"
PASSWORD = "xyz1-demo-password"
#: Bound on waiting for a process to come up (they take well under a second).
STARTUP_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, what: str, process: subprocess.Popen, log: Path | None = None):
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not condition():
        if process.poll() is not None:
            detail = log.read_text()[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {process.returncode}\n{detail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {STARTUP_TIMEOUT:g} s")
        time.sleep(0.02)


def accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    password_file = WORK / "xyz1_mgr.password"
    password_file.write_text(PASSWORD + "\n")
    accounts = WORK / "accounts"
    line = subprocess.run([BIN / "psepr", "passwd", SERVICE], input=PASSWORD + "\n", text=True,
                          capture_output=True, check=True).stdout
    accounts.write_text(line)

    port = free_port()
    url = f"psepr://127.0.0.1:{port}"
    router_log = WORK / "router.log"
    events_file = WORK / f"{SLICE}-events.xml"
    expected = scenario()
    router = listener = None
    print(f"[demo] starting PsEPR router on 127.0.0.1:{port}")
    try:
        router = subprocess.Popen([BIN / "twistd", "-n", "--pidfile=", f"--logfile={router_log}", "psepr-router",
                                   "--listen", f"tcp:{port}:interface=127.0.0.1", "--accounts", str(accounts),
                                   "--name", "demo-router"], stdin=subprocess.DEVNULL)
        wait_for(lambda: accepting(port), "router", router, router_log)

        channel = f"/org/dsmt/ns/deployment/{SLICE}/"
        print(f"[demo] starting listener on {channel} as {SERVICE}")
        listener_err = WORK / "listener.err"
        env = dict(os.environ, PSEPR_ROUTER=url, PSEPR_USER=SERVICE, PSEPR_INSTANCE="demo-listener")
        with open(events_file, "wb") as out, open(listener_err, "wb") as err:
            listener = subprocess.Popen([BIN / "psepr", "listen", channel, "--format", "xml", "--count",
                                         str(len(expected)), "--seconds", "60",
                                         "--password-file", str(password_file)],
                                        stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL)
            wait_for(lambda: b"listening on" in listener_err.read_bytes(), "listener", listener, listener_err)

            print(f"[demo] publishing {len(expected)} installation-status events of {SLICE} on {len(HOSTS)} nodes")
            publisher = subprocess.run([sys.executable, HERE / "xyz1_publisher.py", "--router", url,
                                        "--password-file", str(password_file)], capture_output=True, text=True)
            if publisher.returncode != 0:
                raise RuntimeError(f"publisher failed ({publisher.returncode}): {publisher.stderr.strip()}")
            listener.wait(30)
        if listener.returncode != 0:
            raise RuntimeError(f"listener ended with {listener.returncode}: {listener_err.read_text().strip()}")
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        print(f"[demo] FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        stop(listener)
        stop(router)

    received = [parse_event(line.encode()) for line in events_file.read_text().splitlines() if line.strip()]
    show(received)
    if [(e.channel, e.payload.value) for e in received] != [(e.channel, e.payload.value) for e in expected]:
        print(f"[demo] FAILED: received {len(received)} events, not the {len(expected)} sent in order",
              file=sys.stderr)
        return 1
    print(f"[demo] OK: the listener received all {len(received)} events in order; raw XML in {events_file}")
    return 0


def show(events) -> None:
    """Print the received events: a line each, then a per-node recap of the last status per component."""
    print(f"\n[demo] the listener received {len(events)} events:")
    last: "OrderedDict[str, OrderedDict[str, str]]" = OrderedDict((host, OrderedDict()) for host in HOSTS)
    for event in events:
        fields = dict(part.split("=", 1) for part in event.payload.value.split(",") if "=" in part)
        component = event.channel.split("/")[-3]
        print(f"  {event.channel:<75} {event.payload.field}: {event.payload.value}")
        if "hostname" in fields:
            last[fields["hostname"]][component.rsplit(".", 1)[-1]] = fields["status"]
    print("\n[demo] recap (last status per node and component):")
    components = sorted({c for statuses in last.values() for c in statuses})
    print(f"  {'node':<30}" + "".join(f"{c:<20}" for c in components))
    for host, statuses in last.items():
        print(f"  {host:<30}" + "".join(f"{statuses.get(c, '-'):<20}" for c in components))


if __name__ == "__main__":
    sys.exit(main())
