"""The small CA: issuing, files, and trust checks with their precise messages."""
from __future__ import annotations

import datetime as dt
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dsmt.transports.soap import pki
from dsmt.transports.soap.pki import CertificateError, PkiArgumentError, PkiError, Purpose, TrustStore

NOW = dt.datetime(2027, 1, 15, 8, 0, tzinfo=dt.timezone.utc)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def ca():
    return pki.make_ca("dsmt test CA", key_type="ec", now=NOW - 30 * DAY)


@pytest.fixture(scope="module")
def trust(ca):
    return TrustStore([ca[1]])


def issue(ca, kind="user", name="alice", **options):
    options.setdefault("key_type", "ec")
    options.setdefault("now", NOW - DAY)
    return pki.make_certificate(ca[0], ca[1], kind, name, **options)


def extension(certificate, kind):
    return certificate.extensions.get_extension_for_class(kind)


# ------------------------------------------------------------------------------------------ issuing

def test_ca_certificate():
    key, cert = pki.make_ca("dsmt test CA", key_type="ec", path_length=1, now=NOW)
    assert cert.subject == cert.issuer and cert.subject.rfc4514_string() == "CN=dsmt test CA"
    constraints = extension(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 1
    usage = extension(cert, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign and not usage.value.digital_signature
    assert cert.not_valid_before_utc == NOW - pki.BACKDATE
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=pki.CA_VALIDITY_DAYS)
    cert.verify_directly_issued_by(cert)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"


def test_rsa_is_3072_bits_by_default():
    key, cert = pki.make_ca("rsa CA", now=NOW)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 3072
    assert cert.signature_hash_algorithm.name == "sha256"


def test_service_certificate(ca):
    key, cert = issue(ca, "service", "nodemanager", dns_names=["Node1.Example", "node1"])
    assert cert.subject.rfc4514_string() == "CN=nodemanager,OU=service"
    assert list(extension(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH,
                                                                   ExtendedKeyUsageOID.CLIENT_AUTH]
    assert extension(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == \
        ["node1.example", "node1"]
    assert not extension(cert, x509.BasicConstraints).value.ca
    assert extension(cert, x509.KeyUsage).value.digital_signature
    assert extension(cert, x509.AuthorityKeyIdentifier).value.key_identifier == \
        extension(ca[1], x509.SubjectKeyIdentifier).value.digest
    cert.verify_directly_issued_by(ca[1])


def test_user_certificate(ca):
    _, cert = issue(ca, "user", "alice")
    assert cert.subject.rfc4514_string() == "CN=alice,OU=user"
    assert list(extension(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        extension(cert, x509.SubjectAlternativeName)


def test_leaf_never_outlives_its_ca(ca):
    _, cert = issue(ca, days=100 * 365)
    assert cert.not_valid_after_utc == ca[1].not_valid_after_utc


@pytest.mark.parametrize("call, message", [
    (lambda ca: issue(ca, "robot", "r2"), "certificate kind must be one of service, user, not 'robot'"),
    (lambda ca: issue(ca, "user", "../etc"), "user name '../etc' may hold only letters, digits"),
    (lambda ca: issue(ca, "user", ""), "user name is empty"),
    (lambda ca: issue(ca, "user", "x" * 65), "is longer than 64 characters"),
    (lambda ca: issue(ca, "user", "alice", dns_names=["a.example"]), "only service certificates carry DNS names"),
    (lambda ca: issue(ca, "service", "s", dns_names=["*.example"]), "'*.example' is not a DNS host name"),
    (lambda ca: issue(ca, "service", "s", dns_names=["-bad.example"]), "is not a DNS host name"),
    (lambda ca: issue(ca, days=0), "validity must be a positive number of days, not 0"),
    (lambda ca: issue(ca, key_type="dsa"), "key type must be one of rsa, ec, not 'dsa'"),
    (lambda ca: pki.make_ca("CA", path_length=2), "CA path length must be 0 or 1, not 2"),
    (lambda ca: pki.make_ca(" "), "CA name must be 1 to 64 characters"),
])
def test_argument_errors(ca, call, message):
    with pytest.raises(PkiArgumentError) as caught:
        call(ca)
    assert message in str(caught.value)


def test_issuing_needs_the_ca_key_and_a_ca(ca):
    other_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(PkiError, match="the CA key does not belong to the CA certificate"):
        pki.make_certificate(other_key, ca[1], "user", "alice")
    _, leaf = issue(ca)
    with pytest.raises(PkiError, match=r"CN=alice,OU=user is not a CA certificate"):
        pki.make_certificate(ca[0], leaf, "user", "bob")
    with pytest.raises(PkiError, match="the CA expired at"):
        issue(ca, now=NOW + 20 * 365 * DAY)


# ------------------------------------------------------------------------------------------- trust

def test_valid_chain(ca, trust):
    _, user = issue(ca)
    _, service = issue(ca, "service", "nm", dns_names=["nm.example"])
    trust.validate(user, Purpose.CLIENT, at=NOW)
    trust.validate(service, Purpose.CLIENT, at=NOW)
    trust.validate(service, Purpose.SERVER, at=NOW, dns_name="NM.example.")
    trust.validate(user, at=NOW.timestamp())  # POSIX seconds work too


def test_wrong_extended_key_usage(ca, trust):
    _, user = issue(ca)
    with pytest.raises(CertificateError) as caught:
        trust.validate(user, Purpose.SERVER, at=NOW)
    assert str(caught.value) == ("certificate CN=alice,OU=user is not valid for serverAuth "
                                 "(its extended key usage: clientAuth)")


def test_wrong_dns_name(ca, trust):
    _, service = issue(ca, "service", "nm", dns_names=["nm.example"])
    with pytest.raises(CertificateError, match=r"^certificate CN=nm,OU=service is not valid for other.example "
                                               r"\(it names nm.example\)$"):
        trust.validate(service, Purpose.SERVER, at=NOW, dns_name="other.example")


def test_expired_and_not_yet_valid(ca, trust):
    _, user = issue(ca, days=10)
    with pytest.raises(CertificateError, match=r"^certificate CN=alice,OU=user expired at 2027-01-24T08:00:00Z$"):
        trust.validate(user, at=NOW + 10 * DAY)
    with pytest.raises(CertificateError, match=r"^certificate CN=alice,OU=user is not valid before "
                                               r"2027-01-14T07:55:00Z$"):
        trust.validate(user, at=NOW - 2 * DAY)


def test_expired_ca():
    ca = pki.make_ca("short CA", key_type="ec", days=5, now=NOW)
    _, user = pki.make_certificate(*ca, "user", "alice", key_type="ec", now=NOW)   # clipped to the CA's end
    ca_key, ca_cert = ca
    # a leaf that outlives its CA can only be made by hand
    late = (x509.CertificateBuilder().subject_name(user.subject).issuer_name(ca_cert.subject)
            .public_key(user.public_key()).serial_number(7).not_valid_before(NOW)
            .not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    with pytest.raises(CertificateError, match=r"^issuing CA CN=short CA expired at 2027-01-20T08:00:00Z$"):
        TrustStore([ca_cert]).validate(late, at=NOW + 10 * DAY)


def test_not_issued_by_a_trusted_ca(ca, trust):
    other = pki.make_ca("dsmt test CA", key_type="ec", now=NOW - DAY)   # same name, different key
    _, user = pki.make_certificate(*other, "user", "mallory", key_type="ec", now=NOW - DAY)
    with pytest.raises(CertificateError) as caught:
        trust.validate(user, at=NOW)
    assert str(caught.value) == ("certificate not issued by a trusted CA (subject CN=mallory,OU=user, "
                                 "issuer CN=dsmt test CA)")


def test_a_ca_certificate_is_not_a_caller(ca, trust):
    with pytest.raises(CertificateError, match=r"^certificate CN=dsmt test CA is a CA certificate, not a service"):
        trust.validate(ca[1], at=NOW)


def test_missing_extended_key_usage(ca, trust):
    key = ec.generate_private_key(ec.SECP256R1())
    bare = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bare")]))
            .issuer_name(ca[1].subject).public_key(key.public_key()).serial_number(9)
            .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()), critical=False)
            .sign(ca[0], hashes.SHA256()))
    with pytest.raises(CertificateError, match=r"^certificate CN=bare has no extended key usage; clientAuth is "
                                               r"required$"):
        trust.validate(bare, at=NOW)


def test_weak_rsa_key(ca, trust):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    _, cert = issue(ca, key=weak)
    with pytest.raises(CertificateError, match=r"^certificate CN=alice,OU=user has a weak 1024-bit RSA key "
                                               r"\(at least 2048\)$"):
        trust.validate(cert, at=NOW)


def test_the_library_verifier_catches_the_rest(ca, trust):
    """What the simple checks do not look at (here: no authorityKeyIdentifier) cryptography's verifier refuses."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")]))
            .issuer_name(ca[1].subject).public_key(key.public_key()).serial_number(11)
            .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca[0], hashes.SHA256()))
    with pytest.raises(CertificateError, match=r"^certificate CN=odd rejected: invalid extension: 2.5.29.35: "
                                               r"Certificate is missing required extension$"):
        trust.validate(cert, at=NOW)


def test_validation_is_cached_but_dates_still_apply(ca, trust, monkeypatch):
    _, user = issue(ca, days=10)
    trust.validate(user, at=NOW)
    monkeypatch.setattr(pki.x509v, "PolicyBuilder", None)  # a second full check would now crash
    trust.validate(user, at=NOW + DAY)
    with pytest.raises(CertificateError, match="expired at"):
        trust.validate(user, at=NOW + 20 * DAY)


def test_pinned_certificates(ca):
    _, alice = issue(ca)
    _, bob = issue(ca, name="bob")
    pinned = pki.PinnedCertificates([alice])
    pinned.validate(alice, Purpose.SERVER, at=NOW)   # pinning is explicit trust: no usage check
    with pytest.raises(CertificateError, match=r"^certificate CN=bob,OU=user is not one of the 1 pinned "
                                               r"certificates$"):
        pinned.validate(bob, at=NOW)
    with pytest.raises(CertificateError, match="expired at"):
        pinned.validate(alice, at=NOW + 400 * DAY)


def test_trust_store_needs_ca_certificates(ca):
    _, leaf = issue(ca)
    with pytest.raises(PkiError, match="is not a CA certificate"):
        TrustStore([leaf])
    with pytest.raises(PkiError, match="needs at least one CA certificate"):
        TrustStore([])


def test_times_must_be_aware(trust, ca):
    with pytest.raises(PkiError, match="timezone-aware"):
        trust.validate(issue(ca)[1], at=dt.datetime(2027, 1, 15))


# ------------------------------------------------------------------------------------------- files

def test_files_modes_and_no_overwrite(tmp_path):
    directory = str(tmp_path / "ca")
    files = pki.create_ca(directory, "file CA", key_type="ec")
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(files.key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(files.certificate).st_mode) == 0o644
    issued = pki.issue_certificate(directory, "service", "pldb", dns_names=["pldb.example"], key_type="ec")
    assert issued == pki.IssuedFiles(os.path.join(directory, "service-pldb.pem"),
                                     os.path.join(directory, "service-pldb.key"))
    assert stat.S_IMODE(os.stat(issued.key).st_mode) == 0o600
    TrustStore.from_files(files.certificate).validate(pki.load_certificate(issued.certificate), Purpose.SERVER,
                                                      dns_name="pldb.example")
    key = pki.load_private_key(issued.key)
    assert key.public_key() == pki.load_certificate(issued.certificate).public_key()
    with pytest.raises(PkiError, match=r"service-pldb.pem already exists; refusing to overwrite it$"):
        pki.issue_certificate(directory, "service", "pldb", key_type="ec")
    with pytest.raises(PkiError, match=r"ca.pem already exists"):
        pki.create_ca(directory, "again", key_type="ec")


def test_file_errors(tmp_path):
    with pytest.raises(PkiError, match=r"holds no CA \(ca.pem missing\); create one with: dsmt-pki ca "):
        pki.issue_certificate(str(tmp_path), "user", "alice")
    with pytest.raises(PkiError, match=r"^certificate file .*/nothing.pem does not exist$"):
        pki.load_certificates(str(tmp_path / "nothing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"hello")
    with pytest.raises(PkiError, match="holds no PEM or DER certificate"):
        pki.load_certificate(str(junk))
    with pytest.raises(PkiError, match="holds no PEM private key"):
        pki.load_private_key(str(junk))
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(PkiError, match="is encrypted; dsmt keys are unencrypted PKCS#8"):
        pki.load_private_key(str(encrypted))


def test_bundle_of_cas(tmp_path, ca):
    other = pki.make_ca("second CA", key_type="ec", now=NOW - DAY)
    bundle = tmp_path / "cas.pem"
    bundle.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ca[1], other[1])))
    store = TrustStore.from_files(str(bundle))
    store.validate(pki.make_certificate(*other, "user", "u", key_type="ec", now=NOW - DAY)[1], at=NOW)
    with pytest.raises(PkiError, match="holds 2 certificates; expected one"):
        pki.load_certificate(str(bundle))


def test_describe(ca):
    _, cert = issue(ca, "service", "nm", dns_names=["nm.example"])
    text = pki.describe_certificate(cert)
    assert "subject:     CN=nm,OU=service" in text
    assert "kind:        end entity" in text
    assert "ext. usage:  serverAuth, clientAuth" in text
    assert "DNS names:   nm.example" in text
    assert f"SHA-256:     {pki.fingerprint(cert)}" in text
    assert "kind:        CA (path length 0)" in pki.describe_certificate(ca[1])
