"""Deployment descriptors: what the deployment engine on a sliver does for one application.

A descriptor (namespace :data:`NAMESPACE`, schema ``wsdl/deployment-descriptor.xsd``) names an
application and its version, declares parameters, describes components (package, install command,
config templates, start/stop commands, health check, restart policy, dependencies) and composes
steps over component actions (``sequence``, ``parallel``, ``barrier``).  ``tests/server/
deployment/fixtures/xyz.xml`` is a complete example.

Contract: :func:`parse_descriptor` returns a :class:`Descriptor` (frozen dataclasses all the way
down) or raises :class:`DescriptorError` — never another exception, whatever the bytes — whose
``code`` says what kind of problem it is and whose reason names the element and its line.  Three
gates, in order:

1. Safe XML (:func:`dsmt.transports.xmlsafe.parse_xml`): no DTD or entity, at most
   :data:`MAX_DESCRIPTOR_BYTES`, at most :data:`MAX_DEPTH` levels.  Code ``unsafe-xml``.
2. The XSD (lxml ``XMLSchema``): shape and value syntax.  Code ``schema``; the reason is the
   first violation libxml2 reports, with its line.
3. Rules the XSD cannot state, each with its own code:

   * ``duplicate`` — two parameters, components, env variables of one command, or config files
     (across all components) with the same name/path;
   * ``unknown-component`` — a step or ``dependsOn`` names no component; ``cycle`` — the
     dependencies loop (the message lists the loop) or a component depends on itself;
   * ``path-escape`` — a config path, package ``dest`` or ``cwd`` is absolute, has a ``..``,
     ``.`` or empty segment, a backslash, a control character, or a segment over
     :data:`MAX_SEGMENT_BYTES`: every path is relative to the sliver and must stay in it;
   * ``undefined-parameter`` — a ``${name}`` that no parameter declares; ``bad-template`` — a
     ``${`` not closed or not around a parameter name;
   * ``empty-argv`` — ``argv[0]`` empty (the XSD already demands one ``arg``);
   * ``unknown-action`` — an action neither built in (:data:`BUILTIN_ACTIONS`) nor given by the
     caller (plugins' actions); ``unsupported-action`` — a built-in action the component cannot
     do (``start`` without ``<start>``, ``check`` without ``<health>``, ``configure`` without
     ``<config>``, ``install`` without ``<package>`` or ``<install>``, ``stop`` without
     ``<start>``);
   * ``barrier`` — a barrier outside every ``parallel``'s branch, directly a branch, in fewer than
     two branches, twice in a branch, or in orders that would deadlock;
   * ``parameter`` — a parameter both required and defaulted, or neither;
   * ``value`` — numbers out of range (health ``timeout`` > ``interval``, ``backoffInitial`` >
     ``backoffMax``, a literal TCP port not in 1..65535, a health URL not http(s));
   * ``limit`` — more than :data:`MAX_COMPONENTS`, :data:`MAX_PARAMETERS` or :data:`MAX_STEPS`.

**Composition semantics** (what the engine executes): ``sequence`` runs its children one after
the other and stops at the first failure; ``parallel`` runs its children (branches) together and
ends when all have; a ``barrier`` named N inside branches of one ``parallel`` (the nearest
enclosing one) holds each branch there until every branch holding N has reached it.

**Substitution** (:func:`substitute`): in config text, command ``arg``s, env values, the health
URL, host and port, ``${name}`` is the parameter's value and ``$$`` a literal ``$``; any other
``$`` is literal, so shell snippets in templates rarely need escaping.  Paths are never
substituted: they are checked here, once, and a parameter cannot move a file out of the sliver.

Pure: bytes in, a value or an error out.  :func:`resolve_parameters` binds a deployment's values.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Union

from lxml import etree

from dsmt.server.deployment.checksum import normalize_sha256
from dsmt.server.refusal import Refusal
from dsmt.transports.xmlsafe import XmlSafetyError, parse_xml

__all__ = [
    "NAMESPACE", "SCHEMA_NAME", "BUILTIN_ACTIONS", "MAX_DESCRIPTOR_BYTES", "MAX_DEPTH", "MAX_COMPONENTS",
    "MAX_PARAMETERS", "MAX_STEPS", "MAX_SEGMENT_BYTES", "MAX_PARAMETER_VALUE_BYTES", "DEFAULT_RESTART",
    "DescriptorError", "Descriptor", "Application", "Parameter", "Component", "Package", "Command",
    "Limits", "ConfigFile", "StopSpec", "HealthCheck", "RestartPolicy", "Sequence", "Parallel", "Barrier",
    "Do", "Step", "parse_descriptor", "read_descriptor", "substitute", "template_names",
    "resolve_parameters", "check_sliver_path", "schema",
]

NAMESPACE = "http://dsmt.org/ns/deployment"
#: The schema's file in the installed contracts (``dsmt.wsdl``, the repository's ``wsdl/``).
SCHEMA_NAME = "deployment-descriptor.xsd"

#: Actions every engine knows; plugins add theirs through ``parse_descriptor(actions=…)``.
BUILTIN_ACTIONS = frozenset({"install", "configure", "start", "check", "stop", "uninstall"})

#: Largest descriptor read.  Config templates are inline, and a few dozen config files of a few
#: KB each is the realistic top; 1 MiB leaves room and stops a giant document at the door.
MAX_DESCRIPTOR_BYTES = 1024 * 1024
#: Deepest nesting.  The fixed part is 5 levels (deployment/component/start/limits or
#: health/command/arg); the rest is steps nesting sequence/parallel.  32 allows ~25 levels of
#: composition, far more than anyone writes, and keeps every recursive walk short.
MAX_DEPTH = 32
#: Most components: each is one or more processes in one sliver, whose process and memory
#: limits make dozens the realistic top; 64 bounds the dependency walk and the status channels.
MAX_COMPONENTS = 64
#: Most parameters: a template engine's worth of knobs without letting a descriptor declare
#: thousands of names.
MAX_PARAMETERS = 256
#: Most step elements (sequence, parallel, barrier, do): six actions for each of the maximum
#: 64 components is 384; 1024 leaves room for composition elements.
MAX_STEPS = 1024
#: Longest path segment, in UTF-8 bytes: NAME_MAX on Linux file systems.
MAX_SEGMENT_BYTES = 255
#: Longest parameter value bound at deployment time: values land in argv and config files;
#: 64 KiB fits a certificate bundle or a key list, and keeps argv far below ARG_MAX.
MAX_PARAMETER_VALUE_BYTES = 64 * 1024
#: Highest TCP port.
_MAX_PORT = 65535

_Q = "{%s}" % NAMESPACE
_PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
#: "$$", "${...}" (at most 80 characters inside, so an unclosed "${" never scans a megabyte), "${".
_TOKEN = re.compile(r"\$(?:(\$)|\{([^}\n]{0,80})\}|(\{))")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class DescriptorError(Refusal):
    """A descriptor is not acceptable: ``code`` (see the module docstring) and a reason naming the element
    and its line; ``line`` is that line (None when the problem has no single place)."""

    def __init__(self, code: str, reason: str, line: int | None = None):
        super().__init__(code, reason if line is None else f"line {line}: {reason}")
        self.line = line


# ---------------------------------------------------------------------------------------------------
# The model

@dataclass(frozen=True)
class Application:
    name: str
    version: str


@dataclass(frozen=True)
class Parameter:
    """``default`` is None exactly when ``required``."""

    name: str
    default: str | None
    required: bool


@dataclass(frozen=True)
class Package:
    """``dest``: the directory it is unpacked into, relative to the sliver."""

    url: str
    sha256: str
    format: str
    dest: str


@dataclass(frozen=True)
class Limits:
    """setrlimit values for a started process; None keeps the sliver's own limit."""

    cpu_seconds: int | None = None
    memory_bytes: int | None = None
    open_files: int | None = None
    processes: int | None = None
    file_size_bytes: int | None = None


@dataclass(frozen=True)
class Command:
    """A program run without a shell.  ``argv`` and env values are templates; ``cwd`` is relative to the
    sliver (None: the sliver's root); ``limits`` only on start commands."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    limits: Limits | None = None


@dataclass(frozen=True)
class ConfigFile:
    """``template`` rendered with :func:`substitute` and written at ``path`` (relative to the sliver)."""

    path: str
    template: str
    mode: int = 0o644


@dataclass(frozen=True)
class StopSpec:
    """Send ``signal`` (a name: ``TERM``…) to the process group, ``KILL`` after ``grace`` seconds; or run
    ``command`` when given (then the same grace applies before ``KILL``)."""

    signal: str = "TERM"
    grace: float = 10.0
    command: Command | None = None


@dataclass(frozen=True)
class HealthCheck:
    """``kind`` is ``http`` (``url``), ``tcp`` (``host``, ``port``: templates) or ``command``.  Healthy
    again after one success; unhealthy after ``retries`` consecutive failures, each check at most
    ``timeout`` seconds, one every ``interval`` seconds."""

    kind: str
    interval: float
    timeout: float
    retries: int
    url: str | None = None
    host: str | None = None
    port: str | None = None
    command: Command | None = None


@dataclass(frozen=True)
class RestartPolicy:
    """Restart a failed process at most ``max_restarts`` times, waiting ``backoff_initial`` seconds,
    doubling up to ``backoff_max``."""

    max_restarts: int
    backoff_initial: float
    backoff_max: float


#: Used when a component has no ``<restart>``: the schema's defaults.  Five restarts ride out a
#: transient fault (a port still in TIME_WAIT, a dependency restarting) without hiding a crash loop;
#: 1 s doubling to 60 s keeps a crashing process from burning the sliver's CPU share.
DEFAULT_RESTART = RestartPolicy(max_restarts=5, backoff_initial=1.0, backoff_max=60.0)


@dataclass(frozen=True)
class Component:
    name: str
    package: Package | None = None
    depends_on: tuple[str, ...] = ()
    install: Command | None = None
    configs: tuple[ConfigFile, ...] = ()
    start: Command | None = None
    stop: StopSpec | None = None
    health: HealthCheck | None = None
    restart: RestartPolicy = DEFAULT_RESTART


@dataclass(frozen=True)
class Do:
    action: str
    component: str
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Barrier:
    name: str
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Sequence:
    steps: tuple["Step", ...]


@dataclass(frozen=True)
class Parallel:
    branches: tuple["Step", ...]


Step = Union[Sequence, Parallel, Barrier, Do]


@dataclass(frozen=True)
class Descriptor:
    application: Application
    parameters: tuple[Parameter, ...]
    components: tuple[Component, ...]
    steps: Step

    def component(self, name: str) -> Component:
        """The component named ``name``; KeyError if none."""
        for component in self.components:
            if component.name == name:
                return component
        raise KeyError(name)

    def parameter(self, name: str) -> Parameter:
        for parameter in self.parameters:
            if parameter.name == name:
                return parameter
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------------
# Templates and paths

def _scan(text: str):
    """Yield ``("text", s)`` and ``("name", n)`` pieces of a template; ValueError on a malformed ``${``."""
    position = 0
    for match in _TOKEN.finditer(text):
        if match.start() > position:
            yield "text", text[position:match.start()]
        dollar, name, unclosed = match.groups()
        if dollar:
            yield "text", "$"
        elif unclosed:
            raise ValueError(f"'${{' at character {match.start()} is not closed by '}}' around a parameter name "
                             "(write '$$' for a literal '$')")
        elif not _PARAMETER_NAME.match(name):
            raise ValueError(f"'${{{name}}}' is not a parameter reference: names are letters, digits and '_', "
                             "not starting with a digit")
        else:
            yield "name", name
        position = match.end()
    if position < len(text):
        yield "text", text[position:]


def template_names(text: str) -> tuple[str, ...]:
    """The parameter names ``text`` refers to, in order of first use; ValueError if malformed."""
    seen: dict[str, None] = {}
    for kind, value in _scan(text):
        if kind == "name":
            seen.setdefault(value)
    return tuple(seen)


def substitute(text: str, values: Mapping[str, str]) -> str:
    """``text`` with ``${name}`` replaced by ``values[name]`` and ``$$`` by ``$``.

    KeyError names a missing parameter; ValueError a malformed template.
    """
    out = []
    for kind, value in _scan(text):
        if kind == "name":
            if value not in values:
                raise KeyError(f"parameter {value!r} has no value")
            out.append(values[value])
        else:
            out.append(value)
    return "".join(out)


def check_sliver_path(path: str, what: str = "path") -> str:
    """Return ``path`` if it is a canonical relative path that stays inside the sliver, else ValueError.

    Canonical: segments separated by single ``/``, none empty, ``.`` or ``..``, no leading ``/``,
    no backslash (a Windows separator: its meaning would differ between systems), no control
    character, each segment at most :data:`MAX_SEGMENT_BYTES` bytes in UTF-8.
    """
    shown = path if len(path) <= 80 else path[:80] + "…"
    if not path:
        raise ValueError(f"{what} is empty")
    if path.startswith("/"):
        raise ValueError(f"{what} {shown!r} is absolute; paths are relative to the sliver")
    if _CONTROL.search(path):
        raise ValueError(f"{what} {shown!r} has a control character")
    if "\\" in path:
        raise ValueError(f"{what} {shown!r} has a backslash; use '/' between segments")
    for segment in path.split("/"):
        if segment == "..":
            raise ValueError(f"{what} {shown!r} has a '..' segment and could leave the sliver")
        if segment in ("", "."):
            raise ValueError(f"{what} {shown!r} has an empty or '.' segment; write it canonically")
        if len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            raise ValueError(f"{what} {shown!r} has a segment over {MAX_SEGMENT_BYTES} bytes")
    return path


# ---------------------------------------------------------------------------------------------------
# Parsing

@functools.lru_cache(maxsize=1)
def schema() -> etree.XMLSchema:
    """The compiled descriptor schema from the installed contracts, compiled once per process — at
    this module's import (end of the module), so a process that imports it and then forks (the node
    manager's fork server, which preloads the engine) compiles it once for every engine it forks:
    ~3 ms of CPU each, one Deploy's worth of parsing twenty times over."""
    from dsmt.server.contracts import schema_path
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    with open(schema_path(SCHEMA_NAME.removesuffix(".xsd")), "rb") as stream:
        return etree.XMLSchema(etree.parse(stream, parser))


def read_descriptor(path: str, *, actions: Iterable[str] = BUILTIN_ACTIONS) -> Descriptor:
    """:func:`parse_descriptor` of the file at ``path``; DescriptorError ``io`` if it cannot be read."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_DESCRIPTOR_BYTES + 1)
    except OSError as exc:
        raise DescriptorError("io", f"cannot read descriptor {path}: {exc.strerror or exc}") from None
    return parse_descriptor(data, actions=actions)


def parse_descriptor(data: bytes, *, actions: Iterable[str] = BUILTIN_ACTIONS) -> Descriptor:
    """Parse and check a descriptor (see the module docstring).  ``actions``: the actions the engine
    knows (built-ins plus plugins')."""
    try:
        root = parse_xml(data, max_bytes=MAX_DESCRIPTOR_BYTES, max_depth=MAX_DEPTH, what="deployment descriptor")
    except XmlSafetyError as exc:
        raise DescriptorError("unsafe-xml", str(exc)) from None
    if root.tag != _Q + "deployment":
        raise DescriptorError("schema", f"the root element is <{_shown_tag(root.tag)}>, not <deployment> in "
                              f"namespace {NAMESPACE}", root.sourceline)
    checker = schema()
    if not checker.validate(root):
        error = checker.error_log[0]
        raise DescriptorError("schema", error.message.replace(_Q, ""), error.line)
    return _Reader(frozenset(actions)).read(root)


def _shown_tag(tag) -> str:
    text = str(tag)
    return text if len(text) <= 120 else text[:120] + "…"


def _local(element) -> str:
    return etree.QName(element).localname


def _children(element, name: str):
    return element.iterchildren(_Q + name)


def _child(element, name: str):
    return element.find(_Q + name)


def _seconds(element, attribute: str, default: str) -> float:
    return float(element.get(attribute, default))


def _integer(element, attribute: str, default: str | None = None) -> int | None:
    value = element.get(attribute, default)
    return None if value is None else int(value)


class _Reader:
    """One pass over a schema-valid tree: builds the model and checks the semantic rules."""

    def __init__(self, actions: frozenset[str]):
        self.actions = BUILTIN_ACTIONS | actions
        self.parameter_names: set[str] = set()
        self.step_count = 0

    def read(self, root) -> Descriptor:
        application_element = _child(root, "application")
        application = Application(application_element.get("name"), application_element.get("version"))
        parameters = self._parameters(_child(root, "parameters"))
        self.parameter_names = {parameter.name for parameter in parameters}
        component_elements = list(_children(root, "component"))
        if len(component_elements) > MAX_COMPONENTS:
            raise DescriptorError("limit", f"{len(component_elements)} components, over the limit of "
                                  f"{MAX_COMPONENTS}", component_elements[MAX_COMPONENTS].sourceline)
        components: dict[str, Component] = {}
        lines: dict[str, int] = {}
        for element in component_elements:
            name = element.get("name")
            if name in components:
                raise DescriptorError("duplicate", f"<component name={name!r}> is declared twice (first on line "
                                      f"{lines[name]})", element.sourceline)
            components[name] = self._component(element)
            lines[name] = element.sourceline
        self._check_dependencies(components, component_elements)
        self._check_config_paths(components, component_elements)
        steps_element = _child(root, "steps")
        steps = self._step(next(steps_element.iterchildren()), components)
        check_barriers(steps)
        return Descriptor(application, parameters, tuple(components.values()), steps)

    # -- parameters and templates ------------------------------------------------------------------

    def _parameters(self, element) -> tuple[Parameter, ...]:
        if element is None:
            return ()
        found: dict[str, Parameter] = {}
        lines: dict[str, int] = {}
        for item in _children(element, "parameter"):
            if len(found) == MAX_PARAMETERS:
                raise DescriptorError("limit", f"more than {MAX_PARAMETERS} parameters", item.sourceline)
            name = item.get("name")
            if name in found:
                raise DescriptorError("duplicate", f"<parameter name={name!r}> is declared twice (first on line "
                                      f"{lines[name]})", item.sourceline)
            required = item.get("required", "false") in ("true", "1")
            default = item.get("default")
            if required and default is not None:
                raise DescriptorError("parameter", f"<parameter name={name!r}> is required and has a default; a "
                                      "required parameter's value comes from the deployment", item.sourceline)
            if not required and default is None:
                raise DescriptorError("parameter", f"<parameter name={name!r}> has no default: give one "
                                      "(default=\"\" for empty) or mark it required=\"true\"", item.sourceline)
            if default is not None:
                _check_value(name, default, item.sourceline)
            found[name] = Parameter(name, default, required)
            lines[name] = item.sourceline
        return tuple(found.values())

    def _template(self, text: str, element, what: str) -> str:
        try:
            names = template_names(text)
        except ValueError as exc:
            raise DescriptorError("bad-template", f"{what}: {exc}", element.sourceline) from None
        for name in names:
            if name not in self.parameter_names:
                raise DescriptorError("undefined-parameter", f"{what} uses ${{{name}}}, which no <parameter> "
                                      "declares", element.sourceline)
        return text

    def _path(self, path: str, element, what: str) -> str:
        try:
            return check_sliver_path(path, what)
        except ValueError as exc:
            raise DescriptorError("path-escape", str(exc), element.sourceline) from None

    # -- components --------------------------------------------------------------------------------

    def _component(self, element) -> Component:
        name = element.get("name")
        where = f"component {name!r}"
        package = None
        package_element = _child(element, "package")
        if package_element is not None:
            dest = package_element.get("dest", name)
            package = Package(package_element.get("url"), normalize_sha256(package_element.get("sha256")),
                              package_element.get("format"),
                              self._path(dest, package_element, f"{where}: <package dest>"))
        depends_on = []
        for dependency in _children(element, "dependsOn"):
            target = dependency.get("component")
            if target in depends_on:
                raise DescriptorError("duplicate", f"{where} depends on {target!r} twice", dependency.sourceline)
            depends_on.append(target)
        install_element = _child(element, "install")
        install = None if install_element is None else self._command(install_element, f"{where}: <install>")
        configs = tuple(self._config(config, where) for config in _children(element, "config"))
        start_element = _child(element, "start")
        start = None if start_element is None else self._command(start_element, f"{where}: <start>")
        stop = self._stop(_child(element, "stop"), where)
        health = self._health(_child(element, "health"), where)
        restart = self._restart(_child(element, "restart"), where)
        return Component(name, package, tuple(depends_on), install, configs, start, stop, health, restart)

    def _command(self, element, what: str) -> Command:
        args = [arg.text or "" for arg in _children(element, "arg")]
        if not args[0].strip():
            raise DescriptorError("empty-argv", f"{what}: the first <arg> (the program) is empty",
                                  next(_children(element, "arg")).sourceline)
        for arg in _children(element, "arg"):
            self._template(arg.text or "", arg, f"{what} <arg>")
        env: dict[str, str] = {}
        for variable in _children(element, "env"):
            name = variable.get("name")
            if name in env:
                raise DescriptorError("duplicate", f"{what}: environment variable {name!r} is set twice",
                                      variable.sourceline)
            env[name] = self._template(variable.get("value"), variable, f"{what} <env name={name!r}>")
        cwd = element.get("cwd")
        if cwd is not None:
            self._path(cwd, element, f"{what} cwd")
        limits = None
        limits_element = _child(element, "limits")
        if limits_element is not None:
            limits = Limits(*(_integer(limits_element, attribute) for attribute in
                              ("cpuSeconds", "memoryBytes", "openFiles", "processes", "fileSizeBytes")))
        return Command(tuple(args), tuple(env.items()), cwd, limits)

    def _config(self, element, where: str) -> ConfigFile:
        path = self._path(element.get("path"), element, f"{where}: <config path>")
        template = self._template(element.text or "", element, f"{where}: <config path={path!r}>")
        return ConfigFile(path, template, int(element.get("mode", "0644"), 8))

    def _stop(self, element, where: str) -> StopSpec | None:
        if element is None:
            return None
        command_element = _child(element, "command")
        command = None if command_element is None else self._command(command_element, f"{where}: <stop>")
        return StopSpec(element.get("signal", "TERM"), _seconds(element, "grace", "10"), command)

    def _health(self, element, where: str) -> HealthCheck | None:
        if element is None:
            return None
        what = f"{where}: <health>"
        interval, timeout = _seconds(element, "interval", "10"), _seconds(element, "timeout", "5")
        retries = _integer(element, "retries", "3")
        if interval <= 0 or timeout <= 0:
            raise DescriptorError("value", f"{what} interval and timeout must be above 0", element.sourceline)
        if timeout > interval:
            raise DescriptorError("value", f"{what} timeout {timeout:g} s is longer than the interval "
                                  f"{interval:g} s; checks would overlap", element.sourceline)
        if retries < 1:
            raise DescriptorError("value", f"{what} retries must be at least 1", element.sourceline)
        probe = next(element.iterchildren())
        kind = _local(probe)
        if kind == "http":
            url = self._template(probe.get("url"), probe, f"{what} <http url>")
            if not url.startswith(("http://", "https://")):
                raise DescriptorError("value", f"{what} <http url={url[:80]!r}> is not an http:// or https:// URL",
                                      probe.sourceline)
            return HealthCheck("http", interval, timeout, retries, url=url)
        if kind == "tcp":
            host = self._template(probe.get("host", "127.0.0.1"), probe, f"{what} <tcp host>")
            port = self._template(probe.get("port"), probe, f"{what} <tcp port>")
            if not template_names(port) and not (port.isdigit() and len(port) <= 5 and 1 <= int(port) <= _MAX_PORT):
                raise DescriptorError("value", f"{what} <tcp port={port[:20]!r}> is not a port number "
                                      f"(1..{_MAX_PORT}) or a ${{parameter}}", probe.sourceline)
            return HealthCheck("tcp", interval, timeout, retries, host=host, port=port)
        return HealthCheck("command", interval, timeout, retries, command=self._command(probe, f"{what} <command>"))

    def _restart(self, element, where: str) -> RestartPolicy:
        if element is None:
            return DEFAULT_RESTART
        policy = RestartPolicy(_integer(element, "maxRestarts", "5"), _seconds(element, "backoffInitial", "1"),
                               _seconds(element, "backoffMax", "60"))
        if policy.backoff_initial <= 0:
            raise DescriptorError("value", f"{where}: <restart backoffInitial> must be above 0: a zero backoff "
                                  "restarts a crashing process in a tight loop", element.sourceline)
        if policy.backoff_initial > policy.backoff_max:
            raise DescriptorError("value", f"{where}: <restart backoffInitial={policy.backoff_initial:g}> is above "
                                  f"backoffMax={policy.backoff_max:g}", element.sourceline)
        return policy

    # -- cross-component rules ---------------------------------------------------------------------

    def _check_dependencies(self, components: dict[str, Component], elements) -> None:
        lines = {element.get("name"): element for element in elements}
        for component in components.values():
            for target in component.depends_on:
                element = next(d for d in _children(lines[component.name], "dependsOn") if d.get("component") == target)
                if target == component.name:
                    raise DescriptorError("cycle", f"component {target!r} depends on itself", element.sourceline)
                if target not in components:
                    raise DescriptorError("unknown-component", f"component {component.name!r} depends on "
                                          f"{target!r}, which is not declared", element.sourceline)
        done: set[str] = set()
        for start in components:
            path: list[str] = []
            on_path: set[str] = set()
            stack = [(start, iter(components[start].depends_on))]
            if start in done:
                continue
            path.append(start)
            on_path.add(start)
            while stack:
                name, pending = stack[-1]
                target = next(pending, None)
                if target is None:
                    stack.pop()
                    path.pop()
                    on_path.discard(name)
                    done.add(name)
                    continue
                if target in on_path:
                    loop = path[path.index(target):] + [target]
                    raise DescriptorError("cycle", "components depend on each other in a loop: " + " -> ".join(loop),
                                          lines[target].sourceline)
                if target not in done:
                    path.append(target)
                    on_path.add(target)
                    stack.append((target, iter(components[target].depends_on)))

    def _check_config_paths(self, components: dict[str, Component], elements) -> None:
        owners: dict[str, str] = {}
        by_name = {element.get("name"): element for element in elements}
        for component in components.values():
            for config in component.configs:
                if config.path in owners:
                    element = next(c for c in _children(by_name[component.name], "config")
                                   if c.get("path") == config.path)
                    other = owners[config.path]
                    whose = "twice by it" if other == component.name else f"by component {other!r} too"
                    raise DescriptorError("duplicate", f"config file {config.path!r} of component "
                                          f"{component.name!r} is written {whose}", element.sourceline)
                owners[config.path] = component.name

    # -- steps -------------------------------------------------------------------------------------

    def _step(self, element, components: dict[str, Component]) -> Step:
        self.step_count += 1
        if self.step_count > MAX_STEPS:
            raise DescriptorError("limit", f"more than {MAX_STEPS} step elements", element.sourceline)
        kind = _local(element)
        if kind == "do":
            return self._do(element, components)
        if kind == "barrier":
            return Barrier(element.get("name"), element.sourceline)
        children = tuple(self._step(child, components) for child in element.iterchildren())
        return Sequence(children) if kind == "sequence" else Parallel(children)

    def _do(self, element, components: dict[str, Component]) -> Do:
        action, name = element.get("action"), element.get("component")
        if action not in self.actions:
            raise DescriptorError("unknown-action", f"<do action={action!r}>: no management component provides "
                                  f"this action (known: {', '.join(sorted(self.actions))})", element.sourceline)
        component = components.get(name)
        if component is None:
            raise DescriptorError("unknown-component", f"<do action={action!r} component={name!r}>: no such "
                                  "component", element.sourceline)
        missing = {
            "start": None if component.start else "<start>",
            "stop": None if component.start else "<start> (nothing to stop)",
            "check": None if component.health else "<health>",
            "configure": None if component.configs else "<config>",
            "install": None if component.package or component.install else "<package> or <install>",
        }.get(action)
        if missing:
            raise DescriptorError("unsupported-action", f"<do action={action!r} component={name!r}>: the component "
                                  f"has no {missing}", element.sourceline)
        return Do(action, name, element.sourceline)


def barriers_of(step: Step) -> list[Barrier]:
    """Barriers that belong to the parallel enclosing ``step``: not those inside nested parallels."""
    if isinstance(step, Barrier):
        return [step]
    if isinstance(step, Sequence):
        return [barrier for child in step.steps for barrier in barriers_of(child)]
    return []


def check_barriers(root: Step) -> None:
    outside = barriers_of(root)
    if outside:
        raise DescriptorError("barrier", f"<barrier name={outside[0].name!r}> is not inside a branch of a "
                              "<parallel>; it would synchronise nothing", outside[0].line)
    pending = [root]
    while pending:
        step = pending.pop()
        if isinstance(step, Sequence):
            pending.extend(step.steps)
            continue
        if not isinstance(step, Parallel):
            continue
        pending.extend(step.branches)
        holders: dict[str, int] = {}
        first: dict[str, Barrier] = {}
        after: dict[str, set[str]] = {}
        for branch in step.branches:
            if isinstance(branch, Barrier):
                raise DescriptorError("barrier", f"<barrier name={branch.name!r}> is directly a branch of "
                                      "<parallel>; put it in a branch's <sequence>", branch.line)
            names: list[str] = []
            for barrier in barriers_of(branch):
                if barrier.name in names:
                    raise DescriptorError("barrier", f"<barrier name={barrier.name!r}> appears twice in one branch; "
                                          "the branch would wait for itself", barrier.line)
                if names:
                    after.setdefault(names[-1], set()).add(barrier.name)
                names.append(barrier.name)
                holders[barrier.name] = holders.get(barrier.name, 0) + 1
                first.setdefault(barrier.name, barrier)
        for name, count in holders.items():
            if count < 2:
                raise DescriptorError("barrier", f"<barrier name={name!r}> is in only one branch of its <parallel>; "
                                      "a barrier synchronises two or more branches", first[name].line)
        loop = _find_loop(after)
        if loop:
            raise DescriptorError("barrier", "barriers are reached in opposite orders by different branches, which "
                                  "would deadlock: " + " -> ".join(loop), first[loop[0]].line)


def _find_loop(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _check_value(name: str, value: str, line: int | None = None) -> None:
    if "\x00" in value:
        raise DescriptorError("parameter", f"parameter {name!r}: the value has a NUL character", line)
    if len(value.encode("utf-8", "surrogatepass")) > MAX_PARAMETER_VALUE_BYTES:
        raise DescriptorError("parameter", f"parameter {name!r}: the value is over {MAX_PARAMETER_VALUE_BYTES} "
                              "bytes", line)


def resolve_parameters(descriptor: Descriptor, given: Mapping[str, str]) -> dict[str, str]:
    """Every parameter's value for one deployment: ``given`` over the defaults.

    DescriptorError ``parameter`` when ``given`` names an undeclared parameter, misses a required one,
    or holds a value with NUL or over :data:`MAX_PARAMETER_VALUE_BYTES`.
    """
    declared = {parameter.name: parameter for parameter in descriptor.parameters}
    for name in given:
        if name not in declared:
            raise DescriptorError("parameter", f"{name!r} is not a parameter of {descriptor.application.name}")
    values: dict[str, str] = {}
    for name, parameter in declared.items():
        if name in given:
            value = given[name]
            if not isinstance(value, str):
                raise DescriptorError("parameter", f"parameter {name!r}: the value must be text")
            _check_value(name, value)
            values[name] = value
        elif parameter.required:
            raise DescriptorError("parameter", f"parameter {name!r} is required and was not given")
        else:
            values[name] = parameter.default
    return values


try:
    schema()                  # at import: see schema()
except (OSError, LookupError, ValueError, etree.LxmlError):
    pass                      # not cached: the first parse compiles it again and reports the problem
