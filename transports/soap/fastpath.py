"""Compiled codecs: operations' arguments read and replies written without spyne's object machinery.

spyne's pipeline (``generate_contexts`` → ``get_in_object`` →
``get_out_object`` → ``get_out_string``) costs about 100 µs per call even for
``ping(text) -> text`` — a ``MethodContext`` (8 µs), a dozen events fired,
generic per-member attribute lookups, an lxml tree for the reply — and about
12 ms to write a slice manager's report on 200 nodes.  None of that is needed
for the types dsmt's services are made of: the core has already validated the
request against the published schema, so reading an argument is reading
element texts, and a reply is strings joined.

:func:`compile_operation` looks at one spyne method descriptor and returns an
:class:`OperationCodec` when the operation qualifies, else None (the core then
keeps spyne's pipeline for it).  An operation qualifies when:

* it is a plain ``@rpc`` of a ``ServiceBase`` (``no_self``) with a wrapped
  body, no SOAP header types, no auxiliary processing, and neither the
  service class nor the application has spyne event listeners when the core
  is built (they would be skipped; listeners added later are not seen on this
  path) or its own ``call_wrapper``;
* every argument, and the result if there is one (at most one), is a
  *compilable type*: a :data:`SIMPLE_TYPES` value (text, integers, booleans,
  and binary when the protocols carry it as base64), or a ``ComplexModel``
  (not an ``Array``/``Iterable`` wrapper, not a fault, no ``__extends__``,
  no XML attributes, alternative names, excluded members or body-as-text
  members) in the operation's own namespace whose members are all
  compilable types — each single or repeated (``max_occurs`` > 1), without
  ``sub_name``/``sub_ns``/``default`` customisations.  A type that contains
  itself is not compiled.

Reading follows what spyne's deserialiser yields, checked by the
differential tests in ``tests/transports/soap/test_fastpath.py``: a missing
member keeps what the type's constructor gives (None), an ``xsi:nil``
element is None, an empty text element is ``""``, a repeated member is a list
of what was there, a complex value an instance of its class built as spyne
builds it, binary a one-chunk tuple (spyne's ``ByteArray`` value).  One deliberate difference: a boolean is read as XML Schema says,
whitespace collapsed (`` 1 `` is true); spyne 2.14 compares the raw text and
reads it as false.

Writing: :meth:`OperationCodec.encode` returns the reply envelope, or None
when some value is not exactly what the codec writes — a str for text, an
int (not a bool) for an integer, a bool for a boolean, an instance of
exactly the declared class for a complex value, bytes or a non-empty list or
tuple of bytes chunks for binary, a list or tuple for a
repeated member, None only where spyne would leave the element out, text with
no character XML cannot carry; the core then asks spyne to write that reply,
so unusual values are answered exactly as before, errors included.  The
envelope has spyne's shape (its prefixes, declaration, element names and
empty-element forms), so callers see the same bytes whichever path wrote it.
"""
from __future__ import annotations

import sys
from base64 import b64decode, b64encode
from typing import Callable, Sequence

from lxml import etree
from spyne import (BODY_STYLE_WRAPPED, Array, Boolean, ByteArray, ComplexModelBase, Fault, Integer, ServiceBase,
                   Unicode)
from spyne.model.binary import BINARY_ENCODING_BASE64, BINARY_ENCODING_USE_DEFAULT
from spyne.model.complex import XmlAttribute

from dsmt.transports.xmlsafe import NOT_XML_CHAR, escape_text

__all__ = ["SIMPLE_TYPES", "OperationCodec", "FastMethodContext", "UnreadableValue", "compile_operation"]

_XSI_NIL = "{http://www.w3.org/2001/XMLSchema-instance}nil"
#: The envelope prefixes spyne writes, so a reply has the same bytes whichever path wrote it.
_ENVELOPE_PREFIX = {"http://schemas.xmlsoap.org/soap/envelope/": "soap11env",
                    "http://www.w3.org/2003/05/soap-envelope": "soap12env"}
_DECLARATION = "<?xml version='1.0' encoding='UTF-8'?>\n"


class UnreadableValue(ValueError):
    """A schema-valid value this process cannot turn into a Python value (an integer of more digits than
    Python converts); the core answers it as an ``InvalidBody`` fault naming the element."""


class _Unwritable(Exception):
    """A value the compiled writer does not write: spyne writes the whole reply instead."""


def _read_text(text: str | None) -> str:
    return text or ""


def _read_integer(text: str | None) -> int:
    try:
        return int(text)  # the schema admitted it: optional sign, digits, surrounding whitespace
    except ValueError:  # only Python's guard against quadratic conversions is left: over 4300 digits
        raise UnreadableValue(f"an integer of {len(text.strip())} digits, over the "
                              f"{sys.get_int_max_str_digits()} this service reads") from None


def _read_boolean(text: str | None) -> bool:
    return text.strip() in ("true", "1")


def _read_binary(text: str | None) -> tuple[bytes] | None:
    # spyne's ByteArray: a one-chunk tuple; characters outside base64 (whitespace) are skipped, as there
    return None if text is None else (b64decode(text),)


def _write_text(value: object) -> str:
    if type(value) is not str or NOT_XML_CHAR.search(value):  # spyne refuses such text, as it always has
        raise _Unwritable
    return escape_text(value)  # as lxml writes text content


def _write_integer(value: object) -> str:
    if type(value) is not int:
        raise _Unwritable
    return str(value)


def _write_binary(value: object) -> str:
    if type(value) is bytes:
        return b64encode(value).decode("ascii")
    if (type(value) is list or type(value) is tuple) and value and all(type(chunk) is bytes for chunk in value):
        return b64encode(b"".join(value)).decode("ascii")  # chunks, as spyne's ByteArray holds them
    raise _Unwritable


def _write_boolean(value: object) -> str:
    if type(value) is not bool:
        raise _Unwritable
    return "true" if value else "false"


class _SimpleCodec:
    """A text-valued type: ``read`` turns an element's text into the value, ``write`` the value into escaped
    text (raising :class:`_Unwritable` for a value of another type)."""

    def __init__(self, read: Callable[[str | None], object], write: Callable[[object], str]):
        self.read_text, self.write_text = read, write

    def read(self, element: etree._Element) -> object:
        try:
            return self.read_text(element.text)
        except UnreadableValue as exc:  # the reader knows the value, the element is named here
            raise UnreadableValue(f"{element.tag}: {exc}") from None

    def write(self, parts: list, value: object, name: str) -> None:
        parts.append(f"<tns:{name}>{self.write_text(value)}</tns:{name}>")


#: The spyne types a compiled codec reads and writes, by the base class of their lineage.
SIMPLE_TYPES: dict[type, _SimpleCodec] = {
    Unicode: _SimpleCodec(_read_text, _write_text),
    Integer: _SimpleCodec(_read_integer, _write_integer),
    Boolean: _SimpleCodec(_read_boolean, _write_boolean),
    ByteArray: _SimpleCodec(_read_binary, _write_binary),  # base64, the SOAP protocols' binary encoding
}


class _Member:
    """One member of a complex type (or one argument or result of an operation), with spyne's rules."""

    __slots__ = ("key", "tag", "codec", "repeated", "required")

    def __init__(self, key: str, namespace: str, codec, repeated: bool, required: bool):
        self.key, self.tag, self.codec = key, f"{{{namespace}}}{key}", codec
        self.repeated, self.required = repeated, required

    def read(self, element: etree._Element) -> object:
        return None if element.get(_XSI_NIL) in ("true", "1") else self.codec.read(element)

    def write(self, parts: list, value: object) -> None:
        """Spyne's rule: a repeated member writes each item; a None is left out unless the member is
        required (spyne then writes a nil or empty element — its writer does that, not this one)."""
        if value is None:
            if self.required:
                raise _Unwritable
            return
        if self.repeated:
            if type(value) is not list and type(value) is not tuple:
                raise _Unwritable
            for item in value:
                if item is None:
                    raise _Unwritable
                self.codec.write(parts, item, self.key)
        else:
            self.codec.write(parts, value, self.key)


def _read_members(members: dict[str, _Member], element: etree._Element, into: dict) -> None:
    """Read ``element``'s children into ``into`` (key → value; repeated members as lists), as spyne does:
    children that are no member (the schema allowed them) are skipped."""
    for child in element:
        member = members.get(child.tag)
        if member is None:
            continue
        value = member.read(child)
        if member.repeated:
            items = into.get(member.key)  # None until the first item (the blank instance has the key)
            if items is None:
                into[member.key] = [value]
            else:
                items.append(value)
        else:
            into[member.key] = value


class _ComplexCodec:
    """A ``ComplexModel`` whose members are all compilable."""

    def __init__(self, cls: type, members: Sequence[_Member]):
        self.cls = cls
        self.members = tuple(members)
        self._by_tag = {member.tag: member for member in members}
        #: spyne's constructor costs ~3 µs to set every member to None (no defaults here, no properties, no
        #: SQLAlchemy): the same instance is made by filling the dict of a bare one, in 0.1 µs.
        self._blank = dict.fromkeys(member.key for member in members)

    def read(self, element: etree._Element) -> object:
        """An instance as spyne's ``get_deserialization_instance`` makes it, with the members found set."""
        instance = self.cls.__new__(self.cls)
        values = instance.__dict__
        values.update(self._blank)
        _read_members(self._by_tag, element, values)
        return instance

    def write(self, parts: list, value: object, name: str) -> None:
        if type(value) is not self.cls:
            raise _Unwritable
        start = len(parts)
        parts.append(f"<tns:{name}>")
        for member in self.members:
            member.write(parts, getattr(value, member.key, None))
        if len(parts) == start + 1:
            parts[start] = f"<tns:{name}/>"
        else:
            parts.append(f"</tns:{name}>")


class _Compiler:
    """Compiles the types of one operation; every complex type must be in ``namespace``."""

    def __init__(self, namespace: str, base64: bool):
        self.namespace = namespace
        #: Whether binary values travel as base64 both ways (the SOAP protocols' default).
        self.base64 = base64
        self._complex: dict[type, _ComplexCodec | None] = {}

    def members(self, cls) -> list[_Member] | None:
        """The compiled members of a complex type (an operation's in or out message included), or None."""
        if getattr(cls, "__extends__", None) is not None or cls.get_namespace() != self.namespace \
                or getattr(cls, "_type_info_alt", None) or cls.Attributes._xml_tag_body_as is not None:
            return None
        members = []
        for key, member_cls in cls._type_info.items():
            attributes = member_cls.Attributes
            if (isinstance(member_cls, type) and issubclass(member_cls, XmlAttribute)) or attributes.exc \
                    or attributes.sub_name is not None or attributes.sub_ns is not None \
                    or attributes.default is not None or getattr(attributes, "default_factory", None) is not None \
                    or isinstance(getattr(cls, key, None), property):
                return None
            codec = self.codec(member_cls)
            if codec is None:
                return None
            members.append(_Member(key, self.namespace, codec, attributes.max_occurs > 1, attributes.min_occurs > 0))
        return members

    def codec(self, cls) -> _SimpleCodec | _ComplexCodec | None:
        base = getattr(cls, "__orig__", None) or cls
        if base is Unicode or base is Boolean:  # not AnyUri & co.: they read into other types
            return SIMPLE_TYPES[base]
        if base is ByteArray:
            return SIMPLE_TYPES[base] if self.base64 and cls.Attributes.encoding is BINARY_ENCODING_USE_DEFAULT \
                else None
        if issubclass(base, Integer):  # bounded and unsigned integers read and write as ints too
            return SIMPLE_TYPES[Integer]
        if not issubclass(base, ComplexModelBase) or issubclass(base, (Array, Fault)) \
                or base.__init__ is not ComplexModelBase.__init__ or base.__new__ is not object.__new__ \
                or base.__setattr__ is not object.__setattr__ or hasattr(base, "_sa_class_manager"):
            return None
        if base in self._complex:  # compiled already, or being compiled (a type containing itself: None)
            return self._complex[base]
        self._complex[base] = None
        members = self.members(base)
        if members is None:
            return None
        codec = self._complex[base] = _ComplexCodec(base, members)
        return codec


class FastMethodContext:
    """What a service method gets as ``ctx`` on the compiled path: ``udc`` (the core's ``CallContext``),
    ``descriptor``, ``function``, ``service_class`` and ``app``.  dsmt's services read only ``ctx.udc``;
    spyne's other ``MethodContext`` attributes are not provided here (a service that needs them is built
    with ``SoapCore(…, fast_path=False)``)."""

    __slots__ = ("udc", "descriptor", "function", "app")

    def __init__(self, app, descriptor, udc):
        self.app, self.descriptor, self.function, self.udc = app, descriptor, descriptor.function, udc

    @property
    def service_class(self):
        return self.descriptor.service_class


class OperationCodec:
    """Reads one operation's arguments from its (schema-valid) Body element and writes its reply envelope."""

    def __init__(self, descriptor, envelope_ns: str, arguments: Sequence[_Member], response_name: str,
                 namespace: str, result: _Member | None):
        self.descriptor = descriptor
        self.function = descriptor.function
        self.no_ctx = bool(descriptor.no_ctx)
        self._arguments = {member.tag: member for member in arguments}
        self._keys = tuple(member.key for member in arguments)
        prefix = _ENVELOPE_PREFIX[envelope_ns]
        self._head = f'{_DECLARATION}<{prefix}:Envelope xmlns:{prefix}="{envelope_ns}" xmlns:tns="{namespace}">'
        self._header = f"<{prefix}:Header>".encode(), f"</{prefix}:Header>".encode()
        self._body = f"<{prefix}:Body>"
        tail = f"</{prefix}:Body></{prefix}:Envelope>"
        self._empty = f"{self._body}<tns:{response_name}/>{tail}"
        self._open, self._close = f"{self._body}<tns:{response_name}>", f"</tns:{response_name}>{tail}"
        self._result = result

    def decode(self, body: etree._Element) -> list:
        """The arguments, in declaration order, from a Body element the schema has accepted."""
        found: dict = {}
        _read_members(self._arguments, body, found)
        return [found.get(key) for key in self._keys]

    def encode(self, value: object, headers: bytes = b"") -> bytes | None:
        """The reply envelope for the method's return value, with ``headers`` (serialised header blocks)
        in its SOAP Header when there are any; None when spyne must write it."""
        parts = [self._head, self._open]
        if self._result is not None:
            try:
                self._result.write(parts, value)
            except _Unwritable:
                return None
        if len(parts) == 2:
            parts[1] = self._empty
        else:
            parts.append(self._close)
        if not headers:
            return "".join(parts).encode()
        opening, closing = self._header
        return b"".join((parts[0].encode(), opening, headers, closing, "".join(parts[1:]).encode()))


def compile_operation(application, descriptor, envelope_ns: str) -> OperationCodec | None:
    """An :class:`OperationCodec` for ``descriptor`` when the operation qualifies (module docstring), else
    None."""
    service = descriptor.service_class
    if (not descriptor.no_self or service is None or descriptor.body_style is not BODY_STYLE_WRAPPED
            or descriptor.aux is not None or descriptor.in_header or descriptor.out_header
            or descriptor.function is None or descriptor.when is not None
            or service.call_wrapper.__func__ is not ServiceBase.call_wrapper.__func__
            or application.event_manager.handlers or service.event_manager.handlers):
        return None
    in_message, out_message = descriptor.in_message, descriptor.out_message
    namespace = out_message.get_namespace()
    compiler = _Compiler(namespace, application.in_protocol.binary_encoding == BINARY_ENCODING_BASE64
                         and application.out_protocol.binary_encoding == BINARY_ENCODING_BASE64)
    arguments = compiler.members(in_message)
    results = compiler.members(out_message)
    if arguments is None or results is None or len(results) > 1:
        return None
    return OperationCodec(descriptor, envelope_ns, arguments, out_message.get_type_name(), namespace,
                          results[0] if results else None)
