"""The SOAP core on bytes: replies, every fault it answers, filters, WS-Addressing, WSDL.

Synchronous operations answer within ``process`` (its Deferred has fired when
it returns), so most tests need no reactor; the operations that return a
Deferred or are coroutines run under trial.
"""
from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from lxml import etree
from twisted.internet import defer
from twisted.trial import unittest

from dsmt.transports.soap import addressing
from dsmt.transports.soap.core import (
    DSMT_FAULT_NS, PSEPR_TRANSPORT, SOAP11, SOAP12, WSAM_NS, WSDL_CACHE_SIZE, OperationActions, SoapFault, SoapLimits, SoapResponse)
from tests.transports.soap.service import (
    CLIENT_FAULTS, SECRET, SERVED, TNS, FaultView, RequireToken, assert_core_fault, envelope, make_core)

VERSIONS = [SOAP11, SOAP12]
WSA = addressing.WSA_NS
CORES: dict = {}


def core_for(version):
    """One core per SOAP version for the whole module (building one takes ~50 ms)."""
    if version not in CORES:
        CORES[version] = make_core(version)
    return CORES[version]


def answer(core, data: bytes, **options) -> SoapResponse:
    answered = core.process(data, **options)
    assert answered.called, "a synchronous operation must be answered within process()"
    return answered.result


def reply_root(response: SoapResponse):
    assert not response.is_fault, response.body
    return etree.fromstring(response.body)


def t(name: str) -> str:
    return "{%s}%s" % (TNS, name)


ECHO = ("<t:echo><t:shape><t:name>square</t:name><t:points>"
        "<t:Point><t:x>0</t:x><t:y>0</t:y><t:label>origin &amp; co</t:label></t:Point>"
        "<t:Point><t:x>1</t:x><t:y>-1</t:y></t:Point></t:points></t:shape></t:echo>")


# ------------------------------------------------------------------ replies

@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_echo_complex_type_with_array(version):
    response = answer(core_for(version), envelope(ECHO, version))
    assert response.content_type == version.content_type and response.version is version
    root = reply_root(response)
    (shape,) = root.iter(t("echoResult"))
    assert shape.findtext(t("name")) == "square"
    points = shape.findall(f"{t('points')}/{t('Point')}")
    assert [(p.findtext(t("x")), p.findtext(t("y")), p.findtext(t("label"))) for p in points] == [
        ("0", "0", "origin & co"), ("1", "-1", None)]


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_array_result(version):
    root = reply_root(answer(core_for(version), envelope("<t:repeat><t:word>ab</t:word><t:times>3</t:times></t:repeat>",
                                                         version)))
    assert [e.text for e in root.iter("{%s}string" % TNS)] == ["ab", "ab", "ab"]


def test_a_charset_that_agrees_with_the_document():
    data = ("<?xml version='1.0' encoding='ISO-8859-1'?>" + envelope(
        "<t:repeat><t:word>d\u00e9j\u00e0</t:word><t:times>1</t:times></t:repeat>").decode()).encode("latin-1")
    root = reply_root(answer(core_for(SOAP11), data, content_type='text/xml; charset="iso-8859-1"'))
    assert [e.text for e in root.iter("{%s}string" % TNS)] == ["d\u00e9j\u00e0"]


# ------------------------------------------------------------------ faults of the core

@pytest.mark.parametrize("case", CLIENT_FAULTS, ids=str)
@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_client_faults_name_the_problem(version, case):
    request, subcode, reason = CLIENT_FAULTS[case]
    response = answer(core_for(version), request(version))
    assert response.is_fault and response.fault.code == SoapFault.SENDER
    assert response.content_type == version.content_type
    assert_core_fault(response.body, version, subcode, *reason)


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_oversized_envelope_is_a_fault_not_a_truncation(version):
    core = make_core(version, limits=SoapLimits(max_envelope_bytes=2000))
    request = envelope(f"<t:repeat><t:word>{'w' * 3000}</t:word><t:times>1</t:times></t:repeat>", version)
    assert_core_fault(answer(core, request).body, version, "EnvelopeTooLarge",
                      f"SOAP envelope is {len(request)} bytes, over the limit of 2000 bytes")
    assert not answer(core, envelope("<t:repeat><t:word>w</t:word><t:times>1</t:times></t:repeat>", version)).is_fault


def test_charset_disagreeing_with_the_document():
    data = b"<?xml version='1.0' encoding='UTF-8'?>" + envelope("<t:crash/>")
    assert_core_fault(answer(core_for(SOAP11), data, content_type="text/xml; charset=iso-8859-1").body, SOAP11,
                      "CharsetMismatch", "charset=iso-8859-1", "UTF-8")
    assert_core_fault(answer(core_for(SOAP11), data, content_type="text/xml; charset=klingon").body, SOAP11,
                      "CharsetMismatch", "klingon")


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_soap12_allows_nothing_after_the_body(version):
    request = f"<s:Envelope xmlns:s='{version.envelope_ns}'><s:Body><t:crash xmlns:t='{TNS}'/></s:Body><x/></s:Envelope>"
    response = answer(core_for(version), request.encode())
    if version is SOAP12:
        assert_core_fault(response.body, SOAP12, "BadEnvelope", "x follows the Body")
    else:  # SOAP 1.1 §4.3: elements may follow the Body
        assert FaultView(response.body).code == "Server.InternalError"


def test_version_mismatch_is_answered_in_soap11_with_an_upgrade_header():
    response = answer(core_for(SOAP12), envelope("<t:crash/>", SOAP11))
    assert response.version is SOAP11 and response.content_type == SOAP11.content_type
    fault = FaultView(response.body)
    assert (fault.version, fault.code, fault.code_namespace) == (SOAP11, "VersionMismatch", SOAP11.envelope_ns)
    assert "speaks SOAP 1.2, the request is a SOAP 1.1 envelope" in fault.reason
    (upgrade,) = fault.header
    (supported,) = upgrade
    assert upgrade.tag == "{%s}Upgrade" % SOAP12.envelope_ns
    prefix, _, local = supported.get("qname").partition(":")
    assert (supported.nsmap[prefix], local) == (SOAP12.envelope_ns, "Envelope")


def test_version_mismatch_from_a_soap11_service():
    response = answer(core_for(SOAP11), envelope("<t:crash/>", SOAP12))
    fault = FaultView(response.body)
    assert (fault.version, fault.code, fault.header) == (SOAP11, "VersionMismatch", None)


# ------------------------------------------------------------------ faults of the service

@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_declared_fault_keeps_its_code_and_detail(version):
    response = answer(core_for(version), envelope("<t:spend><t:amount>20</t:amount></t:spend>", version))
    fault = FaultView(response.body)
    if version is SOAP11:
        assert fault.code == "Client.QuotaExceeded"
    else:
        assert (fault.code, fault.subcodes) == ("Sender", [(TNS, "QuotaExceeded")])
    assert fault.reason == "the quota of 10 is exceeded"
    (detail,) = fault.detail
    assert detail.tag == t("QuotaExceeded") and detail.findtext(t("limit")) == "10"
    assert root_text(answer(core_for(version), envelope("<t:spend><t:amount>4</t:amount></t:spend>", version))) == "6"


def test_undeclared_fault_codes_become_subcodes():
    from spyne import Fault, ServiceBase, Unicode, rpc

    from dsmt.transports.soap.core import SoapCore

    class Odd(ServiceBase):
        @rpc(Unicode, _returns=Unicode)
        def odd(ctx, code):
            raise Fault(code, "odd")

    cores = {version: SoapCore([Odd], "urn:odd", "Odd", soap_version=version) for version in VERSIONS}

    def fault(version, code):
        request = f"<s:Envelope xmlns:s='{version.envelope_ns}'><s:Body><o:odd xmlns:o='urn:odd'><o:code>{code}" \
                  "</o:code></o:odd></s:Body></s:Envelope>"
        return FaultView(answer(cores[version], request.encode()).body)

    assert fault(SOAP11, "Quota.Daily").code == "Server.Quota.Daily"  # neither Client nor Server: the server's
    assert (fault(SOAP12, "Quota.Daily").code, fault(SOAP12, "Quota.Daily").subcodes) == (
        "Receiver", [("urn:odd", "Quota"), ("urn:odd", "Daily")])
    assert (fault(SOAP12, "Client").code, fault(SOAP12, "Client").subcodes) == ("Sender", [])
    assert fault(SOAP11, "Server.Busy").code == "Server.Busy"


def root_text(response: SoapResponse) -> str:
    (result,) = reply_root(response).iter(t("spendResult"))
    return result.text


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_unexpected_exception_is_an_internal_error_without_details(version):
    response = answer(core_for(version), envelope("<t:crash/>", version))
    fault = FaultView(response.body)
    assert (fault.code, fault.subcodes) == (("Server.InternalError", []) if version is SOAP11 else
                                            ("Receiver", [(DSMT_FAULT_NS, "InternalError")]))
    assert SECRET.encode() not in response.body and b"Traceback" not in response.body
    assert response.fault.code == SoapFault.RECEIVER


def test_a_bug_in_the_core_is_still_answered(monkeypatch):
    core = make_core()
    monkeypatch.setattr(core, "_call", None)  # calling it raises TypeError deep in the pipeline
    fault = FaultView(answer(core, envelope("<t:crash/>")).body)
    assert fault.code == "Server.InternalError"


# ------------------------------------------------------------------ mustUnderstand

UNKNOWN_HEADER = "<u:Secret xmlns:u='urn:unknown' s:mustUnderstand='{value}' {role}/>"


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_must_understand_an_unknown_header(version):
    header = UNKNOWN_HEADER.format(value="1", role="")
    response = answer(core_for(version), envelope("<t:crash/>", version, header))
    fault = FaultView(response.body)
    assert fault.code == "MustUnderstand" and "{urn:unknown}Secret" in fault.reason
    if version is SOAP12:
        (not_understood,) = fault.header
        prefix, _, local = not_understood.get("qname").partition(":")
        assert (not_understood.nsmap[prefix], local) == ("urn:unknown", "Secret")


@pytest.mark.parametrize("header", [
    UNKNOWN_HEADER.format(value="0", role=""),
    UNKNOWN_HEADER.format(value="1", role="s:actor='urn:someone-else' s:role='urn:someone-else'"),
    f"<wsa:Action xmlns:wsa='{WSA}' s:mustUnderstand='1'>{TNS}/EchoService/crash</wsa:Action>",
])
@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_headers_not_for_us_or_understood_pass(version, header):
    assert FaultView(answer(core_for(version), envelope("<t:crash/>", version, header)).body).reason.startswith(
        "internal error")  # reached the operation


# ------------------------------------------------------------------ WS-Addressing

def wsa_request(operation: str, version, message_id: str = "3e8b0f1c-0b9a-4c33-9a51-0a7d7f5c2d10",
                reply_to: str | None = None) -> bytes:
    return addressing.insert_headers(envelope(operation, version), addressing.request_headers(
        action=f"{TNS}/EchoService/" + re.match(r"<t:(\w+)", operation).group(1), to="http://wherever/",
        message_id=message_id,
        reply_to=None if reply_to is None else addressing.EndpointReference(reply_to)))


def reply_addressing(response: SoapResponse) -> addressing.AddressingHeaders:
    return addressing.read_headers(etree.fromstring(response.body))


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_reply_relates_to_the_request(version):
    core = core_for(version)
    response = answer(core, wsa_request("<t:spend><t:amount>1</t:amount></t:spend>", version, reply_to="urn:back"))
    headers = reply_addressing(response)
    assert headers.relates_to == "3e8b0f1c-0b9a-4c33-9a51-0a7d7f5c2d10"  # bare UUID echoed as received
    assert headers.action == wsdl_action(core, "spend", "output") == f"{TNS}/EchoService/spendResponse"
    assert headers.to == "urn:back" and headers.message_id.startswith("urn:uuid:")
    assert root_text(response) == "9"


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_fault_replies_carry_addressing_too(version):
    core = core_for(version)
    declared = reply_addressing(answer(core, wsa_request("<t:spend><t:amount>99</t:amount></t:spend>", version)))
    assert declared.action == wsdl_action(core, "spend", "fault") == f"{TNS}/EchoService/spend/Fault/QuotaExceeded"
    other = reply_addressing(answer(core, wsa_request("<t:nothing/>", version, message_id="urn:uuid:m1")))
    assert (other.action, other.relates_to, other.to) == (addressing.FAULT_ACTION, "urn:uuid:m1", addressing.ANONYMOUS)


def test_no_addressing_in_no_addressing_out():
    assert b"addressing" not in answer(core_for(SOAP11), envelope("<t:spend><t:amount>1</t:amount></t:spend>")).body


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_broken_addressing_is_a_ws_addressing_fault(version):
    header = f"<wsa:MessageID xmlns:wsa='{WSA}'>a</wsa:MessageID>" * 2
    fault = FaultView(answer(core_for(version), envelope("<t:crash/>", version, header)).body)
    if version is SOAP11:  # WS-Addressing SOAP binding: the subcode is SOAP 1.1's faultcode
        assert (fault.code_namespace, fault.code) == (WSA, "InvalidAddressingHeader")
    else:
        assert (fault.code, fault.subcodes) == ("Sender", [(WSA, "InvalidAddressingHeader"), (WSA, "InvalidCardinality")])
    assert "wsa:MessageID appears 2 times" in fault.reason


def wsdl_action(core, operation: str, message: str) -> str:
    definitions = etree.fromstring(core.wsdl("http://x/"))
    (element,) = definitions.xpath(f"//wsdl:portType/wsdl:operation[@name='{operation}']/wsdl:{message}",
                                   namespaces={"wsdl": "http://schemas.xmlsoap.org/wsdl/"})
    return element.get("{%s}Action" % WSAM_NS)


# ------------------------------------------------------------------ declared Actions, checked Actions

DECLARED = {"spend": OperationActions(input="urn:bank:Spend", output="urn:bank:SpendDone",
                                      faults={"QuotaExceeded": "urn:bank:fault"}),
            "crash": OperationActions(faults={"Fault": "urn:never"})}


def addressed(body: str, version, action: str | None, message_id: str = "urn:uuid:m2") -> bytes:
    blocks = addressing.request_headers(action=action or "", to="http://wherever/", message_id=message_id)
    if action is None:  # no Action header at all
        blocks = re.sub(rb"<wsa:Action[^>]*>.*?</wsa:Action>", b"", blocks)
    return addressing.insert_headers(envelope(body, version), blocks)


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_declared_actions_in_the_wsdl_and_on_the_replies(version):
    core = make_core(version, actions=DECLARED)
    assert (wsdl_action(core, "spend", "input"), wsdl_action(core, "spend", "output"),
            wsdl_action(core, "spend", "fault")) == ("urn:bank:Spend", "urn:bank:SpendDone", "urn:bank:fault")
    assert wsdl_action(core, "echo", "input") == f"{TNS}/EchoService/echo"  # undeclared: the default pattern
    ok = reply_addressing(answer(core, addressed("<t:spend><t:amount>1</t:amount></t:spend>", version,
                                                 "urn:bank:Spend")))
    assert (ok.action, ok.relates_to) == ("urn:bank:SpendDone", "urn:uuid:m2")
    fault = reply_addressing(answer(core, addressed("<t:spend><t:amount>99</t:amount></t:spend>", version,
                                                    "urn:bank:Spend")))
    assert fault.action == "urn:bank:fault"
    # the default-pattern Action of an operation with declared ones is another operation's now: refused
    refused = answer(core, addressed("<t:spend><t:amount>1</t:amount></t:spend>", version,
                                     f"{TNS}/EchoService/spend"))
    assert FaultView(refused.body).reason.startswith("the Action ")
    with pytest.raises(ValueError, match="nosuch"):
        make_core(version, actions={"nosuch": OperationActions(input="urn:x")})


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_request_action_is_checked_leniently(version):
    core = core_for(version)
    body = "<t:spend><t:amount>1</t:amount></t:spend>"
    for action in (None, f"{TNS}/EchoService/spend"):  # absent, or the operation's own: answered
        response = answer(core, addressed(body, version, action))
        assert not response.is_fault and root_text(response) == "9"
    for action in ("", f"{TNS}/EchoService/echo", "urn:anything"):
        response = answer(core, addressed(body, version, action))
        fault = FaultView(response.body)
        if version is SOAP11:
            assert (fault.code_namespace, fault.code) == (WSA, "ActionNotSupported")
        else:
            assert (fault.code, fault.subcodes) == ("Sender", [(WSA, "ActionNotSupported")])
        problem = etree.fromstring(response.body).find(f".//{{{WSA}}}ProblemAction/{{{WSA}}}Action")
        assert (problem.text or "") == action
        assert reply_addressing(response).relates_to == "urn:uuid:m2"
    unchecked = make_core(version, check_actions=False)
    assert not answer(unchecked, addressed(body, version, "urn:anything")).is_fault


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_whole_envelope_refusals_are_correlated(version):
    core = core_for(version)
    other = SOAP12 if version is SOAP11 else SOAP11
    deep = "<t:echo>" + "<t:x>" * 40 + "</t:x>" * 40 + "</t:echo>"
    for request, code in ((addressed("<t:crash/>", other, "urn:x", "urn:uuid:vm"), "VersionMismatch"),
                          (addressed(deep, version, "urn:x", "urn:uuid:vm"), "BadXML")):
        response = answer(core, request)
        fault = FaultView(response.body)
        assert code in (fault.code, fault.code.split(".")[-1]) or fault.subcodes[-1][1] == code
        headers = reply_addressing(response)
        assert (headers.relates_to, headers.action) == ("urn:uuid:vm", addressing.FAULT_ACTION)
    # a parsed tree handed in by the transport is used as is, and its depth still checked
    request = addressed(deep, version, None, "urn:uuid:p")
    parsed = etree.fromstring(request)
    response = core.process(request, parsed=parsed).result
    assert "nested deeper than" in FaultView(response.body).reason
    assert reply_addressing(response).relates_to == "urn:uuid:p"
    request = addressed("<t:spend><t:amount>1</t:amount></t:spend>", version, None)
    assert root_text(core.process(request, parsed=etree.fromstring(request)).result) == "9"


# ------------------------------------------------------------------ filters

def token(value: str = "alice") -> str:
    return f"<t:Token s:mustUnderstand='1'>{value}</t:Token>"


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_filter_sees_exact_bytes_and_names_the_caller(version):
    require = RequireToken()
    core = make_core(version, filters=[require])
    request = envelope("<t:whoami/>", version, token("alice"))
    response = answer(core, request)
    root = reply_root(response)
    assert root.findtext(f".//{t('whoamiResult')}") == "alice"
    assert root.findtext(f"{{{version.envelope_ns}}}Header/{SERVED}") == "ok"
    assert require.seen[0] == ("in", request) and require.seen[1][0] == "out"
    served = b'<t:Served xmlns:t="%s">ok</t:Served>' % TNS.encode()
    assert response.body == addressing.insert_headers(require.seen[1][1], served)  # outbound's bytes are sent


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_filter_refusal_still_goes_through_outbound(version):
    require = RequireToken()
    fault = FaultView(answer(make_core(version, filters=[require]), envelope("<t:whoami/>", version)).body)
    assert fault.reason == "a Token header is required"
    assert fault.code == "Client.NoToken" if version is SOAP11 else fault.subcodes == [(TNS, "NoToken")]
    assert fault.header.findtext(SERVED) == "fault"
    assert [stage for stage, _ in require.seen] == ["in", "out"]


def test_faults_before_the_filters_are_not_filtered():
    require = RequireToken()
    response = answer(make_core(filters=[require]), b"junk")
    assert FaultView(response.body).code == "Client.BadXML" and require.seen == []


class Recorder:
    understood_headers = frozenset()

    def __init__(self, name: str, log: list, *, inbound=None, outbound=None):
        self.name, self.log, self._inbound, self._outbound = name, log, inbound, outbound

    def inbound(self, envelope: bytes, context) -> bytes:
        self.log.append(f"{self.name} in")
        return self._inbound(envelope) if self._inbound else envelope

    def outbound(self, envelope: bytes, context) -> bytes:
        self.log.append(f"{self.name} out")
        return self._outbound(envelope) if self._outbound else envelope


def test_filters_nest_and_rewritten_requests_are_read_again():
    log: list = []
    shout = Recorder("b", log, inbound=lambda data: data.replace(b">hi<", b">HI<"))
    core = make_core(filters=[Recorder("a", log), shout])
    root = reply_root(answer(core, envelope("<t:repeat><t:word>hi</t:word><t:times>1</t:times></t:repeat>")))
    assert [e.text for e in root.iter("{%s}string" % TNS)] == ["HI"]
    assert log == ["a in", "b in", "b out", "a out"]
    garble = make_core(filters=[Recorder("c", [], inbound=lambda data: data[:-5])])
    assert FaultView(answer(garble, envelope("<t:crash/>")).body).code == "Client.BadXML"


def test_failing_filters_are_internal_errors():
    log: list = []

    def explode(_):
        raise RuntimeError(SECRET)

    core = make_core(filters=[Recorder("a", log), Recorder("b", log, inbound=explode)])
    response = answer(core, envelope("<t:crash/>"))
    assert FaultView(response.body).code == "Server.InternalError" and SECRET.encode() not in response.body
    assert log == ["a in", "b in", "b out", "a out"]  # b's outbound runs: its inbound was called
    sealed = make_core(filters=[RequireToken(), Recorder("c", [], outbound=explode)])
    response = answer(sealed, envelope("<t:whoami/>", header=token()))
    assert FaultView(response.body).code == "Server.InternalError" and b"Served" not in response.body


# ------------------------------------------------------------------ hostile input

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), version=st.sampled_from(VERSIONS))
def test_random_bytes_get_a_well_formed_sender_fault(data, version):
    response = answer(core_for(version), data)
    fault = FaultView(response.body)
    assert response.is_fault and fault.version is version and fault.code in ("Client.BadXML", "Client.NotSOAP", "Sender")


FRAGMENTS = st.lists(st.sampled_from([
    "<t:echo>", "</t:echo>", "<t:shape>", "</t:shape>", "<t:name>", "</t:name>", "<t:points>", "</t:points>",
    "<t:Point>", "</t:Point>", "<t:x>", "</t:x>", "<t:spend>", "</t:spend>", "<t:amount>", "</t:amount>",
    "1", "-7", "x", "&amp;", "&lt;", "<![CDATA[<]]>", "<!-- c -->", "<t:repeat/>", "<s:Body>", "</s:Body>",
    "<s:Header>", "</s:Header>", " ", "\u00e9", "&#0;", "&undefined;",
]), max_size=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=FRAGMENTS, version=st.sampled_from(VERSIONS))
def test_any_body_gets_a_well_formed_reply_or_fault(body, version):
    response = answer(core_for(version), envelope("".join(body), version))
    root = etree.fromstring(response.body)
    assert root.tag == f"{{{version.envelope_ns}}}Envelope"
    if response.is_fault:
        FaultView(response.body)


# ------------------------------------------------------------------ WSDL

def test_wsdl_per_address_with_actions_and_transport():
    core = make_core(SOAP12, transport_uri=PSEPR_TRANSPORT)
    ns = {"wsdl": "http://schemas.xmlsoap.org/wsdl/", "soap12": "http://schemas.xmlsoap.org/wsdl/soap12/"}
    first, second = (etree.fromstring(core.wsdl(a)) for a in ("psepr:/org/dsmt/ns/soap/echo/", "http://h/echo"))
    for document, address in ((first, "psepr:/org/dsmt/ns/soap/echo/"), (second, "http://h/echo")):
        assert document.xpath("//wsdl:service/wsdl:port/soap12:address/@location", namespaces=ns) == [address]
        assert document.xpath("//wsdl:binding/soap12:binding/@transport", namespaces=ns) == [PSEPR_TRANSPORT]
    inputs = first.xpath("//wsdl:portType/wsdl:operation/wsdl:input", namespaces=ns)
    assert {i.get("{%s}Action" % WSAM_NS) for i in inputs} == {
        f"{TNS}/EchoService/{name}" for name in ("echo", "repeat", "later", "reverse", "spend", "crash", "whoami")}
    assert core.wsdl("http://h/echo") is core.wsdl("http://h/echo")


def test_wsdl_cache_is_bounded():
    core = make_core()
    for number in range(WSDL_CACHE_SIZE + 3):
        core.wsdl(f"http://host{number}/")
    assert len(core._wsdl_cache) == WSDL_CACHE_SIZE
    assert b"http://host0/" not in b"".join(core._wsdl_cache.values())


def test_urn_namespaces_use_colons_in_default_actions():
    from dsmt.transports.soap.core import SoapCore
    from tests.transports.soap.service import EchoService
    core = SoapCore([EchoService], "urn:dsmt:test", "Urn")
    assert b'wsam:Action="urn:dsmt:test:Urn:echo"' in core.wsdl("http://x/")


# ------------------------------------------------------------------ the fault type

def test_soap_fault_checks_its_code_and_subcodes():
    with pytest.raises(ValueError, match="not a SOAP fault code"):
        SoapFault("Client", "x")
    with pytest.raises(ValueError, match="qualified names"):
        SoapFault(SoapFault.SENDER, "x", subcodes=["Bare"])
    assert repr(SoapFault.sender("BadXML", "r")) == "SoapFault(Sender/BadXML: 'r')"


def test_soap11_faultcode_override_and_detail():
    detail = etree.fromstring("<d:Why xmlns:d='urn:d'>because</d:Why>")
    fault = SoapFault(SoapFault.SENDER, "no", subcodes=["{urn:wsse}InvalidSecurity"], detail=detail,
                      soap11_faultcode="{urn:wsse}InvalidSecurity")
    soap11, soap12 = FaultView(fault.to_envelope(SOAP11)), FaultView(fault.to_envelope(SOAP12))
    assert (soap11.code_namespace, soap11.code) == ("urn:wsse", "InvalidSecurity")
    assert soap12.subcodes == [("urn:wsse", "InvalidSecurity")]
    assert soap11.detail[0].text == soap12.detail[0].text == "because" and detail.getparent() is None


# ------------------------------------------------------------------ Deferreds and coroutines (reactor)

class AsynchronousOperations(unittest.TestCase):
    """Operations answered on a later reactor turn: a Deferred-returning method and an ``async def`` one."""

    @defer.inlineCallbacks
    def test_deferred_and_coroutine_results(self):
        for version in VERSIONS:
            core = core_for(version)
            pending = core.process(envelope("<t:later><t:text>soon</t:text></t:later>", version))
            self.assertFalse(pending.called)
            later = yield pending
            reversed_ = yield core.process(envelope("<t:reverse><t:text>abc</t:text></t:reverse>", version))
            self.assertEqual(reply_root(later).findtext(f".//{t('laterResult')}"), "SOON")
            self.assertEqual(reply_root(reversed_).findtext(f".//{t('reverseResult')}"), "cba")

    @defer.inlineCallbacks
    def test_concurrent_calls_complete_independently(self):
        core = core_for(SOAP12)
        texts = [f"call{n}" for n in range(30)]
        responses = yield defer.gatherResults([
            core.process(envelope(f"<t:reverse><t:text>{text}</t:text></t:reverse>", SOAP12)) for text in texts])
        self.assertEqual([reply_root(r).findtext(f".//{t('reverseResult')}") for r in responses],
                         [text[::-1] for text in texts])
