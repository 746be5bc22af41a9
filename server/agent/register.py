"""A node manager registering with its agent: ``Register(node, slots, endpoint)`` over SOAP/HTTP.

:func:`register_node` is one call; the daemon (``dsmt.server.nodemanager.daemon``)
retries it with backoff until the agent answers.  With a ``signer`` the request
is signed (an agent that checks signatures refuses unsigned registrations).
"""
from __future__ import annotations

from twisted.internet import defer

from dsmt.server.contracts import Contract
from dsmt.transports.soap import HTTP_TRANSPORT

__all__ = ["register_node", "REGISTER_TIMEOUT"]

#: Seconds one registration attempt may take: the agent answers in milliseconds; a hung agent must not hold
#: the retry loop.
REGISTER_TIMEOUT = 30.0


def register_node(agent_url: str, node: str, slots: int, endpoint: str, *, signer=None, verifier=None,
                  reactor=None) -> defer.Deferred:
    """Fires with the node name the agent registered (normalised), or fails (zeep Fault, connection error)."""
    from dsmt.transports.http import TreqTransport
    from dsmt.transports.soap.wssec import AsyncSigningTransport
    treq = TreqTransport(reactor=reactor, timeout=REGISTER_TIMEOUT)
    transport = AsyncSigningTransport(treq, signer, verifier) if signer is not None else treq
    contract = Contract("agent", transport, HTTP_TRANSPORT)
    call = contract.call(agent_url, "Register", {"node": node, "slots": slots, "endpoint": endpoint})

    def closed(result):
        return defer.ensureDeferred(treq.aclose()).addBoth(lambda _: result)
    return call.addBoth(closed)
