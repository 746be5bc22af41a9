"""Management components: the deployment engine's units of work, behind a small plugin interface.

A :class:`ManagementComponent` has a ``name`` and ``run(context, component) -> Deferred``: it does
one thing for one descriptor component in one sliver and fires (None) or fails with a
:class:`~dsmt.server.refusal.Refusal` whose code says precisely what went wrong.  It does not touch
lifecycle states: it declares what its success means — ``reaches`` (a
:class:`~dsmt.server.deployment.lifecycle.Milestone`) or ``outcome`` (``running``, ``terminated``) —
and the engine moves the state, records it and publishes.  Components must be **idempotent**: after
a crash the engine runs the steps again (see ``store``'s recovery rule).

A :class:`Registry` holds them by name.  Third parties add theirs with :meth:`Registry.add` or as
entry points of group :data:`ENTRY_POINT_GROUP` (each loading a class or instance);
a plugin's name is also a descriptor action (``<do action="notify-irc" component="…"/>``).
The descriptor's built-in actions map onto components as :data:`ACTIONS` says.

Built-ins and their refusal codes:

* ``download`` — the package (http, https, file) through the Fetcher into ``<home>/.deploy/
  packages/``, checksum verified, resumable: the fetcher's codes (``checksum``, ``unreachable``,
  ``timeout``, ``http-status``, ``too-large``, ``bad-url``, ``io``);
* ``unpack`` — into the package's ``dest`` (in a thread): unpack's codes (``link-escape``,
  ``parent-reference``, ``corrupt``, …) and ``path-escape``.  A tree already unpacked from the same
  digest is kept; another one is replaced;
* ``configure`` — every ``<config>`` rendered with the deployment's parameters and written
  atomically (temporary file, fsync, rename) with its mode: ``path-escape`` when a symbolic link
  would take the file out of the sliver, ``io``;
* ``install`` — the install command, run once in the sliver with output to ``logs/<component>.log``:
  ``install-failed`` (non-zero exit, killed), ``install-timeout`` (over :data:`INSTALL_TIMEOUT_SECONDS`),
  ``launch``;
* ``start`` — the start command under supervision, then its health check's startup wait:
  ``launch``, ``path-escape``, ``unhealthy`` (the process is stopped again);
* ``health`` — the health check, steady rule: ``unhealthy``;
* ``stop`` — the supervised process stopped (signal, grace, KILL);
* ``uninstall`` — stop, then the component's unpacked tree, config files, markers and package
  removed: ``path-escape``, ``io``.
"""
from __future__ import annotations

import abc
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable

from twisted.internet import defer, threads

from dsmt.server.atomicfile import write_atomic
from dsmt.server.deployment.descriptor import BUILTIN_ACTIONS, Component, substitute
from dsmt.server.deployment.health import HealthChecker, HealthError
from dsmt.server.deployment.lifecycle import RUNNING, TERMINATED, Milestone
from dsmt.server.deployment.supervisor import ProcessError, inside_home, prepare, run_once
from dsmt.server.deployment.unpack import unpack
from dsmt.server.refusal import Refusal

__all__ = [
    "ManagementComponent", "Context", "Registry", "ACTIONS", "PREPARATION", "ENTRY_POINT_GROUP", "STATE_DIR",
    "INSTALL_TIMEOUT_SECONDS", "Download", "Unpack", "Configure", "Install", "Start", "Health", "Stop",
    "Uninstall", "builtin_components",
]

#: Entry-point group of third-party management components.
ENTRY_POINT_GROUP = "dsmt.deployment.components"
#: The engine's own directory in the sliver home: packages and unpack markers.
STATE_DIR = ".deploy"
#: Longest an install command may run: compiling or fetching dependencies takes minutes on a loaded
#: node; ten minutes is generous and still frees the engine from a hung installer.
INSTALL_TIMEOUT_SECONDS = 600.0

#: Descriptor action → the management components it runs, in order.
ACTIONS: dict[str, tuple[str, ...]] = {
    "install": ("download", "unpack", "install"),
    "configure": ("configure",),
    "start": ("start",),
    "check": ("health",),
    "stop": ("stop",),
    "uninstall": ("uninstall",),
}
#: What makes a component ready to run: run before ``start`` for every milestone not yet reached.
PREPARATION: tuple[tuple[Milestone, str], ...] = (
    (Milestone.FETCHED, "download"), (Milestone.UNPACKED, "unpack"), (Milestone.CONFIGURED, "configure"),
    (Milestone.INSTALLED, "install"),
)


@dataclass
class Context:
    """What a management component may use: the sliver (``slice_name``, ``host``, ``home``), the
    deployment's parameter ``values``, the ``reactor`` (I/O and real-time timeouts), the ``clock``
    (restart backoff, stop grace), the ``fetcher``, the ``supervisor``, ``record(component, **fields)``
    (store the supervised pid) and ``waits`` (the pending startup health waits by component, which
    the engine cancels when the process dies)."""

    slice_name: str
    host: str
    home: str
    values: dict
    reactor: object
    clock: object
    fetcher: object
    supervisor: object
    record: Callable[..., None]
    waits: dict = field(default_factory=dict)

    @property
    def state_dir(self) -> str:
        return os.path.join(self.home, STATE_DIR)

    def launch(self, component: str, command):
        return prepare(self.home, self.slice_name, component, command, self.values)

    def run_command(self, component: str, command, timeout: float):
        """Run ``command`` once for ``component``; a Deferred of its ExitStatus."""
        try:
            launch = self.launch(component, command)
        except ProcessError:
            return defer.fail()
        return run_once(self.reactor, self.reactor, launch, timeout)

    def health(self, component: Component) -> HealthChecker:
        return HealthChecker(self.reactor, component.health, self.values,
                             run_command=lambda command, timeout: self.run_command(component.name, command, timeout))


class ManagementComponent(abc.ABC):
    """One unit of deployment work (module docstring)."""

    #: The component's name: a registry key and, for plugins, a descriptor action.
    name: str = ""
    #: The milestone its success reaches, if any.
    reaches: Milestone | None = None
    #: The lifecycle state its success ends in (``running``, ``terminated``), if any.
    outcome: str | None = None

    @abc.abstractmethod
    def run(self, context: Context, component: Component):
        """Do the work; a Deferred firing None, or failing with a Refusal."""


def _io(what: str, exc: OSError) -> Refusal:
    return Refusal("io", f"{what}: {exc.strerror or exc}")


def _remove_tree(context: Context, path: str) -> None:
    """Remove ``path`` (inside the home) by renaming it into the state directory first (atomic: a
    crash leaves it whole or gone), then deleting the renamed tree."""
    os.makedirs(context.state_dir, exist_ok=True)
    trash = tempfile.mkdtemp(prefix="trash-", dir=context.state_dir)
    os.rename(path, os.path.join(trash, "tree"))
    shutil.rmtree(trash, ignore_errors=True)


def _package_file(component: Component) -> str:
    return f"{component.name}-{component.package.sha256[:16].lower()}.{component.package.format}"


class Download(ManagementComponent):
    name = "download"
    reaches = Milestone.FETCHED

    def run(self, context, component):
        if component.package is None:
            return defer.succeed(None)
        directory = os.path.join(context.state_dir, "packages")
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            return defer.fail(_io("cannot create the package directory", exc))
        d = context.fetcher.fetch(component.package.url, directory, _package_file(component), component.package.sha256)
        return d.addCallback(lambda _: None)


class Unpack(ManagementComponent):
    name = "unpack"
    reaches = Milestone.UNPACKED

    def run(self, context, component):
        if component.package is None:
            return defer.succeed(None)
        return defer.maybeDeferred(self._prepare, context, component)

    def _prepare(self, context, component):
        package = component.package
        dest = inside_home(context.home, package.dest, f"package dest of {component.name!r}")
        markers = os.path.join(context.state_dir, "unpacked")
        marker = os.path.join(markers, component.name)
        try:
            os.makedirs(markers, mode=0o700, exist_ok=True)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(marker, encoding="ascii") as stream:
                done = stream.read().strip() == package.sha256.lower()
        except FileNotFoundError:
            done = False
        except OSError as exc:
            raise _io(f"cannot prepare {package.dest!r}", exc) from None
        if done and os.path.isdir(dest):
            return None
        archive = os.path.join(context.state_dir, "packages", _package_file(component))

        def work():
            if os.path.lexists(dest):
                _remove_tree(context, dest)
            unpack(archive, dest, format=package.format)
            write_atomic(marker, package.sha256.lower().encode("ascii"), 0o600)
        pool = context.reactor.getThreadPool()
        return threads.deferToThreadPool(context.reactor, pool, work)


class Configure(ManagementComponent):
    name = "configure"
    reaches = Milestone.CONFIGURED

    def run(self, context, component):
        return defer.maybeDeferred(self._write, context, component)

    def _write(self, context, component):
        for config in component.configs:
            try:
                text = substitute(config.template, context.values)
            except (KeyError, ValueError) as exc:
                raise Refusal("template", f"config {config.path!r} of {component.name!r}: {exc}") from None
            parent = os.path.dirname(config.path)
            inside_home(context.home, parent or None, f"config directory of {config.path!r}")
            path = inside_home(context.home, config.path, f"config {config.path!r}")
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_atomic(path, text.encode("utf-8"), config.mode)
            except OSError as exc:
                raise _io(f"cannot write config {config.path!r}", exc) from None


class Install(ManagementComponent):
    name = "install"
    reaches = Milestone.INSTALLED

    def __init__(self, timeout: float = INSTALL_TIMEOUT_SECONDS):
        self.timeout = timeout

    def run(self, context, component):
        if component.install is None:
            return defer.succeed(None)
        return defer.ensureDeferred(self._run(context, component))

    async def _run(self, context, component):
        program = component.install.argv[0]
        try:
            status = await context.run_command(component.name, component.install, self.timeout)
        except ProcessError as exc:
            if exc.code == "timeout":
                raise Refusal("install-timeout", f"install command {program!r} of {component.name!r} ran over "
                              f"{self.timeout:g} s and was killed; see logs/{component.name}.log") from None
            raise
        if not status.ok:
            raise Refusal("install-failed", f"install command {program!r} of {component.name!r} {status}; see "
                          f"logs/{component.name}.log")


class Start(ManagementComponent):
    name = "start"
    outcome = RUNNING

    def run(self, context, component):
        return defer.ensureDeferred(self._run(context, component))

    async def _run(self, context, component):
        supervisor = context.supervisor
        launch = context.launch(component.name, component.start)
        stop_launch = None
        if component.stop is not None and component.stop.command is not None:
            stop_launch = context.launch(component.name, component.stop.command)
        pid = await supervisor.start(launch, component.restart, component.stop, stop_launch=stop_launch)
        context.record(component.name, pid=pid, pid_started=supervisor.started(component.name))
        if component.health is None:
            return
        wait = context.waits[component.name] = context.health(component).wait_healthy(startup=True)
        try:
            await wait
        except defer.CancelledError:
            raise Refusal("crashed", f"the process of {component.name!r} ended before it was healthy; see "
                          f"logs/{component.name}.log") from None
        except HealthError:
            await supervisor.stop(component.name)
            context.record(component.name, pid=None, pid_started=None)
            raise
        finally:
            if context.waits.get(component.name) is wait:
                del context.waits[component.name]


class Health(ManagementComponent):
    name = "health"

    def run(self, context, component):
        if component.health is None:
            return defer.succeed(None)
        return context.health(component).wait_healthy(startup=False)


class Stop(ManagementComponent):
    name = "stop"
    outcome = TERMINATED

    def run(self, context, component):
        d = context.supervisor.stop(component.name)
        return d.addCallback(lambda _: context.record(component.name, pid=None, pid_started=None))


class Uninstall(ManagementComponent):
    name = "uninstall"
    outcome = TERMINATED

    def run(self, context, component):
        d = Stop().run(context, component)
        return d.addCallback(lambda _: self._remove(context, component))

    def _remove(self, context, component):
        paths = [config.path for config in component.configs]
        if component.package is not None:
            paths.append(component.package.dest)
        for relative in paths:
            path = inside_home(context.home, relative, f"{relative!r} of {component.name!r}")
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    _remove_tree(context, path)
                elif os.path.lexists(path):
                    os.unlink(path)
            except OSError as exc:
                raise _io(f"cannot remove {relative!r}", exc) from None
        if component.package is not None:
            for leftover in (os.path.join(context.state_dir, "unpacked", component.name),
                             os.path.join(context.state_dir, "packages", _package_file(component))):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise _io(f"cannot remove {leftover}", exc) from None


def builtin_components() -> list[ManagementComponent]:
    return [Download(), Unpack(), Configure(), Install(), Start(), Health(), Stop(), Uninstall()]


class Registry:
    """Management components by name (module docstring)."""

    def __init__(self, components=None, *, entry_points: bool = False):
        self._components: dict[str, ManagementComponent] = {}
        for component in builtin_components() if components is None else components:
            self.add(component)
        if entry_points:
            self.load_entry_points()

    def add(self, component: ManagementComponent) -> None:
        """Register ``component``; Refusal ``duplicate`` if its name is taken, ``invalid`` if it is not a
        ManagementComponent with a name usable as an action."""
        import re
        if not isinstance(component, ManagementComponent):
            raise Refusal("invalid", f"{component!r} is not a ManagementComponent")
        if not isinstance(component.name, str) or not re.fullmatch(r"[a-z][a-z0-9\-]{0,31}", component.name):
            raise Refusal("invalid", f"management component name {component.name!r} is not an action word "
                          "(a-z, 0-9, -; at most 32)")
        builtin = {name for names in ACTIONS.values() for name in names}
        if component.name in self._components or (component.name in BUILTIN_ACTIONS and component.name not in builtin):
            raise Refusal("duplicate", f"a management component or action named {component.name!r} exists")
        self._components[component.name] = component

    def load_entry_points(self) -> list[str]:
        """Add the components of group :data:`ENTRY_POINT_GROUP`; the names added."""
        from importlib.metadata import entry_points
        added = []
        for point in entry_points(group=ENTRY_POINT_GROUP):
            loaded = point.load()
            self.add(loaded() if isinstance(loaded, type) else loaded)
            added.append(point.name)
        return added

    def get(self, name: str) -> ManagementComponent:
        try:
            return self._components[name]
        except KeyError:
            raise Refusal("unknown-component", f"no management component named {name!r}") from None

    def names(self) -> list[str]:
        return list(self._components)

    def actions(self) -> frozenset[str]:
        """The descriptor actions this registry can run: the built-in ones and every plugin's name."""
        builtin = {name for names in ACTIONS.values() for name in names}
        return BUILTIN_ACTIONS | {name for name in self._components if name not in builtin}

    def plan(self, action: str) -> tuple[ManagementComponent, ...]:
        """The components an action runs."""
        if action in ACTIONS:
            return tuple(self.get(name) for name in ACTIONS[action])
        return (self.get(action),)
