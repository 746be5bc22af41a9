"""The compiled path for simple operations, checked against spyne's own pipeline on the same requests.

Every differential case runs one request through two cores built from the same service class — one
with compiled codecs, one with ``fast_path=False`` — and requires the same arguments at the method and
the same reply bytes (faults included).
"""
from __future__ import annotations

import functools

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

    @rpc(ByteArray, _returns=ByteArray)
    def blob(ctx, data):
        SEEN.append(data)
        return data

    @rpc(Unicode, _returns=ByteArray)
    def blob_of(ctx, kind):
        return {"bytes": b"\x00\xffhello", "chunks": [b"he", b"llo"], "tuple": (b"x",), "empty": b"",
                "no chunks": [], "text": "hello", "bytearray": bytearray(b"ab"), "mixed": [b"a", "b"]}[kind]

    @rpc(Unicode, _returns=ByteArray.customize(max_occurs=5))
    def blobs(ctx, kind):
        return {"list": [b"ab", b"\x00\xff"], "chunked": [[b"a", b"b"]], "bytes": b"xyz", "empty": []}[kind]

    @rpc(Unicode, _returns=Unicode)
    def deferred(ctx, text):
        return defer.succeed(text.upper())

    @rpc(Unicode, _returns=Unicode)
    async def coroutine(ctx, text):
        return text[::-1]

    @rpc(Unicode, _returns=Unicode, _no_ctx=True)
    def no_context(text):
        SEEN.append(text)
        return text.upper()

    @rpc(_returns=Unicode)
    def context(ctx):
        return f"{type(ctx).__name__}:{ctx.udc.transport}:{ctx.descriptor.operation_name}"


@functools.cache
def core_pair(service: type, version) -> tuple[SoapCore, SoapCore]:
    """A compiled core and a spyne-only core for ``service``, built once per module (~50 ms each)."""
    return tuple(SoapCore([service], TNS, service.__name__, soap_version=version, fast_path=fast)
                 for fast in (True, False))


def cores(version):
    return core_pair(Simple, version)


def request(body: str, version) -> bytes:
    return (f'<s:Envelope xmlns:s="{version.envelope_ns}" xmlns:t="{TNS}" '
            f'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><s:Body>{body}</s:Body></s:Envelope>').encode()


def both(body: str, version):
    """(arguments seen, reply bytes) from the compiled core and from spyne's."""
    return answers(cores(version), body, version)


def answers(pair, body: str, version):
    """(arguments seen, reply bytes) from each core of ``pair`` for the same request."""
    results = []
    for core in pair:
        SEEN.clear()
        answered = core.process(request(body, version))
        assert answered.called
        results.append((list(SEEN), answered.result.body))
    return results


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
    "<t:no_context><t:text>quiet</t:text></t:no_context>",
    "<t:blob><t:data>aGVsbG8=</t:data></t:blob>",
    "<t:blob><t:data> aGVs\n bG8= </t:data></t:blob>",
    "<t:blob><t:data></t:data></t:blob>",
    "<t:blob><t:data xsi:nil='true'/></t:blob>",
    "<t:blob/>",
    *(f"<t:blob_of><t:kind>{kind}</t:kind></t:blob_of>" for kind in
      ["bytes", "chunks", "tuple", "empty", "no chunks", "text", "bytearray", "mixed"]),
    *(f"<t:blobs><t:kind>{kind}</t:kind></t:blobs>" for kind in ["list", "chunked", "bytes", "empty"]),
    # refused before any codec runs: both paths must agree on these too
    "<t:blob><t:data>not base64!</t:data></t:blob>",
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


def test_what_is_compiled_and_what_keeps_spyne():
    class Point(ComplexModel):
        __namespace__ = TNS
        x = Integer

    class Elsewhere(ComplexModel):
        __namespace__ = "urn:dsmt:test:elsewhere"
        x = Integer

    class Node(ComplexModel):
        __namespace__ = TNS

    Node._type_info["next"] = Node  # a type that contains itself

    class Child(Point):
        y = Integer

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

        @rpc(Unicode(max_occurs=3), _returns=Point.customize(max_occurs=9))
        def repeated(ctx, texts):
            return []

        @rpc(_returns=Array(Unicode))
        def array_out(ctx):
            return []

        @rpc(Elsewhere, _returns=Unicode)
        def other_namespace(ctx, value):
            return ""

        @rpc(Node, _returns=Unicode)
        def recursive(ctx, node):
            return ""

        @rpc(Child, _returns=Unicode)
        def extends(ctx, child):
            return ""

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
    compiled = {"plain", "complex_in", "complex_out", "repeated", "binary"}
    assert {codec.descriptor.operation_name for codec in core._codecs.values()} == compiled
    descriptors = [d for ds in core.application.interface.service_method_map.values() for d in ds]
    assert {d.operation_name for d in descriptors if compile_operation(core.application, d, SOAP11.envelope_ns)} \
        == compiled


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


# ------------------------------------------------------------------ complex types and repeated members

class Person(ComplexModel):
    __namespace__ = TNS
    _type_info = [("name", Unicode(min_occurs=1, nillable=False)), ("admin", Boolean)]


class Spot(ComplexModel):
    __namespace__ = TNS
    _type_info = [("x", Integer), ("y", Integer), ("label", Unicode), ("tags", Unicode(max_occurs=5))]


class Group(ComplexModel):
    __namespace__ = TNS
    _type_info = [("name", Unicode(min_occurs=1, nillable=False)),
                  ("spots", Spot.customize(min_occurs=0, max_occurs=10, nillable=False)),
                  ("owner", Person), ("size", Integer(min_occurs=1))]


def _group(kind: str):
    """Reply values, the ordinary ones first, then those only spyne writes."""
    spot = Spot(x=1, y=-2, label="a & b", tags=["t1", "t2"])
    return {
        "full": Group(name="g", spots=[spot, Spot(x=0)], owner=Person(name="ann", admin=True), size=2),
        "empty lists": Group(name="g", spots=[], owner=Person(name="bob"), size=0),
        "tuple": Group(name="g", spots=(spot,), size=1),
        "empty member": Group(name="g", spots=[Spot()], size=1),
        "none": None,
        "dict": {"name": "g", "size": 1},
        "none in list": Group(name="g", spots=[None], size=1),
        "generator": Group(name="g", spots=(s for s in [spot]), size=1),
        "required none": Group(name="g", size=None),
        "wrong member type": Group(name="g", spots=[Person(name="p")], size=1),
        "string for integer": Group(name="g", size="1"),
    }[kind]


class Shapes(ServiceBase):
    @rpc(Group, Unicode(max_occurs=4), _returns=Group)
    def regroup(ctx, group, notes):
        SEEN.append((_plain(group), notes))
        return group

    @rpc(Unicode, _returns=Group)
    def make(ctx, kind):
        return _group(kind)

    @rpc(Unicode, _returns=Spot.customize(max_occurs=20))
    def spots(ctx, kind):
        return {"list": [Spot(x=1), Spot(y=2, tags=["z"])], "empty": [], "none": None, "single": Spot(x=1)}[kind]


def _plain(value):
    """A spyne value as plain data, to compare what both paths built."""
    if isinstance(value, ComplexModel):
        return (type(value).__name__, {key: _plain(item) for key, item in vars(value).items()})
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def shape_cores(version):
    return core_pair(Shapes, version)


SPOT = "<t:spots><t:x>3</t:x><t:label>here</t:label><t:tags>a</t:tags><t:tags/><t:tags>c</t:tags></t:spots>"
COMPLEX = [
    f"<t:regroup><t:group><t:name>g</t:name>{SPOT}{SPOT}<t:owner><t:name>o</t:name><t:admin>true</t:admin></t:owner>"
    "<t:size>2</t:size></t:group><t:notes>n1</t:notes><t:notes>n2</t:notes></t:regroup>",
    "<t:regroup><t:group><t:name>g</t:name><t:size>0</t:size></t:group></t:regroup>",
    "<t:regroup><t:group><t:name>g</t:name><t:spots/><t:owner xsi:nil='true'/><t:size>1</t:size></t:group>"
    "<t:notes xsi:nil='true'/><t:notes/></t:regroup>",
    "<t:regroup><t:group><t:name>g</t:name><t:spots><t:tags xsi:nil='true'/></t:spots>"
    "<t:size xsi:nil='true'/></t:group></t:regroup>",
    "<t:regroup/>",
    "<t:regroup><t:group><t:size>1</t:size></t:group></t:regroup>",  # schema-invalid: no name
    *(f"<t:make><t:kind>{kind}</t:kind></t:make>" for kind in
      ["full", "empty lists", "tuple", "empty member", "none", "dict", "none in list", "generator", "required none",
       "wrong member type", "string for integer"]),
    *(f"<t:spots><t:kind>{kind}</t:kind></t:spots>" for kind in ["list", "empty", "none", "single"]),
]


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
@pytest.mark.parametrize("body", COMPLEX)
def test_complex_types_compiled_and_spyne_answer_alike(version, body):
    compiled, spyne = answers(shape_cores(version), body, version)
    assert compiled == spyne


def test_complex_operations_are_compiled():
    compiled, _ = shape_cores(SOAP11)
    assert {codec.descriptor.operation_name for codec in compiled._codecs.values()} == {"regroup", "make", "spots"}


def test_a_slice_report_on_many_nodes_is_written_alike():
    """The slice manager's real report type, 200 nodes: the reply the compiled path exists for."""
    from dsmt.server.slicemanager.service import TNS as SM_TNS, NodeResult, SliceReport

    class Reports(ServiceBase):
        @rpc(Integer, _returns=SliceReport)
        def report(ctx, nodes):
            return SliceReport(command="NewVms", slice="xyz1", ok=False, summary=f"{nodes - 1} of {nodes}",
                               result=[NodeResult(node=f"n{i}", ok=i > 0, line=f"Success on n{i}", state="running",
                                                  expiresAt=1790000000 + i, keys=i % 3,
                                                  code=None if i else "Refused", reason=None if i else "full <&>")
                                       for i in range(nodes)], value=["v1", "v2"])

    bodies = []
    for fast in (True, False):
        core = SoapCore([Reports], SM_TNS, "Reports", fast_path=fast)
        assert bool(core._codecs) is fast
        body = f'<t:report xmlns:t="{SM_TNS}"><t:nodes>200</t:nodes></t:report>'
        bodies.append(core.process((f'<s:Envelope xmlns:s="{SOAP11.envelope_ns}"><s:Body>{body}</s:Body>'
                                    "</s:Envelope>").encode()).result.body)
    assert bodies[0] == bodies[1] and bodies[0].count(b"<tns:result>") == 200


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_an_integer_too_long_to_convert_is_a_short_invalid_body_fault_on_both_paths(version):
    """xs:integer has no length limit; Python converts at most 4300 digits.  Both paths answer a Sender
    InvalidBody fault whose reason stays short, not an internal error or a fault quoting every digit."""
    body = "<t:regroup><t:group><t:name>g</t:name><t:size>" + "7" * 5000 + "</t:size></t:group></t:regroup>"
    for core in shape_cores(version):
        reply = core.process(request(body, version)).result
        assert reply.is_fault and reply.fault.code == "Sender", reply.body[:300]
        assert [subcode.localname for subcode in reply.fault.subcodes] == ["InvalidBody"]
        assert len(reply.fault.reason) < 400
    compiled = shape_cores(version)[0].process(request(body, version)).result
    assert compiled.fault.reason == f"{{{TNS}}}size: an integer of 5000 digits, over the 4300 this service reads"


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
@pytest.mark.parametrize("operation", ["<t:echo><t:text>hi</t:text></t:echo>", "<t:consume/>",
                                       "<t:odd><t:kind>int</t:kind></t:odd>",
                                       "<t:refuse><t:why>declared</t:why></t:refuse>"])
def test_replies_with_addressing_headers_are_alike(version, operation):
    """The compiled path writes the reply's WS-Addressing headers in place; spyne's reply gets them spliced
    in.  Apart from each reply's own fresh MessageID the bytes are the same."""
    import re
    header = ('<s:Header><wsa:MessageID xmlns:wsa="http://www.w3.org/2005/08/addressing">urn:uuid:'
              '0b1d4a36-1f5e-4c3a-9d0e-3c1d2e4f5a6b</wsa:MessageID><wsa:ReplyTo xmlns:wsa='
              '"http://www.w3.org/2005/08/addressing"><wsa:Address>psepr:/org/dsmt/ns/reply/x/</wsa:Address>'
              "</wsa:ReplyTo></s:Header>")
    data = request(operation, version).replace(b"<s:Body>", header.encode() + b"<s:Body>")
    replies = [core.process(data).result.body for core in cores(version)]
    fresh = re.compile(rb"(<wsa:MessageID[^>]*>)urn:uuid:[0-9a-f-]{36}(</wsa:MessageID>)")
    assert [len(fresh.findall(reply)) for reply in replies] == [1, 1]
    assert fresh.sub(rb"\1X\2", replies[0]) == fresh.sub(rb"\1X\2", replies[1])
    assert b"<wsa:RelatesTo" in replies[0] and b"psepr:/org/dsmt/ns/reply/x/" in replies[0]
