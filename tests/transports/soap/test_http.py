"""SOAP over HTTP on real sockets (127.0.0.1, kernel-chosen ports): zeep clients, WSDL, limits, TLS.

Synchronous zeep clients (requests) run in threads (``deferToThread``) so the
trial reactor keeps serving; asynchronous ones use ``TreqTransport``.  Broken
requests go over a raw TCP connection, so the bytes on the wire are exactly
the test's.  Nothing sleeps: every wait is on a Deferred.
"""
from __future__ import annotations

import datetime
import gc
import ipaddress
import os
import socket

import treq
import zeep
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from spyne import ServiceBase, Unicode, rpc
from twisted.internet import defer, protocol, reactor, ssl, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.protocols import policies
from twisted.trial import unittest
from twisted.web.client import BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.resource import Resource
from zeep.plugins import Plugin
from zope.interface import implementer

from dsmt.transports.http import OVERSIZE_DRAIN_BYTES, SoapResource, SoapSite, TreqTransport
from dsmt.transports.soap import addressing
from dsmt.transports.soap.core import SOAP11, SOAP12, WSAM_NS, SoapCore, SoapLimits
from dsmt.transports.soap.zeepsupport import make_client
from tests.transports.soap.service import (
    CLIENT_FAULTS, SECRET, TNS, TOKEN, FaultView, RequireToken, assert_core_fault, envelope, make_core)

#: The request body cap of the test site (small, so oversized requests stay cheap).
LIMIT = 64 * 1024
POINTS = [{"x": 1, "y": 2, "label": "a & b"}, {"x": -3, "y": 4, "label": None}]


class Gate:
    """Lets a test hold an operation open: ``arrived`` fires when the call starts, ``release`` answers it."""

    def __init__(self):
        self.arrived, self.release = defer.Deferred(), defer.Deferred()


GATES: list[Gate] = []


class GateService(ServiceBase):
    @rpc(Unicode, _returns=Unicode)
    def wait(ctx, text):
        gate = GATES[-1]
        gate.arrived.callback(None)
        return gate.release


class Tracked(policies.ProtocolWrapper):
    def connectionMade(self):
        self.lost = defer.Deferred()
        super().connectionMade()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.lost.callback(None)


@implementer(IProtocolNegotiationFactory)
class Tracking(policies.WrappingFactory):
    """Wraps the site to know its live connections, so tearDown can close them and wait.

    It passes on the site's ALPN protocols: on a TLS port, Twisted 26 answers a
    client offering ALPN (curl, requests) with an internal-error alert when the
    factory offers none.
    """

    protocol = Tracked

    def acceptableProtocols(self):
        return self.wrappedFactory.acceptableProtocols()


class RawClient(protocol.Protocol):
    """Writes the test's bytes; splits what comes back into (status, headers, body) responses."""

    def __init__(self):
        self.buffer = b""
        self.responses: list[tuple[int, dict[str, str], bytes]] = []
        self.closed = defer.Deferred()
        self._waiters: list[tuple[int, defer.Deferred]] = []

    def dataReceived(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {name.strip().lower(): value.strip() for name, _, value in (l.partition(":") for l in lines[1:])}
            length = int(headers.get("content-length", 0))
            if len(rest) < length:
                return
            self.responses.append((int(lines[0].split()[1]), headers, rest[:length]))
            self.buffer = rest[length:]
        for count, waiter in list(self._waiters):
            if len(self.responses) >= count:
                self._waiters.remove((count, waiter))
                waiter.callback(self.responses)

    def connectionLost(self, reason):
        for _, waiter in self._waiters:
            waiter.errback(AssertionError(f"closed after {len(self.responses)} responses"))
        self.closed.callback(None)

    def until(self, count: int) -> defer.Deferred:
        """Fires once ``count`` responses have arrived."""
        if len(self.responses) >= count:
            return defer.succeed(self.responses)
        waiter = defer.Deferred()
        self._waiters.append((count, waiter))
        return waiter


def post_bytes(path: str, body: bytes, *, content_type: str = "text/xml; charset=utf-8", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def self_signed(directory) -> tuple[str, str, bytes]:
    """A key and a certificate for 127.0.0.1 (files in ``directory``); returns (key path, cert path, cert PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_path, cert_path = f"{directory}/key.pem", f"{directory}/cert.pem"
    with open(key_path, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    with open(cert_path, "wb") as handle:
        handle.write(pem)
    return key_path, cert_path, pem


class Capture(Plugin):
    """zeep plugin keeping the last request and reply envelopes."""

    def egress(self, envelope, http_headers, operation, binding_options):
        self.request = envelope
        return envelope, http_headers

    def ingress(self, envelope, http_headers, operation):
        self.reply = envelope
        return envelope, http_headers


class Harness(unittest.TestCase):
    """A SoapSite on 127.0.0.1 with: /echo11 (SOAP 1.1, public URL configured: ``localhost``), /echo12 (SOAP 1.2),
    /guarded (SOAP 1.2 behind RequireToken), /gate (an operation the test answers)."""

    timeout = 30
    endpoint = "tcp:0:interface=127.0.0.1"

    @defer.inlineCallbacks
    def setUp(self):
        root = Resource()
        limits = SoapLimits(max_envelope_bytes=LIMIT)
        self.public = SoapResource(make_core(SOAP11, limits=limits))
        root.putChild(b"echo11", self.public)
        root.putChild(b"echo12", SoapResource(make_core(SOAP12, limits=limits)))
        root.putChild(b"guarded", SoapResource(make_core(SOAP12, filters=[RequireToken()])))
        root.putChild(b"gate", SoapResource(SoapCore([GateService], TNS, "Gate")))
        self.tracking = Tracking(SoapSite(root, max_request_bytes=LIMIT))
        self.port = yield serverFromString(reactor, self.server_endpoint()).listen(self.tracking)
        # the configured public address differs from the one requests use (127.0.0.1) but reaches us
        self.public.public_url = self.base.replace("127.0.0.1", "localhost") + "/echo11"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.transports: list[TreqTransport] = []

    def server_endpoint(self) -> str:
        return self.endpoint

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    @defer.inlineCallbacks
    def tearDown(self):
        for transport in self.transports:
            yield transport.aclose()
        yield self.port.stopListening()
        live = list(self.tracking.protocols)
        for connection in live:
            connection.transport.abortConnection()
        yield defer.gatherResults([connection.lost for connection in live])

    # ------------------------------------------------------------ helpers

    def zeep_client(self, path: str, **options) -> zeep.Client:
        """A synchronous zeep client (call from a thread)."""
        return zeep.Client(f"{self.base}{path}?wsdl", **options)

    def treq_transport(self, **options) -> TreqTransport:
        transport = TreqTransport(**options)
        self.transports.append(transport)
        return transport

    @defer.inlineCallbacks
    def post(self, path: str, body: bytes, content_type: str = "text/xml; charset=utf-8"):
        response = yield treq.post(self.base + path, data=body, headers={"Content-Type": content_type},
                                   pool=self.pool)
        content = yield response.content()
        return response.code, response.headers.getRawHeaders("content-type", [None])[0], content

    @defer.inlineCallbacks
    def raw(self, data: bytes = b"") -> RawClient:
        client = RawClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), client)
        client.transport.write(data)
        return client


class SoapOverHttp(Harness):

    # ------------------------------------------------------------ zeep clients

    @defer.inlineCallbacks
    def test_zeep_sync_clients_in_both_versions(self):
        def calls(path: str) -> dict:
            client = self.zeep_client(path)
            try:
                shape = client.service.echo({"name": "tri", "points": {"Point": POINTS}})
                results = {"echo": [(p.x, p.y, p.label) for p in shape.points.Point], "name": shape.name,
                           "repeat": client.service.repeat("ab", 2), "later": client.service.later("soon"),
                           "reverse": client.service.reverse("abc")}
                for operation, args in (("spend", (20,)), ("crash", ())):
                    try:
                        getattr(client.service, operation)(*args)
                    except zeep.exceptions.Fault as fault:
                        results[operation] = fault
                return results
            finally:
                client.transport.session.close()

        for path, version in (("/echo11", SOAP11), ("/echo12", SOAP12)):
            results = yield threads.deferToThread(calls, path)
            self.assertEqual(results["echo"], [(1, 2, "a & b"), (-3, 4, None)])
            self.assertEqual((results["name"], results["repeat"], results["later"], results["reverse"]),
                             ("tri", ["ab", "ab"], "SOON", "cba"))
            quota, crash = results["spend"], results["crash"]
            self.assertEqual(quota.message, "the quota of 10 is exceeded")
            self.assertEqual(quota.detail.find(f".//{{{TNS}}}limit").text, "10")
            if version is SOAP11:
                self.assertEqual(quota.code, "soap:Client.QuotaExceeded")
            else:
                self.assertEqual((quota.code, quota.subcodes), ("soap:Sender", [etree.QName(TNS, "QuotaExceeded")]))
            self.assertNotIn(SECRET, crash.message)
            self.assertIn(crash.code, ("soap:Server.InternalError", "soap:Receiver"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    @defer.inlineCallbacks
    def test_async_client_over_treq(self):
        transport = self.treq_transport()
        client = make_client((yield transport.fetch(f"{self.base}/echo12?wsdl")), transport, asynchronous=True)
        texts = [f"text{n}" for n in range(20)]
        results = yield defer.gatherResults(
            [defer.ensureDeferred(client.service.reverse(text)) for text in texts]
            + [defer.ensureDeferred(client.service.later("x")),
               defer.ensureDeferred(client.service.echo({"name": "n", "points": {"Point": POINTS}}))])
        self.assertEqual(results[:20], [text[::-1] for text in texts])
        self.assertEqual(results[20], "X")
        self.assertEqual([p.label for p in results[21].points.Point], ["a & b", None])
        with self.assertRaises(zeep.exceptions.Fault) as caught:
            yield defer.ensureDeferred(client.service.spend(11))
        self.assertEqual(caught.exception.subcodes, [etree.QName(TNS, "QuotaExceeded")])

    def test_treq_transport_never_loads_synchronously(self):
        with self.assertRaises(zeep.exceptions.TransportError) as caught:
            self.treq_transport().load(f"{self.base}/echo12?wsdl")
        self.assertIn("fetch() it first", str(caught.exception))

    @defer.inlineCallbacks
    def test_filter_identity_reaches_the_method(self):
        def calls():
            client = self.zeep_client("/guarded")
            token = etree.Element(TOKEN)
            token.text = "operator@example.org"
            try:
                try:
                    client.service.whoami()
                except zeep.exceptions.Fault as fault:
                    refused = fault
                return refused, client.service.whoami(_soapheaders=[token])
            finally:
                client.transport.session.close()

        refused, caller = yield threads.deferToThread(calls)
        self.assertEqual((refused.message, refused.subcodes), ("a Token header is required",
                                                               [etree.QName(TNS, "NoToken")]))
        self.assertEqual(caller, "operator@example.org")

    @defer.inlineCallbacks
    def test_ws_addressing_round_trip(self):
        def call(path: str):
            capture = Capture()
            client = self.zeep_client(path, plugins=[capture])
            try:
                client.service.repeat("a", 1)
                return capture, etree.fromstring(client.transport.session.get(f"{self.base}{path}?wsdl").content)
            finally:
                client.transport.session.close()

        for path in ("/echo11", "/echo12"):
            capture, wsdl = yield threads.deferToThread(call, path)
            request = addressing.read_headers(capture.request)
            reply = addressing.read_headers(capture.reply)
            output = wsdl.find(".//{http://schemas.xmlsoap.org/wsdl/}portType/*[@name='repeat']/"
                               "{http://schemas.xmlsoap.org/wsdl/}output").get("{%s}Action" % WSAM_NS)
            self.assertTrue(request.message_id.startswith("urn:uuid:"))  # zeep adds them: the WSDL has Actions
            self.assertEqual(reply.relates_to, request.message_id)
            self.assertEqual(reply.action, output)
            self.assertEqual(reply.action, f"{TNS}/EchoService/repeatResponse")
            self.assertNotEqual(reply.message_id, request.message_id)

    # ------------------------------------------------------------ WSDL and methods

    @defer.inlineCallbacks
    def test_wsdl_carries_the_public_address(self):
        ns = {"wsdl": "http://schemas.xmlsoap.org/wsdl/", "s11": "http://schemas.xmlsoap.org/wsdl/soap/",
              "s12": "http://schemas.xmlsoap.org/wsdl/soap12/"}
        for path, query, expected in (("/echo11", "wsdl", self.public.public_url),
                                      ("/echo12", "WSDL", f"{self.base}/echo12")):
            response = yield treq.get(f"{self.base}{path}?{query}", pool=self.pool)
            self.assertEqual((response.code, response.headers.getRawHeaders("content-type")),
                             (200, ["text/xml; charset=utf-8"]))
            document = etree.fromstring((yield response.content()))
            self.assertEqual(document.xpath("//wsdl:port/*/@location", namespaces=ns), [expected])

    @defer.inlineCallbacks
    def test_other_methods_are_405(self):
        for method in ("PUT", "DELETE", "PATCH"):
            response = yield treq.request(method, f"{self.base}/echo12", data=b"x", pool=self.pool)
            yield response.content()
            self.assertEqual(response.code, 405, method)
            self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, POST"])
        response = yield treq.get(f"{self.base}/echo12", pool=self.pool)
        yield response.content()
        self.assertEqual((response.code, response.headers.getRawHeaders(b"allow")), (405, [b"POST"]))

    # ------------------------------------------------------------ faults and status codes

    @defer.inlineCallbacks
    def test_broken_requests_get_precise_faults(self):
        for path, version in (("/echo11", SOAP11), ("/echo12", SOAP12)):
            for case, (request, subcode, reason) in CLIENT_FAULTS.items():
                status, content_type, body = yield self.post(path, request(version))
                self.assertEqual((status, content_type), (500 if version is SOAP11 else 400, version.content_type),
                                 case)
                assert_core_fault(body, version, subcode, *reason)

    @defer.inlineCallbacks
    def test_status_codes(self):
        status, _, _ = yield self.post("/echo12", envelope("<t:reverse><t:text>a</t:text></t:reverse>", SOAP12))
        self.assertEqual(status, 200)
        status, _, body = yield self.post("/echo12", envelope("<t:crash/>", SOAP12))
        self.assertEqual((status, FaultView(body).code), (500, "Receiver"))
        status, content_type, body = yield self.post("/echo12", envelope("<t:crash/>", SOAP11))
        self.assertEqual((status, content_type, FaultView(body).code), (500, SOAP11.content_type, "VersionMismatch"))
        self.flushLoggedErrors(RuntimeError)

    # ------------------------------------------------------------ request size

    def big_request(self, version, size: int) -> bytes:
        return envelope(f"<t:repeat><t:word>{'w' * size}</t:word><t:times>1</t:times></t:repeat>", version)

    @defer.inlineCallbacks
    def test_declared_oversize_is_drained_then_faulted_and_the_connection_kept(self):
        big = self.big_request(SOAP12, LIMIT)
        client = yield self.raw(post_bytes("/echo12", big, content_type=SOAP12.content_type))
        yield client.until(1)
        status, headers, body = client.responses[0]
        self.assertEqual(status, 400)
        assert_core_fault(body, SOAP12, "EnvelopeTooLarge", f"is {len(big)} bytes, over the limit of {LIMIT} bytes")
        client.transport.write(post_bytes("/echo12", self.big_request(SOAP12, 10), content_type=SOAP12.content_type))
        yield client.until(2)
        self.assertEqual(client.responses[1][0], 200)  # keep-alive: the same connection serves the next call
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_chunked_oversize_is_faulted_while_reading(self):
        big = self.big_request(SOAP11, 3 * LIMIT)
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 8192]), big[i:i + 8192]) for i in range(0, len(big), 8192))
        client = yield self.raw(b"POST /echo11 HTTP/1.1\r\nHost: h\r\nContent-Type: text/xml\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
        yield client.until(1)
        status, _, body = client.responses[0]
        self.assertEqual(status, 500)
        assert_core_fault(body, SOAP11, "EnvelopeTooLarge", f"more than {LIMIT} bytes")
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_zeep_sending_too_much_gets_the_fault(self):
        def call():
            client = self.zeep_client("/echo11")
            try:
                client.service.repeat("w" * LIMIT, 1)
            except zeep.exceptions.Fault as fault:
                return fault
            finally:
                client.transport.session.close()

        fault = yield threads.deferToThread(call)
        self.assertEqual(fault.code, "soap:Client.EnvelopeTooLarge")

    @defer.inlineCallbacks
    def test_absurd_content_length_is_cut_off(self):
        client = yield self.raw(b"POST /echo11 HTTP/1.1\r\nHost: h\r\nContent-Type: text/xml\r\n"
                                b"Content-Length: %d\r\n\r\n<s:Envelope" % (LIMIT + OVERSIZE_DRAIN_BYTES + 1))
        yield client.closed
        self.assertEqual(client.responses, [])

    @defer.inlineCallbacks
    def test_content_length_shorter_than_the_body_is_never_half_processed(self):
        request = envelope("<t:reverse><t:text>abc</t:text></t:reverse>", SOAP11)
        lie = post_bytes("/echo11", request).replace(b"Content-Length: %d" % len(request),
                                                     b"Content-Length: %d" % (len(request) - 20))
        client = yield self.raw(lie)
        yield client.until(1)
        status, _, body = client.responses[0]
        self.assertEqual(status, 500)
        assert_core_fault(body, SOAP11, "BadXML", "not well-formed")  # the cut envelope is refused, not run
        client.transport.write(b"\r\n")  # ends the 20 left-over bytes' "request line": no HTTP request
        yield client.closed
        self.assertEqual([status for status, _, _ in client.responses], [500, 400])

    # ------------------------------------------------------------ connections

    @defer.inlineCallbacks
    def test_keep_alive_and_tcp_nodelay(self):
        request = post_bytes("/echo11", envelope("<t:reverse><t:text>abc</t:text></t:reverse>"))
        client = yield self.raw(request + request)
        yield client.until(2)
        self.assertEqual([status for status, _, _ in client.responses], [200, 200])
        (server_side,) = self.tracking.protocols
        self.assertTrue(server_side.transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_a_client_gone_before_the_reply_is_no_error(self):
        gate = Gate()
        GATES.append(gate)
        request = envelope("<t:wait><t:text>x</t:text></t:wait>")
        client = yield self.raw(post_bytes("/gate", request))
        yield gate.arrived
        client.transport.abortConnection()
        yield client.closed
        yield defer.gatherResults([connection.lost for connection in list(self.tracking.protocols)])
        gate.release.callback("late")  # the reply has nowhere to go: dropped without an error
        gc.collect()  # an error left in a Deferred is logged when the Deferred is collected
        self.assertEqual(self.flushLoggedErrors(), [])
        status, _, body = yield self.post("/echo11", envelope("<t:reverse><t:text>ok</t:text></t:reverse>"))
        self.assertEqual(status, 200)


class SoapOverTls(Harness):
    """The same site behind TLS, configured with a strports endpoint string; clients trust its certificate."""

    def server_endpoint(self) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        self.key, self.cert, pem = self_signed(directory)
        self.policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(pem))
        return f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port.getHost().port}"

    @defer.inlineCallbacks
    def test_zeep_over_tls_with_the_wsdl_address_from_the_request(self):
        def call():
            transport = zeep.Transport()
            transport.session.verify = self.cert
            transport.session.trust_env = False  # else REQUESTS_CA_BUNDLE, when set, overrides verify
            client = zeep.Client(f"{self.base}/echo12?wsdl", transport=transport)
            try:
                return client.service.reverse("tls"), client.service._binding_options["address"]
            finally:
                transport.session.close()

        self.assertEqual((yield threads.deferToThread(call)), ("slt", f"{self.base}/echo12"))

    @defer.inlineCallbacks
    def test_treq_transport_over_tls(self):
        transport = self.treq_transport(tls_policy=self.policy)
        client = make_client((yield transport.fetch(f"{self.base}/echo12?wsdl")), transport, asynchronous=True)
        self.assertEqual((yield defer.ensureDeferred(client.service.later("tls"))), "TLS")
