"""WS-Security end to end without sockets: zeep client → SigningTransport → SoapCore + WsSecurityPolicy → zeep.

The "network" is a zeep transport whose ``post`` hands the bytes to a real
``SoapCore`` (the test EchoService) and returns its answer; the service
methods used are synchronous, so the core's Deferred has fired when
``process`` returns and no reactor runs.
"""
from __future__ import annotations

import asyncio

import pytest
import zeep
import zeep.exceptions
import zeep.transports
from zeep.wsdl.utils import etree_to_string

from dsmt.transports.soap import wssec
from dsmt.transports.soap.core import SOAP11, SOAP12
from dsmt.transports.soap.pki import Purpose
from dsmt.transports.soap.wssec import AsyncSigningTransport, Signer, SigningTransport, Verifier, WsSecurityPolicy
from dsmt.transports.soap.zeepsupport import make_client
from tests.transports.soap.service import make_core
from tests.transports.soap.test_wssec import NOW, Party, parties

ADDRESS = "http://node1.example/soap/echo"


class Response:
    """What zeep reads of a requests.Response."""

    def __init__(self, content: bytes, status: int, content_type: str):
        self.content = content
        self.status_code = status
        self.headers = {"Content-Type": content_type}
        self.encoding = "utf-8"


class CoreTransport(zeep.transports.Transport):
    """zeep's transport with ``post`` answered by a SoapCore in-process; ``mangle`` may alter the reply."""

    def __init__(self, core, mangle=None):
        super().__init__()
        self.core = core
        self.mangle = mangle or (lambda reply: reply)
        self.requests: list[bytes] = []

    def post(self, address, message, headers):
        self.requests.append(message)
        answered = []
        self.core.process(message, content_type=headers.get("Content-Type")).addCallback(answered.append)
        assert answered, "the core did not answer synchronously"
        response = answered[0]
        return Response(self.mangle(response.body), 500 if response.fault else 200, response.content_type)


class AsyncCoreTransport(CoreTransport):
    """Like zeep's AsyncTransport: an ``async def post`` taking bytes."""

    async def post(self, address, message, headers):
        return CoreTransport.post(self, address, message, headers)


class PostXmlOnlyTransport(CoreTransport):
    """Like dsmt's TreqTransport: only ``async def post_xml``, which serialises the tree itself."""

    async def post_xml(self, address, envelope, headers):
        return CoreTransport.post(self, address, etree_to_string(envelope), headers)


def clock():
    """Every party's clock: the test certificates are valid around NOW, not around today."""
    return NOW


def server_policy(party: Party | None = None, **options) -> WsSecurityPolicy:
    service = party or parties().service
    options.setdefault("clock", clock)
    return WsSecurityPolicy(parties().trust, service.key, service.cert, **options)


def client_for(core, *, user: Party | None = None, mangle=None, dns_name="node1.example", transport_class=None,
               asynchronous=False, replay_capacity=wssec.DEFAULT_REPLAY_CAPACITY):
    user = user or parties().alice
    inner = (transport_class or CoreTransport)(core, mangle)
    wrapper_class = AsyncSigningTransport if asynchronous else SigningTransport
    transport = wrapper_class(inner, Signer(user.key, user.cert, clock=clock),
                              Verifier(parties().trust, purpose=Purpose.SERVER, dns_name=dns_name, clock=clock,
                                       replay_capacity=replay_capacity))
    return make_client(core.wsdl(ADDRESS), transport, asynchronous=asynchronous), inner


def verify_only_policy(**options) -> WsSecurityPolicy:
    """A service policy that checks requests but has no key: its replies and faults go out unsigned."""
    return WsSecurityPolicy(parties().trust, clock=clock, **options)


@pytest.mark.parametrize("version", [SOAP11, SOAP12])
def test_signed_call_and_signed_reply(version):
    core = make_core(version, filters=[server_policy()])
    client, inner = client_for(core)
    assert client.service.whoami().startswith("VerifiedCaller(subject='CN=alice,OU=user'")
    assert client.service.repeat("dsmt", 2) == ["dsmt", "dsmt"]
    request = inner.requests[0]
    assert b"<wsse:Security" in request and b"wsa:MessageID" in request  # zeep's own WS-Addressing, signed


@pytest.mark.parametrize("transport_class", [AsyncCoreTransport, PostXmlOnlyTransport])
def test_async_client_through_the_async_wrapper(transport_class):
    core = make_core(filters=[server_policy()])
    client, inner = client_for(core, transport_class=transport_class, asynchronous=True)
    assert asyncio.run(client.service.repeat("x", 3)) == ["x", "x", "x"]
    assert b"<wsse:Security" in inner.requests[0]


def test_unsigned_request_is_refused_with_the_ws_security_fault():
    core = make_core(filters=[server_policy()])
    plain = make_client(core.wsdl(ADDRESS), CoreTransport(core))
    with pytest.raises(zeep.exceptions.Fault) as caught:
        plain.service.whoami()
    assert caught.value.message == "message is not signed: no wsse:Security header"
    assert caught.value.code.endswith("InvalidSecurity")


def test_unsigned_allowed_when_not_required():
    core = make_core(filters=[verify_only_policy(require_signed=False)])
    plain = make_client(core.wsdl(ADDRESS), CoreTransport(core))
    assert plain.service.whoami() == "None"


def test_caller_of_another_ca_gets_failed_authentication():
    core = make_core(filters=[server_policy()])
    client, _ = client_for(core, user=parties().mallory)
    with pytest.raises(zeep.exceptions.Fault, match="certificate not issued by a trusted CA") as caught:
        client.service.whoami()
    assert caught.value.code.endswith("FailedAuthentication")  # the fault reply was signed and verified


def test_unsigned_fault_reply_reaches_the_caller():
    client, _ = client_for(make_core(filters=[verify_only_policy()]), user=parties().mallory)
    with pytest.raises(zeep.exceptions.Fault, match="certificate not issued by a trusted CA"):
        client.service.whoami()


def test_a_service_without_the_filter_refuses_signed_requests():
    """wsse:Security is mustUnderstand: a service that does not check signatures must not run the call."""
    client, _ = client_for(make_core())
    with pytest.raises(zeep.exceptions.Fault, match="header blocks not understood here: .*Security"):
        client.service.whoami()


def test_unsigned_ordinary_reply_is_refused():
    client, _ = client_for(make_core(filters=[verify_only_policy()]))
    with pytest.raises(wssec.WsSecurityFault, match=r"^wsse:InvalidSecurity: reply is not signed: no wsse:Security"):
        client.service.repeat("a", 1)


def test_tampered_reply():
    core = make_core(filters=[server_policy()])
    client, _ = client_for(core, mangle=lambda reply: reply.replace(b">dsmt<", b">DSMT<"))
    with pytest.raises(wssec.WsSecurityFault, match=r"^wsse:FailedCheck: digest of soap:Body"):
        client.service.repeat("dsmt", 1)


def first_reply_forever():
    replies = []

    def mangle(reply):
        replies.append(reply)
        return replies[0]
    return mangle


def test_replayed_reply_is_refused():
    client, _ = client_for(make_core(filters=[server_policy()]), mangle=first_reply_forever())
    client.service.repeat("a", 1)
    with pytest.raises(wssec.WsSecurityFault, match=r"^wsse:InvalidSecurity: replayed message urn:uuid:"):
        client.service.repeat("b", 1)


def test_reply_to_another_request_is_refused():
    """A genuine signed reply, but to an earlier request: its signed RelatesTo names that request."""
    client, _ = client_for(make_core(filters=[server_policy()]), mangle=first_reply_forever(), replay_capacity=None)
    client.service.repeat("a", 1)
    with pytest.raises(wssec.WsSecurityFault, match=r"^wsse:InvalidSecurity: reply relates to 'urn:uuid:[-0-9a-f]+', "
                                                    r"not to this request 'urn:uuid:[-0-9a-f]+'$"):
        client.service.repeat("b", 1)


def test_reply_signed_by_a_user_certificate_is_refused():
    client, _ = client_for(make_core(filters=[server_policy(parties().bob)]), dns_name=None)
    with pytest.raises(wssec.WsSecurityFault, match="is not valid for serverAuth"):
        client.service.repeat("a", 1)


def test_reply_from_another_host_is_refused():
    client, _ = client_for(make_core(filters=[server_policy()]), dns_name="node2.example")
    with pytest.raises(wssec.WsSecurityFault, match=r"is not valid for node2.example \(it names node1.example\)"):
        client.service.repeat("a", 1)
