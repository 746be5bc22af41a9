"""X.509 for dsmt's SOAP services: a small CA, service and user certificates, trust checks.

Two layers, like the rest of dsmt:

* **Pure** (objects in, objects out, no files): :func:`new_private_key`,
  :func:`make_ca`, :func:`make_certificate`, :class:`TrustStore`,
  :class:`PinnedCertificates`, :func:`describe_certificate`.
* **Files**: :func:`create_ca`, :func:`issue_certificate`, :func:`load_certificates`,
  :func:`load_private_key`, used by the ``dsmt-pki`` command
  (``dsmt.client.dsmt_pki``) and by services loading their key.

What gets issued (one CA directory holds everything; nothing is overwritten)::

    DIR/ca.pem  DIR/ca.key                      CN=<name>; CA, path length 0 (or 1), keyCertSign+cRLSign
    DIR/service-NAME.pem  DIR/service-NAME.key  CN=NAME,OU=service; EKU serverAuth+clientAuth; SAN DNS names
    DIR/user-NAME.pem     DIR/user-NAME.key     CN=NAME,OU=user;    EKU clientAuth

The ``OU`` keeps a user and a service of the same name apart in the subject a
service authorises on (``VerifiedCaller.subject`` in ``wssec.py``).  Keys are
RSA 3072 by default or EC P-256, written as unencrypted PKCS#8 PEM with mode
0600 (services start unattended; protect the file, not the key).

Trust contract: :meth:`TrustStore.validate` returns only for an end-entity
certificate that a trusted CA signed directly, whose key is RSA ≥ 2048 bits
or EC on P-256/384/521, that is valid at the time given (leaf and CA), whose
extended key usage allows the purpose (``clientAuth`` for callers,
``serverAuth`` for services answering) and, when asked, names the DNS name,
and that passes ``cryptography.x509.verification`` (RFC 5280 / CA/B Forum
profile: signature algorithms, CA constraints, AKI…).  Otherwise it raises
:class:`CertificateError` whose message names the first problem found, in the
order a person fixing it needs: wrong CA, then key, dates, usage.  Chains are
leaf → trust anchor: a WS-Security BinarySecurityToken carries one
certificate, so intermediates are not looked for.

Errors: :class:`PkiArgumentError` for a bad name, DNS name, key type,
validity or path length (the CLI's usage errors); :class:`PkiError` for
everything else that cannot be done (files, a CA that does not match).
"""
from __future__ import annotations

import datetime as dt
import enum
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification as x509v
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "KEY_TYPES", "DEFAULT_KEY_TYPE", "RSA_KEY_BITS", "MIN_RSA_KEY_BITS", "CA_VALIDITY_DAYS", "LEAF_VALIDITY_DAYS",
    "BACKDATE", "KINDS", "PkiError", "PkiArgumentError", "CertificateError", "Purpose", "TrustStore",
    "PinnedCertificates",
    "new_private_key", "make_ca", "make_certificate", "create_ca", "issue_certificate", "load_certificates",
    "load_certificate", "load_private_key", "describe_certificate", "fingerprint", "subject_text",
    "check_name", "check_dns_name", "CA_CERT_FILE", "CA_KEY_FILE", "IssuedFiles",
]

#: Key types the tools create.
KEY_TYPES = ("rsa", "ec")
DEFAULT_KEY_TYPE = "rsa"
#: RSA modulus for new keys: 3072 bits is NIST's 128-bit security level
#: (SP 800-57), good past 2030; RSA-2048 is only 112-bit.
RSA_KEY_BITS = 3072
#: Smallest RSA key accepted from anyone: cryptography's verifier floor and
#: the last size NIST still allows.
MIN_RSA_KEY_BITS = 2048
#: A CA lives ten years: a site CA is rotated by hand, rarely.
CA_VALIDITY_DAYS = 3650
#: Service and user certificates live one year: renewal stays a routine an
#: operator remembers, and a leaked key stops working within a year.
LEAF_VALIDITY_DAYS = 365
#: New certificates are valid from this long before issue, so a peer whose
#: clock lags a little does not reject a certificate issued a moment ago.
BACKDATE = dt.timedelta(minutes=5)
#: Certificate kinds: the subject's OU and the extended key usages.
KINDS = ("service", "user")
#: Longest service or user name: X.520's upper bound for a common name.
MAX_NAME_CHARS = 64
#: Validations remembered per trust store (certificate, purpose, DNS name).
#: A chain check costs ~0.1 ms, over half the per-message budget; a service
#: sees far fewer distinct callers than this between restarts.
VALIDATION_CACHE_SIZE = 1024

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*\Z")
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


class PkiError(Exception):
    """A PKI operation cannot be done; the message says what to fix."""


class PkiArgumentError(PkiError):
    """An argument is not acceptable: a name, DNS name, key type, validity or path length."""


class CertificateError(PkiError):
    """A presented certificate is not acceptable; the message names the first problem found."""


class Purpose(enum.Enum):
    """What a certificate is being accepted for: the extended key usage required."""

    CLIENT = "clientAuth"   # a caller signing a request
    SERVER = "serverAuth"   # a service signing a reply

    @property
    def oid(self) -> x509.ObjectIdentifier:
        return ExtendedKeyUsageOID.CLIENT_AUTH if self is Purpose.CLIENT else ExtendedKeyUsageOID.SERVER_AUTH


# --------------------------------------------------------------------------------------------- names

def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it can be a service or user name (and a file name), else raise PkiError."""
    if not isinstance(name, str) or not name:
        raise PkiArgumentError(f"{what} is empty")
    if len(name) > MAX_NAME_CHARS:
        raise PkiArgumentError(f"{what} {name!r} is longer than {MAX_NAME_CHARS} characters")
    if not _NAME.match(name):
        raise PkiArgumentError(f"{what} {name!r} may hold only letters, digits and . _ @ - "
                               "(and not start with a symbol)")
    return name


def check_dns_name(name: str) -> str:
    """Return ``name`` lower-cased if it is a plain DNS host name (no wildcard), else raise PkiError."""
    host = name.lower().rstrip(".") if isinstance(name, str) else ""
    if not host or len(host) > 253 or not all(_DNS_LABEL.match(label) for label in host.split(".")):
        raise PkiArgumentError(f"{name!r} is not a DNS host name "
                               "(letters, digits, '-', dot-separated labels; no wildcards)")
    return host


def subject_text(certificate: x509.Certificate) -> str:
    """The subject as an RFC 4514 string, e.g. ``CN=alice,OU=user``."""
    return certificate.subject.rfc4514_string()


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 fingerprint, colon-separated upper-case hex (as ``openssl x509 -fingerprint`` prints)."""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


# ---------------------------------------------------------------------------------------- issuing

def new_private_key(key_type: str = DEFAULT_KEY_TYPE):
    """A fresh private key: ``"rsa"`` (3072 bits) or ``"ec"`` (P-256)."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise PkiArgumentError(f"key type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")


def _signing_hash(key) -> hashes.HashAlgorithm:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 384:
        return hashes.SHA512()
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _utc(at) -> dt.datetime:
    if at is None:
        return dt.datetime.now(dt.timezone.utc)
    if isinstance(at, (int, float)):
        return dt.datetime.fromtimestamp(at, dt.timezone.utc)
    if isinstance(at, dt.datetime):
        if at.tzinfo is None:
            raise PkiError("times must be timezone-aware datetimes or POSIX seconds")
        return at.astimezone(dt.timezone.utc)
    raise PkiError(f"a time must be a datetime or POSIX seconds, not {type(at).__name__}")


def _key_usage(*, signature: bool, key_encipherment: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=signature, content_commitment=False, key_encipherment=key_encipherment,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def make_ca(name: str, *, key=None, key_type: str = DEFAULT_KEY_TYPE, path_length: int = 0,
            days: int = CA_VALIDITY_DAYS, now=None):
    """Create a CA: returns ``(private_key, self_signed_certificate)``.

    ``path_length`` 0 means the CA signs end-entity certificates only (what
    ``dsmt-pki`` does); 1 allows one level of sub-CA below it.
    """
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
        raise PkiArgumentError(f"CA name must be 1 to {MAX_NAME_CHARS} characters")
    if path_length not in (0, 1):
        raise PkiArgumentError(f"CA path length must be 0 or 1, not {path_length!r}")
    if not isinstance(days, int) or days < 1:
        raise PkiArgumentError(f"validity must be a positive number of days, not {days!r}")
    key = key if key is not None else new_private_key(key_type)
    start = _utc(now) - BACKDATE
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + BACKDATE + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(signature=False, cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _signing_hash(key))
    )
    return key, certificate


def make_certificate(ca_key, ca_certificate: x509.Certificate, kind: str, name: str, *,
                     dns_names: Sequence[str] = (), key=None, key_type: str = DEFAULT_KEY_TYPE,
                     days: int = LEAF_VALIDITY_DAYS, now=None):
    """Issue a service or user certificate signed by the CA: returns ``(private_key, certificate)``.

    ``kind`` ``"service"``: EKU serverAuth + clientAuth (a service answers and
    also calls other services), SAN with ``dns_names`` if any.  ``"user"``:
    EKU clientAuth only; ``dns_names`` must be empty.  The validity never
    extends past the CA's.
    """
    if kind not in KINDS:
        raise PkiArgumentError(f"certificate kind must be one of {', '.join(KINDS)}, not {kind!r}")
    check_name(name, f"{kind} name")
    hosts = [check_dns_name(host) for host in dns_names]
    if hosts and kind != "service":
        raise PkiArgumentError("only service certificates carry DNS names")
    if not isinstance(days, int) or days < 1:
        raise PkiArgumentError(f"validity must be a positive number of days, not {days!r}")
    _check_is_ca(ca_certificate)
    if ca_key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != ca_certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo):
        raise PkiError("the CA key does not belong to the CA certificate")
    key = key if key is not None else new_private_key(key_type)
    start = _utc(now) - BACKDATE
    end = min(start + BACKDATE + dt.timedelta(days=days), ca_certificate.not_valid_after_utc)
    if end <= start:
        raise PkiError(f"the CA expired at {_when(ca_certificate.not_valid_after_utc)}; create a new CA")
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if kind == "service" \
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
                                 x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_certificate.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # keyEncipherment only for RSA service keys: TLS RSA key transport, should a service reuse its cert for TLS.
        .add_extension(_key_usage(signature=True,
                                  key_encipherment=kind == "service" and isinstance(key, rsa.RSAPrivateKey)),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_certificate.public_key()), critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
    return key, builder.sign(ca_key, _signing_hash(ca_key))


def _check_is_ca(certificate: x509.Certificate) -> None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise PkiError(f"{subject_text(certificate)} is not a CA certificate (no basicConstraints CA:TRUE)")


# ------------------------------------------------------------------------------------------ files

@dataclass(frozen=True)
class IssuedFiles:
    """Where a certificate and its private key were written."""

    certificate: str
    key: str


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet, created with ``mode`` (never briefly wider)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise PkiError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise PkiError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it further; make it exact
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        raise PkiError(f"cannot write {path}: {exc.strerror}") from None


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_pair(directory: str, stem: str, key, certificate: x509.Certificate) -> IssuedFiles:
    cert_path, key_path = os.path.join(directory, stem + ".pem"), os.path.join(directory, stem + ".key")
    for path in (cert_path, key_path):
        if os.path.lexists(path):
            raise PkiError(f"{path} already exists; refusing to overwrite it")
    _write_new(key_path, _key_pem(key), 0o600)
    _write_new(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return IssuedFiles(cert_path, key_path)


def create_ca(directory: str, name: str, *, key_type: str = DEFAULT_KEY_TYPE, path_length: int = 0,
              days: int = CA_VALIDITY_DAYS, now=None) -> IssuedFiles:
    """Create ``directory`` (mode 0700) if needed and write ``ca.pem`` and ``ca.key`` into it."""
    key, certificate = make_ca(name, key_type=key_type, path_length=path_length, days=days, now=now)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create directory {directory}: {exc.strerror}") from None
    return _write_pair(directory, "ca", key, certificate)


def issue_certificate(directory: str, kind: str, name: str, *, dns_names: Sequence[str] = (),
                      key_type: str = DEFAULT_KEY_TYPE, days: int = LEAF_VALIDITY_DAYS, now=None) -> IssuedFiles:
    """Issue ``kind``-``name``.pem/.key in the CA ``directory`` (which holds ``ca.pem`` and ``ca.key``)."""
    if kind not in KINDS:
        raise PkiArgumentError(f"certificate kind must be one of {', '.join(KINDS)}, not {kind!r}")
    check_name(name, f"{kind} name")
    ca_path = os.path.join(directory, CA_CERT_FILE)
    if not os.path.exists(ca_path):
        raise PkiError(f"{directory} holds no CA ({CA_CERT_FILE} missing); create one with: dsmt-pki ca {directory}")
    ca_certificate = load_certificate(ca_path)
    ca_key = load_private_key(os.path.join(directory, CA_KEY_FILE))
    key, certificate = make_certificate(ca_key, ca_certificate, kind, name, dns_names=dns_names, key_type=key_type,
                                        days=days, now=now)
    return _write_pair(directory, f"{kind}-{name}", key, certificate)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise PkiError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_certificates(path: str) -> list[x509.Certificate]:
    """Every certificate in a PEM file (a bundle may hold several); at least one is required."""
    data = _read(path, "certificate file")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        try:
            certificates = [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise PkiError(f"{path} holds no PEM or DER certificate") from None
    return certificates


def load_certificate(path: str) -> x509.Certificate:
    """The single certificate in ``path`` (PEM or DER)."""
    certificates = load_certificates(path)
    if len(certificates) != 1:
        raise PkiError(f"{path} holds {len(certificates)} certificates; expected one")
    return certificates[0]


def load_private_key(path: str, password: bytes | None = None):
    """An RSA or EC private key from a PEM file."""
    data = _read(path, "private key file")
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError:
        raise PkiError(f"{path} is encrypted; dsmt keys are unencrypted PKCS#8 (protect the file, mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PkiError(f"{path} holds no PEM private key") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise PkiError(f"{path} holds a {type(key).__name__}; only RSA and EC keys are supported")
    return key


# ------------------------------------------------------------------------------------------ trust

def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _extended_key_usage(certificate: x509.Certificate) -> list[str] | None:
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    return [getattr(oid, "_name", None) or oid.dotted_string for oid in usages]


def _dns_names(certificate: x509.Certificate) -> list[str]:
    try:
        return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        return []


def _check_dates(certificate: x509.Certificate, at: dt.datetime, who: str) -> None:
    if at < certificate.not_valid_before_utc:
        raise CertificateError(f"{who} {subject_text(certificate)} is not valid before "
                               f"{_when(certificate.not_valid_before_utc)}")
    if at > certificate.not_valid_after_utc:
        raise CertificateError(f"{who} {subject_text(certificate)} expired at {_when(certificate.not_valid_after_utc)}")


def _check_usage(certificate: x509.Certificate, purpose: Purpose) -> None:
    usages = _extended_key_usage(certificate)
    if usages is None:
        raise CertificateError(f"certificate {subject_text(certificate)} has no extended key usage; "
                               f"{purpose.value} is required")
    if purpose.value not in usages:
        raise CertificateError(f"certificate {subject_text(certificate)} is not valid for {purpose.value} "
                               f"(its extended key usage: {', '.join(usages) or 'none'})")


def _check_dns(certificate: x509.Certificate, dns_name: str | None) -> None:
    if dns_name is None:
        return
    names = _dns_names(certificate)
    if dns_name.lower().rstrip(".") not in [n.lower() for n in names]:
        raise CertificateError(f"certificate {subject_text(certificate)} is not valid for {dns_name} "
                               f"(it names {', '.join(names) or 'no DNS names'})")


def _eku_validator(purpose: Purpose):
    def validate(policy, certificate, usages) -> None:
        if usages is None or purpose.oid not in usages:
            raise ValueError(f"extended key usage {purpose.value} is required")
    return validate


class _Cache:
    """A small LRU of successful validations: key -> (valid_from, valid_until)."""

    def __init__(self, size: int):
        self._size = size
        self._entries: OrderedDict = OrderedDict()

    def hit(self, key, at: dt.datetime) -> bool:
        window = self._entries.get(key)
        if window is None or not window[0] <= at <= window[1]:
            return False
        self._entries.move_to_end(key)
        return True

    def add(self, key, window) -> None:
        self._entries[key] = window
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class TrustStore:
    """Certificates issued directly by one of a set of trusted CAs.

    Built from CA certificates (``TrustStore.from_files("ca.pem")``).
    Uses ``cryptography.x509.verification`` (cryptography ≥ 42; dsmt runs 50)
    with its CA/Browser-Forum profile for the chain, plus an extension policy
    that makes the subjectAltName optional (user certificates have none) and
    requires the purpose's extended key usage: the stock client verifier
    demands a SAN and always clientAuth, and a custom EKU validator *replaces*
    its EKU check.  That verifier checks the keys that sign certificates, not
    the leaf's own key size, so that is checked here.  Simple checks run first
    so the common failures get precise messages.  A full check costs ~0.1 ms:
    successes are cached per (certificate, purpose, DNS name) for the window
    the chain is valid in (the time is still checked against it every call).
    """

    def __init__(self, anchors: Iterable[x509.Certificate]):
        self.anchors = tuple(anchors)
        if not self.anchors:
            raise PkiError("a trust store needs at least one CA certificate")
        for anchor in self.anchors:
            _check_is_ca(anchor)
        self._store = x509v.Store(list(self.anchors))
        self._cache = _Cache(VALIDATION_CACHE_SIZE)

    @classmethod
    def from_files(cls, *paths: str) -> "TrustStore":
        """Every certificate in the given PEM files is a trusted CA."""
        return cls([certificate for path in paths for certificate in load_certificates(path)])

    def validate(self, certificate: x509.Certificate, purpose: Purpose = Purpose.CLIENT, *, at=None,
                 dns_name: str | None = None) -> None:
        """Return if ``certificate`` is acceptable for ``purpose`` at time ``at`` (POSIX seconds or aware
        datetime; default now) and, if given, names ``dns_name``; else raise :class:`CertificateError`."""
        at = _utc(at)
        key = (certificate, purpose, dns_name)   # Certificate hashes and compares by its DER bytes
        if self._cache.hit(key, at):
            return
        try:
            self._validate(certificate, purpose, at, dns_name, key)
        except ValueError as exc:   # cryptography parses fields lazily: a malformed one surfaces here
            raise CertificateError(f"certificate is malformed: {exc}") from None

    def _validate(self, certificate: x509.Certificate, purpose: Purpose, at: dt.datetime, dns_name: str | None,
                  key) -> None:
        issuer = self._issuer_of(certificate)
        _check_leaf(certificate)
        _check_key(certificate)
        _check_dates(certificate, at, "certificate")
        _check_dates(issuer, at, "issuing CA")
        _check_usage(certificate, purpose)
        _check_dns(certificate, dns_name)
        ee_policy = (x509v.ExtensionPolicy.webpki_defaults_ee()
                     .may_be_present(x509.SubjectAlternativeName, x509v.Criticality.AGNOSTIC, None)
                     .require_present(x509.ExtendedKeyUsage, x509v.Criticality.AGNOSTIC, _eku_validator(purpose)))
        verifier = (x509v.PolicyBuilder().store(self._store).time(at).max_chain_depth(1)
                    .extension_policies(ca_policy=x509v.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
                    .build_client_verifier())
        try:
            verifier.verify(certificate, [])
        except x509v.VerificationError as exc:
            detail = re.sub(r"^validation failed: | \(encountered processing .*$", "", str(exc))
            raise CertificateError(f"certificate {subject_text(certificate)} rejected: {detail}") from None
        self._cache.add(key, (max(certificate.not_valid_before_utc, issuer.not_valid_before_utc),
                              min(certificate.not_valid_after_utc, issuer.not_valid_after_utc)))

    def _issuer_of(self, certificate: x509.Certificate) -> x509.Certificate:
        for anchor in self.anchors:
            if anchor.subject != certificate.issuer:
                continue
            try:
                certificate.verify_directly_issued_by(anchor)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return anchor
        raise CertificateError(f"certificate not issued by a trusted CA (subject {subject_text(certificate)}, "
                               f"issuer {certificate.issuer.rfc4514_string()})")


def _check_leaf(certificate: x509.Certificate) -> None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return
    if constraints.ca:
        raise CertificateError(f"certificate {subject_text(certificate)} is a CA certificate, "
                               "not a service or user certificate")


def _check_key(certificate: x509.Certificate) -> None:
    """RSA of at least MIN_RSA_KEY_BITS or EC on a NIST prime curve (cryptography's verifier only
    checks the keys that sign certificates, not the leaf's own)."""
    key = certificate.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_KEY_BITS:
            raise CertificateError(f"certificate {subject_text(certificate)} has a weak {key.key_size}-bit RSA key "
                                   f"(at least {MIN_RSA_KEY_BITS})")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise CertificateError(f"certificate {subject_text(certificate)} has an EC key on {key.curve.name}; "
                                   "P-256, P-384 or P-521 is required")
    else:
        raise CertificateError(f"certificate {subject_text(certificate)} has a {type(key).__name__}; "
                               "RSA or EC is required")


class PinnedCertificates:
    """Trust exactly these certificates (no CA): for a service talking to a few known peers.

    A pinned certificate is accepted for any purpose while it is within its
    validity period; pinning is the operator's explicit statement of trust, so
    the extended key usage is not second-guessed.
    """

    def __init__(self, certificates: Iterable[x509.Certificate]):
        self._pinned = {c.public_bytes(serialization.Encoding.DER): c for c in certificates}
        if not self._pinned:
            raise PkiError("pin at least one certificate")

    @classmethod
    def from_files(cls, *paths: str) -> "PinnedCertificates":
        return cls([certificate for path in paths for certificate in load_certificates(path)])

    def validate(self, certificate: x509.Certificate, purpose: Purpose = Purpose.CLIENT, *, at=None,
                 dns_name: str | None = None) -> None:
        if certificate.public_bytes(serialization.Encoding.DER) not in self._pinned:
            raise CertificateError(f"certificate {subject_text(certificate)} is not one of the "
                                   f"{len(self._pinned)} pinned certificates")
        _check_dates(certificate, _utc(at), "certificate")
        _check_dns(certificate, dns_name)


# ------------------------------------------------------------------------------------------- show

def describe_certificate(certificate: x509.Certificate) -> str:
    """A few lines an operator reads: subject, issuer, validity, key, usages, names, fingerprint."""
    key = certificate.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        key_text = f"RSA {key.key_size} bits"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key_text = f"EC {key.curve.name}"
    else:
        key_text = type(key).__name__
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        kind = f"CA (path length {constraints.path_length})"
    else:
        kind = "end entity"
    usages = _extended_key_usage(certificate)
    lines = [
        f"subject:     {subject_text(certificate)}",
        f"issuer:      {certificate.issuer.rfc4514_string()}",
        f"kind:        {kind}",
        f"serial:      {certificate.serial_number:x}",
        f"not before:  {_when(certificate.not_valid_before_utc)}",
        f"not after:   {_when(certificate.not_valid_after_utc)}",
        f"key:         {key_text}",
        f"signature:   {certificate.signature_algorithm_oid._name}",
        f"ext. usage:  {', '.join(usages) if usages is not None else '(any)'}",
    ]
    names = _dns_names(certificate)
    if names:
        lines.append(f"DNS names:   {', '.join(names)}")
    lines.append(f"SHA-256:     {fingerprint(certificate)}")
    return "\n".join(lines)
