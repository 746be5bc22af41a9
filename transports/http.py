"""SOAP over HTTP, both ends: a ``twisted.web`` resource per service, and zeep's transport over treq.

Server.  :class:`SoapResource` serves one :class:`~dsmt.transports.soap.core.SoapCore`:

* ``POST`` — a SOAP request; the reply is the core's response, HTTP status per
  the SOAP HTTP bindings (:func:`http_status`).
* ``GET …?wsdl`` — the WSDL, its port's address being the configured
  ``public_url`` (what clients must use, e.g. behind a proxy or TLS
  terminator) or, when none is configured, the URL the request was sent to.
* anything else — ``405 Method Not Allowed`` with an ``Allow`` header (a
  ``GET`` without ``?wsdl`` too, with ``Allow: POST``).

Mount resources on a :class:`SoapSite` and listen with a strports endpoint
string, which is also how TLS is configured::

    root = Resource(); root.putChild(b"echo", SoapResource(core, public_url="https://h:8443/echo"))
    serverFromString(reactor, "ssl:8443:privateKey=key.pem:certKey=cert.pem").listen(SoapSite(root))

Connections are persistent (HTTP/1.1 keep-alive) and Twisted's HTTP channel
sets TCP_NODELAY on them (without it, Nagle's algorithm adds ~40 ms to every
request/reply round trip).  :class:`SoapSite` caps each request body *while it
is read*: a ``Content-Length`` over the cap is refused before any byte is
buffered, a body without one (chunked) stops being buffered the moment it
passes the cap.  Either way the rest is read and discarded, then answered with
the ``EnvelopeTooLarge`` fault — a client that sends its whole body before
reading gets the fault, not a reset connection.  Past
:data:`OVERSIZE_DRAIN_BYTES` of excess the connection is aborted instead.  A
resource mounted on a plain ``Site`` still answers oversized envelopes with the
same fault (the core checks), after Twisted buffered them.

Status codes: a reply is 200; a fault is 500, except a SOAP 1.2 ``Sender``
fault, which is 400 (SOAP 1.2 part 2 §7.5.2.2; SOAP 1.1 faults are always 500,
WS-I Basic Profile R1126).  An oversized request therefore gets 500 (1.1) or
400 (1.2), not 413: SOAP clients look for the fault, and the fault names the
problem precisely.

Client.  :class:`TreqTransport` lets ``zeep.AsyncClient`` call services from
inside a running reactor: its ``post_xml`` is a coroutine awaiting treq, so
``defer.ensureDeferred(client.service.op(...))`` gives a Deferred and never
blocks the reactor.  zeep loads WSDL synchronously, so this transport refuses
to load anything over the network: fetch the WSDL first with
:meth:`TreqTransport.fetch` and build the client from the bytes
(``zeepsupport.make_client``).  Scripts use plain zeep (requests) instead.

The module is ``dsmt.transports.http``, DESIGN.md's name.  It does not shadow
the standard library's ``http`` package: imports are absolute, and the
``transports`` folder is never put on ``sys.path`` itself.
"""
from __future__ import annotations

import io

from requests import Response
from requests.structures import CaseInsensitiveDict
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from treq.client import HTTPClient
from zeep.exceptions import TransportError
from zeep.transports import Transport
from zeep.wsdl.utils import etree_to_string

from dsmt.transports.soap.core import MAX_ENVELOPE_BYTES, SOAP12, SoapCore, SoapFault, SoapResponse, envelope_too_large

__all__ = ["SoapResource", "SoapSite", "LimitedRequest", "TreqTransport", "http_status", "OVERSIZE_DRAIN_BYTES",
           "CALL_TIMEOUT", "PERSISTENT_CONNECTIONS_PER_HOST"]

log = Logger(namespace="dsmt.soap.http")

#: Excess body bytes read and discarded after the cap before the connection is
#: aborted.  A client that merely overshoots still receives its fault; one that
#: announces or streams far more costs at most this much bandwidth, no memory.
OVERSIZE_DRAIN_BYTES = 16 * 1024 * 1024
#: Seconds a client call may take before it fails.  Every planned operation
#: answers in seconds (a sliver creation is the slowest); a minute means the
#: service or the network is gone.
CALL_TIMEOUT = 60.0
#: Idle connections a client keeps per host.  treq's pool keeps 2 by default,
#: so 20 concurrent calls to one service (a deployment engine's fan-in, the
#: benchmark's load) would reconnect 18 times per round; 20 keeps them all.
PERSISTENT_CONNECTIONS_PER_HOST = 20

_WSDL_CONTENT_TYPE = b"text/xml; charset=utf-8"


def http_status(response: SoapResponse) -> int:
    """The HTTP status of a SOAP response: 200, or for a fault 400 (SOAP 1.2 Sender) or 500."""
    if response.fault is None:
        return 200
    if response.version is SOAP12 and response.fault.code == SoapFault.SENDER:
        return 400
    return 500


class SoapResource(resource.Resource):
    """One SOAP service over HTTP (see the module docstring).  ``public_url``: the address written in the
    WSDL; None means the URL of each ``?wsdl`` request.  Never name an attribute ``server``: ``putChild``
    overwrites it."""

    def __init__(self, core: SoapCore, *, public_url: str | None = None):
        super().__init__()
        self.core = core
        self.public_url = public_url

    def render(self, request: server.Request):
        if request.method not in (b"GET", b"HEAD", b"POST"):  # Twisted would answer 501 to methods it doesn't know
            return _not_allowed(request, b"GET, POST")
        return super().render(request)

    def render_POST(self, request: server.Request):
        refusal = getattr(request, "refusal", None)
        if refusal is not None:
            return self._write(request, self.core.fault_response(refusal))
        answer = self.core.process(request.content.read(), content_type=_header(request, b"content-type"),
                                   peer=request.getClientAddress())
        if answer.called:  # answered within process() (no Deferred in the operation): write it as any resource
            return self._write(request, answer.result)
        gone: list = []  # holds the reason once the client has disconnected
        request.notifyFinish().addErrback(gone.append)
        answer.addCallback(self._finish, request, gone)
        return server.NOT_DONE_YET

    def render_GET(self, request: server.Request):
        query = request.uri.partition(b"?")[2]  # request.args drops a bare "wsdl": no "="
        if not any(item.partition(b"=")[0].lower() == b"wsdl" for item in query.split(b"&")):
            return _not_allowed(request, b"POST")
        address = self.public_url or request.prePathURL().decode("ascii")
        request.setHeader(b"content-type", _WSDL_CONTENT_TYPE)
        return self.core.wsdl(address)

    def _write(self, request: server.Request, response: SoapResponse) -> bytes:
        request.setResponseCode(http_status(response))
        request.setHeader(b"content-type", response.content_type.encode("ascii"))
        return response.body

    def _finish(self, response: SoapResponse, request: server.Request, gone: list) -> None:
        if gone:
            return
        body = self._write(request, response)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()


def _not_allowed(request: server.Request, allow: bytes) -> bytes:
    request.setResponseCode(405)
    request.setHeader(b"allow", allow)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return b"405 Method Not Allowed: this SOAP endpoint takes POST (SOAP requests) and GET ?wsdl\n"


def _header(request: server.Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


class LimitedRequest(server.Request):
    """A request whose body is capped at its site's ``max_request_bytes`` while it is read.

    Over the cap, ``refusal`` is set to the ``EnvelopeTooLarge`` fault, what
    was buffered is dropped and the rest is discarded as it arrives (the
    resource answers the fault once the body is complete); past
    :data:`OVERSIZE_DRAIN_BYTES` of excess the connection is aborted.
    """

    refusal: SoapFault | None = None
    _received = 0
    _aborted = False

    def __init__(self, channel, *args, **kwargs):
        # A SOAP body is never a form: skip Twisted's form detection, which parses every POST's
        # Content-Type with the email package (~70 µs, twice what the rest of a small request costs).
        super().__init__(channel, *args, parsePOSTFormSubmission=False, **kwargs)

    @property
    def _limit(self) -> int:
        return self.channel.site.max_request_bytes

    def gotLength(self, length):
        if length is not None and length > self._limit:
            self._refuse(envelope_too_large(self._limit, length))
            if length - self._limit > OVERSIZE_DRAIN_BYTES:
                self._abort(length)
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data):
        self._received += len(data)
        if self.refusal is None and self._received > self._limit:
            self._refuse(envelope_too_large(self._limit))
        if self.refusal is None:
            super().handleContentChunk(data)
        elif self._received - self._limit > OVERSIZE_DRAIN_BYTES:
            self._abort(self._received)

    def _refuse(self, fault: SoapFault) -> None:
        self.refusal = fault
        self.content = io.BytesIO()

    def _abort(self, size: int) -> None:
        if not self._aborted:
            self._aborted = True
            log.warn("aborting a connection from {peer}: its request body is {size} bytes",
                     peer=self.getClientAddress(), size=size)
            self.channel.transport.abortConnection()


class SoapSite(server.Site):
    """A ``Site`` whose requests cap their bodies at ``max_request_bytes`` while reading them.

    Set the cap to the largest ``max_envelope_bytes`` of the cores mounted on
    it (each core still enforces its own).
    """

    requestFactory = LimitedRequest

    def __init__(self, root: resource.Resource, *, max_request_bytes: int = MAX_ENVELOPE_BYTES, **options):
        super().__init__(root, **options)
        self.max_request_bytes = max_request_bytes


class TreqTransport(Transport):
    """zeep transport for ``zeep.AsyncClient`` inside a reactor: POSTs through treq, Deferreds awaited.

    One persistent connection pool per transport (HTTP/1.1 keep-alive, up to
    :data:`PERSISTENT_CONNECTIONS_PER_HOST` idle connections per host, and
    TCP_NODELAY, which Twisted's HTTP client sets).  ``tls_policy`` is the
    Agent's ``contextFactory`` (default: verify against the system's CAs).
    Calls fail after ``timeout`` seconds.  Call :meth:`aclose` (or use the
    client as an async context manager) to close the pool.
    """

    def __init__(self, *, reactor=None, tls_policy=None, timeout: float = CALL_TIMEOUT):
        super().__init__(operation_timeout=timeout)
        if reactor is None:
            from twisted.internet import reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = PERSISTENT_CONNECTIONS_PER_HOST
        self.http = HTTPClient(Agent(reactor, contextFactory=tls_policy or BrowserLikePolicyForHTTPS(), pool=self.pool))

    async def post_xml(self, address, envelope, headers) -> Response:
        response = await self.http.post(address, data=etree_to_string(envelope), headers=headers,
                                        timeout=self.operation_timeout)
        reply = Response()
        reply._content = await response.content()
        reply.status_code = response.code
        reply.headers = CaseInsensitiveDict({name.decode("latin-1"): values[-1].decode("latin-1")
                                             for name, values in response.headers.getAllRawHeaders()})
        return reply

    async def fetch(self, url: str) -> bytes:
        """GET ``url`` (a WSDL, ``…?wsdl``) without blocking the reactor; TransportError unless 200."""
        response = await self.http.get(url, timeout=self.operation_timeout)
        content = await response.content()
        if response.code != 200:
            raise TransportError(f"GET {url}: HTTP {response.code}", status_code=response.code, content=content)
        return content

    def _load_remote_data(self, url):
        raise TransportError(f"not loading {url} synchronously inside the reactor: fetch() it first and build "
                             "the client from the bytes")

    async def aclose(self) -> None:
        await self.pool.closeCachedConnections()

