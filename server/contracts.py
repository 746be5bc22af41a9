"""Where the published contracts (``wsdl/``) are found at run time.

``setup.py`` installs the repository's ``wsdl/`` folder as the data package
``dsmt.wsdl`` (``make dev`` links it as ``.dev/dsmt/wsdl``), so a client
loads exactly the committed WSDL its services are tested against, whether it
runs from an installed copy or from the working tree.
"""
from __future__ import annotations

import importlib.resources
import re

__all__ = ["wsdl_path", "schema_path", "ContractMissing", "Contract", "binding_name"]

_NAME = re.compile(r"[a-z][a-z0-9-]{0,63}\Z")


class ContractMissing(LookupError):
    """No committed WSDL of that name is installed."""


def wsdl_path(name: str) -> str:
    """The file system path of ``wsdl/<name>.wsdl`` (``name``: ``agent``, ``nodemanager``, …)."""
    return _contract(name, ".wsdl")


def schema_path(name: str) -> str:
    """The file system path of ``wsdl/<name>.xsd`` (``deployment-descriptor``, ``psepr-event``, …)."""
    return _contract(name, ".xsd")


def _contract(name: str, suffix: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{name!r} is not a contract name")
    resource = importlib.resources.files("dsmt.wsdl") / f"{name}{suffix}"
    if not resource.is_file():
        raise ContractMissing(f"wsdl/{name}{suffix} is not installed (reinstall dsmt)")
    return str(resource)


def binding_name(client, transport_uri: str):
    """The QName of the WSDL binding that uses ``transport_uri`` (HTTP or PsEPR); LookupError if none."""
    for binding in client.wsdl.bindings.values():
        if getattr(binding, "transport", None) == transport_uri:
            return binding.name
    raise LookupError(f"the WSDL has no binding for {transport_uri}")


class Contract:
    """One zeep ``AsyncClient`` for a committed WSDL on ``transport``, and service proxies bound to addresses.

    The WSDL is parsed once; :meth:`at` gives (and caches) the proxy for one address — a node manager's
    endpoint URL, or a ``psepr:`` service address — so calling a hundred nodes costs one client.
    """

    def __init__(self, name: str, transport, transport_uri: str):
        from dsmt.transports.soap.zeepsupport import make_client
        self.client = make_client(wsdl_path(name), transport, asynchronous=True)
        self.binding = self.client.wsdl.bindings[binding_name(self.client, transport_uri)]
        self._proxies: dict[str, object] = {}

    def at(self, address: str):
        proxy = self._proxies.get(address)
        if proxy is None:
            # zeep's create_service makes a synchronous proxy even on an AsyncClient: build the async one
            from zeep.proxy import AsyncServiceProxy
            proxy = self._proxies[address] = AsyncServiceProxy(self.client, self.binding, address=address)
        return proxy

    def call(self, address: str, operation: str, kwargs):
        """``operation(**kwargs)`` at ``address`` as a Deferred."""
        from twisted.internet import defer
        return defer.ensureDeferred(getattr(self.at(address), operation)(**dict(kwargs)))
