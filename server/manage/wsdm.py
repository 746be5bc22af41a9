"""WSDM manageability of a dsmt daemon: MUWS properties read through WS-ResourceProperties 1.2.

Two layers:

* **The model** (pure, no spyne): a :class:`ManageableResource` says who it
  is (``resource_id``, ``caption``, ``description``, ``version``), how it is
  doing (:meth:`~ManageableResource.operational_status`) and what it counts
  (:meth:`~ManageableResource.metrics`).  :func:`property_document` turns it
  into the resource properties document; :func:`select_properties` picks the
  elements of given property names out of it.
* **The SOAP face**: :func:`manageability_service` makes a spyne service
  class for one resource with the three WS-RF RP 1.2 read operations, and
  :func:`manageability_core` a :class:`SoapCore` around it (service name
  :data:`SERVICE_NAME`, one core per SOAP version and transport).

The document (root ``dsmt-m:ManageabilityProperties``), in this order::

    muws1:ResourceId                 urn:uuid:… (stable per daemon instance)
    muws1:ManageabilityCapability    one per capability (:data:`CAPABILITIES`)
    muws2:Caption xml:lang="en"      short name
    muws2:Description xml:lang="en"
    muws2:Version
    muws2:OperationalStatus          Available | PartiallyAvailable | Unavailable | Unknown
    muws2:CurrentTime                UTC, when the document was made
    dsmt-m:<Metric>                  one per metric of the daemon (e.g. dsmt-m:EventsIn)

Operations (WS-RF RP 1.2, namespace :data:`RP_NS`; WS-Addressing 1.0, as
WSDM uses, is handled by the SOAP core):

* ``GetResourcePropertyDocument`` (empty element) → the whole document inside
  ``GetResourcePropertyDocumentResponse``;
* ``GetResourceProperty`` whose text is one QName (``muws2:OperationalStatus``),
  its prefix resolved in the request element's scope → every element of that
  property (none when a known property has no value);
* ``GetMultipleResourceProperties`` with one or more ``ResourceProperty``
  QNames → their elements, in the order asked.

A QName naming no property of the document is a ``Sender`` fault with subcode
``wsrf-rp:InvalidResourcePropertyQNameFault`` (SOAP 1.1:
``Client.InvalidResourcePropertyQNameFault``) whose reason names the QName,
without a ``detail`` (WS-BaseFaults' element would need ``bf-2`` elements inside
an ``rp-2`` type, which spyne cannot declare; the subcode is what is precise);
an undeclared prefix or a body not shaped as WS-RF says is the core's
``InvalidBody`` fault (the schema types the QNames as ``xs:QName``).

How arbitrary property elements travel through spyne: each response element
is declared as WS-RF's schema declares it, a sequence of one ``xs:any``
(``GetResourcePropertyDocumentResponse``: exactly one element; the two others:
any number), ``processContents="lax"`` — so any property element is
schema-valid, and zeep hands the elements back as lxml elements (the document
element itself, or a list).  A spyne sub-protocol (:class:`_ElementList`)
serialises them: it writes the response element and appends the property
elements as they are — no wrapper per value, no re-encoding.  The requests'
QNames are typed ``xs:QName``, so the core's schema check refuses a QName
whose prefix is not declared before the method runs; the method then resolves
the prefix against the request element's own in-scope namespaces.

WS-Addressing Actions are WS-RF's own (:data:`ACTIONS`, from WS-ResourceProperties
1.2's ``rpw-2`` WSDL, §5–§7 of the specification): the request of operation
``Op`` is ``http://docs.oasis-open.org/wsrf/rpw-2/Op/OpRequest``, its reply
``…/Op/OpResponse``, and every WS-RF fault, InvalidResourcePropertyQNameFault
included, ``http://docs.oasis-open.org/wsrf/fault`` (:data:`WSRF_FAULT_ACTION`).
The SOAP core writes them into the WSDL (``wsam:Action``), puts them on the
replies, and refuses a request whose Action is another (``wsa:ActionNotSupported``;
a request without Action is answered).
"""
from __future__ import annotations

import abc
import copy
import datetime
import enum
import re
import uuid
from typing import Callable, Iterable, Mapping, Sequence

from lxml import etree
from spyne import AnyXml, ComplexModel, Fault, ServiceBase, Unicode, rpc
from spyne.const.xml import XSD
from spyne.protocol.xml import SubXmlBase

from dsmt.transports.soap import HTTP_TRANSPORT
from dsmt.transports.soap.core import SOAP11, OperationActions, SoapCore, SoapVersion

__all__ = [
    "RP_NS", "RPW_NS", "WSRF_FAULT_ACTION", "ACTIONS", "MUWS1_NS", "MUWS2_NS", "MANAGE_NS", "SERVICE_NAME", "DOCUMENT_ELEMENT", "CAPABILITIES",
    "STANDARD_PROPERTIES", "OperationalStatus", "ManageableResource", "StaticResource", "resource_id_for",
    "property_document", "select_properties", "property_names", "InvalidResourcePropertyQName",
    "manageability_service", "manageability_core",
]

#: WS-ResourceProperties 1.2: the operations and their fault.
RP_NS = "http://docs.oasis-open.org/wsrf/rp-2"
#: WS-ResourceProperties 1.2's WSDL namespace, the root of its operations' Action URIs.
RPW_NS = "http://docs.oasis-open.org/wsrf/rpw-2"
#: The Action of every WS-RF fault message (WS-RF 1.2 WSDLs, ``wsa:Action`` of each ``wsdl:fault``).
WSRF_FAULT_ACTION = "http://docs.oasis-open.org/wsrf/fault"
#: MUWS part 1 (ResourceId, ManageabilityCapability) and part 2 (description, status, metrics).
MUWS1_NS = "http://docs.oasis-open.org/wsdm/muws1-2.xsd"
MUWS2_NS = "http://docs.oasis-open.org/wsdm/muws2-2.xsd"
#: dsmt's own: the document element, the daemons' metrics, dsmt's capability.
MANAGE_NS = "http://dsmt.org/ns/manage"
#: The service's name: WSDL name, ``/org/dsmt/ns/soap/manageability/`` over PsEPR.
SERVICE_NAME = "manageability"
#: The root element of the resource properties document.
DOCUMENT_ELEMENT = f"{{{MANAGE_NS}}}ManageabilityProperties"

_MUWS_CAPABILITY = "http://docs.oasis-open.org/wsdm/muws/capabilities/"
#: What a dsmt daemon's manageability offers (MUWS capability URIs, then dsmt's daemon metrics).
CAPABILITIES = (
    _MUWS_CAPABILITY + "Identity",
    _MUWS_CAPABILITY + "ManageabilityCharacteristics",
    _MUWS_CAPABILITY + "Description",
    _MUWS_CAPABILITY + "OperationalStatus",
    _MUWS_CAPABILITY + "Metrics",
    MANAGE_NS + "/capabilities/DaemonMetrics",
)

_M1, _M2 = f"{{{MUWS1_NS}}}", f"{{{MUWS2_NS}}}"
#: The properties every document has, in document order.
STANDARD_PROPERTIES = (
    _M1 + "ResourceId", _M1 + "ManageabilityCapability", _M2 + "Caption", _M2 + "Description", _M2 + "Version",
    _M2 + "OperationalStatus", _M2 + "CurrentTime",
)
_NSMAP = {"muws1": MUWS1_NS, "muws2": MUWS2_NS, "dsmt-m": MANAGE_NS}
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_NCNAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]*\Z")
#: Namespace of :func:`resource_id_for`'s name-based UUIDs (uuid5 of this URL).
_RESOURCE_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, MANAGE_NS + "/resource")


class OperationalStatus(str, enum.Enum):
    """MUWS part 2 ``OperationalStatus``."""

    AVAILABLE = "Available"
    PARTIALLY_AVAILABLE = "PartiallyAvailable"
    UNAVAILABLE = "Unavailable"
    UNKNOWN = "Unknown"


def resource_id_for(kind: str, *names: str) -> str:
    """A ``urn:uuid:`` resource id derived from a daemon's kind and identifying names (its router name and
    listening endpoints, say): the same daemon instance gets the same id after a restart."""
    return "urn:uuid:" + str(uuid.uuid5(_RESOURCE_ID_NAMESPACE, "\n".join((kind, *names))))


class ManageableResource(abc.ABC):
    """What a daemon tells about itself.  Subclasses set the four attributes and implement the two methods;
    the methods are called for every request, so they read live state."""

    resource_id: str
    caption: str
    description: str
    version: str

    @abc.abstractmethod
    def operational_status(self) -> OperationalStatus:
        """How the daemon is doing now."""

    @abc.abstractmethod
    def metrics(self) -> Mapping[str, int | float | str]:
        """Metric name (an XML NCName, the element's local name in :data:`MANAGE_NS`) → value."""

    def metric_names(self) -> Sequence[str]:
        """Every metric this resource reports (even when a value is momentarily missing); default: the
        current :meth:`metrics`' names."""
        return tuple(self.metrics())


class StaticResource(ManageableResource):
    """A resource whose status and metrics come from callables (tests, small daemons)."""

    def __init__(self, resource_id: str, caption: str, description: str, version: str,
                 status: Callable[[], OperationalStatus] = lambda: OperationalStatus.UNKNOWN,
                 metrics: Callable[[], Mapping[str, int | float | str]] = dict):
        self.resource_id, self.caption, self.description, self.version = resource_id, caption, description, version
        self._status, self._metrics = status, metrics

    def operational_status(self) -> OperationalStatus:
        return self._status()

    def metrics(self) -> Mapping[str, int | float | str]:
        return self._metrics()


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def property_document(resource: ManageableResource, *, now: datetime.datetime | None = None) -> etree._Element:
    """The resource properties document of ``resource`` (see the module docstring)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    root = etree.Element(DOCUMENT_ELEMENT, nsmap=_NSMAP)
    etree.SubElement(root, _M1 + "ResourceId").text = resource.resource_id
    for capability in CAPABILITIES:
        etree.SubElement(root, _M1 + "ManageabilityCapability").text = capability
    for name in ("Caption", "Description"):
        element = etree.SubElement(root, _M2 + name)
        element.set(_XML_LANG, "en")
        element.text = getattr(resource, name.lower())
    etree.SubElement(root, _M2 + "Version").text = resource.version
    status = resource.operational_status()
    etree.SubElement(root, _M2 + "OperationalStatus").text = OperationalStatus(status).value
    etree.SubElement(root, _M2 + "CurrentTime").text = now.astimezone(datetime.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")
    for name, value in resource.metrics().items():
        if not _NCNAME.match(name):
            raise ValueError(f"metric name {name!r} is not an XML name")
        etree.SubElement(root, f"{{{MANAGE_NS}}}{name}").text = _text(value)
    return root


def property_names(resource: ManageableResource) -> frozenset[str]:
    """Every property name (Clark notation) ``resource``'s document may hold."""
    return frozenset(STANDARD_PROPERTIES) | {f"{{{MANAGE_NS}}}{name}" for name in resource.metric_names()}


class InvalidResourcePropertyQName(Fault):
    """WS-RF RP's InvalidResourcePropertyQNameFault: a Sender fault, subcode
    ``wsrf-rp:InvalidResourcePropertyQNameFault`` (the service's namespace is :data:`RP_NS`)."""

    __namespace__ = RP_NS

    def __init__(self, qname: str):
        super().__init__("Client.InvalidResourcePropertyQNameFault",
                         f"{qname} is not a resource property of this resource")


def select_properties(resource: ManageableResource, names: Iterable[str]) -> list[etree._Element]:
    """The elements of the properties ``names`` (Clark notation), in the order asked, from one fresh
    document; :class:`InvalidResourcePropertyQName` for a name that is no property of ``resource``."""
    names = list(names)
    known = property_names(resource)
    for name in names:
        if name not in known:
            raise InvalidResourcePropertyQName(name)
    document = property_document(resource)
    # copies: a name asked twice must appear twice (lxml moves, not copies, an element put in a new parent)
    return [copy.deepcopy(element) for name in names for element in document.iterchildren(name)]


def _resolve(element: etree._Element) -> str:
    """The QName in ``element``'s text, in Clark notation, its prefix resolved in the element's scope (the
    schema already checked that the text is a QName whose prefix is declared)."""
    prefix, _, local = element.text.strip().rpartition(":")
    namespace = element.nsmap.get(prefix or None)
    return f"{{{namespace}}}{local}" if namespace else local


class _ElementList(SubXmlBase):
    """spyne sub-protocol: write the response element, then the given lxml elements into it, unchanged."""

    def subserialize(self, ctx, cls, inst, parent, ns=None, name=None):
        response = etree.SubElement(parent, f"{{{ns}}}{name}" if ns else name)
        response.extend([inst] if etree.iselement(inst) else inst or ())


def _response_type(name: str, *, many: bool) -> type[ComplexModel]:
    """The type of a WS-RF response element: ``<xs:sequence><xs:any processContents="lax"/></xs:sequence>``
    (one element, or any number when ``many``), as WS-RF's schema declares it; zeep hands back the element
    (or the list of them).  Serialised by :class:`_ElementList`."""
    occurs = {"min_occurs": 0, "max_occurs": "unbounded"} if many else {"min_occurs": 1, "max_occurs": 1}
    body = AnyXml(schema_tag=XSD("any"), process_contents="lax", namespace="##any", nillable=False, **occurs)
    model = type(name, (ComplexModel,), {"__namespace__": RP_NS, "__type_name__": name, "_type_info": [("any", body)]})
    return model.customize(prot=_ElementList())


_DocumentResponse = _response_type("GetResourcePropertyDocumentResponse", many=False)
_PropertyResponse = _response_type("GetResourcePropertyResponse", many=True)
_MultipleResponse = _response_type("GetMultipleResourcePropertiesResponse", many=True)


class _QName(Unicode):
    """``xs:QName`` on the wire: the core's schema check resolves the prefix, the service reads the element."""

    __type_name__ = "QName"
    __namespace__ = "http://www.w3.org/2001/XMLSchema"


def _rp_actions(operation: str) -> OperationActions:
    return OperationActions(input=f"{RPW_NS}/{operation}/{operation}Request",
                            output=f"{RPW_NS}/{operation}/{operation}Response",
                            faults={InvalidResourcePropertyQName.get_type_name(): WSRF_FAULT_ACTION})


#: The WS-Addressing Actions of the three operations, as WS-ResourceProperties 1.2 defines them.
ACTIONS = {operation: _rp_actions(operation) for operation in (
    "GetResourcePropertyDocument", "GetResourceProperty", "GetMultipleResourceProperties")}


def manageability_service(resource: ManageableResource) -> type[ServiceBase]:
    """A spyne service class answering the three WS-RF RP 1.2 read operations about ``resource``."""

    class ManageabilityService(ServiceBase):
        __service_name__ = "ManageabilityService"

        @rpc(_returns=_DocumentResponse, _body_style="out_bare", _in_message_name="GetResourcePropertyDocument",
             _out_message_name="GetResourcePropertyDocumentResponse")
        def GetResourcePropertyDocument(ctx):
            return property_document(resource)

        @rpc(_QName, _returns=_PropertyResponse, _body_style="bare", _in_message_name="GetResourceProperty",
             _out_message_name="GetResourcePropertyResponse")
        def GetResourceProperty(ctx, name):
            return select_properties(resource, [_resolve(ctx.in_body_doc)])

        @rpc(_QName(min_occurs=1, max_occurs="unbounded", nillable=False), _returns=_MultipleResponse,
             _body_style="out_bare", _in_message_name="GetMultipleResourceProperties",
             _out_message_name="GetMultipleResourcePropertiesResponse")
        def GetMultipleResourceProperties(ctx, ResourceProperty):
            return select_properties(resource, [_resolve(element) for element in ctx.in_body_doc
                                                if isinstance(element.tag, str)])

    return ManageabilityService


def manageability_core(resource: ManageableResource, *, soap_version: SoapVersion = SOAP11,
                       transport_uri: str = HTTP_TRANSPORT, **options) -> SoapCore:
    """A :class:`SoapCore` serving ``resource``'s manageability (``options``: the core's limits, filters)."""
    return SoapCore([manageability_service(resource)], RP_NS, SERVICE_NAME, soap_version=soap_version,
                    transport_uri=transport_uri, actions=ACTIONS, **options)
