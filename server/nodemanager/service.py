"""The node manager's SOAP face: one spyne service over a :class:`~dsmt.server.nodemanager.node.NodeService`.

Operations, types and faults are those of ``docs/dslice.md`` (and of the
committed ``wsdl/nodemanager.wsdl``, generated from this module by
``wsdl/generate.py``).  Every method is a thin adapter: it takes the verified
caller's certificate subject from ``ctx.udc.caller`` (None for an unsigned
request on a service that accepts them), calls the node service, and turns a
refusal into a ``Client.<Fault>[.<code>]`` fault through
:func:`dsmt.server.faults.refusal_fault`.  Nothing here decides anything.

Sizes: a ticket is at most ``tickets.MAX_TICKET_BYTES`` and a slice private key
at most ``sshkeys`` limits — the node service checks both; the SOAP core's
envelope limit bounds everything before that.
"""
from __future__ import annotations

from spyne import ByteArray, ComplexModel, Integer, Iterable, ServiceBase, Unicode, rpc

from dsmt.server.faults import refusal_fault
from dsmt.server.hosting import caller_subject
from dsmt.server.refusal import Refusal

__all__ = ["TNS", "SERVICE_NAME", "HTTP_PATH", "LeaseInfo", "SliverInfo", "nodemanager_service"]

TNS = "http://dsmt.org/ns/nodemanager"
#: WSDL service name and PsEPR service name (channel ``/org/dsmt/ns/soap/nodemanager/``).
SERVICE_NAME = "nodemanager"
#: URL path of the service on the node manager's HTTP port.
HTTP_PATH = "nodemanager"

_Text = Unicode(min_occurs=1, nillable=False)
_Count = Integer(min_occurs=1, nillable=False)


class LeaseInfo(ComplexModel):
    __namespace__ = TNS
    _type_info = [("leaseId", _Text), ("ticketId", _Text), ("slice", _Text), ("node", _Text),
                  ("slots", _Count), ("grantedAt", _Count), ("expiresAt", _Count), ("leaselen", _Count)]

    @classmethod
    def of(cls, lease) -> "LeaseInfo":
        return cls(leaseId=lease.lease_id, ticketId=lease.ticket_id, slice=lease.slice, node=lease.node,
                   slots=lease.slots, grantedAt=lease.granted_at, expiresAt=lease.expires_at,
                   leaselen=lease.leaselen)


class SliverInfo(ComplexModel):
    __namespace__ = TNS
    _type_info = [("slice", _Text), ("node", _Text), ("state", _Text), ("leaseId", Unicode),
                  ("expiresAt", Integer), ("keys", _Count)]

    @classmethod
    def of(cls, sliver) -> "SliverInfo":
        return cls(slice=sliver.slice, node=sliver.node, state=sliver.state, leaseId=sliver.lease_id,
                   expiresAt=sliver.expires_at, keys=sliver.keys)


def _call(function, *args):
    try:
        return function(*args)
    except Refusal as refusal:
        raise refusal_fault(refusal) from None


def nodemanager_service(node) -> type[ServiceBase]:
    """A spyne service class answering the node manager operations for ``node`` (a NodeService)."""

    class NodeManagerService(ServiceBase):
        __service_name__ = "NodeManagerService"

        @rpc(ByteArray(min_occurs=1, nillable=False), _returns=LeaseInfo)
        def Redeem(ctx, ticket):
            return LeaseInfo.of(_call(node.redeem, b"".join(ticket), caller_subject(ctx)))

        @rpc(_Text, _Text, Unicode, ByteArray, _returns=SliverInfo,
             _in_variable_names={"slice_name": "slice", "lease_id": "leaseId", "public": "slicePublicKey",
                                 "private": "slicePrivateKey"})
        def CreateSliver(ctx, slice_name, lease_id, public, private):
            private_bytes = None if private is None else b"".join(private)
            return SliverInfo.of(_call(node.create_sliver, slice_name, lease_id, public, private_bytes, caller_subject(ctx)))

        @rpc(_Text, _returns=SliverInfo, _in_variable_names={"slice_name": "slice"})
        def DeleteSliver(ctx, slice_name):
            return SliverInfo.of(_call(node.delete_sliver, slice_name, caller_subject(ctx)))

        @rpc(_Text, _Text, _returns=Integer, _in_variable_names={"slice_name": "slice"},
             _out_variable_name="keys")
        def AddKey(ctx, slice_name, key):
            return _call(node.add_key, slice_name, key, caller_subject(ctx))

        @rpc(_Text, _Text, _returns=Integer, _in_variable_names={"slice_name": "slice"},
             _out_variable_name="keys")
        def DelKey(ctx, slice_name, key):
            return _call(node.del_key, slice_name, key, caller_subject(ctx))

        @rpc(_Text, _returns=Integer, _in_variable_names={"slice_name": "slice"}, _out_variable_name="keys")
        def NukeKeys(ctx, slice_name):
            return _call(node.nuke_keys, slice_name, caller_subject(ctx))

        @rpc(_Text, _returns=LeaseInfo, _in_variable_names={"slice_name": "slice"})
        def RenewLease(ctx, slice_name):
            return LeaseInfo.of(_call(node.renew, slice_name, caller_subject(ctx)))

        @rpc(_Text, _returns=SliverInfo, _in_variable_names={"slice_name": "slice"})
        def GetSliver(ctx, slice_name):
            return SliverInfo.of(_call(node.get_sliver, slice_name))

        @rpc(_returns=Iterable(SliverInfo, member_name="sliver"))
        def ListSlivers(ctx):
            return [SliverInfo.of(sliver) for sliver in _call(node.list_slivers)]

    return NodeManagerService
