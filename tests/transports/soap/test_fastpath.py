"""The compiled path for simple operations, checked against spyne's own pipeline on the same requests.

Every differential case runs one request through two cores built from the same service class — one
with compiled codecs, one with ``fast_path=False`` — and requires the same arguments at the method and
the same reply bytes (faults included).
"""
from __future__ import annotations

import pytest
from lxml import etree
from spyne import Array, Boolean, ByteArray, ComplexModel, Fault, Integer, ServiceBase, Unicode, rpc
from spyne.model.primitive import AnyUri, Integer32, UnsignedInteger
from twisted.internet import defer
from twisted.python.failure import Failure

from dsmt.transports.soap.core import SOAP11, SOAP12, SoapCore
from dsmt.transports.soap.fastpath import FastMethodContext, compile_operation

TNS = "urn:dsmt:test:fastpath"
SEEN: list = []


class Refused(Fault):
    __namespace__ = TNS
    why = Unicode

    def __init__(self, why: str = ""):
        super().__init__("Client.Refused", f"refused: {why}")
        self.why = why


class Simple(ServiceBase):
    @rpc(Unicode, Integer, Boolean, _returns=Unicode)
    def echo(ctx, text, number, flag):
        SEEN.append((text, number, flag))
        return text

    @rpc(Integer(min_occurs=1, nillable=False), Integer32, _returns=Integer, _in_variable_names={"a": "first"})
    def add(ctx, a, b):
        SEEN.append((a, b))
        return a + (b or 0)

    @rpc(Boolean, _returns=Boolean)
    def negate(ctx, flag):
        SEEN.append(flag)
        return None if flag is None else not flag

    @rpc(Unicode)
    def consume(ctx, text):
        SEEN.append(text)

    @rpc(Unicode, _returns=Unicode(min_occurs=1))
    def required(ctx, text):
        return None if text == "none" else text

    @rpc(Unicode, _returns=Unicode)
    def odd(ctx, kind):
        """Results only spyne writes: the compiled codec hands them over."""
        return {"int": 42, "bytes": b"raw", "control": "a\x00b", "surrogate": "\udcff", "float": 1.5}[kind]

    @rpc(UnsignedInteger, _returns=UnsignedInteger)
    def unsigned(ctx, n):
        return n

    @rpc(Unicode, _returns=Unicode, _throws=[Refused])
    def refuse(ctx, why):
        if why == "declared":
            raise Refused(why)
        if why == "plain":
            raise Fault("Client.Nope.Never", "nope")
        if why == "failure":
            return Failure(Refused("as a failure"))
        raise RuntimeError("secret detail")

    @rpc(Unicode, _returns=Unicode)
    def deferred(ctx, text):
        return defer.succeed(text.upper())

    @rpc(Unicode, _returns=Unicode)
    async def coroutine(ctx, text):
        return text[::-1]

    @rpc(_returns=Unicode)
    def context(ctx):
        return f"{type(ctx).__name__}:{ctx.udc.transport}:{ctx.descriptor.operation_name}"


CORES: dict = {}


def cores(version):
    if version not in CORES:
        CORES[version] = (SoapCore([Simple], TNS, "Simple", soap_version=version),
                          SoapCore([Simple], TNS, "Simple", soap_version=version, fast_path=False))
    return CORES[version]


def request(body: str, version) -> bytes:
    return (f'<s:Envelope xmlns:s="{version.envelope_ns}" xmlns:t="{TNS}" '
            f'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><s:Body>{body}</s:Body></s:Envelope>').encode()


def both(body: str, version):
    """(arguments seen, reply bytes) from the compiled core and from spyne's."""
    answers = []
    for core in cores(version):
        SEEN.clear()
        answered = core.process(request(body, version))
        assert answered.called
        answers.append((list(SEEN), answered.result.body))
    return answers


VERSIONS = [SOAP11, SOAP12]
SAME = [
    "<t:echo><t:text>hello</t:text><t:number>7</t:number><t:flag>true</t:flag></t:echo>",
    "<t:echo><t:text/><t:number> -0 </t:number><t:flag>0</t:flag></t:echo>",
    "<t:echo><t:text xsi:nil='true'/><t:number xsi:nil='1'/></t:echo>",
    "<t:echo/>",
    "<t:echo><t:text><![CDATA[a<b]]>&amp;&#13;&gt;\"'</t:text></t:echo>",
    "<t:echo><t:text>  spaced\n\tout  </t:text><t:number>+12345678901234567890</t:number></t:echo>",
    "<t:echo><t:text>\u00e9\u4e2d\U0001f600</t:text></t:echo>",
    "<t:add><t:first>2</t:first><t:b>40</t:b></t:add>",
    "<t:add><t:first>-2147483649</t:first></t:add>",
    "<t:negate><t:flag>false</t:flag></t:negate>",
    "<t:negate><t:flag>1</t:flag></t:negate>",
    "<t:negate/>",
    "<t:consume><t:text>gone</t:text></t:consume>",
    "<t:required><t:text>here</t:text></t:required>",
    "<t:required><t:text>none</t:text></t:required>",
    "<t:odd><t:kind>int</t:kind></t:odd>",
    "<t:odd><t:kind>bytes</t:kind></t:odd>",
    "<t:odd><t:kind>control</t:kind></t:odd>",
    "<t:odd><t:kind>surrogate</t:kind></t:odd>",
    "<t:odd><t:kind>float</t:kind></t:odd>",
    "<t:unsigned><t:n>18446744073709551615</t:n></t:unsigned>",
    "<t:refuse><t:why>declared</t:why></t:refuse>",
    "<t:refuse><t:why>plain</t:why></t:refuse>",
    "<t:refuse><t:why>failure</t:why></t:refuse>",
    "<t:refuse><t:why>bug</t:why></t:refuse>",
    # refused before any codec runs: both paths must agree on these too
    "<t:add><t:first>two</t:first></t:add>",
    "<t:add><t:b>1</t:b></t:add>",
    "<t:echo><t:flag>yes</t:flag></t:echo>",
    "<t:echo><t:text>a</t:text><t:text>b</t:text></t:echo>",
    "<t:echo><t:unknown/></t:echo>",
    "<t:unsigned><t:n>-1</t:n></t:unsigned>",
]


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
@pytest.mark.parametrize("body", SAME)
def test_compiled_and_spyne_answer_alike(version, body):
    compiled, spyne = both(body, version)
    assert compiled == spyne


def test_the_simple_operations_are_compiled_and_the_others_not():
    class Point(ComplexModel):
        __namespace__ = TNS
        x = Integer

    class Mixed(ServiceBase):
        @rpc(Unicode, _returns=Unicode)
        def plain(ctx, text):
            return text

        @rpc(Point, _returns=Unicode)
        def complex_in(ctx, point):
            return ""

        @rpc(Unicode, _returns=Point)
        def complex_out(ctx, text):
            return None

        @rpc(Unicode(max_occurs=3), _returns=Unicode)
        def array_in(ctx, texts):
            return ""

        @rpc(_returns=Array(Unicode))
        def array_out(ctx):
            return []

        @rpc(ByteArray, _returns=Unicode)
        def binary(ctx, data):
            return ""

        @rpc(AnyUri, _returns=Unicode)
        def uri(ctx, address):
            return ""

        @rpc(Unicode(sub_name="renamed"), _returns=Unicode)
        def renamed(ctx, text):
            return ""

        @rpc(Unicode(default="x"), _returns=Unicode)
        def defaulted(ctx, text):
            return ""

        @rpc(_returns=(Unicode, Integer))
        def two_results(ctx):
            return "", 0

    core = SoapCore([Mixed], TNS, "Mixed")
    assert {codec.descriptor.operation_name for codec in core._codecs.values()} == {"plain"}
    descriptors = [d for ds in core.application.interface.service_method_map.values() for d in ds]
    assert [d.operation_name for d in descriptors if compile_operation(core.application, d, SOAP11.envelope_ns)] \
        == ["plain"]


def test_services_with_their_own_call_wrapper_or_listeners_keep_spyne():
    class Wrapped(ServiceBase):
        @classmethod
        def call_wrapper(cls, ctx, args=None):
            return "wrapped"

        @rpc(_returns=Unicode)
        def hello(ctx):
            return "hello"

    class Listened(ServiceBase):
        @rpc(_returns=Unicode)
        def hello(ctx):
            return "hello"

    Listened.event_manager.add_listener("method_call", lambda ctx: None)
    for service in (Wrapped, Listened):
        core = SoapCore([service], TNS, service.__name__)
        assert core._codecs == {}
    reply = SoapCore([Wrapped], TNS, "Wrapped").process(request("<t:hello/>", SOAP11)).result
    assert b">wrapped<" in reply.body


def test_fast_path_can_be_turned_off():
    compiled, spyne = cores(SOAP11)
    assert f"{{{TNS}}}echo" in compiled._codecs and spyne._codecs == {}


def test_booleans_are_read_as_xml_schema_says():
    """Whitespace around a boolean collapses (XSD §3.2.2); spyne 2.14 reads `` 1 `` as false, the compiled
    codec as true."""
    SEEN.clear()
    compiled, _ = cores(SOAP11)
    reply = compiled.process(request("<t:negate><t:flag> 1 </t:flag></t:negate>", SOAP11)).result
    assert SEEN == [True] and b"<tns:negateResult>false</tns:negateResult>" in reply.body


def test_methods_see_a_context_with_the_call_context():
    compiled, spyne = cores(SOAP12)
    text = etree.fromstring(compiled.process(request("<t:context/>", SOAP12)).result.body).findtext(".//{*}contextResult")
    assert text == f"FastMethodContext:{compiled.transport_uri}:context"
    text = etree.fromstring(spyne.process(request("<t:context/>", SOAP12)).result.body).findtext(".//{*}contextResult")
    assert text == f"MethodContext:{spyne.transport_uri}:context"
    assert FastMethodContext.__slots__ == ("udc", "descriptor", "function", "app")


@pytest.mark.parametrize("operation, expected", [("deferred", b">ABC<"), ("coroutine", b">cba<")])
def test_deferreds_and_coroutines_are_awaited(operation, expected):
    compiled, spyne = cores(SOAP11)
    replies = []
    for core in (compiled, spyne):
        core.process(request(f"<t:{operation}><t:text>abc</t:text></t:{operation}>", SOAP11)).addCallback(
            replies.append)
    assert len(replies) == 2 and replies[0].body == replies[1].body and expected in replies[0].body


def test_an_unexpected_exception_does_not_leak():
    compiled, _ = cores(SOAP11)
    reply = compiled.process(request("<t:refuse><t:why>bug</t:why></t:refuse>", SOAP11)).result
    assert reply.is_fault and b"secret" not in reply.body and b"InternalError" in reply.body
