"""zeep machinery: binding classes for dsmt's transport URIs, clients from WSDL bytes or files.

A loopback zeep transport hands envelopes straight to a :class:`SoapCore`
built for SOAP over PsEPR — the shape the PsEPR transport will have, without
the network.
"""
from __future__ import annotations

import io

import pytest
import zeep
from lxml import etree
from requests import Response
from twisted.trial import unittest
from zeep.wsdl.utils import etree_to_string

from dsmt.transports.soap.core import HTTP_TRANSPORT, PSEPR_TRANSPORT, SOAP12
from dsmt.transports.soap.zeepsupport import bind, binding_classes, make_client
from tests.transports.soap.service import TNS, make_core

ADDRESS = "psepr:/org/dsmt/ns/soap/echo/"


def psepr_core():
    return make_core(SOAP12, transport_uri=PSEPR_TRANSPORT)


def as_response(soap_response) -> Response:
    response = Response()
    response._content = soap_response.body
    response.status_code = 500 if soap_response.is_fault else 200
    response.headers["Content-Type"] = soap_response.content_type
    return response


class Loopback(zeep.Transport):
    """A synchronous zeep transport whose calls go straight to ``core`` (synchronous operations only)."""

    binding_classes = binding_classes(PSEPR_TRANSPORT)

    def __init__(self, core):
        super().__init__()
        self.core = core
        self.addresses: list[str] = []

    def post_xml(self, address, envelope, headers):
        self.addresses.append(address)
        answered = self.core.process(etree_to_string(envelope), content_type=headers["Content-Type"])
        return as_response(answered.result)


class AsyncLoopback(Loopback):
    """The asynchronous form: ``post_xml`` awaits the core's Deferred, as a PsEPR reply would be awaited."""

    async def post_xml(self, address, envelope, headers):
        return as_response(await self.core.process(etree_to_string(envelope), content_type=headers["Content-Type"]))


def test_zeep_alone_drops_a_psepr_binding_silently():
    client = zeep.Client(io.BytesIO(psepr_core().wsdl(ADDRESS)))
    with pytest.raises(IndexError):
        client.service  # noqa: B018 — the documented failure mode binding_classes exists for


def test_binding_classes_make_the_psepr_port_first_class():
    core = psepr_core()
    transport = Loopback(core)
    client = make_client(core.wsdl(ADDRESS), transport)
    shape = client.service.echo({"name": "over psepr", "points": {"Point": [{"x": 5}]}})
    assert (shape.name, shape.points.Point[0].x) == ("over psepr", 5)
    assert transport.addresses == [ADDRESS]
    with pytest.raises(zeep.exceptions.Fault) as caught:
        client.service.spend(50)
    assert caught.value.subcodes == [etree.QName(TNS, "QuotaExceeded")]


def test_bind_picks_the_port_by_transport():
    core = psepr_core()
    client = make_client(core.wsdl(ADDRESS), Loopback(core))
    assert bind(client, PSEPR_TRANSPORT).repeat("x", 2) == ["x", "x"]
    with pytest.raises(LookupError, match=HTTP_TRANSPORT):
        bind(client, HTTP_TRANSPORT)


def test_make_client_from_a_wsdl_file(tmp_path):
    core = psepr_core()
    path = tmp_path / "echo.wsdl"
    path.write_bytes(core.wsdl(ADDRESS))
    assert make_client(path, Loopback(core)).service.repeat("f", 1) == ["f"]


def test_asynchronous_clients_refuse_urls():
    with pytest.raises(ValueError, match="fetch http://h/echo\\?wsdl first"):
        make_client("http://h/echo?wsdl", AsyncLoopback(None), asynchronous=True)


def test_replies_with_a_dtd_are_refused():
    class Hostile(Loopback):
        def post_xml(self, address, envelope, headers):
            response = Response()
            response._content = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>'
            response.status_code = 200
            return response

    core = psepr_core()
    with pytest.raises(zeep.exceptions.DTDForbidden):
        make_client(core.wsdl(ADDRESS), Hostile(core)).service.repeat("x", 1)


class AsyncClientOnTheReactor(unittest.TestCase):
    async def test_async_client_awaits_deferreds(self):
        core = psepr_core()
        client = make_client(core.wsdl(ADDRESS), AsyncLoopback(core), asynchronous=True)
        self.assertEqual(await client.service.later("deferred"), "DEFERRED")
        self.assertEqual(await client.service.reverse("coroutine"), "enituoroc")
