"""Hosting dsmt's SOAP daemons: one service (or many) over HTTP and PsEPR, signed, with manageability.

Every SOAP daemon (agent, node manager, slice manager) serves spyne service
classes the same way; this module is that way, so a daemon is its service
classes plus a few lines:

* :class:`HostingOptions` — the twistd options they share (subclass it and
  add the daemon's own):

  ===================== ==================================================================
  ``--http STRPORT``    where the HTTP site listens (``tcp:8090:interface=127.0.0.1``,
                        ``ssl:…`` for TLS); default none: no HTTP
  ``--public-url URL``  the service's URL as clients must use it, written in the served
                        WSDL (behind a proxy or TLS terminator); default: the URL each
                        ``?wsdl`` request was sent to
  ``--router URLS``     PsEPR router address(es), comma-separated; default none: no PsEPR
  ``--psepr-service``   the PsEPR account the daemon logs in with (default: the SOAP
                        service's PsEPR name, e.g. ``agent``)
  ``--password-file``   the account's password (first line; default ``$PSEPR_PASSWORD``)
  ``--instance``        the PsEPR instance the daemon answers as (default: the host name)
  ``--ca FILE``         trust anchor for callers' certificates (repeatable)
  ``--cert``/``--key``  the service's own certificate and key: replies are signed with them
  ``--allow-unsigned``  accept unsigned requests (they reach methods with no caller)
  ``--soap12``          speak SOAP 1.2 instead of 1.1 (HTTP and PsEPR alike)
  ``--manage-http``     strports endpoint of the manageability port (``/manage``, ``/manage12``)
  ``--manage-psepr``    manageability on PsEPR too, on the daemon's own connection
  ===================== ==================================================================

  Signing policy: **unsigned requests are refused by default**, so a daemon
  needs ``--ca`` to check signatures, or ``--allow-unsigned`` to run without
  (a usage error says so).  With ``--ca``, every request that carries a
  WS-Security header is verified (a bad signature is never ignored), and
  with ``--cert``/``--key`` every reply is signed.  Without ``--ca`` nothing
  is verified and nothing signed (``--allow-unsigned`` is then required; a
  signed request gets the core's ``MustUnderstand`` fault).  At least one of
  ``--http`` and ``--router`` is required; ``--manage-psepr`` needs ``--router``.

* :class:`ServiceHost` — one process's hosting: **one** :class:`SoapSite` on
  the ``--http`` endpoint(s), and any number of :class:`HostedService`
  children added with :meth:`ServiceHost.add`, each mounted under its own
  resource path.  A node-manager farm is one host with one ``add`` per node
  manager: each its own cores (so its own WS-Security replay cache: a
  multicast request legitimately reaches every instance once), its own path
  (``nodemanager/<node>``), its own :class:`PsEPRConnection` (its PsEPR
  instance) and its own manageability resource.
* :class:`HostedService` — one service instance: a :class:`SoapCore` for HTTP
  and one for PsEPR built from the same spyne classes and the same
  WS-Security policy (the filter, when configured), the
  :class:`~dsmt.transports.http.SoapResource` under ``/<path>``, a
  :class:`~dsmt.transports.psepr_soap.PsEPRSoapEndpoint` on its connection
  (channel ``/org/dsmt/ns/soap/<psepr_service>/``, instance = the
  connection's), and its manageability ports.  It connects the connection
  when started (retrying, as daemons do) and closes it when stopped.
* :func:`host_service` — the one-service daemon in one call, from options or
  explicit arguments.

Callers: a method reads the verified caller as ``ctx.udc.caller`` (the
core's :class:`~dsmt.transports.soap.core.CallContext`: a
``wssec.VerifiedCaller`` with ``subject`` and ``certificate``, or None for an
unsigned request the policy let through); :func:`caller_subject` reads it.
``HostedService.signing`` tells whether a policy checks signatures at all.

Port numbers: :meth:`ServiceHost.when_listening` fires with the port numbers
of the ``--http`` endpoints once they all listen (``tcp:0`` in tests), or
fails naming the endpoint that could not; ``ServiceHost.ports`` holds the
listening ports.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.resource import Resource

from dsmt.server.manage.wsdm import ManageableResource
from dsmt.transports.psepr.accounts import read_password
from dsmt.transports.soap import HTTP_TRANSPORT, PSEPR_TRANSPORT
from dsmt.transports.soap.core import SOAP11, SOAP12, SoapCore, SoapLimits, SoapVersion

__all__ = ["HostingOptions", "ServiceHost", "HostedService", "host_service", "caller_subject", "read_password",
           "event_publisher",
           "stop_daemon_failed", "CANNOT_SERVE_STATUS",
           "resource_path"]

log = Logger(namespace="dsmt.hosting")


#: Exit status of a daemon that stopped because it could not serve (a port it cannot bind): not 0, so
#: supervisors (systemd, the testbed) see the failure.
CANNOT_SERVE_STATUS = 1


def stop_daemon_failed(reactor, status: int = CANNOT_SERVE_STATUS) -> None:
    """Stop the reactor (once it runs: at start-up it does not yet) and exit with ``status`` after the
    reactor's shutdown triggers ran (twistd itself would exit 0)."""
    reactor.addSystemEventTrigger("after", "shutdown", os._exit, status)
    reactor.callWhenRunning(reactor.stop)


def event_publisher(connection, logger: Logger, who: str | None = None):
    """The ``publish(event)`` of a daemon that reports over PsEPR: sent on ``connection``, or only logged
    when the daemon has none (no ``--router``).  A send that fails (``SendQueueFull`` while the router is
    away) is logged, never raised: status events are re-sent at an interval, so the next one catches up.
    ``who`` prefixes the log lines (a farm's node name)."""
    prefix = f"{who}: " if who else ""

    def publish(event) -> None:
        payload = event.payload
        if connection is None:
            logger.info("{prefix}{channel} {field}={value}", prefix=prefix, channel=event.channel,
                        field=getattr(payload, "field", "?"), value=getattr(payload, "value", ""))
            return
        try:
            connection.send(event)
        except Exception as exc:
            logger.warn("{prefix}event not sent ({error}): {value}", prefix=prefix, error=exc,
                        value=getattr(payload, "value", ""))
    return publish


def caller_subject(ctx) -> str | None:
    """The certificate subject (RFC 4514) of the request's verified signer, or None (unsigned)."""
    caller = getattr(ctx.udc, "caller", None)
    return None if caller is None else caller.subject


def resource_path(path: str) -> list[bytes]:
    """``"nodemanager/n1"`` → ``[b"nodemanager", b"n1"]``; ValueError for an empty path or segment, ``.``/``..``,
    or characters outside URL-safe ASCII."""
    segments = path.strip("/").split("/") if isinstance(path, str) else []
    for segment in segments:
        if not segment or segment in (".", "..") or not all(ch.isascii() and (ch.isalnum() or ch in "-._~:@")
                                                            for ch in segment):
            raise ValueError(f"{path!r} is not a usable resource path (segments of letters, digits, '-._~:@')")
    return [segment.encode("ascii") for segment in segments]


class HostedService(service.MultiService):
    """One service instance hosted by a :class:`ServiceHost` (see the module docstring).

    Attributes: ``service_name`` (the WSDL name), ``path``, ``http_core`` (None without an HTTP site), ``psepr_core`` and
    ``endpoint`` (None without a connection), ``connection``, ``policy``, ``resource`` (the manageability
    resource, or None), ``http_resource`` (the mounted ``SoapResource``).
    """

    def __init__(self, host: "ServiceHost", services: Sequence[type], tns: str, name: str, *, path: str,
                 psepr_service: str | None = None, public_url: str | None = None, policy=None, connection=None,
                 resource: ManageableResource | None = None, manage_http: str | None = None,
                 manage_psepr: bool = False):
        super().__init__()
        from dsmt.transports.psepr_soap import PsEPRSoapEndpoint, service_channel
        self.setName(path)
        self.service_name = name
        self.path = path
        self.policy = policy
        self.connection = connection
        self.resource = resource
        filters = [policy] if policy is not None else []
        self.psepr_service = psepr_service or name
        service_channel(self.psepr_service)  # ValueError for an unusable name, before anything is built
        if (manage_http or manage_psepr) and resource is None:
            raise ValueError("a manageability port needs the service's ManageableResource")
        if manage_psepr and connection is None:
            raise ValueError("manageability over PsEPR needs a PsEPR connection")
        self.http_core = self.http_resource = None
        if host.http:
            self.http_core = SoapCore(services, tns, name, soap_version=host.soap_version,
                                      transport_uri=HTTP_TRANSPORT, limits=host.limits, filters=filters)
            from dsmt.transports.http import SoapResource
            self.http_resource = SoapResource(self.http_core, public_url=public_url)
        self.psepr_core = self.endpoint = None
        if connection is not None:
            self.psepr_core = SoapCore(services, tns, name, soap_version=host.soap_version,
                                       transport_uri=PSEPR_TRANSPORT, limits=host.limits, filters=filters)
            self.endpoint = PsEPRSoapEndpoint(connection, self.psepr_core, self.psepr_service)
            self.endpoint.setServiceParent(self)
        if manage_http:
            from dsmt.server.manage.daemons import http_service
            http_service(resource, manage_http).setServiceParent(self)
        if manage_psepr:
            from dsmt.server.manage.daemons import psepr_service as manage_endpoint
            manage_endpoint(resource, connection).setServiceParent(self)

    @property
    def signing(self) -> bool:
        """Whether requests' signatures are checked (a WS-Security policy is configured)."""
        return self.policy is not None

    def startService(self):
        super().startService()  # the endpoints lease first; the leases are requested once connected
        if self.connection is not None:
            self.connection.connect(retry=True).addErrback(self._not_connected)

    def _not_connected(self, failure) -> None:
        from dsmt.transports.psepr.client import ConnectionClosed
        if not failure.check(ConnectionClosed):  # closed: we are stopping
            log.error("{service} cannot connect to PsEPR: {error}", service=self.psepr_service,
                      error=failure.getErrorMessage())

    def stopService(self):
        stopped = super().stopService()
        if self.connection is not None:
            self.connection.close()
        return stopped


class ServiceHost(service.MultiService):
    """One SOAP site (on ``http``: a strports endpoint string or several; none: PsEPR only) and the
    :class:`HostedService` instances mounted on it.  ``soap_version`` and ``limits`` apply to every core.
    """

    def __init__(self, *, http: str | Iterable[str] | None = None, soap_version: SoapVersion = SOAP11,
                 limits: SoapLimits = SoapLimits(), reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.http = [http] if isinstance(http, str) else list(http or ())
        self.soap_version = soap_version
        self.limits = limits
        self.root = Resource()
        self.site = None                      # PsEPR only (an engine in a sliver): twisted.web is not loaded
        if self.http:
            from dsmt.transports.http import SoapSite
            self.site = SoapSite(self.root, max_request_bytes=limits.max_envelope_bytes)
            self.site.noisy = False
        self.ports: list = []
        self.hosted: list[HostedService] = []
        self._listening: defer.Deferred | None = None
        self._waiting: list[defer.Deferred] = []
        self._outcome = None

    def add(self, services: Sequence[type], tns: str, name: str, *, path: str, **options) -> HostedService:
        """Host one service instance under ``/<path>`` (and on PsEPR when ``connection`` is given); the
        keyword options are :class:`HostedService`'s.  Call before the host starts."""
        segments = resource_path(path)
        hosted = HostedService(self, services, tns, name, path="/".join(s.decode() for s in segments), **options)
        if hosted.http_resource is not None:
            parent = self.root
            for segment in segments[:-1]:
                child = parent.children.get(segment)
                if child is None:
                    child = Resource()
                    parent.putChild(segment, child)
                parent = child
            if segments[-1] in parent.children:
                raise ValueError(f"a service is already mounted at /{path}")
            parent.putChild(segments[-1], hosted.http_resource)
        hosted.setServiceParent(self)
        self.hosted.append(hosted)
        return hosted

    # ------------------------------------------------------------ listening

    def when_listening(self) -> defer.Deferred:
        """Fires with the port numbers of the HTTP endpoints once all listen (``[]`` without HTTP), or fails
        with the first endpoint's error."""
        waiter = defer.Deferred()
        if self._outcome is not None:
            self._fire(waiter, self._outcome)
        else:
            self._waiting.append(waiter)
        return waiter

    @staticmethod
    def _fire(waiter: defer.Deferred, outcome) -> None:
        ok, value = outcome
        if ok:
            waiter.callback(list(value))
        else:
            waiter.errback(value)

    def _settle(self, outcome) -> None:
        self._outcome = outcome
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            self._fire(waiter, outcome)

    def startService(self):
        super().startService()
        self._outcome = None
        listens = [self._listen(endpoint) for endpoint in self.http]
        self._listening = defer.DeferredList(listens, consumeErrors=True).addCallback(self._listened)

    def _listen(self, description: str) -> defer.Deferred:
        try:
            listening = serverFromString(self.reactor, description).listen(self.site)
        except Exception as exc:  # a malformed description raises before any Deferred exists
            listening = defer.fail(exc)

        def failed(failure):
            raise RuntimeError(f"cannot listen on {description}: {failure.getErrorMessage()}")
        return listening.addErrback(failed)

    def _listened(self, results) -> None:
        self.ports = [value for ok, value in results if ok]  # those that listen are stopped with the host
        failures = [value for ok, value in results if not ok]
        if failures:
            error = failures[0].value
            log.error("{error}", error=str(error))
            self._settle((False, error))
        else:
            self._settle((True, [port.getHost().port for port in self.ports]))

    @defer.inlineCallbacks
    def stopService(self):
        if self._listening is not None:
            yield self._listening
        ports, self.ports = self.ports, []
        yield defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports])
        yield super().stopService()


# ------------------------------------------------------------------ options


class HostingOptions(usage.Options):
    """The options every SOAP daemon shares (see the module docstring); subclasses add their own with
    their own ``optParameters``/``optFlags`` (twistd collects them along the class hierarchy) and call
    ``super().postOptions()``.  ``psepr_name``: the SOAP service's PsEPR name, the default account.

    After parsing: ``self["soap-version"]``, ``self["signing-key"]``/``self["signing-cert"]`` (loaded, or
    None), ``self["trust"]`` (a ``TrustStore`` or None), and :meth:`new_policy` / :meth:`new_connection`,
    which build a fresh policy (own replay cache) and connection per hosted instance.
    """

    psepr_name = "service"

    optParameters = [
        ["http", None, None, "strports endpoint the SOAP site listens on (tcp:8090:interface=127.0.0.1); "
                             "default: none"],
        ["public-url", None, None, "the service's URL as clients use it, written in the served WSDL; "
                                   "default: the URL each ?wsdl request was sent to"],
        ["router", "r", None, "PsEPR router address(es), comma-separated (psepr://host:port, nats://host:port); "
                              "default: none (no PsEPR)"],
        ["psepr-service", None, None, "PsEPR account the daemon logs in with; default: the service's PsEPR name"],
        ["password-file", "p", None, "file holding the PsEPR account's password (first line); "
                                     "default: $PSEPR_PASSWORD"],
        ["instance", "i", os.uname().nodename, "PsEPR instance the service answers as"],
        ["cert", None, None, "the service's certificate (PEM): replies are signed with it"],
        ["key", None, None, "the service's private key (PEM)"],
        ["manage-http", None, None, "strports endpoint of the manageability port (WSDM over SOAP/HTTP: "
                                    "/manage SOAP 1.1, /manage12 SOAP 1.2); default: none"],
    ]
    optFlags = [
        ["allow-unsigned", None, "accept unsigned requests (default: refuse them)"],
        ["soap12", None, "speak SOAP 1.2 instead of SOAP 1.1"],
        ["manage-psepr", None, "serve manageability over PsEPR too (/org/dsmt/ns/soap/manageability/, "
                               "on the service's own connection)"],
    ]

    def __init__(self):
        super().__init__()
        self["ca"] = []

    def opt_ca(self, path):
        """trust anchor (CA certificate, PEM) for callers' certificates (repeatable)"""
        self["ca"].append(path)

    def postOptions(self):
        from dsmt.transports.soap.pki import PkiError, TrustStore, load_certificate, load_private_key
        if (self["cert"] is None) != (self["key"] is None):
            raise usage.UsageError("give both --cert and --key (the service's certificate and its key), or neither")
        if not self["ca"] and not self["allow-unsigned"]:
            raise usage.UsageError("unsigned requests are refused by default, so --ca is needed to check "
                                   "callers' signatures; give --ca FILE, or --allow-unsigned")
        if not self["http"] and not self["router"]:
            raise usage.UsageError("nothing to serve on: give --http STRPORT and/or --router URLS")
        if self["manage-psepr"] and not self["router"]:
            raise usage.UsageError("--manage-psepr needs --router")
        self["soap-version"] = SOAP12 if self["soap12"] else SOAP11
        try:
            self["signing-key"] = load_private_key(self["key"]) if self["key"] else None
            self["signing-cert"] = load_certificate(self["cert"]) if self["cert"] else None
            self["trust"] = TrustStore.from_files(*self["ca"]) if self["ca"] else None
            self["password"] = read_password(self["password-file"]) if self["router"] else None
            if self["router"]:
                self.new_connection()  # refuse a bad router address now, not when starting
        except (PkiError, ValueError, OSError) as exc:
            raise usage.UsageError(str(exc))

    def new_policy(self, **options):
        """A fresh ``WsSecurityPolicy`` (its own replay cache) from the options, or None without ``--ca``."""
        if self["trust"] is None:
            return None
        from dsmt.transports.soap.wssec import WsSecurityPolicy
        return WsSecurityPolicy(self["trust"], self["signing-key"], self["signing-cert"],
                                require_signed=not self["allow-unsigned"], **options)

    def new_connection(self, instance: str | None = None):
        """A fresh ``PsEPRConnection`` to ``--router`` as ``--psepr-service`` (default :attr:`psepr_name`),
        instance ``instance`` (default ``--instance``), or None without ``--router``."""
        if not self["router"]:
            return None
        from dsmt.transports.psepr.client import PsEPRConnection
        return PsEPRConnection.from_urls(self["router"], service=self["psepr-service"] or self.psepr_name,
                                         instance=instance or self["instance"], password=self["password"])


def host_service(services: Sequence[type], tns: str, name: str, *, path: str,
                 resource: ManageableResource | None = None, options: HostingOptions | None = None,
                 psepr_service: str | None = None, **explicit) -> ServiceHost:
    """One service in one :class:`ServiceHost`, configured by parsed ``options`` and/or ``explicit``
    keyword arguments, which win: ``http``, ``soap_version``, ``limits``, ``reactor`` (the host's) and
    ``public_url``, ``policy``, ``connection``, ``manage_http``, ``manage_psepr`` (the service's).
    The hosted service is ``host.hosted[0]``."""
    settings: dict = {}
    if options is not None:
        settings = dict(http=options["http"], soap_version=options["soap-version"], public_url=options["public-url"],
                        policy=options.new_policy(), connection=options.new_connection(),
                        manage_http=options["manage-http"], manage_psepr=options["manage-psepr"])
    settings.update(explicit)
    host = ServiceHost(**{key: settings.pop(key) for key in ("http", "soap_version", "limits", "reactor")
                          if key in settings})
    host.add(services, tns, name, path=path, psepr_service=psepr_service, resource=resource, **settings)
    return host
