"""The slice manager's calls over the network: :class:`AgentCalls` and :class:`NodeCalls` over zeep.

Two transports, one behaviour (the tests run the same scenarios over both and
compare the outcomes):

* **HTTP** (:class:`HttpAgentCalls`, :class:`HttpNodeCalls`): zeep's
  ``AsyncClient`` on :class:`~dsmt.transports.http.TreqTransport` (one
  persistent connection pool), loaded once from the committed
  ``wsdl/agent.wsdl`` / ``wsdl/nodemanager.wsdl``; a node manager is reached at
  the endpoint URL the agent advertised.  One call per node, at most
  ``parallelism`` at a time (:func:`~dsmt.server.slicemanager.calls.run_each`).
* **PsEPR** (:class:`PsEPRAgentCalls`, :class:`PsEPRNodeCalls`): the same
  WSDLs' PsEPR ports on a :class:`~dsmt.transports.psepr_soap.PsEPRTransport`.
  A step whose requests all carry the same arguments (``RenewLease``,
  ``AddKey``, ``DeleteSliver``…) is **one multicast** to the node managers'
  group channel, gathered from the named nodes until all answered or the
  timeout; other steps (``Redeem``: one ticket per node) are one call per node
  addressed by instance.  A node that does not answer in time is ``timeout``
  either way.

The per-node machinery is not the node managers' alone: :class:`HttpCalls` and
:class:`PsEPRCalls` run any :class:`NodeContract` (WSDL name, PsEPR address of
a node or of the group, reply converters, request check), and
:class:`HttpNodeCalls` / :class:`PsEPRNodeCalls` are them with
:data:`NODEMANAGER`; the deployment engines' adapters
(``dsmt.server.deployment.remote``) are them with the engines' contract.

Outcomes are the plain values of :mod:`~dsmt.server.slicemanager.calls`;
failures become :class:`NodeCallError` / :class:`AgentCallError` with the
fault's code below ``Client.`` (``AdmissionRefused.capacity``, ``NoLease``…),
or ``unreachable`` (connection refused, no route, DNS), ``timeout``, ``error``.

Signing: with ``cert``/``key`` every request is signed (WS-Security); with
``ca`` replies must be signed by a service certificate of that CA.

``make_calls(options)`` builds the pair ``svm`` uses from its
:class:`~dsmt.server.slicemanager.calls.CallOptions`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from twisted.internet import defer, error as net_error

from dsmt.server.contracts import Contract
from dsmt.server.slicemanager.calls import (
    ERROR, TIMEOUT, UNREACHABLE, AgentCallError, CallOptions, LeaseInfo, NodeAd, NodeCallError, NodeRequest,
    SliverInfo, as_call_error, check_request, run_each)
from dsmt.transports.soap import HTTP_TRANSPORT, PSEPR_TRANSPORT

__all__ = ["DEFAULT_TIMEOUT", "fault_code", "NodeContract", "NODEMANAGER", "HttpCalls", "PsEPRCalls",
           "gather_multicast", "HttpAgentCalls", "HttpNodeCalls", "PsEPRAgentCalls", "PsEPRNodeCalls", "make_calls",
           "signing_parts"]

#: Seconds a call may take when ``svm -t`` is not given: a node manager answers in milliseconds; a minute
#: covers a loaded machine and a slow network, and a dead node is still reported within the run.
DEFAULT_TIMEOUT = 60.0
NODEMANAGER_PSEPR_SERVICE = "nodemanager"
AGENT_PSEPR_SERVICE = "agent"

_UNREACHABLE_ERRORS = (net_error.ConnectError, net_error.DNSLookupError, net_error.ConnectionRefusedError,
                       net_error.NoRouteError, net_error.ConnectingCancelledError)


def fault_code(fault) -> str:
    """A zeep Fault's code below ``Client.``/``Server.``: ``soap:Client.AdmissionRefused.capacity`` →
    ``AdmissionRefused.capacity``; SOAP 1.2 subcodes joined with ``.``; ``error`` when there is none."""
    subcodes = getattr(fault, "subcodes", None)
    if subcodes:
        return ".".join(getattr(code, "localname", str(code)) for code in subcodes)
    code = str(getattr(fault, "code", "") or "")
    code = code.rsplit("}", 1)[-1].rsplit(":", 1)[-1]
    head, _, rest = code.partition(".")
    return rest or ERROR if head in ("Client", "Server", "Sender", "Receiver") else (code or ERROR)


def _failure(exc: BaseException, where: str, error_class):
    """Any exception of a call as ``error_class`` (NodeCallError or AgentCallError): never a traceback."""
    from zeep.exceptions import Fault, TransportError
    if isinstance(exc, error_class):
        return exc
    if isinstance(exc, Fault):
        return error_class(fault_code(exc), str(exc.message or "").strip() or "the service refused the call")
    if isinstance(exc, _UNREACHABLE_ERRORS):
        return error_class(UNREACHABLE, f"cannot reach {where}: {_reason(exc)}")
    if isinstance(exc, (defer.CancelledError, defer.TimeoutError, net_error.TimeoutError)):
        return error_class(TIMEOUT, f"no answer from {where} in time")
    if isinstance(exc, TransportError):
        return error_class(ERROR, f"{where} answered HTTP {exc.status_code}")
    if error_class is NodeCallError:
        return as_call_error(exc)
    text = str(exc).strip() or type(exc).__name__
    return error_class(ERROR, text[:300])


def _reason(exc: BaseException) -> str:
    if isinstance(exc, net_error.ConnectError) and exc.args and exc.args[0]:
        return str(exc.args[0]).strip()  # the system's sentence ("Connection refused"); osError is its number
    text = getattr(exc, "osError", None) or getattr(exc, "message", None) or str(exc)
    return str(text).strip() or type(exc).__name__


# ---------------------------------------------------------------- values

def _lease(value) -> LeaseInfo:
    return LeaseInfo(str(value.leaseId), str(value.ticketId), str(value.slice), str(value.node), int(value.slots),
                     int(value.grantedAt), int(value.expiresAt), int(value.leaselen))


def _sliver(value) -> SliverInfo:
    return SliverInfo(str(value.slice), str(value.node), str(value.state),
                      None if value.leaseId is None else str(value.leaseId),
                      None if value.expiresAt is None else int(value.expiresAt), int(value.keys))


#: How each node manager operation's reply becomes its outcome value.
_CONVERT: Mapping[str, Callable[[Any], Any]] = {
    "Redeem": _lease, "RenewLease": _lease,
    "CreateSliver": _sliver, "DeleteSliver": _sliver, "GetSliver": _sliver,
    "AddKey": int, "DelKey": int, "NukeKeys": int,
}


def _ads(values) -> list[NodeAd]:
    return [NodeAd(str(ad.node), int(ad.slots), int(ad.free), str(ad.endpoint or "")) for ad in values or ()]


def _tickets(values) -> list[bytes]:
    return [bytes(value) for value in values or ()]


def _spec_text(spec_xml: bytes) -> str:
    try:
        return spec_xml.decode("utf-8")
    except UnicodeDecodeError:
        raise AgentCallError("InvalidSpec", "the slice file is not UTF-8 text") from None


# ---------------------------------------------------------------- one contract, many nodes

@dataclass(frozen=True)
class NodeContract:
    """What the per-node adapters (:class:`HttpCalls`, :class:`PsEPRCalls`) need to know of a service that
    runs on many nodes: the node managers (:data:`NODEMANAGER`), the deployment engines
    (``dsmt.server.deployment.remote``).

    ``wsdl``: the committed WSDL's name; ``psepr_address(node)``: the ``psepr:`` address of the service on
    ``node``, and of every instance (the group) for ``None``; ``convert``: operation → function turning
    zeep's reply into the outcome value (a TypeError/ValueError/AttributeError/KeyError there makes the
    node's outcome an ``error``: the answer is not the operation's reply); ``check(operation, kwargs)``:
    raises ValueError for a request the contract does not allow (given to
    :func:`~dsmt.server.slicemanager.calls.run_each`); ``wire(operation, kwargs)``: the WSDL operation's
    keyword arguments for a request's (None: the request's as they are).
    """

    wsdl: str
    psepr_address: Callable[[str | None], str]
    convert: Mapping[str, Callable[[Any], Any]]
    check: Callable[[str, Mapping[str, Any]], None]
    wire: Callable[[str, Mapping[str, Any]], dict] | None = None

    def arguments(self, operation: str, kwargs: Mapping[str, Any]) -> dict:
        return dict(kwargs) if self.wire is None else self.wire(operation, kwargs)

    def outcome(self, operation: str, value, node: str):
        """The outcome value of ``node``'s reply ``value``, or a NodeCallError ``error`` when it is not one."""
        try:
            return self.convert[operation](value)
        except (TypeError, ValueError, AttributeError, KeyError):
            return NodeCallError(ERROR, f"{node} answered {operation} with something that is not its reply")


def _nodemanager_address(node: str | None = None) -> str:
    from dsmt.transports.psepr_soap import service_address
    return service_address(NODEMANAGER_PSEPR_SERVICE, node)


#: The node managers' contract (``wsdl/nodemanager.wsdl``; PsEPR service ``nodemanager``, instance = node).
NODEMANAGER = NodeContract("nodemanager", _nodemanager_address, _CONVERT, check_request)


# ---------------------------------------------------------------- zeep plumbing

def signing_parts(cert: str | None, key: str | None, ca: str | None):
    """(Signer or None, Verifier or None) from PEM files: requests signed with ``key``/``cert``; replies
    verified against ``ca`` (service certificates)."""
    from dsmt.transports.soap.pki import Purpose, TrustStore
    from dsmt.transports.soap.wssec import Signer, Verifier
    if (cert is None) != (key is None):
        raise ValueError("give both --cert and --key (to sign requests) or neither")
    signer = Signer.from_files(key, cert) if cert is not None else None
    verifier = Verifier(TrustStore.from_files(ca), purpose=Purpose.SERVER) if ca is not None else None
    return signer, verifier


# ---------------------------------------------------------------- HTTP

class HttpAgentCalls:
    """The agent at ``url`` (``http://agent:8090/agent``) over SOAP/HTTP."""

    def __init__(self, url: str, transport, *, timeout: float | None = None, reactor=None):
        self.url = url
        self.timeout = timeout
        self._reactor = reactor
        self._contract = Contract("agent", transport, HTTP_TRANSPORT)

    def _run(self, operation: str, kwargs, convert) -> defer.Deferred:
        call = self._contract.call(self.url, operation, kwargs)
        if self.timeout is not None:
            call.addTimeout(self.timeout, self._clock())
        call.addCallback(convert)
        return call.addErrback(lambda failure: defer.fail(_failure(failure.value, f"the agent at {self.url}",
                                                                    AgentCallError)))

    def _clock(self):
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    def getads(self) -> defer.Deferred:
        return self._run("GetAds", {}, _ads)

    def issue_tickets(self, spec_xml: bytes) -> defer.Deferred:
        try:
            spec = _spec_text(spec_xml)
        except AgentCallError as exc:
            return defer.fail(exc)
        return self._run("IssueTickets", {"spec": spec}, _tickets)

    def release(self, ticket_ids: Sequence[str]) -> defer.Deferred:
        return self._run("Release", {"ticketId": list(ticket_ids)}, int)


def _call_node(zeep: Contract, contract: NodeContract, operation: str, address: str,
               request: NodeRequest) -> defer.Deferred:
    """One node's call at ``address``: its outcome value, or a failure that is a NodeCallError."""
    call = zeep.call(address, operation, contract.arguments(operation, request.kwargs))
    call.addCallback(lambda value: contract.outcome(operation, value, request.node))
    return call.addErrback(lambda failure: defer.fail(_failure(failure.value, request.node, NodeCallError)))


class HttpCalls:
    """A :class:`NodeContract`'s service at each request's endpoint URL over SOAP/HTTP, one call per node
    (bounded by ``parallelism``)."""

    def __init__(self, contract: NodeContract, transport, *, reactor=None):
        self.contract = contract
        self._reactor = reactor
        self._zeep = Contract(contract.wsdl, transport, HTTP_TRANSPORT)

    def run(self, operation: str, requests: Sequence[NodeRequest], *, parallelism: int, timeout: float | None,
            on_result=None) -> defer.Deferred:
        contract = self.contract

        def call_one(request: NodeRequest) -> defer.Deferred:
            if not request.endpoint.startswith(("http://", "https://")):
                return defer.fail(NodeCallError(UNREACHABLE, f"no HTTP endpoint known for {request.node}"))
            return _call_node(self._zeep, contract, operation, request.endpoint, request)

        return run_each(call_one, operation, requests, parallelism=parallelism,
                        timeout=DEFAULT_TIMEOUT if timeout is None else timeout, on_result=on_result,
                        clock=self._reactor, check=contract.check)


class HttpNodeCalls(HttpCalls):
    """Node managers at their endpoint URLs over SOAP/HTTP, one call per node (bounded by ``parallelism``)."""

    def __init__(self, transport, *, reactor=None):
        super().__init__(NODEMANAGER, transport, reactor=reactor)


# ---------------------------------------------------------------- PsEPR

class PsEPRAgentCalls(HttpAgentCalls):
    """The agent over SOAP/PsEPR (the group channel ``/org/dsmt/ns/soap/agent/``; one agent answers)."""

    def __init__(self, transport, *, timeout: float | None = None, reactor=None):
        from dsmt.transports.psepr_soap import service_address
        self.url = service_address(AGENT_PSEPR_SERVICE)
        self.timeout = timeout
        self._reactor = reactor
        self._contract = Contract("agent", transport, PSEPR_TRANSPORT)


class PsEPRCalls:
    """A :class:`NodeContract`'s service over SOAP/PsEPR: one multicast to the group address for a step
    whose requests share their arguments, else one call per node addressed by instance (``to/instance`` =
    the node).  A node that does not answer within ``timeout`` is ``timeout`` either way."""

    def __init__(self, contract: NodeContract, transport, *, reactor=None):
        self.contract = contract
        self.transport = transport
        self._reactor = reactor
        self._zeep = Contract(contract.wsdl, transport, PSEPR_TRANSPORT)

    def run(self, operation: str, requests: Sequence[NodeRequest], *, parallelism: int, timeout: float | None,
            on_result=None) -> defer.Deferred:
        seconds = DEFAULT_TIMEOUT if timeout is None else timeout
        contract = self.contract
        if len(requests) > 1 and all(r.kwargs == requests[0].kwargs for r in requests):
            return self._multicast(operation, requests, seconds, on_result)

        def call_one(request: NodeRequest) -> defer.Deferred:
            return _call_node(self._zeep, contract, operation, contract.psepr_address(request.node), request)

        return run_each(call_one, operation, requests, parallelism=parallelism, timeout=seconds,
                        on_result=on_result, clock=self._reactor, check=contract.check)

    def _multicast(self, operation, requests, seconds, on_result) -> defer.Deferred:
        from dsmt.transports.psepr_soap import multicast_call
        contract = self.contract
        nodes = [request.node for request in requests]
        if len(set(nodes)) != len(nodes):
            raise ValueError("requests must name distinct nodes")
        for request in requests:
            contract.check(operation, request.kwargs)
        return gather_multicast(
            multicast_call(self.transport, self._zeep.at(contract.psepr_address(None)), operation,
                           kwargs=contract.arguments(operation, requests[0].kwargs), instances=nodes,
                           deadline=seconds),
            contract, operation, nodes, seconds, on_result)


def gather_multicast(call: defer.Deferred, contract: NodeContract, operation: str, nodes: Sequence[str],
                     seconds: float, on_result=None) -> defer.Deferred:
    """The ``NodeCalls.run`` outcomes of a ``multicast_call`` Deferred: each named node's converted value or
    NodeCallError (``timeout`` for a node that did not answer), ``on_result`` told per node; a failure of
    the call as a whole (router gone) is every node's error.  Never fails."""

    def gathered(results) -> dict:
        outcomes = {}
        for node in nodes:
            result = results.get(node)
            if result is None or result.outcome == "missing":
                outcome = NodeCallError(TIMEOUT, f"no answer from {node} in {seconds:g} s")
            elif result.outcome == "value":
                outcome = contract.outcome(operation, result.value, node)
            elif result.outcome == "fault":
                outcome = _failure(result.fault, node, NodeCallError)
            else:
                outcome = _failure(result.error, node, NodeCallError)
            outcomes[node] = outcome
            if on_result is not None:
                on_result(node, outcome)
        return outcomes

    def failed(failure) -> dict:
        error = _failure(failure.value, "the PsEPR router", NodeCallError)
        return gathered({node: None for node in nodes}) if error.code == TIMEOUT else \
            _all(nodes, error, on_result)

    return call.addCallbacks(gathered, failed)


class PsEPRNodeCalls(PsEPRCalls):
    """Node managers over SOAP/PsEPR: one multicast for a step whose requests share their arguments,
    else one call per node addressed by instance (``to/instance`` = the node)."""

    def __init__(self, transport, *, reactor=None):
        super().__init__(NODEMANAGER, transport, reactor=reactor)


def _all(nodes, error, on_result) -> dict:
    outcomes = {}
    for node in nodes:
        outcomes[node] = error
        if on_result is not None:
            on_result(node, error)
    return outcomes


# ---------------------------------------------------------------- svm's factory

def make_calls(options: CallOptions):
    """``(AgentCalls, NodeCalls, close)`` for ``svm``'s options: ``close()`` returns a Deferred that releases
    the connection pool or the PsEPR connection.  Must run inside the reactor (PsEPR connects)."""
    signer, verifier = signing_parts(options.cert, options.key, options.ca)
    if options.transport == "http":
        from dsmt.transports.http import TreqTransport
        from dsmt.transports.soap.wssec import AsyncSigningTransport
        treq = TreqTransport(timeout=options.timeout or DEFAULT_TIMEOUT)
        transport = AsyncSigningTransport(treq, signer, verifier) if signer is not None else treq
        if options.agent_url is None:
            raise ValueError("the HTTP transport needs the agent's URL (--agent http://host:port/agent)")
        agent = HttpAgentCalls(options.agent_url, transport, timeout=options.timeout)
        return agent, HttpNodeCalls(transport), lambda: defer.ensureDeferred(treq.aclose())
    if options.transport == "psepr":
        return _psepr_calls(options, signer, verifier)
    raise ValueError(f"unknown transport {options.transport!r} (http or psepr)")


def _psepr_calls(options: CallOptions, signer, verifier):
    import os

    from dsmt.transports.psepr.accounts import read_password
    from dsmt.transports.psepr.client import PsEPRConnection
    from dsmt.transports.psepr_soap import PsEPRTransport
    if not options.router:
        raise ValueError("the PsEPR transport needs a router (--router psepr://host:port)")
    connection = PsEPRConnection.from_urls(options.router, service=options.psepr_service or "svm",
                                           instance=f"svm-{os.getpid()}",
                                           password=read_password(options.password_file))
    transport = PsEPRTransport(connection, timeout=options.timeout or DEFAULT_TIMEOUT, signer=signer,
                               verifier=verifier)
    ready = connection.connect(retry=False).addCallback(lambda _: transport.start())
    agent = _Deferring(PsEPRAgentCalls(transport, timeout=options.timeout), ready)
    nodes = _Deferring(PsEPRNodeCalls(transport), ready)

    def close() -> defer.Deferred:
        transport.close()
        connection.close()
        return defer.succeed(None)
    return agent, nodes, close


class _Deferring:
    """Delays every call on ``target`` until ``ready`` fired (the PsEPR login and reply lease);
    a failed connection fails each call as ``unreachable``."""

    def __init__(self, target, ready: defer.Deferred):
        self._target = target
        self._ready = ready
        self._outcome: list = []
        ready.addBoth(self._settled)

    def _settled(self, result):
        self._outcome.append(result)
        return None

    def _when_ready(self) -> defer.Deferred:
        waiter = defer.Deferred()

        def check():
            result = self._outcome[0]
            if isinstance(result, BaseException) or hasattr(result, "value") and hasattr(result, "trap"):
                error = getattr(result, "value", result)
                waiter.errback(AgentCallError(UNREACHABLE, f"cannot reach the PsEPR router: {_reason(error)}"))
            else:
                waiter.callback(None)
        if self._outcome:
            check()
        else:
            self._ready.addBoth(lambda result: (check(), result)[1])
        return waiter

    def __getattr__(self, name):
        method = getattr(self._target, name)

        def deferred(*args, **kwargs):
            waiting = self._when_ready()
            if name == "run":
                requests = args[1] if len(args) > 1 else kwargs["requests"]

                def unreachable(failure):
                    error = NodeCallError(failure.value.code, failure.value.reason)
                    return _all([r.node for r in requests], error, kwargs.get("on_result"))
                return waiting.addCallbacks(lambda _: method(*args, **kwargs), unreachable)
            return waiting.addCallback(lambda _: method(*args, **kwargs))
        return deferred
