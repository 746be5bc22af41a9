"""The test service every SOAP test uses, and a trivial envelope filter.

Operations: ``echo`` (complex type with an array), ``repeat`` (array result),
``later`` (returns a Deferred that fires on a later reactor turn), ``reverse``
(``async def``), ``spend`` (raises the declared fault ``QuotaExceeded``,
code ``Client.QuotaExceeded``), ``crash`` (raises an unexpected exception whose
text must not leak), ``whoami`` (the caller a filter put in ``ctx.udc``).
"""
from __future__ import annotations

from lxml import etree
from spyne import Array, ComplexModel, Fault, Integer, ServiceBase, Unicode, rpc
from twisted.internet import reactor, task

from dsmt.transports.soap import addressing
from dsmt.transports.soap.core import SOAP11, SOAP12, SoapCore, SoapFault

TNS = "http://dsmt.org/ns/test/echo"
NAME = "EchoService"
SECRET = "secret: /etc/shadow"


class Point(ComplexModel):
    __namespace__ = TNS
    x = Integer
    y = Integer
    label = Unicode


class Shape(ComplexModel):
    __namespace__ = TNS
    name = Unicode(min_occurs=1, nillable=False)
    points = Array(Point)


class QuotaExceeded(Fault):
    __namespace__ = TNS
    limit = Integer

    def __init__(self, limit: int = 0):
        super().__init__("Client.QuotaExceeded", f"the quota of {limit} is exceeded")
        self.limit = limit


class EchoService(ServiceBase):
    @rpc(Shape, _returns=Shape)
    def echo(ctx, shape):
        return shape

    @rpc(Unicode, Integer, _returns=Array(Unicode))
    def repeat(ctx, word, times):
        return [word] * times

    @rpc(Unicode, _returns=Unicode)
    def later(ctx, text):
        return task.deferLater(reactor, 0, text.upper)

    @rpc(Unicode, _returns=Unicode)
    async def reverse(ctx, text):
        await task.deferLater(reactor, 0, lambda: None)
        return text[::-1]

    @rpc(Integer(min_occurs=1, nillable=False), _returns=Integer, _throws=[QuotaExceeded])
    def spend(ctx, amount):
        if amount > 10:
            raise QuotaExceeded(10)
        return 10 - amount

    @rpc(_returns=Unicode)
    def crash(ctx):
        raise RuntimeError(SECRET)

    @rpc(_returns=Unicode)
    def whoami(ctx):
        return str(ctx.udc.caller)


TOKEN = "{%s}Token" % TNS
SERVED = "{%s}Served" % TNS


class RequireToken:
    """A real, trivial envelope filter: a request must carry a ``Token`` header, whose text becomes the
    caller; every reply gets a ``Served`` header.  ``seen`` records what each stage received."""

    understood_headers = frozenset({TOKEN})

    def __init__(self):
        self.seen: list[tuple[str, bytes]] = []

    def inbound(self, envelope: bytes, context) -> bytes:
        self.seen.append(("in", envelope))
        token = context.envelope.find(f"{{{context.version.envelope_ns}}}Header/{TOKEN}")
        if token is None:
            raise SoapFault(SoapFault.SENDER, "a Token header is required", subcodes=["{%s}NoToken" % TNS])
        context.caller = token.text
        return envelope

    def outbound(self, envelope: bytes, context) -> bytes:
        self.seen.append(("out", envelope))
        served = etree.Element(SERVED, nsmap={"t": TNS})
        served.text = "fault" if context.fault is not None else "ok"
        return addressing.insert_headers(envelope, etree.tostring(served))


def make_core(version=SOAP11, **options) -> SoapCore:
    return SoapCore([EchoService], TNS, NAME, soap_version=version, **options)


def envelope(body: str, version=SOAP11, header: str = "") -> bytes:
    """A request envelope around ``body`` (XML text using prefix ``t`` for the test namespace)."""
    head = f"<s:Header>{header}</s:Header>" if header else ""
    return (f'<s:Envelope xmlns:s="{version.envelope_ns}" xmlns:t="{TNS}">{head}<s:Body>{body}</s:Body>'
            f"</s:Envelope>").encode()


# ------------------------------------------------------------------ hostile and broken requests

DEEP = "<t:x>" * 40 + "</t:x>" * 40
LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">'
          '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;">]><lolz>&lol3;</lolz>')
XXE = '<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]><e>&x;</e>'

#: name → (request for a SOAP version, the core's subcode, parts of the reason).
CLIENT_FAULTS = {
    "not XML": (lambda v: b"this is not XML", "BadXML", ["not well-formed XML"]),
    "empty": (lambda v: b"", "BadXML", ["not well-formed XML"]),
    "billion laughs": (lambda v: LAUGHS.encode(), "BadXML", ["DOCTYPE"]),
    "external entity": (lambda v: XXE.encode(), "BadXML", ["DOCTYPE"]),
    "too deep": (lambda v: envelope(DEEP, v), "BadXML", ["nested deeper than 32"]),
    "not SOAP": (lambda v: b"<order xmlns='urn:shop'/>", "NotSOAP", ["{urn:shop}order", "not a SOAP"]),
    "no namespace": (lambda v: b"<Envelope><Body/></Envelope>", "NotSOAP", ["root is Envelope"]),
    "no Body": (lambda v: f"<s:Envelope xmlns:s='{v.envelope_ns}'><s:Header/></s:Envelope>".encode(),
                "BadEnvelope", ["no Body"]),
    "empty Body": (lambda v: envelope("", v), "BadEnvelope", ["holds 0 elements"]),
    "two operations": (lambda v: envelope("<t:crash/><t:crash/>", v), "BadEnvelope", ["holds 2 elements"]),
    "unknown operation": (lambda v: envelope("<t:launch/>", v), "UnknownOperation",
                          [f"{{{TNS}}}launch is not an operation", "crash, echo, later, repeat, reverse, spend"]),
    "wrong namespace": (lambda v: envelope("<echo/>", v), "UnknownOperation", ["echo is not an operation"]),
    "schema: bad value": (lambda v: envelope("<t:spend><t:amount>ten</t:amount></t:spend>", v), "InvalidBody",
                          [f"Element '{{{TNS}}}amount': 'ten' is not a valid value of the atomic type 'xs:integer'"]),
    "schema: missing": (lambda v: envelope("<t:spend/>", v), "InvalidBody", [f"{{{TNS}}}spend", "Missing child"]),
    "schema: unexpected": (lambda v: envelope("<t:echo><t:shape><t:colour>red</t:colour></t:shape></t:echo>", v),
                           "InvalidBody", [f"{{{TNS}}}colour", "not expected"]),
}


# ------------------------------------------------------------------ reading what the core sends

SOAP_ENVELOPES = {SOAP11.envelope_ns: SOAP11, SOAP12.envelope_ns: SOAP12}


class FaultView:
    """A fault envelope read back (strictly: it must be well-formed XML, one Envelope, one Fault).

    ``code`` is the SOAP 1.2 code name or SOAP 1.1's faultcode text without its prefix;
    ``subcodes`` are (namespace, local name) pairs (SOAP 1.2 only).
    """

    def __init__(self, body: bytes):
        self.root = etree.fromstring(body)
        self.version = SOAP_ENVELOPES[etree.QName(self.root).namespace]
        env = self.version.envelope_ns
        assert self.root.tag == f"{{{env}}}Envelope", self.root.tag
        (self.fault,) = self.root.findall(f"{{{env}}}Body/{{{env}}}Fault")
        self.header = self.root.find(f"{{{env}}}Header")
        if self.version is SOAP11:
            code = self.fault.find("faultcode")
            prefix, _, self.code = code.text.partition(":")
            self.code_namespace = code.nsmap[prefix]
            self.subcodes = []
            self.reason = self.fault.findtext("faultstring")
            self.detail = self.fault.find("detail")
        else:
            value = self.fault.find(f"{{{env}}}Code/{{{env}}}Value")
            self.code = value.text.partition(":")[2]
            self.code_namespace = value.nsmap[value.text.partition(":")[0]]
            self.subcodes = []
            subcode = self.fault.find(f"{{{env}}}Code/{{{env}}}Subcode")
            while subcode is not None:
                value = subcode.find(f"{{{env}}}Value")
                prefix, _, local = value.text.partition(":")
                self.subcodes.append((value.nsmap[prefix], local))
                subcode = subcode.find(f"{{{env}}}Subcode")
            texts = self.fault.findall(f"{{{env}}}Reason/{{{env}}}Text")
            assert len(texts) == 1 and texts[0].get("{http://www.w3.org/XML/1998/namespace}lang") == "en"
            self.reason = texts[0].text
            self.detail = self.fault.find(f"{{{env}}}Detail")

    def __repr__(self):
        return f"<FaultView {self.version.name} {self.code} {self.subcodes} {self.reason!r}>"


def core_subcode(name: str) -> tuple[str, str]:
    from dsmt.transports.soap.core import DSMT_FAULT_NS
    return (DSMT_FAULT_NS, name)


def assert_core_fault(body: bytes, version, subcode: str, *reason_parts: str) -> FaultView:
    """``body`` is a Sender/Client fault of ``version`` with the core's ``subcode``, its reason holding
    every one of ``reason_parts``."""
    fault = FaultView(body)
    assert fault.version is version, fault
    if version is SOAP11:
        assert fault.code == f"Client.{subcode}", fault
    else:
        assert (fault.code, fault.subcodes) == ("Sender", [core_subcode(subcode)]), fault
    for part in reason_parts:
        assert part in fault.reason, (part, fault.reason)
    return fault
