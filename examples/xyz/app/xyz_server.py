"""XYZ: the example application dsmt deploys onto a slice's slivers (Python standard library only).

    python3 xyz_server.py --config xyz.conf

A small HTTP service:

* ``GET /health`` → ``200`` ``ok`` (what the deployment descriptor's health check asks);
* ``GET /`` → ``200``, an HTML page naming the node, the slice, the greeting and the whole
  configuration it runs with;
* any other path → ``404``; methods other than ``GET``/``HEAD`` → ``501`` (the standard library's).

**Configuration** (``--config FILE``, rendered by the deployment engine from the descriptor's
parameters): ``key = value`` lines, ``#`` comments and blank lines ignored.  Keys: ``port``
(required, 0..65535; 0 takes any free port), ``address`` (default ``127.0.0.1``), ``node``,
``slice``, ``greeting``.  An unknown key, a malformed line, a bad port or a file over
:data:`MAX_CONFIG_BYTES` ends the program with status 2 and one sentence on stderr, before it
listens — the engine then reports the start as failed, with the log.

Once listening it prints ``XYZ <version> listening on http://<address>:<port>/`` (the real port,
also for ``port = 0``) and serves until ``SIGTERM`` or ``SIGINT``, which end it with status 0.

**Start cost.**  Every sliver starts one XYZ, so its start is part of each node's deployment CPU
(~35 ms, most of it importing ``http.server``).  Run as a program it keeps ``ssl`` out (below), and
it does not look its own address up in the DNS (``HTTPServer.server_bind`` would call
``socket.getfqdn``, a reverse lookup that can stall a start on a node with a slow resolver, for a
``server_name`` nothing here uses).  The descriptor runs it with ``python -S``: the standard library
is all it needs, so the ``site`` set-up (``.pth`` files of every installed package) is skipped.
"""
import sys

if __name__ == "__main__":
    # http.client, imported by http.server, imports ssl only to offer HTTPS *client* connections; this
    # plain HTTP server makes none, and ssl (OpenSSL's set-up) is ~6 ms of a ~40 ms start.  Only when
    # run as a program: a module importing this one keeps its ssl.
    sys.modules.setdefault("ssl", None)

import argparse  # noqa: E402 — after the ssl exclusion above
import html  # noqa: E402
import http.server  # noqa: E402
import signal  # noqa: E402
import socketserver  # noqa: E402

VERSION = "1.0.0"
#: Largest configuration read: the rendered file is a few lines; 64 KiB refuses anything else.
MAX_CONFIG_BYTES = 64 * 1024
#: Seconds a client may stay silent mid-request before its connection is closed: health probes
#: and browsers send their request at once; 10 s frees threads held by stalled clients.
REQUEST_TIMEOUT_SECONDS = 10
KEYS = ("port", "address", "node", "slice", "greeting")
DEFAULTS = {"address": "127.0.0.1", "node": "", "slice": "", "greeting": "hello from XYZ"}


class ConfigError(ValueError):
    """The configuration file is unusable; the message says why and where."""


def read_config(path):
    """The configuration in ``path`` (module docstring) as a dict, or ConfigError."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is over {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8") from None
    config = dict(DEFAULTS)
    seen = set()
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"{path} line {number} is not 'key = value'")
        if key not in KEYS:
            raise ConfigError(f"{path} line {number}: unknown key {key[:40]!r} (known: {', '.join(KEYS)})")
        if key in seen:
            raise ConfigError(f"{path} line {number}: {key!r} is set twice")
        seen.add(key)
        config[key] = value
    if "port" not in seen:
        raise ConfigError(f"{path} sets no port")
    port = config["port"]
    if not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ConfigError(f"{path}: port {port[:20]!r} is not a number from 0 to 65535")
    config["port"] = int(port)
    return config


def page(config, bound_port):
    rows = "".join(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(config[key]))}</td></tr>"
                   for key in KEYS)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>XYZ on {html.escape(config['node'])}"
            f"</title></head><body>\n<h1>{html.escape(config['greeting'])}</h1>\n"
            f"<p>XYZ {VERSION} on node <b>{html.escape(config['node'])}</b>, slice "
            f"<b>{html.escape(config['slice'])}</b>, port {bound_port}.</p>\n"
            f"<table>{rows}</table>\n</body></html>\n").encode("utf-8")


def handler_for(config):
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = f"XYZ/{VERSION}"
        timeout = REQUEST_TIMEOUT_SECONDS

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/health":
                self.answer(200, b"ok\n", "text/plain; charset=utf-8")
            elif path == "/":
                self.answer(200, page(config, self.server.server_address[1]), "text/html; charset=utf-8")
            else:
                self.answer(404, b"not found\n", "text/plain; charset=utf-8")

        def do_HEAD(self):
            self.do_GET()

        def answer(self, code, body, kind):
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format, *args):
            pass                    # health probes every few seconds would fill the log
    return Handler


class Server(http.server.ThreadingHTTPServer):
    """The standard library's threading HTTP server, binding without a DNS lookup (module docstring)."""

    allow_reuse_address = True
    daemon_threads = True

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="xyz_server.py", description="XYZ, dsmt's example application")
    parser.add_argument("--config", required=True, help="the configuration file")
    args = parser.parse_args(argv)
    try:
        config = read_config(args.config)
    except ConfigError as exc:
        print(f"xyz: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        server = Server((config["address"], config["port"]), handler_for(config))
    except OSError as exc:
        print(f"xyz: cannot listen on {config['address']}:{config['port']}: {exc.strerror or exc}",
              file=sys.stderr, flush=True)
        return 2

    def end(signum, frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, end)
    signal.signal(signal.SIGINT, end)
    host, port = server.server_address[:2]
    print(f"XYZ {VERSION} listening on http://{host}:{port}/ (node {config['node']}, slice {config['slice']})",
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
