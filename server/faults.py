"""One mapping from a service's refusals to SOAP faults, shared by every dsmt service.

A service method refuses with a :class:`~dsmt.server.refusal.Refusal` (code
+ sentence) or a subclass; :func:`refusal_fault` turns it into the spyne
``Fault`` the SOAP core writes::

    Fault(faultcode="Client.<FaultName>[.<code>]", faultstring=<the refusal's reason>)

* ``<FaultName>``: the ``fault_name`` argument, else the refusal class's
  ``fault`` attribute (``class NoLease(Refusal): fault = "NoLease"``), else
  :data:`DEFAULT_FAULT` (``Refused``).
* ``.<code>``: only for refusals whose fault is :data:`ADMISSION_REFUSED`
  (``Client.AdmissionRefused.capacity``, ``….already-leased``, ``….expired``)
  — there the code is what the caller must tell apart (docs/dslice.md); the
  other faults' names say it all.

The core (``SoapCore._service_fault``) splits the faultcode on ``.``: SOAP 1.1
writes it as it is (``soap:Client.AdmissionRefused.already-leased``), SOAP
1.2 as the ``Sender`` code with one subcode per part, each a QName in the
service's target namespace (``tns:AdmissionRefused`` / ``tns:already-leased``).
So every part must be an XML NCName without a dot.  **Codes are kept as they
are when they are one** — ``-`` is allowed inside an NCName, so the refusal
codes of dslice (``already-leased``, ``not-yet-valid``, ``wrong-node``…) travel
verbatim, as docs/dslice.md writes them.  A code that is not one (a dot, a
space, a leading digit or ``-``, a character outside ASCII letters, digits,
``_`` and ``-``) is converted to CamelCase of its letter/digit runs
(``"rate.limit"`` → ``RateLimit``, ``"2fast"`` → ``Code2fast``) by
:func:`subcode`, so a fault can never carry an invalid QName.
"""
from __future__ import annotations

import re

from spyne.model.fault import Fault

from dsmt.server.refusal import Refusal

__all__ = ["ADMISSION_REFUSED", "DEFAULT_FAULT", "MAX_SUBCODE_CHARS", "refusal_fault", "client_fault", "subcode"]

#: The fault whose refusal code is written as a second subcode.
ADMISSION_REFUSED = "AdmissionRefused"
#: The fault name of a Refusal that names none.
DEFAULT_FAULT = "Refused"
#: Longest subcode kept: refusal codes are short words; a faultcode is no place for a sentence.
MAX_SUBCODE_CHARS = 64

_NCNAME_NO_DOT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_RUNS = re.compile(r"[A-Za-z0-9]+")


def subcode(text: str) -> str:
    """``text`` as one faultcode part: itself when it is an NCName without ``.`` (ASCII), else the CamelCase
    of its letter/digit runs, prefixed ``Code`` when that is empty or starts with a digit; at most
    :data:`MAX_SUBCODE_CHARS` characters."""
    text = str(text)
    if not _NCNAME_NO_DOT.match(text):
        text = "".join(run[:1].upper() + run[1:] for run in _RUNS.findall(text))
        if not text or text[0].isdigit():
            text = "Code" + text
    return text[:MAX_SUBCODE_CHARS]


def client_fault(name: str, reason: str, *codes: str) -> Fault:
    """A Sender (``Client``) fault ``Client.<name>[.<code>…]`` with ``reason`` as its string."""
    parts = [subcode(name)] + [subcode(code) for code in codes]
    return Fault(faultcode="Client." + ".".join(parts), faultstring=str(reason))


def refusal_fault(refusal: Refusal, fault_name: str | None = None) -> Fault:
    """The spyne Fault for ``refusal`` (see the module docstring)."""
    name = fault_name or getattr(type(refusal), "fault", None) or DEFAULT_FAULT
    codes = (refusal.code,) if name == ADMISSION_REFUSED else ()
    return client_fault(name, refusal.reason, *codes)
