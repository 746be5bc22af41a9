"""Slice specs: the dslice slice XML users write, parsed strictly.

The format (dslice HOWTO, "Creating a slice"), with or without an XML declaration::

    <?xml version="1.0" ?>
    <slice>
      <name>oceanstore</name>            the slice name: the Unix login on every node
      <numnodes>2</numnodes>             how many nodes: a hard requirement
      <leaselen>1209600</leaselen>       lease length in seconds (two weeks, the maximum)
      <ips>141.213.4.201 216.165.109.81 216.165.109.82</ips>   optional preference list
    </slice>

Contract: :func:`parse_slice_spec` returns a :class:`SliceSpec` or raises
:class:`SliceSpecError` whose message names the first problem (never another
exception, whatever the bytes).  Rules, each with its reason:

* Safe XML (``dsmt.transports.xmlsafe``): no DTD or entity (billion laughs,
  external entities), at most :data:`MAX_SPEC_BYTES`, three levels deep.
* The root is ``slice`` (no namespace, no attributes); its children are
  ``name``, ``numnodes`` and ``leaselen`` exactly once each and ``ips`` at
  most once, in any order; each holds text only.  Anything else (unknown
  elements, attributes, stray text) is refused: a misspelt ``<numnode>``
  silently ignored would create a slice the user did not ask for.
* ``name`` (:func:`check_slice_name`): it becomes a Unix login on every node
  and a PsEPR channel segment (``/org/dsmt/ns/deployment/<slice>/``), so it
  must be ``[a-z][a-z0-9_-]{0,31}``: lower case (``useradd``'s default rule,
  and logins are case-sensitive while people are not), at most 32 characters
  (``UT_NAMESIZE``, what ``utmp``/``who`` keep), starting with a letter (a
  leading ``-`` reads as an option to ``ssh -l``/``useradd``, a leading
  digit can be taken for a UID, a leading ``_`` is Debian's convention for
  system accounts), no ``.``, ``/`` or ``$`` (paths, ``../x``, Samba
  machine accounts).  Names of system and service accounts
  (:data:`RESERVED_SLICE_NAMES`, and ``systemd-*``) are refused: a slice
  named ``root`` or ``sshd`` would be handed that account's home or keys.
* ``numnodes``: decimal digits only, 1 ≤ n ≤ ``max_numnodes``
  (:data:`MAX_NUMNODES`).
* ``leaselen``: decimal digits only, ``min_leaselen`` ≤ s ≤ ``max_leaselen``
  (:data:`MIN_LEASELEN` .. :data:`MAX_LEASELEN`, two weeks — the reference's
  "current maximum lease length"; node managers cap leases at the same value).
* ``ips``: whitespace-separated node addresses, each an IPv4 or IPv6
  address or a DNS host name (:func:`normalize_node_address`), no
  duplicates after normalisation, at most :data:`MAX_PREFERRED_NODES`.
  **Reading of the reference**: "given a list of n node IP addresses and a
  request for m nodes (n >= m), the system will attempt to allocate m of the
  n nodes starting from the beginning of the list … if m nodes cannot be
  allocated, an error will be reported".  The list is therefore *where the
  nodes come from*, not a hint followed by "then any others": nodes are only
  taken from it, in order.  So n < m can never succeed and is refused here,
  as a spec error naming both numbers, instead of failing later at the agent;
  an empty ``<ips/>`` is refused for the same reason.  (``SliceSpec.ips`` is
  ``()`` when the element is absent: any advertised node may be chosen.)

Pure: bytes in, a value or an error out.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from lxml import etree

from dsmt.transports.xmlsafe import XmlSafetyError, parse_xml

__all__ = [
    "SliceSpec", "SliceSpecError", "parse_slice_spec", "check_slice_name", "normalize_node_address",
    "node_sort_key", "MAX_SPEC_BYTES", "MAX_NUMNODES", "MIN_LEASELEN", "MAX_LEASELEN", "MAX_PREFERRED_NODES",
    "RESERVED_SLICE_NAMES", "SLICE_NAME_PATTERN",
]

#: Most nodes one slice may ask for.  The issue's benchmark tops out at 200
#: nodes; PlanetLab had a few hundred.  1000 leaves room while bounding the
#: work one spec can order (one signature per node at the agent, one SOAP
#: call per node at each step).
MAX_NUMNODES = 1000
#: Longest ``ips`` preference list.  Four candidates per node at the maximum
#: slice size is a generous fallback margin.
MAX_PREFERRED_NODES = 4 * MAX_NUMNODES
#: Largest spec accepted.  A full preference list of IPv6 addresses is
#: ~160 KB; 256 KiB fits it with the rest and stops a 1 GB "spec" at the door.
MAX_SPEC_BYTES = 256 * 1024
#: Shortest lease accepted by default, in seconds.  The reference only says a
#: lease has a length; one second is useless (creating the sliver takes
#: longer) but harmless — the lease expires and the reaper removes it — so the
#: floor is the brief's ≥ 1 and callers may raise it.
MIN_LEASELEN = 1
#: Longest lease by default: 14 days, the reference's "current maximum lease
#: length" (1209600 s in its example).
MAX_LEASELEN = 14 * 24 * 3600
#: Longest decimal number read (no sign, no exponent): more digits than any
#: in-range value, short enough that int() never sees a megabyte of digits.
_MAX_DIGITS = 12
#: Depth parsed: ``slice`` and its children are two levels; one more lets an
#: element inside a field get its own precise message (``<name> holds an element``).
_MAX_DEPTH = 3

SLICE_NAME_PATTERN = r"[a-z][a-z0-9_-]{0,31}"
_SLICE_NAME = re.compile(SLICE_NAME_PATTERN + r"\Z")

#: Accounts a slice must never be given: the superuser, Debian's and common
#: distributions' system accounts, service daemons a node may run, and dsmt's
#: own.  (Names starting ``systemd-`` are refused too.)
RESERVED_SLICE_NAMES = frozenset("""
    root daemon bin sys sync games man lp mail news uucp proxy www-data backup list irc gnats nobody nogroup
    sshd messagebus syslog adm operator halt shutdown ftp postfix postgres mysql ntp chrony dnsmasq avahi
    polkitd tss uuidd tcpdump landscape pollinate lxd admin administrator wheel sudo staff users guest
    dsmt agent nodemanager slicemanager pldb psepr
""".split())

_ELEMENTS = ("name", "numnodes", "leaselen", "ips")
_REQUIRED = ("name", "numnodes", "leaselen")
_DIGITS = re.compile(r"[0-9]+\Z", re.ASCII)
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


class SliceSpecError(ValueError):
    """A slice spec is not acceptable; the message names the first problem found."""


@dataclass(frozen=True)
class SliceSpec:
    """A parsed slice spec.

    ``name``: the slice (and Unix login); ``numnodes``: nodes required;
    ``leaselen``: seconds; ``ips``: the preference list in the user's order,
    normalised (:func:`normalize_node_address`), or ``()`` for "any nodes".
    """

    name: str
    numnodes: int
    leaselen: int
    ips: tuple[str, ...] = ()


def check_slice_name(name: str) -> str:
    """Return ``name`` if it can be a slice name (see the module docstring), else raise SliceSpecError."""
    if not isinstance(name, str) or not name:
        raise SliceSpecError("slice name is empty")
    if not _SLICE_NAME.match(name):
        shown = name if len(name) <= 40 else name[:40] + "…"
        raise SliceSpecError(f"slice name {shown!r} is not a valid login: it must be 1 to 32 characters, "
                             "lower-case letters, digits, '_' and '-', starting with a letter")
    if name in RESERVED_SLICE_NAMES or name.startswith("systemd-"):
        raise SliceSpecError(f"slice name {name!r} is reserved (a system or service account)")
    return name


def normalize_node_address(text: str) -> str:
    """The canonical form of a node address, else raise SliceSpecError.

    IPv4 and IPv6 addresses as :mod:`ipaddress` writes them (IPv6 compressed,
    lower case; leading zeros in IPv4 are refused, as Python ≥ 3.9.5 does,
    since ``010.0.0.1`` means octal to some resolvers); otherwise a DNS host
    name, lower-cased, trailing dot removed, labels of letters, digits and
    inner hyphens, at most 253 characters, whose last label is not all digits
    (``1.2.3`` is a malformed address, not a host name).  Zone indices
    (``fe80::1%eth0``) are refused: they name an interface of the machine
    reading the spec, not a node.
    """
    if not isinstance(text, str) or not text:
        raise SliceSpecError("node address is empty")
    shown = text if len(text) <= 60 else text[:60] + "…"
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if getattr(address, "scope_id", None):
            raise SliceSpecError(f"node address {shown!r} has a zone index; give a global address")
        return address.compressed
    host = text.lower()
    host = host[:-1] if host.endswith(".") else host
    labels = host.split(".")
    if (not host or len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels)
            or labels[-1].isdigit()):
        raise SliceSpecError(f"node address {shown!r} is neither an IPv4/IPv6 address nor a DNS host name")
    return host


def node_sort_key(address: str) -> tuple:
    """A total order on normalised addresses: IPv4 numerically, then IPv6 numerically, then host names."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (2, 0, address)
    return (0 if ip.version == 4 else 1, int(ip), "")


def _number(element, what: str, low: int, high: int, unit: str = "") -> int:
    text = (element.text or "").strip()
    if not text:
        raise SliceSpecError(f"<{what}> is empty")
    if not _DIGITS.match(text):
        shown = text if len(text) <= 20 else text[:20] + "…"
        raise SliceSpecError(f"<{what}> must be a whole number in decimal digits only, not {shown!r}")
    if len(text) > _MAX_DIGITS:
        raise SliceSpecError(f"<{what}> has {len(text)} digits; it must be between {low} and {high}{unit}")
    value = int(text)
    if not low <= value <= high:
        raise SliceSpecError(f"<{what}> is {value}{unit}; it must be between {low} and {high}{unit}")
    return value


def parse_slice_spec(data: bytes, *, max_numnodes: int = MAX_NUMNODES, min_leaselen: int = MIN_LEASELEN,
                     max_leaselen: int = MAX_LEASELEN, max_bytes: int = MAX_SPEC_BYTES) -> SliceSpec:
    """Parse the dslice slice XML ``data`` (bytes) into a :class:`SliceSpec`; see the module docstring."""
    try:
        root = parse_xml(data, max_bytes=max_bytes, max_depth=_MAX_DEPTH, what="slice spec")
    except XmlSafetyError as exc:
        raise SliceSpecError(str(exc)) from None
    except (ValueError, LookupError, etree.LxmlError) as exc:   # e.g. an unknown encoding declaration
        raise SliceSpecError(f"slice spec is not readable XML: {exc}") from None
    if root.tag != "slice":
        raise SliceSpecError(f"the root element must be <slice>, not <{_tag_text(root)}>")
    if root.attrib:
        raise SliceSpecError(f"<slice> takes no attributes (found {_attribute_names(root)})")
    if (root.text or "").strip():
        raise SliceSpecError("<slice> holds text outside its elements")
    found: dict[str, object] = {}
    for child in root:
        tag = child.tag if isinstance(child.tag, str) else None
        if tag not in _ELEMENTS:
            raise SliceSpecError(f"unknown element <{_tag_text(child)}> in <slice>; expected "
                                 "<name>, <numnodes>, <leaselen> and optionally <ips>")
        if tag in found:
            raise SliceSpecError(f"<{tag}> appears more than once")
        if child.attrib:
            raise SliceSpecError(f"<{tag}> takes no attributes (found {_attribute_names(child)})")
        if len(child):
            raise SliceSpecError(f"<{tag}> holds an element (<{_tag_text(child[0])}>); it takes text only")
        if (child.tail or "").strip():
            raise SliceSpecError("<slice> holds text outside its elements")
        found[tag] = child
    missing = [tag for tag in _REQUIRED if tag not in found]
    if missing:
        raise SliceSpecError(f"<slice> lacks {', '.join(f'<{tag}>' for tag in missing)}")
    name = check_slice_name((found["name"].text or "").strip())
    numnodes = _number(found["numnodes"], "numnodes", 1, max_numnodes)
    leaselen = _number(found["leaselen"], "leaselen", min_leaselen, max_leaselen, " s")
    ips: tuple[str, ...] = ()
    if "ips" in found:
        words = (found["ips"].text or "").split()
        if not words:
            raise SliceSpecError("<ips> is empty; leave it out to allow any node")
        if len(words) > MAX_PREFERRED_NODES:
            raise SliceSpecError(f"<ips> lists {len(words)} nodes, over the limit of {MAX_PREFERRED_NODES}")
        seen: dict[str, str] = {}
        for word in words:
            address = normalize_node_address(word)
            if address in seen:
                same = "" if seen[address] == word else f" (same node as {seen[address]!r})"
                raise SliceSpecError(f"<ips> lists {word!r} more than once{same}")
            seen[address] = word
        ips = tuple(seen)
        if len(ips) < numnodes:
            raise SliceSpecError(f"<ips> lists {len(ips)} node{'s' if len(ips) != 1 else ''} but <numnodes> is "
                                 f"{numnodes}: nodes are taken only from that list, so it needs at least "
                                 f"{numnodes}")
    return SliceSpec(name, numnodes, leaselen, ips)


def _tag_text(element) -> str:
    if not isinstance(element.tag, str):
        return "?"
    qname = etree.QName(element)
    text = f"{{{qname.namespace}}}{qname.localname}" if qname.namespace else qname.localname
    return text if len(text) <= 60 else text[:60] + "…"


def _attribute_names(element) -> str:
    return ", ".join(sorted(str(name)[:40] for name in element.attrib)[:5])
