"""The manageability port of the dsmt daemons: their resources and how the port is mounted.

* :class:`RouterResource` — the PsEPR router: ``RouterCore.stats()`` as
  metrics (``Connections``, ``Leases``, ``EventsIn``, ``Deliveries`` = events
  out, ``SlowConsumerDrops``, …: each counter's name in CamelCase);
  Available when every ``--listen`` endpoint listens, PartiallyAvailable when
  some do, Unavailable when none does.
* :class:`PldbResource` — PLDB: ``Recorded``, ``Answered``, ``ValuesStored``;
  Available while connected to PsEPR, PartiallyAvailable while (re)connecting,
  Unavailable once stopped.
* :func:`http_service` — the ``--manage-http ENDPOINT`` port: a
  :class:`SoapSite` with SOAP 1.1 at ``/manage`` and SOAP 1.2 at
  ``/manage12`` (a core speaks one SOAP version, so one path each: a client
  picks the path its WSDL names, and an envelope of the other version gets
  the core's ``VersionMismatch`` fault rather than a guess); ``GET …?wsdl``
  on either path serves that path's WSDL.
* :func:`psepr_service` — the ``--manage-psepr`` endpoint on the PsEPR channel
  ``/org/dsmt/ns/soap/manageability/``, SOAP 1.1 and 1.2 on the one channel
  (:class:`BothVersions` picks the core by the envelope's namespace); each
  daemon instance answers for itself, the caller names it with
  ``to/instance`` (or the port address's ``?instance=``).  PLDB mounts it on its own
  connection; the router, which has none, on a loopback connection to itself
  (``dsmt.server.psepr_router.daemon.LoopbackManagement``).

``dsmt.server.psepr_router.daemon`` and ``dsmt.server.pldb.daemon`` import
this module only with ``--manage-*``; the router itself (in ``transports/``)
knows nothing of it.
"""
from __future__ import annotations

import io
import os
import re
from typing import Mapping

from lxml import etree

from twisted.application import service, strports
from twisted.web.resource import Resource

from dsmt.server.manage.wsdm import (
    SERVICE_NAME, ManageableResource, OperationalStatus, manageability_core, resource_id_for)
from dsmt.transports.soap import PSEPR_TRANSPORT
from dsmt.transports.soap.core import SOAP11, SOAP12, SoapCore

__all__ = ["DSMT_VERSION", "HTTP_PATHS", "RouterResource", "PldbResource", "camel", "manage_root", "http_service",
           "psepr_service", "BothVersions", "MAX_SNIFF_BYTES"]

#: URL path of each SOAP version's endpoint on the ``--manage-http`` port.
HTTP_PATHS = {SOAP11: b"manage", SOAP12: b"manage12"}
#: Bytes of a PsEPR request read to find its envelope's version: the root start tag comes first, after at
#: most an XML declaration and a few namespace declarations.
MAX_SNIFF_BYTES = 4096


def _dsmt_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("dsmt")
    except PackageNotFoundError:  # running from the source tree
        return "0.1.0"


DSMT_VERSION = _dsmt_version()


def camel(name: str) -> str:
    """``events_in`` → ``EventsIn``: counter names as XML element names."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[_\-]", name) if part)


class RouterResource(ManageableResource):
    """A PsEPR router (``RouterFactory``) listening on ``listen`` (the strports descriptions)."""

    caption = "dsmt PsEPR router"

    def __init__(self, factory, listen: list[str]):
        self.factory = factory
        self.listen = list(listen)
        name = factory.core.name
        self.resource_id = resource_id_for("psepr-router", name, *self.listen)
        self.description = (f"PsEPR event router {name} listening on {', '.join(self.listen)}: leases, subtree "
                            "routing, XMPP-style stream")
        self.version = DSMT_VERSION

    def operational_status(self) -> OperationalStatus:
        listening = self.factory.numPorts  # Factory.doStart/doStop count the ports that listen with it
        if listening >= len(self.listen):
            return OperationalStatus.AVAILABLE
        return OperationalStatus.PARTIALLY_AVAILABLE if listening else OperationalStatus.UNAVAILABLE

    def metrics(self) -> Mapping[str, int]:
        return {camel(name): value for name, value in self.factory.core.stats().items()}


class PldbResource(ManageableResource):
    """A running :class:`~dsmt.server.pldb.daemon.PldbService`."""

    caption = "dsmt PLDB"

    def __init__(self, pldb, db_path: str):
        self.pldb = pldb
        connection = pldb.connection
        self.resource_id = resource_id_for("pldb", connection.service or "", connection.instance or "",
                                           os.path.abspath(db_path))
        self.description = (f"PLDB {connection.service}/{connection.instance}: last value of every field on "
                            f"{', '.join(pldb.watch)}, answers queries on {pldb.query_channel}")
        self.version = DSMT_VERSION

    def operational_status(self) -> OperationalStatus:
        if not self.pldb.running:
            return OperationalStatus.UNAVAILABLE
        if self.pldb.connection.connected:
            return OperationalStatus.AVAILABLE
        return OperationalStatus.PARTIALLY_AVAILABLE  # reconnecting: queries wait, stored values are kept

    def metrics(self) -> Mapping[str, int]:
        return {"Recorded": self.pldb.recorded, "Answered": self.pldb.answered, "ValuesStored": len(self.pldb.store)}

    def metric_names(self):
        return ("Recorded", "Answered", "ValuesStored")


def manage_root(resource: ManageableResource, *, public_base: str | None = None) -> Resource:
    """A ``twisted.web`` root with ``/manage`` (SOAP 1.1) and ``/manage12`` (SOAP 1.2) for ``resource``.
    ``public_base`` (``https://host:port``): the address WSDLs name; default the requests' own URL."""
    from dsmt.transports.http import SoapResource
    root = Resource()
    for version, path in HTTP_PATHS.items():
        url = None if public_base is None else f"{public_base.rstrip('/')}/{path.decode()}"
        root.putChild(path, SoapResource(manageability_core(resource, soap_version=version), public_url=url))
    return root


def http_service(resource: ManageableResource, endpoint: str) -> service.Service:
    """The manageability port on the strports ``endpoint`` (``tcp:8081:interface=127.0.0.1``)."""
    from dsmt.transports.http import SoapSite
    site = SoapSite(manage_root(resource))
    site.noisy = False
    return strports.service(endpoint, site)


class BothVersions:
    """Two :class:`SoapCore` (SOAP 1.1 and 1.2) behind one PsEPR channel: each request goes to the core of its
    envelope's version, read from the root element's namespace; anything else goes to the SOAP 1.1 core,
    which answers it with the precise fault (BadXML, NotSOAP).  Has what ``PsEPRSoapEndpoint`` uses of a
    core: ``process`` (with ``parsed=``: the version is read from the tree's root), ``fault_response``,
    ``limits``."""

    def __init__(self, soap11: SoapCore, soap12: SoapCore):
        self.soap11, self.soap12 = soap11, soap12
        self.limits = soap11.limits
        self.version = soap11.version

    def _core(self, data: bytes) -> SoapCore:
        try:  # only the first start tag is read; no DTD is loaded, no entity resolved
            _, root = next(etree.iterparse(io.BytesIO(data[:MAX_SNIFF_BYTES]), events=("start",), load_dtd=False,
                                           resolve_entities=False, no_network=True))
        except (etree.XMLSyntaxError, StopIteration):
            return self.soap11
        return self.soap12 if etree.QName(root).namespace == SOAP12.envelope_ns else self.soap11

    def process(self, request: bytes, *, content_type: str | None = None, peer: object = None, parsed=None):
        if parsed is not None:  # the transport parsed it already: its root says the version
            core = self.soap12 if etree.QName(parsed).namespace == SOAP12.envelope_ns else self.soap11
        else:
            core = self._core(request)
        return core.process(request, content_type=content_type, peer=peer, parsed=parsed)

    def fault_response(self, fault, *, request=None):
        return self.soap11.fault_response(fault, request=request)


def psepr_service(resource: ManageableResource, connection) -> service.Service:
    """The manageability endpoint on PsEPR over ``connection``, a PsEPRConnection the daemon also connects
    (the endpoint only leases its channel): SOAP 1.1 and 1.2 on ``/org/dsmt/ns/soap/manageability/``."""
    from dsmt.transports.psepr_soap import PsEPRSoapEndpoint
    cores = [manageability_core(resource, soap_version=version, transport_uri=PSEPR_TRANSPORT)
             for version in (SOAP11, SOAP12)]
    return PsEPRSoapEndpoint(connection, BothVersions(*cores), SERVICE_NAME)
