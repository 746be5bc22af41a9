"""SOAP over PsEPR through a real in-process router: zeep clients, the reply cache, WS-Security, limits,
hostile payloads and multicast to 20 instances.

Every wait is on a Deferred; timeouts use ``task.Clock``; only the multicast deadline test uses a short
real deadline (the instances that never answer are what it waits for).
"""
from __future__ import annotations

import zeep.exceptions
from lxml import etree
from spyne import Fault, Integer, ServiceBase, Unicode, rpc
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from dsmt.transports.psepr.event import Event, OpaquePayload
from dsmt.transports.psepr_soap import (
    GUARANTEED_ENVELOPE_BYTES, MAX_ESCAPED_ENVELOPE_BYTES, PAYLOAD_NS, CallTimeout, EnvelopeTooLarge,
    PayloadError, PsEPRSoapEndpoint, PsEPRTransport, ReplyCache, ReplyToPlugin, decode_payload, encode_payload, escaped_size,
    multicast_call, parse_address, service_address, service_channel)
from dsmt.transports.soap import PSEPR_TRANSPORT, addressing, wssec
from dsmt.transports.soap.core import SOAP11, SOAP12, SoapCore
from dsmt.transports.soap.pki import Purpose
from dsmt.transports.soap.zeepsupport import make_client
from tests.support.psepr import RouterHarness, connect
from tests.transports.soap.service import SECRET, TNS, EchoService, FaultView, envelope
from tests.transports.soap.test_wssec import NOW, parties

CALLS: list[str] = []
GATES: dict[str, defer.Deferred] = {}
FAILING = {"node03", "node07", "node15"}
SLOW_LATE = {"node05"}
SILENT = {"node11", "node12"}


class Counted(ServiceBase):
    @rpc(Unicode, _returns=Integer)
    def count(ctx, text):
        CALLS.append(text)
        return len(CALLS)

    @rpc(Unicode, _returns=Unicode)
    def probe(ctx, text):
        me = ctx.udc.peer.local_instance
        if me in FAILING:
            raise Fault("Client.Refused", f"{me} refuses")
        if me in SLOW_LATE or me in SILENT:
            GATES[me] = defer.Deferred()
            return GATES[me].addCallback(lambda _: f"{me}:{text}:late")
        return f"{me}:{text}"


def clock():
    return NOW


class Harness(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        CALLS.clear()
        GATES.clear()
        self.router = yield RouterHarness().start()
        self.connections = []
        self.endpoints = []
        self.transports = []

    @defer.inlineCallbacks
    def tearDown(self):
        for gate in list(GATES.values()):
            if not gate.called:
                gate.callback(None)
        for transport in self.transports:
            transport.close()
        for endpoint in self.endpoints:
            endpoint.stop()
        for connection in self.connections:
            connection.close()
        yield self.router.stop()

    @defer.inlineCallbacks
    def connection(self, user="alice", instance="cli1"):
        connection = yield connect(self.router.url, user, instance=instance)
        self.connections.append(connection)
        return connection

    @defer.inlineCallbacks
    def endpoint(self, core, service="echo", instance="srv1", user="bob"):
        endpoint = PsEPRSoapEndpoint((yield self.connection(user, instance)), core, service)
        yield endpoint.start()
        yield endpoint.connection.flush()
        self.endpoints.append(endpoint)
        return endpoint

    @defer.inlineCallbacks
    def transport(self, **options):
        transport = PsEPRTransport((yield self.connection(options.pop("user", "alice"),
                                                          options.pop("as_instance", "cli1"))), **options)
        yield transport.start()
        self.transports.append(transport)
        return transport

    @defer.inlineCallbacks
    def client(self, core, service="echo", **options):
        transport = yield self.transport(**options)
        return make_client(core.wsdl(service_address(service)), transport, asynchronous=True), transport

    def psepr_core(self, version=SOAP11, services=(EchoService,), **options):
        return SoapCore(list(services), TNS, "EchoService", soap_version=version, transport_uri=PSEPR_TRANSPORT,
                        **options)


def call(client, operation, *args):
    return defer.ensureDeferred(getattr(client.service, operation)(*args))


class Framing(unittest.TestCase):

    def test_bytes_survive_exactly(self):
        data = ('<?xml version="1.0" encoding="UTF-8"?>\r\n<a b="&lt;&amp;">x]]>y &amp; é\r\n\t</a>').encode()
        payload = encode_payload(data, "application/soap+xml; charset=utf-8")
        reparsed = OpaquePayload.from_xml(payload.xml)  # as a receiver gets it after the event parse
        self.assertEqual(decode_payload(reparsed), (data, "application/soap+xml; charset=utf-8"))
        self.assertEqual(len(payload.xml.split(b"<envelope>")[1].split(b"</envelope>")[0]), escaped_size(data))

    def test_a_payload_built_here_decodes_too(self):
        """A payload from encode_payload, not received (a local loop-back, a test): decoded by parsing its
        bytes, as it has no received element to reuse; equal to the same payload parsed from its bytes."""
        payload = encode_payload(b"<a>x &amp; y</a>", "text/xml")
        self.assertIsNone(payload.parsed_element())
        self.assertEqual(decode_payload(payload), (b"<a>x &amp; y</a>", "text/xml"))
        self.assertEqual(payload, OpaquePayload(payload.namespace, payload.xml))

    def test_payload_matches_the_published_schema(self):
        import pathlib
        schema = etree.XMLSchema(etree.parse(str(pathlib.Path(__file__).parents[3] / "wsdl" / "soap-over-psepr.xsd")))
        for content_type in (None, "application/soap+xml; charset=utf-8"):
            payload = encode_payload(envelope("<t:x/>"), content_type)
            schema.assertValid(etree.fromstring(payload.xml))

    def test_limits(self):
        self.assertEqual(MAX_ESCAPED_ENVELOPE_BYTES, 1024 * 1024 - 8192)
        self.assertEqual(GUARANTEED_ENVELOPE_BYTES, MAX_ESCAPED_ENVELOPE_BYTES // 5)
        encode_payload(b"&" * GUARANTEED_ENVELOPE_BYTES)
        with self.assertRaisesRegex(EnvelopeTooLarge, "1040385 once escaped; a PsEPR event carries at most 1040384"):
            encode_payload(b"&" * (GUARANTEED_ENVELOPE_BYTES + 1))
        for bad, reason in ((b"\xff\xfe<a/>", "as UTF-8; this one is not"), (b"<a>\x01</a>", "XML cannot carry")):
            with self.assertRaisesRegex(Exception, reason):
                encode_payload(bad)

    def test_unusable_envelopes_name_the_first_offender(self):
        for bad, reason in ((b"<a>ok</a>\x0b<b>\x01</b>", r"\(b'\\x0b' at byte 9\)"),
                            ("<a>é\ufffe</a>".encode(), r"\(b'\\xef\\xbf\\xbe' at byte 5\)"),
                            ("<a>\uffff\x02</a>".encode(), r"\(b'\\xef\\xbf\\xbf' at byte 3\)"),
                            ("<a>é\x1f\ufffe</a>".encode(), r"\(b'\\x1f' at byte 5\)"),
                            (b"<a>\xc3</a>", "invalid continuation byte at byte 3"),
                            (b"<a>\xed\xa0\x80</a>", "as UTF-8; this one is not")):
            with self.assertRaisesRegex(PayloadError, reason):
                encode_payload(bad)
        for good in ("<a>\t\r\n é \ufffd \U0001F600</a>".encode(), b""):
            self.assertEqual(decode_payload(OpaquePayload.from_xml(encode_payload(good, None).xml))[0] if good
                             else encode_payload(good).namespace, good if good else PAYLOAD_NS)

    def test_content_types_are_checked_every_time(self):
        for _ in range(2):  # the second time from the cache of payload heads: refusals are not cached
            with self.assertRaisesRegex(PayloadError, "unusable content type"):
                encode_payload(b"<a/>", "text/xml\x01")
            with self.assertRaisesRegex(PayloadError, "unusable content type"):
                encode_payload(b"<a/>", "t" * 256)
            with self.assertRaisesRegex(PayloadError, "content type must be text, not bytes"):
                encode_payload(b"<a/>", b"text/xml")
        payload = encode_payload(b"<a/>", "a&b <c>")
        self.assertIn(b"<content-type>a&amp;b &lt;c&gt;</content-type>", payload.xml)
        self.assertEqual(decode_payload(OpaquePayload.from_xml(payload.xml)), (b"<a/>", "a&b <c>"))

    def test_addresses_are_parsed_and_refused_every_time(self):
        self.assertEqual(parse_address("psepr:/org/dsmt/ns/soap/x/?instance=n1"), ("/org/dsmt/ns/soap/x/", "n1"))
        self.assertIs(parse_address("psepr:/org/dsmt/ns/soap/x/"), parse_address("psepr:/org/dsmt/ns/soap/x/"))
        for _ in range(2):
            with self.assertRaisesRegex(ValueError, "is not a psepr: address"):
                parse_address("http://x/")
            with self.assertRaisesRegex(ValueError, "the only query parameter is one instance="):
                parse_address("psepr:/a/?instance=x&instance=y")

    def test_body_and_fault_are_found_as_find_would(self):
        from dsmt.transports.psepr_soap import _is_fault, _operation_name
        s11 = "http://schemas.xmlsoap.org/soap/envelope/"
        cases = [
            (f"<e:Envelope xmlns:e='{s11}'><e:Header/><e:Body><e:Fault/></e:Body></e:Envelope>", True, "Fault"),
            (f"<e:Envelope xmlns:e='{s11}'><e:Body><!--c--><x:op xmlns:x='urn:x'/></e:Body></e:Envelope>", False,
             "op"),
            (f"<e:Envelope xmlns:e='{s11}'><e:Body><x:op xmlns:x='urn:x'/><e:Fault/></e:Body></e:Envelope>", True,
             "op"),
            (f"<e:Envelope xmlns:e='{s11}'><e:Body><op/></e:Body><e:Body><e:Fault/></e:Body></e:Envelope>", False,
             "op"),  # the first Body counts, as with find()
            (f"<e:Envelope xmlns:e='{s11}'><e:Header/></e:Envelope>", False, "?"),
            ("<Envelope><Body><Fault/></Body></Envelope>", False, "?"),  # no namespace: no SOAP Body
            (f"<e:Envelope xmlns:e='{s11}'><Body><e:Fault/></Body></e:Envelope>", False, "?"),
        ]
        for xml, fault, operation in cases:
            root = etree.fromstring(xml)
            self.assertEqual((_is_fault(root), _operation_name(root)), (fault, operation), xml)

    def test_reply_cache_bounds(self):
        now = [0.0]
        cache = ReplyCache(lambda: now[0], seconds=10, max_entries=3, max_bytes=100)
        for n in range(4):
            cache.put(("id", n), b"x" * 10, None)
        self.assertEqual((len(cache), cache.get(("id", 0)), cache.get(("id", 3))), (3, None, (b"x" * 10, None)))
        cache.put(("big",), b"y" * 95, "text/xml")  # over the byte bound: the oldest go
        self.assertEqual((len(cache), cache.bytes), (1, 95))
        now[0] = 10.0
        self.assertIsNone(cache.get(("big",)))
        self.assertEqual((len(cache), cache.bytes), (0, 0))

    def test_addresses(self):
        self.assertEqual(service_address("echo"), "psepr:/org/dsmt/ns/soap/echo/")
        self.assertEqual(parse_address(service_address("echo", "n1")), ("/org/dsmt/ns/soap/echo/", "n1"))
        for name in ("reply", "a/b", "", "x y"):
            with self.assertRaises(ValueError):
                service_channel(name)
        for address in ("http://h/x", "psepr:/no-slash", "psepr:/a/?who=x"):
            with self.assertRaises(ValueError):
                parse_address(address)


class Calls(Harness):

    @defer.inlineCallbacks
    def test_zeep_calls_in_both_versions(self):
        for version, service in ((SOAP11, "echo11"), (SOAP12, "echo12")):
            core = self.psepr_core(version)
            yield self.endpoint(core, service, instance=f"srv-{service}")
            client, transport = yield self.client(core, service)
            shape = yield call(client, "echo", {"name": "tri", "points": {"Point": [{"x": 1, "y": 2, "label": "a & b"}]}})
            self.assertEqual((shape.name, shape.points.Point[0].label), ("tri", "a & b"))
            self.assertEqual((yield call(client, "repeat", "ab", 2)), ["ab", "ab"])
            self.assertEqual((yield call(client, "later", "soon")), "SOON")  # a Deferred-returning method
            self.assertEqual((yield call(client, "reverse", "abc")), "cba")  # async def
            with self.assertRaises(zeep.exceptions.Fault) as caught:
                yield call(client, "spend", 20)
            self.assertEqual(caught.exception.message, "the quota of 10 is exceeded")
            self.assertEqual(caught.exception.detail.find(f".//{{{TNS}}}limit").text, "10")
            with self.assertRaises(zeep.exceptions.Fault) as caught:
                yield call(client, "crash")
            self.assertNotIn(SECRET, caught.exception.message)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    @defer.inlineCallbacks
    def test_each_request_envelope_is_parsed_once(self):
        from dsmt.transports.soap import core as core_module
        core = self.psepr_core()
        yield self.endpoint(core)
        client, _ = yield self.client(core)
        handed = []
        process = core.process
        core.process = lambda request, **options: handed.append(options.get("parsed")) or process(request, **options)
        self.patch(core_module, "parse_xml", lambda *a, **k: self.fail("the core parsed the envelope again"))
        self.assertEqual((yield call(client, "reverse", "abc")), "cba")
        self.assertEqual(len(handed), 1)
        self.assertEqual(etree.QName(handed[0]).localname, "Envelope")

    @defer.inlineCallbacks
    def test_concurrent_calls_correlate(self):
        core = self.psepr_core()
        yield self.endpoint(core)
        client, _ = yield self.client(core)
        texts = [f"t{n}" for n in range(30)]
        results = yield defer.gatherResults([call(client, "reverse", text) for text in texts])
        self.assertEqual(results, [text[::-1] for text in texts])

    @defer.inlineCallbacks
    def test_one_instance_of_several(self):
        core = self.psepr_core(services=(Counted,))
        for name in ("a", "b"):
            yield self.endpoint(core, "probe", instance=name)
        client, _ = yield self.client(core, "probe", instance="b")
        self.assertEqual((yield call(client, "probe", "x")), "b:x")

    @defer.inlineCallbacks
    def test_timeout_without_a_server(self):
        core = self.psepr_core()
        fake = task.Clock()
        client, transport = yield self.client(core, "nobody", timeout=7, clock=fake)
        pending = call(client, "reverse", "x")
        fake.advance(6.9)
        self.assertNoResult(pending)
        fake.advance(0.1)
        failure = self.failureResultOf(pending, CallTimeout)
        self.assertRegex(str(failure.value), r"^no reply from service 'nobody' to 'reverse' within 7 s "
                                             r"\(MessageID urn:uuid:[-0-9a-f]+\)$")
        self.assertEqual(transport._pending, {})

    @defer.inlineCallbacks
    def test_lost_request_is_resent_and_runs_once(self):
        core = self.psepr_core(services=(Counted,))
        fake = task.Clock()
        client, transport = yield self.client(core, "count", timeout=10, retry_every=1, clock=fake)
        pending = call(client, "count", "x")
        yield transport.connection.flush()  # routed to nobody: lost
        endpoint = yield self.endpoint(core, "count")
        fake.advance(1)
        fake.advance(1)  # two copies now travel
        self.assertEqual((yield pending), 1)
        while endpoint.stats["received"] < 2:
            yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual((CALLS, endpoint.stats["answered"], endpoint.stats["cached"]), (["x"], 1, 1))
        self.assertEqual(transport.stats["resent"], 2)
        self.assertEqual(fake.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_repeated_message_id_answered_from_the_cache(self):
        core = self.psepr_core(services=(Counted,))
        endpoint = yield self.endpoint(core, "count")
        transport = yield self.transport()
        request = addressing.insert_headers(
            envelope("<t:count><t:text>once</t:text></t:count>"),
            addressing.request_headers(action=f"{TNS}/EchoService/count", to=service_address("count"),
                                       reply_to=addressing.EndpointReference(transport.reply_to)))
        first = yield defer.ensureDeferred(transport.post(service_address("count"), request, {}))
        second = yield defer.ensureDeferred(transport.post(service_address("count"), request, {}))
        self.assertEqual(CALLS, ["once"])
        self.assertEqual(first.content, second.content)  # the very same reply bytes
        self.assertEqual(endpoint.stats["cached"], 1)
        # the same MessageID with other bytes is another request: it runs
        changed = request.replace(b">once<", b">twice<")
        third = yield defer.ensureDeferred(transport.post(service_address("count"), changed, {}))
        self.assertEqual(CALLS, ["once", "twice"])
        self.assertIn(b">2<", third.content)

    @defer.inlineCallbacks
    def test_duplicate_in_flight_runs_once(self):
        core = self.psepr_core(services=(Counted,))
        endpoint = yield self.endpoint(core, "probe", instance="node05")  # SLOW_LATE: waits on a gate
        transport = yield self.transport()
        request = addressing.insert_headers(
            envelope("<t:probe><t:text>x</t:text></t:probe>"),
            addressing.request_headers(action=f"{TNS}/EchoService/probe", to="x",
                                       reply_to=addressing.EndpointReference(transport.reply_to)))
        event = Event(service_channel("probe"), encode_payload(request))
        replies = []
        transport.lease.add_callback(replies.append)
        transport.connection.send(event)
        transport.connection.send(event)
        yield transport.connection.flush()
        while "node05" not in GATES or endpoint.stats["cached"] < 1:
            yield task.deferLater(reactor, 0, lambda: None)
        GATES["node05"].callback(None)
        while len(replies) < 2:
            yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(endpoint.stats["answered"], 1)
        self.assertEqual(decode_payload(replies[0].payload), decode_payload(replies[1].payload))

    @defer.inlineCallbacks
    def test_oversized_request_refused_by_the_client(self):
        core = self.psepr_core()
        yield self.endpoint(core)
        client, transport = yield self.client(core)
        with self.assertRaisesRegex(EnvelopeTooLarge, "once escaped; a PsEPR event carries at most 1040384"):
            yield call(client, "reverse", "<" * 300_000)
        self.assertEqual((transport.connection.sent, transport._pending), (0, {}))  # nothing sent

    @defer.inlineCallbacks
    def test_oversized_reply_becomes_a_fault(self):
        core = self.psepr_core()
        endpoint = yield self.endpoint(core)
        client, _ = yield self.client(core)
        with self.assertRaises(zeep.exceptions.Fault) as caught:
            yield call(client, "repeat", "&" * 1000, 300)  # ~300 KB of text, 1.5 MB escaped
        self.assertIn("the reply cannot travel over PsEPR", caught.exception.message)
        self.assertEqual(caught.exception.code, "soap:Server.EnvelopeTooLarge")
        self.assertEqual(endpoint.stats["too_large"], 1)


class Hostile(Harness):

    @defer.inlineCallbacks
    def test_malformed_payloads(self):
        core = self.psepr_core()
        endpoint = yield self.endpoint(core)
        transport = yield self.transport()
        channel = service_channel("echo")
        reply_to = addressing.EndpointReference(transport.reply_to)

        def addressed(body: str, version=SOAP11, to_reply=reply_to):
            return addressing.insert_headers(envelope(body, version), addressing.request_headers(
                action="urn:x", to="x", reply_to=to_reply))

        raw = [OpaquePayload(PAYLOAD_NS, b'<payload xmlns="%s"><other/></payload>' % PAYLOAD_NS.encode()),
               OpaquePayload(PAYLOAD_NS, b'<payload xmlns="%s"><envelope><a/></envelope></payload>'
                             % PAYLOAD_NS.encode()),
               encode_payload(b"not XML at all"),
               encode_payload(b"<order xmlns='urn:shop'/>"),
               encode_payload(envelope("<t:reverse><t:text>no reply-to</t:text></t:reverse>")),
               encode_payload(addressed("<t:reverse><t:text>x</t:text></t:reverse>",
                                        to_reply=addressing.EndpointReference("psepr:/org/dsmt/ns/deployment/x/")))]
        for payload in raw:
            transport.connection.send(Event(channel, payload))
        # answered with faults, correlated: unknown operation, and a SOAP 1.2 envelope to this 1.1 service
        for body, version, code in (("<t:launch/>", SOAP11, "Client.UnknownOperation"),
                                    ("<t:x>" * 40 + "</t:x>" * 40, SOAP11, "Client.BadXML"),
                                    ("<t:reverse><t:text>x</t:text></t:reverse>", SOAP12, "VersionMismatch")):
            response = yield defer.ensureDeferred(transport.post(service_address("echo"), addressed(body, version), {}))
            self.assertEqual((response.status_code, FaultView(response.content).code), (500, code))
        self.assertEqual((endpoint.stats["dropped_malformed"], endpoint.stats["dropped_no_reply_to"],
                          endpoint.stats["errors"]), (4, 2, 0))

    @defer.inlineCallbacks
    def test_unusable_addressing_still_gets_its_fault_on_the_reply_channel(self):
        core = self.psepr_core()
        endpoint = yield self.endpoint(core)
        transport = yield self.transport()
        replies = []
        transport.lease.add_callback(replies.append)
        twice = addressing.insert_headers(envelope("<t:reverse><t:text>x</t:text></t:reverse>"),
                                          addressing.request_headers(
                                              action="urn:x", to="x", message_id="urn:one",
                                              reply_to=addressing.EndpointReference(transport.reply_to))
                                          + b'<wsa:MessageID xmlns:wsa="%s">urn:two</wsa:MessageID>'
                                          % addressing.WSA_NS.encode())
        transport.connection.send(Event(service_channel("echo"), encode_payload(twice)))
        while not replies:
            yield task.deferLater(reactor, 0, lambda: None)
        fault = FaultView(decode_payload(replies[0].payload)[0])
        self.assertEqual((fault.code, replies[0].from_instance), ("InvalidAddressingHeader", "srv1"))
        self.assertIn("wsa:MessageID appears 2 times", fault.reason)
        self.assertEqual(endpoint.stats["faults"], 1)

    @defer.inlineCallbacks
    def test_garbage_replies_do_not_break_the_caller(self):
        core = self.psepr_core()
        yield self.endpoint(core)
        client, transport = yield self.client(core)
        sender = yield self.connection("carol", "evil")
        for payload in (encode_payload(b"<junk/>"), encode_payload(b"not xml")):
            sender.send(Event(transport.reply_channel, payload))
        self.assertEqual((yield call(client, "reverse", "ok")), "ko")
        self.assertEqual(transport.stats["malformed"] + transport.stats["unmatched"], 2)


class Signed(Harness):

    def policy(self):
        service = parties().service
        return wssec.WsSecurityPolicy(parties().trust, service.key, service.cert, clock=clock)

    def signing(self):
        alice = parties().alice
        return dict(signer=wssec.Signer(alice.key, alice.cert, clock=clock),
                    verifier=wssec.Verifier(parties().trust, purpose=Purpose.SERVER, dns_name="node1.example",
                                            clock=clock))

    @defer.inlineCallbacks
    def test_signed_request_and_signed_reply(self):
        for version in (SOAP11, SOAP12):
            core = self.psepr_core(version, filters=[self.policy()])
            service = f"signed{version.name[-1]}"
            yield self.endpoint(core, service, instance=service)
            client, transport = yield self.client(core, service, **self.signing())
            caller = yield call(client, "whoami")
            self.assertTrue(caller.startswith("VerifiedCaller(subject='CN=alice,OU=user'"), caller)
            with self.assertRaises(zeep.exceptions.Fault) as caught:
                yield call(client, "spend", 11)
            self.assertEqual(caught.exception.message, "the quota of 10 is exceeded")  # a signed fault, verified

    @defer.inlineCallbacks
    def test_signed_multicast(self):
        # one core (so one WS-Security replay cache) per instance, as on separate nodes: a group request
        # legitimately reaches each instance once; instances sharing a policy would see it as a replay
        for name in ("s1", "s2", "s3"):
            core = self.psepr_core(filters=[self.policy()])
            yield self.endpoint(core, instance=name)
        client, transport = yield self.client(core, **self.signing())
        results = yield multicast_call(transport, client.service, "whoami", instances=["s1", "s2", "s3"], deadline=5)
        self.assertEqual(sorted(results), ["s1", "s2", "s3"])
        for result in results.values():
            self.assertTrue(result.ok, result)
            self.assertIn("CN=alice", result.value)
        # a reply that fails verification is an error for that instance, not for the call
        transport.verifier = wssec.Verifier(parties().trust, purpose=Purpose.SERVER, dns_name="node2.example",
                                            clock=clock)
        results = yield multicast_call(transport, client.service, "whoami", instances=["s1", "s2", "s3"], deadline=5)
        self.assertEqual({r.outcome for r in results.values()}, {"error"})
        self.assertIn("not valid for node2.example", str(results["s1"].error))

    @defer.inlineCallbacks
    def test_external_signing_wrapper_with_the_plugin(self):
        core = self.psepr_core(filters=[self.policy()])
        yield self.endpoint(core)
        transport = yield self.transport()
        options = self.signing()
        wrapped = wssec.AsyncSigningTransport(transport, options["signer"], options["verifier"])
        client = make_client(core.wsdl(service_address("echo")), wrapped, asynchronous=True)
        with self.assertRaisesRegex(Exception, "the signed envelope has no ReplyTo"):
            yield call(client, "whoami")
        client.plugins.append(ReplyToPlugin(transport))
        self.assertIn("CN=alice", (yield call(client, "whoami")))

    @defer.inlineCallbacks
    def test_signed_retry_is_answered_from_the_cache_not_refused_as_a_replay(self):
        core = self.psepr_core(services=(Counted,), filters=[self.policy()])
        endpoint = yield self.endpoint(core, "count")
        transport = yield self.transport()
        request = addressing.insert_headers(
            envelope("<t:count><t:text>signed</t:text></t:count>"),
            addressing.request_headers(action=f"{TNS}/EchoService/count", to=service_address("count"),
                                       reply_to=addressing.EndpointReference(transport.reply_to)))
        signed = self.signing()["signer"].sign(request)
        replies = []
        for _ in range(2):
            replies.append((yield defer.ensureDeferred(transport.post(service_address("count"), signed, {}))))
        self.assertEqual([r.status_code for r in replies], [200, 200])
        self.assertEqual(replies[0].content, replies[1].content)
        self.assertEqual((CALLS, endpoint.stats["cached"]), (["signed"], 1))
        self.assertIsNotNone(self.signing()["verifier"].verify(replies[1].content))


class Multicast(Harness):

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.core = self.psepr_core(services=(Counted,))
        self.names = [f"node{n:02d}" for n in range(20)]
        users = ("alice", "bob", "carol")
        yield defer.gatherResults([self.endpoint(self.core, "probe", instance=name, user=users[n % 3])
                                   for n, name in enumerate(self.names)])
        self.client, self.transport_ = yield self.client(self.core, "probe", as_instance="caller")

    @defer.inlineCallbacks
    def test_results_per_instance(self):
        expected = self.names + ["ghost1", "ghost2"]
        reactor.callLater(0.05, lambda: GATES["node05"].callback(None) if "node05" in GATES else None)
        results = yield multicast_call(self.transport_, self.client.service, "probe", ("hi",),
                                       instances=expected, deadline=0.5)
        self.assertEqual(sorted(results), sorted(expected))
        outcomes = {name: result.outcome for name, result in results.items()}
        for name in expected:
            if name in FAILING:
                self.assertEqual(outcomes[name], "fault")
                self.assertEqual(results[name].fault.message, f"{name} refuses")
            elif name in SILENT or name.startswith("ghost"):
                self.assertEqual(outcomes[name], "missing")
            elif name in SLOW_LATE:
                self.assertEqual(results[name].value, f"{name}:hi:late")
            else:
                self.assertEqual(results[name].value, f"{name}:hi")
        self.assertEqual(self.transport_._pending, {})

    @defer.inlineCallbacks
    def test_expected_count_ends_early(self):
        fake = task.Clock()
        self.transport_.clock = fake
        results = yield multicast_call(self.transport_, self.client.service, "probe", ("x",), expected=5,
                                       deadline=30)
        self.assertEqual(len(results), 5)  # before any deadline: the fake clock never moved
        self.assertEqual(fake.getDelayedCalls(), [])
