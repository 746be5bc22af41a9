"""Health checks of a component: HTTP (GET answered 2xx), TCP (a connection accepted), command (exit 0).

The descriptor's ``<health interval timeout retries>`` is honoured this way:

* each probe takes at most ``timeout`` seconds (a slower answer is a failure);
* **steady state** (:meth:`HealthChecker.check`): unhealthy after ``retries`` consecutive failed
  probes, one every ``interval`` seconds; healthy at the first success;
* **startup** (:meth:`HealthChecker.wait_healthy`): a process just started is probed until its
  first success, for at most ``retries × interval`` seconds — the time the steady rule would give
  it — first :data:`STARTUP_PROBE_SECONDS` apart, the pause doubling after each failure up to
  :data:`STARTUP_PROBE_MAX_SECONDS` (never over ``interval``, and the last one shortened to end with
  the window; with less than the first pause left, unhealthy).  So a service that is up in
  100 ms is ``running`` 100 ms later, not one interval later, and one slow to start (a loaded node
  starting hundreds of slivers) costs a few probes a second, not ten.

Probes connect to an IP address literal directly (``fetch.client_endpoint``): a refused connection
is known at once, not after ``HostnameEndpoint``'s 0.3 s attempt tick.

:class:`RetryCounter` is that arithmetic, pure (times are given); :class:`HealthChecker` is the
Twisted edge.  Failures are :class:`HealthError` (a Refusal, code ``unhealthy``) whose reason says
which probe failed last and how.
"""
from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer, error, protocol

from dsmt.server.deployment.descriptor import HealthCheck, substitute
from dsmt.server.deployment.fetch import abandon_response, client_endpoint, http_client
from dsmt.server.refusal import Refusal

__all__ = ["HealthError", "RetryCounter", "Decision", "HealthChecker", "STARTUP_PROBE_SECONDS",
           "STARTUP_PROBE_MAX_SECONDS"]

#: First pause between probes while waiting for a just-started process: services take tens to
#: hundreds of milliseconds to listen; 0.1 s notices them quickly.
STARTUP_PROBE_SECONDS = 0.1
#: Longest pause between startup probes: a service still not listening after a few probes is slow
#: (a loaded node) and 0.4 s — the pace probes had when each refused one took 0.3 s — bounds how late
#: it is noticed while cutting the probes (each a connection, for the engine and the service) to 2.5 a
#: second.
STARTUP_PROBE_MAX_SECONDS = 0.4


class HealthError(Refusal):
    """A component is not healthy (code ``unhealthy``); or its check cannot be run (code ``launch``)."""


@dataclass(frozen=True)
class Decision:
    """``verdict``: ``healthy``, ``unhealthy`` or ``retry`` (then ``delay`` seconds before the next probe)."""

    verdict: str
    delay: float = 0.0


class RetryCounter:
    """Counts probe results into a verdict (module docstring).  ``startup``: the startup rule."""

    def __init__(self, retries: int, interval: float, *, startup: bool, now: float):
        self.retries, self.interval, self.startup = retries, interval, startup
        self.failures = 0
        self.deadline = now + retries * interval

    def record(self, ok: bool, now: float) -> Decision:
        if ok:
            self.failures = 0
            return Decision("healthy")
        self.failures += 1
        if self.startup:
            left = self.deadline - now
            if left < min(STARTUP_PROBE_SECONDS, self.interval):
                return Decision("unhealthy")
            pause = STARTUP_PROBE_SECONDS * 2 ** min(self.failures - 1, 16)   # bounded: no huge floats
            return Decision("retry", min(pause, STARTUP_PROBE_MAX_SECONDS, self.interval, left))
        if self.failures >= self.retries:
            return Decision("unhealthy")
        return Decision("retry", self.interval)


class _Discard(protocol.Protocol):
    def connectionMade(self):
        self.transport.loseConnection()


class HealthChecker:
    """Probes one component's :class:`~dsmt.server.deployment.descriptor.HealthCheck`.

    ``values``: the deployment's parameters (for ``${…}`` in URL, host and port); ``run_command``:
    ``(command, timeout) -> Deferred[ExitStatus]`` for command checks (the engine runs them in the
    sliver like any command); ``clock``: pauses between probes (defaults to ``reactor``).
    """

    def __init__(self, reactor, check: HealthCheck, values: dict[str, str], *, run_command=None, clock=None):
        self.reactor, self.check, self.values = reactor, check, values
        self.clock = clock or reactor
        self.run_command = run_command
        self._client = None          # the HTTP client of its probes, made at the first one

    def describe(self) -> str:
        check = self.check
        if check.kind == "http":
            return f"GET {substitute(check.url, self.values)}"
        if check.kind == "tcp":
            return f"TCP {substitute(check.host, self.values)}:{substitute(check.port, self.values)}"
        return f"command {check.command.argv[0]!r}"

    def probe(self):
        """One probe: a Deferred of None (healthy) or of the reason it failed (never an errback)."""
        d = defer.ensureDeferred(self._probe())
        d.addErrback(lambda failure: f"{self.describe()}: {failure.getErrorMessage() or failure.type.__name__}")
        return d

    async def _probe(self) -> str | None:
        check = self.check
        if check.kind == "http":
            return await self._http(substitute(check.url, self.values))
        if check.kind == "tcp":
            return await self._tcp(substitute(check.host, self.values), substitute(check.port, self.values))
        if self.run_command is None:
            raise HealthError("launch", "no way to run command checks was given")
        status = await self.run_command(check.command, check.timeout)
        return None if status.ok else f"{self.describe()} {status}"

    async def _http(self, url: str) -> str | None:
        if self._client is None:
            self._client = http_client(self.reactor)
        try:
            response = await self._client.get(url, timeout=self.check.timeout, reactor=self.reactor)
        except defer.CancelledError:
            return f"GET {url}: no answer within {self.check.timeout:g} s"
        abandon_response(response)
        if 200 <= response.code < 300:
            return None
        return f"GET {url}: HTTP status {response.code}"

    async def _tcp(self, host: str, port: str) -> str | None:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            return f"TCP {host}:{port}: not a port number"
        endpoint = client_endpoint(self.reactor, host, int(port), timeout=self.check.timeout)
        try:
            await endpoint.connect(protocol.Factory.forProtocol(_Discard))
        except (error.ConnectError, error.DNSLookupError, error.TimeoutError, defer.CancelledError) as exc:
            return f"TCP {host}:{port}: {exc.__class__.__name__}: {exc}"
        return None

    def wait_healthy(self, *, startup: bool = True):
        """Probe until the verdict (module docstring): a Deferred firing None when healthy, failing with
        HealthError ``unhealthy`` otherwise.  Cancelling it stops the probing."""
        counter = RetryCounter(self.check.retries, self.check.interval, startup=startup, now=self.clock.seconds())
        state = {"timer": None, "probe": None}

        def cancel(_):
            for key in ("timer", "probe"):
                pending = state[key]
                if pending is not None and (key == "probe" or pending.active()):
                    pending.cancel()

        result = defer.Deferred(cancel)

        def next_probe():
            state["timer"] = None
            state["probe"] = self.probe()
            state["probe"].addCallback(judged)

        def judged(reason):
            state["probe"] = None
            if result.called:
                return
            decision = counter.record(reason is None, self.clock.seconds())
            if decision.verdict == "healthy":
                result.callback(None)
            elif decision.verdict == "unhealthy":
                window = self.check.retries * self.check.interval
                how = (f"not healthy within {window:g} s of starting" if startup
                       else f"{counter.failures} consecutive failed checks")
                result.errback(HealthError("unhealthy", f"{how}; last: {reason}"))
            else:
                state["timer"] = self.clock.callLater(decision.delay, next_probe)

        next_probe()
        return result
