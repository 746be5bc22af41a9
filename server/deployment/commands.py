"""The deployment agent's commands: parsing and judging them.  Pure (no I/O, no reactor).

Commands travel as attribute events on the deployment agent's command channel of a slice::

    channel  /org/dsmt/ns/deployment/<slice>/org.dsmt.component.deployment-agent/command/
    service  <slice>_mgr
    payload  attribute, field "status"

and as the text of the ``Command`` SOAP operation.  The value is one line (reference 000 gives
``APPCONFIG,planetlab5.nbgisp.com,XYZ,XYZ-proc``); its grammar, exactly::

    command     = appconfig / update / uninstall / start / stop
    appconfig   = "APPCONFIG" "," host "," app "," proc
    update      = "UPDATE"    "," host "," app
    uninstall   = "UNINSTALL" "," host "," app [ "," component ]
    start       = "START"     "," host "," app "," component
    stop        = "STOP"      "," host "," app "," component
    host        = "*" / node-address     ; "*": every engine of the slice
    app         = [A-Za-z][A-Za-z0-9._-]{0,63}       ; the descriptor's application name
    proc        = [A-Za-z0-9][A-Za-z0-9._:@+~-]{0,63} ; the process (role) the node runs
    component   = [a-z][a-z0-9._-]{0,63}              ; a descriptor component name

* Verbs are upper case, as the reference writes them; parts are separated by single commas with
  nothing around them (no spaces, no empty part, no trailing comma).
* ``node-address`` is what :func:`~dsmt.server.slicemanager.spec.normalize_node_address` accepts
  (an IPv4/IPv6 address or a DNS name); it is compared in its normalised form, so
  ``PlanetLab5.NBGISP.com.`` addresses ``planetlab5.nbgisp.com``.
* What each verb means to an engine is the service core's business
  (``dsmt.server.deployment.service``); this module only reads and judges.

:func:`parse_command` reads a value into a :class:`Command` or raises :class:`CommandError` (a
Refusal) whose code is one of ``oversized`` (over :data:`MAX_COMMAND_CHARS`), ``malformed`` (not
text, control characters, spaces, empty parts, wrong number of parts), ``unknown-verb``,
``bad-host``, ``bad-name`` (an application, proc or component name outside its grammar).

:func:`judge` decides what an engine does with a value or a received event and **never raises**:
a :class:`Verdict` holds the command to run, or why the input is ignored (another host, another
slice's channel, another field: not an error, nothing to log loudly), or why it is refused (the
refusal, for the log).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from dsmt.server.refusal import Refusal
from dsmt.server.slicemanager.spec import SliceSpecError, normalize_node_address
from dsmt.server.statusevents import DEPLOYMENT_AGENT

__all__ = [
    "APPCONFIG", "UPDATE", "UNINSTALL", "START", "STOP", "VERBS", "ALL_HOSTS", "COMMAND_FIELD",
    "MAX_COMMAND_CHARS", "APPLICATION_NAME", "CommandError", "Command", "Verdict", "command_channel",
    "parse_command", "format_command", "judge",
]

APPCONFIG, UPDATE, UNINSTALL, START, STOP = "APPCONFIG", "UPDATE", "UNINSTALL", "START", "STOP"
#: Verb → (required parts after the verb, optional parts after those).
VERBS: dict[str, tuple[int, int]] = {
    APPCONFIG: (3, 0),   # host, app, proc
    UPDATE: (2, 0),      # host, app
    UNINSTALL: (2, 1),   # host, app [, component]
    START: (3, 0),       # host, app, component
    STOP: (3, 0),        # host, app, component
}
#: The host part that addresses every engine of the slice.
ALL_HOSTS = "*"
#: The attribute field commands travel in (reference 000).
COMMAND_FIELD = "status"
#: Longest command read: a verb (9), a 253-character DNS name, a 64-character application name and a
#: 64-character proc or component name with their commas is under 400 characters; 1024 leaves room
#: and refuses a hostile megabyte before it is split.
MAX_COMMAND_CHARS = 1024

#: An application name (the descriptor schema's ``ApplicationName``).
APPLICATION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._\-]{0,63}\Z")
_PROC = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+~\-]{0,63}\Z")
_COMPONENT = re.compile(r"[a-z][a-z0-9._\-]{0,63}\Z")
_UNSAFE = re.compile(r"[\x00-\x20\x7f\u0085\u00a0\u2028\u2029]")


class CommandError(Refusal):
    """A command value that is refused: ``code`` (module docstring) and a sentence naming the problem."""


@dataclass(frozen=True)
class Command:
    """One parsed command.  ``host`` is ``*`` or a normalised node address; ``target`` is APPCONFIG's
    proc, or START/STOP/UNINSTALL's component (None for UPDATE and an UNINSTALL of the whole application)."""

    verb: str
    host: str
    application: str
    target: str | None = None

    def for_host(self, host: str) -> bool:
        """Whether an engine on ``host`` (normalised) is addressed."""
        return self.host == ALL_HOSTS or self.host == host

    def text(self) -> str:
        return format_command(self.verb, self.host, self.application, self.target)


@dataclass(frozen=True)
class Verdict:
    """What to do with one input: run ``command``; or nothing, ``ignored`` saying why (not for us); or
    nothing, ``refused`` (a :class:`CommandError`) saying what is wrong with it."""

    command: Command | None = None
    ignored: str | None = None
    refused: CommandError | None = None


def command_channel(slice_name: str) -> str:
    """The deployment agent's command channel of ``slice_name`` (the slice name is checked)."""
    from dsmt.server.statusevents import status_channel
    return status_channel(slice_name, DEPLOYMENT_AGENT)[:-len("status/")] + "command/"


def _shown(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _host(text: str) -> str:
    if text == ALL_HOSTS:
        return text
    try:
        return normalize_node_address(text)
    except SliceSpecError as exc:
        raise CommandError("bad-host", f"host {_shown(text)!r} is neither '*' nor a node address: {exc}") from None


def _name(what: str, text: str, pattern: re.Pattern, rule: str) -> str:
    if not pattern.match(text):
        raise CommandError("bad-name", f"{what} {_shown(text)!r} is not {rule}")
    return text


def parse_command(value) -> Command:
    """The :class:`Command` of ``value`` (module docstring's grammar), else :class:`CommandError`."""
    if not isinstance(value, str):
        raise CommandError("malformed", f"a command is text, not {type(value).__name__}")
    if len(value) > MAX_COMMAND_CHARS:
        raise CommandError("oversized", f"the command is {len(value)} characters long; at most {MAX_COMMAND_CHARS} "
                           "are read")
    if not value:
        raise CommandError("malformed", "the command is empty")
    unsafe = _UNSAFE.search(value)
    if unsafe:
        raise CommandError("malformed", f"the command holds a space or control character (U+{ord(unsafe.group()):04X} "
                           f"at position {unsafe.start()}); parts are separated by single commas")
    verb, *parts = value.split(",")
    if verb not in VERBS:
        known = ", ".join(VERBS)
        raise CommandError("unknown-verb", f"{_shown(verb, 20)!r} is not a command; the commands are {known}")
    required, optional = VERBS[verb]
    if not required <= len(parts) <= required + optional:
        counts = f"{required}" if not optional else f"{required} or {required + optional}"
        raise CommandError("malformed", f"{verb} takes {counts} parts after the verb "
                           f"({_usage(verb)}), not {len(parts)}")
    empty = [index for index, part in enumerate(parts, 1) if not part]
    if empty:
        raise CommandError("malformed", f"part {empty[0] + 1} of the {verb} command is empty")
    host = _host(parts[0])
    application = _name("application", parts[1], APPLICATION_NAME,
                        "1-64 letters, digits, '.', '_' and '-', starting with a letter")
    target = None
    if verb == APPCONFIG:
        target = _name("proc", parts[2], _PROC, "1-64 letters, digits and '. _ : @ + ~ -', starting with a letter "
                                                "or digit")
    elif len(parts) == 3:
        target = _name("component", parts[2], _COMPONENT, "a component name (1-64 lower-case letters, digits, "
                                                          "'.', '_' and '-', starting with a letter)")
    return Command(verb, host, application, target)


def _usage(verb: str) -> str:
    return {APPCONFIG: "APPCONFIG,<host>,<app>,<proc>", UPDATE: "UPDATE,<host>,<app>",
            UNINSTALL: "UNINSTALL,<host>,<app>[,<component>]", START: "START,<host>,<app>,<component>",
            STOP: "STOP,<host>,<app>,<component>"}[verb]


def format_command(verb: str, host: str, application: str, target: str | None = None) -> str:
    """The value of a command (checked: what :func:`parse_command` reads back); CommandError otherwise."""
    text = ",".join([verb, host, application] + ([target] if target is not None else []))
    parse_command(text)
    return text


def judge(received, *, host: str, slice_name: str | None = None) -> Verdict:
    """What the engine of ``slice_name`` on ``host`` (normalised) does with ``received``: a command value
    (text), or a PsEPR event (then its channel must be the slice's command channel and its payload an
    attribute with field ``status``; anything else is ignored).  Never raises."""
    try:
        value = received
        if not isinstance(received, str):
            if not hasattr(received, "channel"):
                raise CommandError("malformed", f"a command is text or an event, not {type(received).__name__}")
            channel = received.channel
            if slice_name is not None and channel != command_channel(slice_name):
                return Verdict(ignored=f"event on {_shown(str(channel), 120)}, not on this slice's command channel")
            payload = getattr(received, "payload", None)
            field = getattr(payload, "field", None)
            if field != COMMAND_FIELD:
                return Verdict(ignored=f"not a command: field {_shown(str(field), 40)!r}, not {COMMAND_FIELD!r}")
            value = payload.value
        command = parse_command(value)
    except CommandError as refusal:
        return Verdict(refused=refusal)
    except Exception as exc:  # noqa: BLE001 — whatever arrives, the engine gets a verdict, not a traceback
        return Verdict(refused=CommandError("malformed", f"unreadable command ({type(exc).__name__})"))
    if not command.for_host(host):
        return Verdict(ignored=f"{command.verb} is for {command.host}, not for {host}")
    return Verdict(command=command)
