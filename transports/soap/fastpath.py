"""Compiled codecs for simple operations: arguments read and replies written without spyne's object machinery.

spyne's pipeline (``generate_contexts`` → ``get_in_object`` →
``get_out_object`` → ``get_out_string``) costs about 100 µs per call even for
``ping(text) -> text``: a ``MethodContext`` (8 µs), a dozen events fired,
generic per-member attribute lookups and an lxml tree for the reply.  For the
operations most calls go to — a handful of text, integer and boolean
arguments, at most one such result — none of that is needed: the request has
already been validated against the published schema by the core, so reading
an argument is reading an element's text, and the reply is a fixed envelope
with one escaped value in it.

:func:`compile_operation` looks at one spyne method descriptor and returns an
:class:`OperationCodec` when the operation qualifies, else None (the core then
keeps spyne's pipeline for it).  An operation qualifies when:

* it is a plain ``@rpc`` of a ``ServiceBase`` (``no_self``) with a wrapped
  body, no SOAP header types, no auxiliary processing, and neither the
  service class nor the application has spyne event listeners (they would be
  skipped) or its own ``call_wrapper``;
* every argument is a single (``max_occurs`` 1) :data:`SIMPLE_TYPES` value
  without ``sub_name``/``sub_ns``/``default`` customisations;
* the reply has no value, or one such value.

Reading follows what spyne's deserialiser yields, checked by the
differential tests in ``tests/transports/soap/test_fastpath.py``: a missing
or ``xsi:nil`` element is None, an empty text element is ``""``, integers are
Python ints.  One deliberate difference: a boolean is read as XML Schema
says, whitespace collapsed (`` 1 `` is true); spyne 2.14 compares the raw text
and reads it as false.

Writing: :meth:`OperationCodec.encode` returns the reply envelope, or None
when the value is not exactly what the codec writes (a str for a text result,
an int — not a bool — for an integer, a bool for a boolean, None for an
optional result, text with no character XML cannot carry); the core then
asks spyne to write that reply, so unusual values are answered exactly as
before, errors included.  The envelope has the shape spyne writes (same
prefixes, declaration and element names), so callers see the same bytes for
ordinary values.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from lxml import etree
from spyne import BODY_STYLE_WRAPPED, Boolean, Integer, ServiceBase, Unicode

__all__ = ["SIMPLE_TYPES", "OperationCodec", "FastMethodContext", "compile_operation"]

_XSI_NIL = "{http://www.w3.org/2001/XMLSchema-instance}nil"
#: Characters XML 1.0 cannot carry in text (§2.2), lone surrogates included: such a result goes to spyne,
#: which refuses it the way it always has.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
#: The envelope prefixes spyne writes, so a reply has the same bytes whichever path wrote it.
_ENVELOPE_PREFIX = {"http://schemas.xmlsoap.org/soap/envelope/": "soap11env",
                    "http://www.w3.org/2003/05/soap-envelope": "soap12env"}
_DECLARATION = "<?xml version='1.0' encoding='UTF-8'?>\n"


def _read_text(text: str | None) -> str:
    return text or ""


def _read_integer(text: str | None) -> int:
    return int(text)  # the schema admitted it: optional sign, digits, surrounding whitespace


def _read_boolean(text: str | None) -> bool:
    return text.strip() in ("true", "1")


def _escape(value: str) -> str:
    """Text content as lxml writes it (``\\r`` as a character reference, so a reader gets it back)."""
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;"))


def _write_text(value: object) -> str | None:
    if type(value) is not str or _NOT_XML_CHAR.search(value):
        return None
    return _escape(value)


def _write_integer(value: object) -> str | None:
    return str(value) if type(value) is int else None


def _write_boolean(value: object) -> str | None:
    return ("true" if value else "false") if type(value) is bool else None


@dataclass(frozen=True)
class _SimpleType:
    read: Callable[[str | None], object]
    write: Callable[[object], str | None]


#: The spyne types a compiled codec reads and writes, by the base class of their lineage.
SIMPLE_TYPES: dict[type, _SimpleType] = {
    Unicode: _SimpleType(_read_text, _write_text),
    Integer: _SimpleType(_read_integer, _write_integer),
    Boolean: _SimpleType(_read_boolean, _write_boolean),
}


def _simple_type(cls) -> _SimpleType | None:
    """The codec entry for a spyne class (customised or not), or None when it has none or is customised in a
    way the codec does not follow."""
    attributes = cls.Attributes
    if attributes.max_occurs != 1 or attributes.sub_name is not None or attributes.sub_ns is not None \
            or attributes.default is not None:
        return None
    base = getattr(cls, "__orig__", None) or cls
    if base is Unicode or base is Boolean:  # not AnyUri & co.: they read into other types
        return SIMPLE_TYPES[base]
    if issubclass(base, Integer):  # bounded and unsigned integers read and write as ints too
        return SIMPLE_TYPES[Integer]
    return None


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

    def __init__(self, descriptor, envelope_ns: str, arguments: Sequence[tuple[str, _SimpleType]],
                 response: tuple[str, str], result: tuple[str, _SimpleType, bool] | None):
        self.descriptor = descriptor
        self.function = descriptor.function
        self.no_ctx = bool(descriptor.no_ctx)
        self._positions = {tag: index for index, (tag, _) in enumerate(arguments)}
        self._readers = tuple(simple.read for _, simple in arguments)
        namespace, name = response
        prefix = _ENVELOPE_PREFIX[envelope_ns]
        self._head = (f'{_DECLARATION}<{prefix}:Envelope xmlns:{prefix}="{envelope_ns}" xmlns:tns="{namespace}">'
                      f"<{prefix}:Body>")
        self._tail = f"</{prefix}:Body></{prefix}:Envelope>"
        self._empty = f"{self._head}<tns:{name}/>{self._tail}".encode()
        self._result = None
        if result is not None:
            local, simple, optional = result
            self._result = (f"{self._head}<tns:{name}><tns:{local}>", f"</tns:{local}></tns:{name}>{self._tail}",
                            simple.write, optional)

    def decode(self, body: etree._Element) -> list:
        """The arguments, in declaration order, from a Body element the schema has accepted."""
        values = [None] * len(self._readers)
        positions = self._positions
        for child in body:
            index = positions.get(child.tag)
            if index is not None and child.get(_XSI_NIL) not in ("true", "1"):
                values[index] = self._readers[index](child.text)
        return values

    def encode(self, value: object) -> bytes | None:
        """The reply envelope for the method's return value, or None when spyne must write it."""
        if self._result is None:
            return self._empty
        head, tail, write, optional = self._result
        if value is None:
            return self._empty if optional else None
        text = write(value)
        return None if text is None else (head + text + tail).encode()


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
    if getattr(in_message, "__extends__", None) is not None or getattr(out_message, "__extends__", None) is not None:
        return None
    arguments = []
    for name, cls in in_message._type_info.items():
        simple = _simple_type(cls)
        if simple is None:
            return None
        arguments.append((f"{{{in_message.get_namespace()}}}{name}", simple))
    members = list(out_message._type_info.items())
    if len(members) > 1:
        return None
    result = None
    if members:
        name, cls = members[0]
        simple = _simple_type(cls)
        if simple is None:
            return None
        result = (name, simple, cls.Attributes.min_occurs == 0)
    return OperationCodec(descriptor, envelope_ns, arguments,
                          (out_message.get_namespace(), out_message.get_type_name()), result)
