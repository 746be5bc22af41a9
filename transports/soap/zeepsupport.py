"""zeep machinery every dsmt SOAP client shares, whatever carries the envelopes.

* :func:`binding_classes` — zeep **drops silently** (a DEBUG log line) every
  WSDL binding whose ``soap:binding/@transport`` is not SOAP over HTTP; the
  client then fails with ``IndexError`` on ``client.service``.  A zeep
  transport object may carry a ``binding_classes`` attribute, which zeep then
  uses to parse bindings: give a transport for SOAP over PsEPR
  ``binding_classes = binding_classes(PSEPR_TRANSPORT)`` and its ports become
  first-class.
* :func:`make_client` — a ``zeep.Client`` or ``zeep.AsyncClient`` from WSDL
  bytes (fetched without blocking, e.g. ``TreqTransport.fetch``) or a WSDL
  file (``wsdl/…``), with safe parser settings.
* :func:`bind` — the service proxy of the port whose binding uses a given
  transport URI (a WSDL declares an HTTP and a PsEPR port per service).

Inside a reactor, ``zeep.AsyncClient`` whose transport has an ``async def
post_xml`` awaiting a Deferred runs on the default reactor through
``defer.ensureDeferred(client.service.op(...))``; no asyncio reactor or httpx
is needed.  WSDL loading stays synchronous in zeep, hence bytes in hand.
"""
from __future__ import annotations

import io
import os
from typing import Union

import zeep
from zeep.settings import Settings
from zeep.wsdl.bindings import HttpGetBinding, HttpPostBinding, Soap11Binding, Soap12Binding
from zeep.wsdl.bindings.soap import SoapOperation
from zeep.utils import qname_attr

from dsmt.transports.soap import HTTP_TRANSPORT

__all__ = ["SOAP12_HTTP_TRANSPORT", "binding_classes", "make_client", "bind", "client_settings"]

#: The SOAP 1.2 HTTP binding's own transport URI, which zeep accepts besides :data:`HTTP_TRANSPORT`.
SOAP12_HTTP_TRANSPORT = "http://www.w3.org/2003/05/soap/bindings/HTTP/"


class _AcceptedTransports:
    """Mixin for zeep's SOAP bindings: parse a binding whose transport URI is in ``transports``.

    ``parse`` is zeep 4.3.3's ``SoapBinding.parse`` (zeep is pinned) without
    its hard-coded list of the two HTTP URIs.
    """

    transports: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, definitions, xmlelement):
        soap_binding = xmlelement.find("soap:binding", namespaces=cls.nsmap)
        transport = soap_binding.get("transport")
        if transport not in cls.transports:
            raise NotImplementedError(f"the binding transport {transport} is not one of {sorted(cls.transports)}")
        binding = cls(definitions.wsdl, qname_attr(xmlelement, "name", definitions.target_namespace),
                      qname_attr(xmlelement, "type", definitions.target_namespace), transport,
                      soap_binding.get("style", "document"))
        for node in xmlelement.findall("wsdl:operation", namespaces=cls.nsmap):
            binding._operation_add(SoapOperation.parse(definitions, node, binding, nsmap=cls.nsmap))
        return binding


def binding_classes(*transport_uris: str) -> list[type]:
    """zeep binding classes accepting ``transport_uris`` as well as SOAP over HTTP (both versions)."""
    accepted = frozenset({HTTP_TRANSPORT, SOAP12_HTTP_TRANSPORT, *transport_uris})
    soap11 = type("Soap11Binding", (_AcceptedTransports, Soap11Binding), {"transports": accepted})
    soap12 = type("Soap12Binding", (_AcceptedTransports, Soap12Binding), {"transports": accepted})
    return [soap11, soap12, HttpGetBinding, HttpPostBinding]


def client_settings() -> Settings:
    """zeep settings for dsmt clients: strict parsing and no DTD, entities or external documents in
    replies and WSDL (they come from the network: the server's own rules, ``xmlsafe``, apply)."""
    return Settings(strict=True, forbid_dtd=True, forbid_entities=True, forbid_external=True)


def make_client(wsdl: Union[bytes, str, os.PathLike], transport, *, asynchronous: bool = False) -> zeep.Client:
    """A zeep client (``zeep.AsyncClient`` when ``asynchronous``) for the WSDL in ``wsdl``.

    ``wsdl`` is the document's bytes, a file path, or — for a synchronous
    client only — a URL (zeep loads WSDL synchronously: inside a reactor that
    would block it, so an asynchronous client refuses URLs).  ``transport`` carries the calls (``zeep.Transport()`` for
    scripts, ``TreqTransport`` inside a reactor, a PsEPR transport).
    """
    if isinstance(wsdl, bytes):
        source = io.BytesIO(wsdl)
    else:
        source = os.fspath(wsdl)
        if asynchronous and source.startswith(("http://", "https://")):
            raise ValueError(f"fetch {source} first and pass the bytes: zeep loads WSDL synchronously")
    client_class = zeep.AsyncClient if asynchronous else zeep.Client
    return client_class(source, transport=transport, settings=client_settings())


def bind(client: zeep.Client, transport_uri: str):
    """The service proxy of the first port whose binding uses ``transport_uri`` (LookupError if none)."""
    for service in client.wsdl.services.values():
        for port in service.ports.values():
            if getattr(port.binding, "transport", None) == transport_uri:
                return client.bind(service.name, port.name)
    raise LookupError(f"the WSDL has no port bound to {transport_uri}")
