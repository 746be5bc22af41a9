"""Rewrite the committed WSDL files of dsmt's SOAP services from the services themselves.

    python wsdl/generate.py            # rewrites wsdl/<service>.wsdl for every service below
    python wsdl/generate.py --check    # exit 1 if a committed file differs from what would be written

(``python`` being one that imports ``dsmt``: the installed ``.venv/bin/python``, or
``PYTHONPATH=.dev .venv/bin/python`` for the working tree.)

Each file is the WSDL the service's SOAP 1.1 core serves at ``?wsdl``
(``SoapCore.wsdl(address)``, port address :data:`HTTP_ADDRESS` on the service's
README port), plus a second
binding and port for SOAP over PsEPR: the binding the PsEPR core generates
(``soap:binding transport="http://dsmt.org/ns/soap/transport/psepr"``), named
``<name>_psepr``, and a port ``<name>_psepr`` at
``psepr:/org/dsmt/ns/soap/<service>/``.  Output is indented, so reviews show
what changed.  The tests compare the served WSDL with the committed one
(:func:`normalise`), so the contract cannot drift silently.
"""
from __future__ import annotations

import copy
import logging
import os
import sys
from typing import Callable

from lxml import etree

WSDL_NS = "http://schemas.xmlsoap.org/wsdl/"
SOAP11_BINDING_NS = "http://schemas.xmlsoap.org/wsdl/soap/"
SOAP12_BINDING_NS = "http://schemas.xmlsoap.org/wsdl/soap12/"
HERE = os.path.dirname(os.path.abspath(__file__))
#: The HTTP port's address in committed files: the README's examples (``--manage-http tcp:8081``,
#: the agent's ``--http tcp:8090``).
HTTP_ADDRESS = "http://localhost:{port}/{path}"
PSEPR_ADDRESS = "psepr:/org/dsmt/ns/soap/{service}/"
_W = "{%s}" % WSDL_NS


def _manageability(transport_uri: str):
    from dsmt.server.manage.wsdm import StaticResource, manageability_core
    # the WSDL does not depend on the resource: properties travel as xs:anyType content
    return manageability_core(StaticResource("urn:uuid:00000000-0000-0000-0000-000000000000", "", "", ""),
                              transport_uri=transport_uri)


def _agent(transport_uri: str):
    from dsmt.server.agent.service import NAME, TNS, agent_service
    from dsmt.transports.soap.core import SoapCore
    # the WSDL does not depend on the agent's state
    return SoapCore([agent_service(None)], TNS, NAME, transport_uri=transport_uri)


def _nodemanager(transport_uri: str):
    from dsmt.server.nodemanager.service import SERVICE_NAME, TNS, nodemanager_service
    from dsmt.transports.soap.core import SoapCore
    # the WSDL does not depend on the node's state
    return SoapCore([nodemanager_service(None)], TNS, SERVICE_NAME, transport_uri=transport_uri)


def _slicemanager(transport_uri: str):
    from dsmt.server.slicemanager.service import NAME, TNS, slicemanager_service
    from dsmt.transports.soap.core import SoapCore
    # the WSDL does not depend on the slices
    return SoapCore([slicemanager_service(None)], TNS, NAME, transport_uri=transport_uri)


def _deployment(transport_uri: str):
    from dsmt.server.deployment.service import NAME, TNS, deployment_service
    from dsmt.transports.soap.core import SoapCore
    # the WSDL does not depend on the engine's state
    return SoapCore([deployment_service(None)], TNS, NAME, transport_uri=transport_uri)


#: service name (its PsEPR name too) → (HTTP port, HTTP path, function making its SOAP 1.1 core for a
#: transport URI).
SERVICES: dict[str, tuple[int, str, Callable]] = {
    "manageability": (8081, "manage", _manageability),
    "agent": (8090, "agent", _agent),
    "nodemanager": (8091, "nodemanager", _nodemanager),
    "slicemanager": (8092, "slicemanager", _slicemanager),
    "deployment": (8093, "deployment", _deployment),
}


def with_psepr_port(http_wsdl: bytes, psepr_wsdl: bytes, service: str) -> etree._Element:
    """The HTTP WSDL with the PsEPR WSDL's binding added as ``<binding>_psepr`` and a port for it."""
    parser = etree.XMLParser(remove_blank_text=True, resolve_entities=False, no_network=True)
    root = etree.fromstring(http_wsdl, parser)
    (http_binding,) = root.findall(_W + "binding")
    (psepr_binding,) = copy.deepcopy(etree.fromstring(psepr_wsdl, parser).findall(_W + "binding"))
    name = http_binding.get("name") + "_psepr"
    psepr_binding.set("name", name)
    http_binding.addnext(psepr_binding)
    (port_service,) = root.findall(_W + "service")
    (http_port,) = port_service.findall(_W + "port")
    port = etree.SubElement(port_service, _W + "port", name=name, binding="tns:" + name)
    address = http_port[0]
    etree.SubElement(port, address.tag, location=PSEPR_ADDRESS.format(service=service))
    return root


def committed_wsdl(service: str) -> bytes:
    """What ``wsdl/<service>.wsdl`` must hold."""
    port, path, make_core = SERVICES[service]
    from dsmt.transports.soap import HTTP_TRANSPORT, PSEPR_TRANSPORT
    http_wsdl = make_core(HTTP_TRANSPORT).wsdl(HTTP_ADDRESS.format(port=port, path=path))
    psepr_wsdl = make_core(PSEPR_TRANSPORT).wsdl(PSEPR_ADDRESS.format(service=service))
    root = with_psepr_port(http_wsdl, psepr_wsdl, service)
    etree.indent(root, space="  ")
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8") + b"\n"


def normalise(document: bytes, *, drop_psepr: bool = False) -> bytes:
    """``document`` canonicalised (C14N, no whitespace-only text) with every port address emptied; with
    ``drop_psepr`` also without the ``*_psepr`` binding and port — what the served WSDL must equal."""
    root = etree.fromstring(document, etree.XMLParser(remove_blank_text=True, resolve_entities=False,
                                                      no_network=True))
    for element in root.iter():
        if isinstance(element.tag, str) and element.tag in (f"{{{SOAP11_BINDING_NS}}}address",
                                                            f"{{{SOAP12_BINDING_NS}}}address"):
            element.set("location", "")
    if drop_psepr:
        for element in root.findall(_W + "binding") + root.findall(f"{_W}service/{_W}port"):
            if element.get("name", "").endswith("_psepr"):
                element.getparent().remove(element)
    return etree.tostring(root, method="c14n")


def main(argv: list[str]) -> int:
    # One spyne Application per transport is deliberate (NOTES.md); spyne's registry warns about each.
    logging.getLogger("spyne.util.appreg").setLevel(logging.ERROR)
    check = "--check" in argv
    stale = []
    for service in SERVICES:
        target = os.path.join(HERE, f"{service}.wsdl")
        document = committed_wsdl(service)
        try:
            with open(target, "rb") as handle:
                current = handle.read()
        except FileNotFoundError:
            current = None
        if current == document:
            continue
        stale.append(target)
        if not check:
            with open(target, "wb") as handle:
                handle.write(document)
            print(f"wrote {target}")
    if check and stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
