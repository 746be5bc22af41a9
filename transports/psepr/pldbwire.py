"""PLDB's query and reply payloads (pure codec).

PLDB (last-value replay) answers *query* events with the stored last values.
A query is an event whose payload type is :data:`PLDBGET_NS`::

    <payload xmlns="http://psepr.org/xs/payload/pldbget">
      <query>q-7f3a</query>                       caller's id, echoed in every reply part
      <channel>/org/dsmt/ns/deployment/xyz1/</channel>   subtree asked for
      <field>deployment-status</field>           optional: only this field
      <reply>/org/dsmt/ns/pldb/reply/cli-42/</reply>     where to answer (the caller leases it)
    </payload>

The answer is one or more events of type :data:`PLDBATTRLIST_NS` on the reply
channel, each holding some of the tuples and saying which part it is::

    <payload xmlns="http://psepr.org/xs/payload/pldbattrlist">
      <query>q-7f3a</query><part>1</part><parts>1</parts>
      <attr><channel>…</channel><field>…</field><value>…</value>
            <time>1763920800.125</time><expire>90</expire>
            <from><service>xyz1_mgr</service><instance>node1</instance></from></attr>
    </payload>

``time`` is the Unix time (seconds) at which PLDB received the value.  Parts
are cut so that each event stays under :data:`MAX_PART_BYTES`, well inside
the 1 MiB event limit; an empty result is one part with no ``attr``.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsmt.transports.psepr.channel import ChannelError, validate_channel
from dsmt.transports.psepr.event import EventError, OpaquePayload, _leaf
from dsmt.transports.xmlsafe import escape_text

__all__ = ["PLDBGET_NS", "PLDBATTRLIST_NS", "PldbQuery", "PldbAttr", "PldbReply", "MAX_PART_BYTES",
           "reply_parts", "parse_query", "parse_reply"]

PLDBGET_NS = "http://psepr.org/xs/payload/pldbget"
PLDBATTRLIST_NS = "http://psepr.org/xs/payload/pldbattrlist"
#: Largest reply part: half the 1 MiB event limit, so the event wrapper and
#: any escaping growth never push a part over it.
MAX_PART_BYTES = 512 * 1024
#: Most parts one answer may have (a sanity bound the reader enforces: 1,000
#: parts of 512 KiB is 500 MB, more than any PLDB query should return).
MAX_PARTS = 1000


@dataclass(frozen=True)
class PldbQuery:
    query_id: str
    channel: str
    reply: str
    field: str | None = None

    def __post_init__(self):
        for what, channel in (("query channel", self.channel), ("reply channel", self.reply)):
            try:
                validate_channel(channel)
            except ChannelError as exc:
                raise EventError(f"{what}: {exc}") from None
        if not self.query_id or len(self.query_id) > 255:
            raise EventError("query id must be 1 to 255 characters")

    def payload(self) -> OpaquePayload:
        xml = (f'<payload xmlns="{PLDBGET_NS}"><query>{escape_text(self.query_id)}</query>'
               f"<channel>{escape_text(self.channel)}</channel>{_leaf('field', self.field)}"
               f"<reply>{escape_text(self.reply)}</reply></payload>")
        return OpaquePayload(PLDBGET_NS, xml.encode("utf-8"))


@dataclass(frozen=True)
class PldbAttr:
    channel: str
    field: str
    value: str
    time: float
    from_service: str | None = None
    from_instance: str | None = None
    expire: int | None = None

    def xml(self) -> str:
        sender = ""
        if self.from_service is not None or self.from_instance is not None:
            sender = f"<from>{_leaf('service', self.from_service)}{_leaf('instance', self.from_instance)}</from>"
        expire = "" if self.expire is None else f"<expire>{self.expire}</expire>"
        return (f"<attr><channel>{escape_text(self.channel)}</channel><field>{escape_text(self.field)}</field>"
                f"<value>{escape_text(self.value)}</value><time>{self.time:.3f}</time>{expire}{sender}</attr>")


@dataclass(frozen=True)
class PldbReply:
    query_id: str
    part: int
    parts: int
    attrs: tuple[PldbAttr, ...]


def reply_parts(query_id: str, attrs) -> list[OpaquePayload]:
    """Cut the answer to a query into reply payloads of at most :data:`MAX_PART_BYTES` each."""
    chunks: list[list[str]] = [[]]
    size = 0
    for attr in attrs:
        xml = attr.xml()
        if chunks[-1] and size + len(xml) > MAX_PART_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(xml)
        size += len(xml)
    head = f'<payload xmlns="{PLDBATTRLIST_NS}"><query>{escape_text(query_id)}</query>'
    return [OpaquePayload(PLDBATTRLIST_NS, (f"{head}<part>{n}</part><parts>{len(chunks)}</parts>"
                                            f"{''.join(chunk)}</payload>").encode("utf-8"))
            for n, chunk in enumerate(chunks, 1)]


def _child_text(element, ns: str, name: str, *, required: bool = True) -> str | None:
    found = element.findall(f"{{{ns}}}{name}")
    if len(found) > 1:
        raise EventError(f"<{name}> appears {len(found)} times; at most once is allowed")
    if not found or not (found[0].text or "").strip():
        if required:
            raise EventError(f"<{name}> is missing or empty")
        return None
    return found[0].text.strip() if name != "value" else found[0].text


def parse_query(payload: OpaquePayload) -> PldbQuery:
    if payload.namespace != PLDBGET_NS:
        raise EventError(f"not a PLDB query: payload type {payload.namespace}")
    element = payload.element()
    return PldbQuery(_child_text(element, PLDBGET_NS, "query"), _child_text(element, PLDBGET_NS, "channel"),
                     _child_text(element, PLDBGET_NS, "reply"),
                     _child_text(element, PLDBGET_NS, "field", required=False))


def parse_reply(payload: OpaquePayload) -> PldbReply:
    if payload.namespace != PLDBATTRLIST_NS:
        raise EventError(f"not a PLDB reply: payload type {payload.namespace}")
    ns = PLDBATTRLIST_NS
    element = payload.element()
    part, parts = _number(_child_text(element, ns, "part")), _number(_child_text(element, ns, "parts"))
    if not 1 <= part <= parts <= MAX_PARTS:
        raise EventError(f"reply part {part} of {parts} is out of range (at most {MAX_PARTS} parts)")
    attrs = []
    for attr in element.findall(f"{{{ns}}}attr"):
        sender = attr.find(f"{{{ns}}}from")
        expire = _child_text(attr, ns, "expire", required=False)
        try:
            time = float(_child_text(attr, ns, "time"))
        except ValueError:
            raise EventError("<time> must be a number of seconds") from None
        attrs.append(PldbAttr(
            _child_text(attr, ns, "channel"), _child_text(attr, ns, "field"),
            attr.findtext(f"{{{ns}}}value") or "", time,
            _child_text(sender, ns, "service", required=False) if sender is not None else None,
            _child_text(sender, ns, "instance", required=False) if sender is not None else None,
            _number(expire) if expire is not None else None))
    return PldbReply(_child_text(element, ns, "query"), part, parts, tuple(attrs))


def _number(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise EventError(f"expected a non-negative integer, not {text[:40]!r}")
    return int(text)
