"""The agent's SOAP face: ``AgentService`` (``wsdl/agent.wsdl``, namespace :data:`TNS`, PsEPR service ``agent``).

=================  ====================================  ===================================  ==========================
operation          in                                    out                                  faults (SOAP 1.1)
=================  ====================================  ===================================  ==========================
``GetAds``         —                                     ``NodeAd*`` (node, slots, free,      —
                                                         endpoint)
``IssueTickets``   ``spec`` (the slice XML, as text)     ``ticket*`` (base64Binary: each a    ``Client.InvalidSpec``,
                                                         signed ticket document)              ``Client.Shortage``
``Register``       ``node``, ``slots``, ``endpoint``     ``node`` (normalised)                ``Client.InvalidRegistration``
``Release``        ``ticketId*``                         ``released`` (how many held a slot)  —
=================  ====================================  ===================================  ==========================

* ``IssueTickets``: the text is parsed by
  :func:`~dsmt.server.slicemanager.spec.parse_slice_spec` (safe XML, the
  spec's own limits); its error is the ``Client.InvalidSpec`` reason, word for
  word, as is a spec the agent refuses (``AgentError``).  Too few nodes is
  ``Client.Shortage`` with :class:`~dsmt.server.agent.core.ShortageError`'s
  sentence (asked, available, each preferred node refused and why); nothing
  is reserved then.  Tickets come back in the order the nodes were chosen.
* ``Register``: adds a node or updates its capacity and endpoint
  (:meth:`NodeRegistry.register`, :func:`~dsmt.server.agent.core.check_endpoint`);
  refusals are ``Client.InvalidRegistration`` naming the problem.  **When the
  agent checks signatures** (``signed_registration``: a WS-Security policy is
  configured), Register must come signed — by any certificate the policy
  trusts; an unsigned one (let through by ``--allow-unsigned`` for the other
  operations) is ``Client.InvalidRegistration``.  The certificate is not
  matched to the node: any trusted party may register any node (node managers
  have service certificates of the same CA; binding a node's name to its
  certificate is future work).  Without a policy, anyone who reaches the
  agent may register.
* ``Release``: frees the slot each ticket id holds (at most
  :data:`MAX_RELEASE_IDS` ids, each at most :data:`MAX_TICKET_ID_CHARS`
  characters, both in the schema); unknown, released or expired ids count
  nothing.  Ticket ids are random 128-bit values only the ticket holder knows,
  so the id is the capability.

Wrong types, missing or extra elements, oversized values are refused by the
SOAP core's schema check (``InvalidBody``) before any of this runs.

:func:`agent_service` makes the service class around one
:class:`~dsmt.server.agent.core.Agent`; ``atomic`` (a context-manager factory)
wraps every state change, so a persistent registry commits once per request.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

from spyne import ByteArray, ComplexModel, Integer, ServiceBase, Unicode, rpc

from dsmt.server.agent.core import MAX_NODES, Agent, AgentError, RegistryError, ShortageError
from dsmt.server.faults import client_fault
from dsmt.server.hosting import caller_subject
from dsmt.server.slicemanager.spec import MAX_NUMNODES, SliceSpecError, parse_slice_spec

__all__ = ["TNS", "NAME", "PSEPR_SERVICE", "HTTP_PATH", "MAX_RELEASE_IDS", "MAX_TICKET_ID_CHARS", "NodeAd",
           "agent_service"]

#: The service's target namespace.
TNS = "http://dsmt.org/ns/agent"
#: WSDL name (binding and port names: ``agent``, ``agent_psepr``).
NAME = "agent"
#: The PsEPR service name: channel ``/org/dsmt/ns/soap/agent/``.
PSEPR_SERVICE = "agent"
#: The URL path of the HTTP endpoint.
HTTP_PATH = "agent"
#: Most ticket ids one Release takes: the tickets of the largest slice.
MAX_RELEASE_IDS = MAX_NUMNODES
#: Longest ticket id (the ticket schema's limit).
MAX_TICKET_ID_CHARS = 128


class NodeAd(ComplexModel):
    """One advertised node (``endpoint`` absent when the agent knows none)."""

    __namespace__ = TNS
    __type_name__ = "NodeAd"
    _type_info = [
        ("node", Unicode(min_occurs=1, nillable=False)),
        ("slots", Integer(min_occurs=1, nillable=False)),
        ("free", Integer(min_occurs=1, nillable=False)),
        ("endpoint", Unicode(min_occurs=0, nillable=False)),
    ]


_Required = dict(min_occurs=1, nillable=False)


def agent_service(agent: Agent | None, *, signed_registration: bool = False,
                  atomic: Callable[[], ContextManager] = contextlib.nullcontext) -> type:
    """The spyne service class ``AgentService`` answering for ``agent`` (None: for the WSDL only)."""

    class AgentService(ServiceBase):
        __service_name__ = "AgentService"

        @rpc(_returns=NodeAd.customize(max_occurs=MAX_NODES), _out_variable_name="NodeAd")
        def GetAds(ctx):
            return [NodeAd(node=ad.node, slots=ad.slots, free=ad.free, endpoint=ad.endpoint)
                    for ad in agent.getads()]

        @rpc(Unicode(**_Required), _returns=ByteArray.customize(max_occurs=MAX_NUMNODES),
             _out_variable_name="ticket")
        def IssueTickets(ctx, spec):
            try:
                parsed = parse_slice_spec(spec.encode("utf-8", "surrogatepass"))
            except SliceSpecError as exc:
                raise client_fault("InvalidSpec", str(exc)) from None
            try:
                with atomic():
                    return agent.issue(parsed)
            except ShortageError as exc:
                raise client_fault("Shortage", str(exc)) from None
            except AgentError as exc:
                raise client_fault("InvalidSpec", str(exc)) from None

        @rpc(Unicode(**_Required), Integer(**_Required), Unicode(**_Required), _returns=Unicode,
             _out_variable_name="node")
        def Register(ctx, node, slots, endpoint):
            if signed_registration and caller_subject(ctx) is None:
                raise client_fault("InvalidRegistration", "Register must be signed (WS-Security) by a certificate "
                                                          "this agent trusts; the request is unsigned")
            try:
                with atomic():
                    return agent.registry.register(node, slots, endpoint)
            except RegistryError as exc:
                raise client_fault("InvalidRegistration", str(exc)) from None

        @rpc(Unicode(min_occurs=0, max_occurs=MAX_RELEASE_IDS, max_len=MAX_TICKET_ID_CHARS, nillable=False),
             _returns=Integer, _out_variable_name="released")
        def Release(ctx, ticketId):
            with atomic():
                return sum(1 for ticket_id in (ticketId or ()) if agent.registry.release(ticket_id))

    return AgentService
