"""OpenSSH public keys and the slice key pair: real keys accepted, hostile lines refused precisely."""
from __future__ import annotations

import base64
import shutil
import struct
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from dsmt.server.nodemanager.sshkeys import (
    MAX_COMMENT_CHARS, MAX_KEY_LINE_CHARS, MAX_PRIVATE_KEY_BYTES, SshKeyError, SshPublicKey,
    generate_slice_keypair, parse_private_key, parse_public_key,
)

RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw
X962 = serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint


def ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def ssh_mpint(value: int) -> bytes:
    raw = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return ssh_string(raw)


def openssh_line(private_key, comment: str = "") -> str:
    line = private_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}" if comment else line


def line_of(key_type: str, blob: bytes, comment: str = "") -> str:
    return f"{key_type} {base64.b64encode(blob).decode()}" + (f" {comment}" if comment else "")


def sk_ed25519_line(comment="alice@yubikey") -> str:
    point = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(*RAW)
    blob = ssh_string(b"sk-ssh-ed25519@openssh.com") + ssh_string(point) + ssh_string(b"ssh:")
    return line_of("sk-ssh-ed25519@openssh.com", blob, comment)


def sk_ecdsa_line(comment="bob@token") -> str:
    point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*X962)
    blob = (ssh_string(b"sk-ecdsa-sha2-nistp256@openssh.com") + ssh_string(b"nistp256") + ssh_string(point)
            + ssh_string(b"ssh:"))
    return line_of("sk-ecdsa-sha2-nistp256@openssh.com", blob, comment)


@pytest.fixture(scope="module")
def rsa2048():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def valid_lines(rsa2048):
    return {
        "ssh-ed25519": openssh_line(ed25519.Ed25519PrivateKey.generate(), "alice@laptop"),
        "ecdsa-sha2-nistp256": openssh_line(ec.generate_private_key(ec.SECP256R1()), "p256"),
        "ecdsa-sha2-nistp384": openssh_line(ec.generate_private_key(ec.SECP384R1()), "p384"),
        "ecdsa-sha2-nistp521": openssh_line(ec.generate_private_key(ec.SECP521R1()), "p521 with spaces"),
        "ssh-rsa": openssh_line(rsa2048, "rsa"),
        "sk-ssh-ed25519@openssh.com": sk_ed25519_line(),
        "sk-ecdsa-sha2-nistp256@openssh.com": sk_ecdsa_line(),
    }


ED = openssh_line(ed25519.Ed25519PrivateKey.generate())
ED_TYPE, ED_B64 = ED.split()
ED_BLOB = base64.b64decode(ED_B64)


# -- accepted ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key_type", ["ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                                      "ecdsa-sha2-nistp521", "ssh-rsa", "sk-ssh-ed25519@openssh.com",
                                      "sk-ecdsa-sha2-nistp256@openssh.com"])
def test_every_allowed_type_parses(valid_lines, key_type):
    line = valid_lines[key_type]
    key = parse_public_key(line)
    assert key.key_type == key_type
    assert key.line == line
    assert key.fingerprint.startswith("SHA256:") and not key.fingerprint.endswith("=")
    assert len(key.fingerprint) == len("SHA256:") + 43


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_fingerprints_match_ssh_keygen(valid_lines, tmp_path):
    for key_type, line in valid_lines.items():
        path = tmp_path / "key.pub"
        path.write_text(line + "\n")
        out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(path)], capture_output=True,
                             text=True, check=True).stdout
        assert out.split()[1] == parse_public_key(line).fingerprint, key_type


def test_bytes_trailing_newline_tabs_and_crlf_are_canonicalised():
    expected = parse_public_key(f"{ED} me@host")
    assert parse_public_key(f"{ED} me@host\n".encode()) == expected
    assert parse_public_key(f"{ED} me@host\r\n") == expected
    assert parse_public_key(f"  {ED_TYPE}\t{ED_B64}\t me@host  \n") == expected
    assert expected.line == f"{ED} me@host"
    assert expected.comment == "me@host"


def test_no_comment_and_identity_ignores_comment():
    bare = parse_public_key(ED)
    assert bare.comment == "" and bare.line == ED
    assert bare.identity == parse_public_key(ED + " other").identity
    assert bare != parse_public_key(ED + " other")


def test_unicode_comment_accepted():
    assert parse_public_key(f"{ED} José@Zürich").comment == "José@Zürich"


def test_rsa_at_the_bound_is_accepted(rsa2048):
    assert parse_public_key(openssh_line(rsa2048)).key_type == "ssh-rsa"


# -- refused, each with its reason ------------------------------------------------------------------------

def refused(line) -> str:
    with pytest.raises(SshKeyError) as info:
        parse_public_key(line)
    assert info.value.code == "invalid-key"
    return info.value.reason


def dsa_line() -> str:
    numbers = dsa.generate_private_key(key_size=1024).public_key().public_numbers()
    params = numbers.parameter_numbers
    blob = ssh_string(b"ssh-dss") + b"".join(ssh_mpint(v) for v in (params.p, params.q, params.g, numbers.y))
    return line_of("ssh-dss", blob, "old")


@pytest.mark.parametrize("line, reason", [
    ("", "key line is empty"),
    (" \t\n", "key line is empty"),
    (f'command="/bin/sh" {ED}', "starts with authorized_keys options ('command=\"/bin/sh\"')"),
    (f'from="10.0.0.1",no-pty {ED}', "starts with authorized_keys options"),
    (f"no-pty {ED}", "starts with authorized_keys options ('no-pty')"),
    (f"restrict {ED}", "starts with authorized_keys options ('restrict')"),
    (f'environment="LD_PRELOAD=/tmp/x.so" {ED}', "starts with authorized_keys options"),
    (f"{ED} a\n{ED} b", "line break at position"),
    (f"{ED} a\r{ED}", "line break at position"),
    (f"{ED}\n\n", "line break at position"),
    (f"{ED} a\0b", "NUL character at position"),
    (f"{ED}\0", "NUL character at position"),
    (f"{ED} \x1b[31mred", "control character U+001B"),
    (f"{ED} x\u2028y", "line break at position"),
    (f"{ED} a\u200eb", "non-printable character U+200E"),
    (f"{ED} tab\tinside", "non-printable character U+0009"),
    (f"{ED} " + "c" * (MAX_COMMENT_CHARS + 1), f"comment is {MAX_COMMENT_CHARS + 1} characters"),
    ("ssh-ed25519", "has a type (ssh-ed25519) but no key data"),
    ("ssh-foo AAAA", "unknown key type 'ssh-foo'"),
    ("ssh-ed25519-cert-v01@openssh.com AAAA", "certificates ('ssh-ed25519-cert-v01@openssh.com') are not accepted"),
    ("ssh-ed25519 AAAA*AAA", "not valid base64"),
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ", "not valid base64"),
    ("ssh-ed25519 AAAA====", "not valid base64"),
    (line_of("ssh-rsa", ED_BLOB), "key data is a 'ssh-ed25519' key but the line declares 'ssh-rsa'"),
    (line_of("ssh-ed25519", ED_BLOB[:-5]), "key data of this ssh-ed25519 key is malformed"),
    (line_of("ssh-ed25519", ED_BLOB + b"\0\0\0\0"), "key data of this ssh-ed25519 key is malformed"),
    (line_of("ssh-ed25519", ED_BLOB[:2]), "key data is truncated: 2 bytes"),
    (line_of("ssh-ed25519", b"\0\0\1\0ssh"), "its type string claims 256 bytes but only 3 follow"),
    (line_of("ecdsa-sha2-nistp256", ssh_string(b"ecdsa-sha2-nistp256") + ssh_string(b"nistp256")
             + ssh_string(b"\4" + b"\1" * 64)), "key data of this ecdsa-sha2-nistp256 key is malformed"),
])
def test_hostile_lines_refused_precisely(line, reason):
    assert reason in refused(line)


def test_two_keys_on_two_lines_refused():
    other = openssh_line(ed25519.Ed25519PrivateKey.generate())
    assert "line break at position" in refused(f"{ED}\n{other}\n")


def test_huge_line_refused_before_decoding():
    assert f"at most {MAX_KEY_LINE_CHARS}" in refused(ED + " " + "x" * MAX_KEY_LINE_CHARS)
    assert f"is {MAX_KEY_LINE_CHARS + 1} bytes" in refused(b"A" * (MAX_KEY_LINE_CHARS + 1))


def test_non_utf8_and_non_text_refused():
    assert "not UTF-8 text (invalid byte at offset" in refused(ED.encode() + b" \xff\xfe")
    assert "must be text, not int" in refused(42)


def test_dsa_refused_as_weak():
    assert "DSA keys (ssh-dss) are refused" in refused(dsa_line())


def test_rsa_1024_refused():
    weak = openssh_line(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    assert refused(weak) == "RSA key has 1024 bits; at least 2048 are required"


def test_options_prefix_without_a_known_option_name_is_still_caught():
    assert "authorized_keys options" in refused(f"tunnel=\"0\" {ED}")
    assert "authorized_keys options" in refused(f"some-future-option {ED}")


# -- slice key pair -----------------------------------------------------------------------------------------

def test_generate_slice_keypair():
    pair = generate_slice_keypair("oceanstore")
    assert pair.private_openssh.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    public = parse_public_key(pair.public_line)
    assert public.key_type == "ssh-ed25519" and public.comment == "dsmt-slice-key:oceanstore"
    private = serialization.load_ssh_private_key(pair.private_openssh, password=None)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    assert parse_public_key(openssh_line(private)).identity == public.identity
    assert "PRIVATE" not in repr(pair)
    assert generate_slice_keypair("oceanstore").public_line != pair.public_line


def test_parse_private_key_accepts_matching_pair():
    pair = generate_slice_keypair("s1")
    back = parse_private_key(pair.private_openssh, pair.public_line)
    assert back.public_line == pair.public_line
    assert serialization.load_ssh_private_key(back.private_openssh, None).public_key().public_bytes(*RAW) == \
        serialization.load_ssh_private_key(pair.private_openssh, None).public_key().public_bytes(*RAW)
    assert parse_private_key(pair.private_openssh, parse_public_key(pair.public_line)).public_line == pair.public_line


def encrypted_openssh_key() -> bytes:
    """An OpenSSH private key whose header says aes256-ctr + bcrypt (the body is never decrypted)."""
    public = ssh_string(b"ssh-ed25519") + ssh_string(b"\1" * 32)
    body = (b"openssh-key-v1\0" + ssh_string(b"aes256-ctr") + ssh_string(b"bcrypt")
            + ssh_string(ssh_string(b"\0" * 16) + struct.pack(">I", 16)) + struct.pack(">I", 1)
            + ssh_string(public) + ssh_string(b"\0" * 144))
    text = base64.encodebytes(body).replace(b"\n", b"")
    lines = [text[i:i + 70] for i in range(0, len(text), 70)]
    return b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + b"\n".join(lines) + b"\n-----END OPENSSH PRIVATE KEY-----\n"


def private_refused(data, public) -> str:
    with pytest.raises(SshKeyError) as info:
        parse_private_key(data, public)
    assert info.value.code == "invalid-key"
    return info.value.reason


def test_parse_private_key_refusals(rsa2048):
    pair, other = generate_slice_keypair("s1"), generate_slice_keypair("s2")
    assert "does not match the slice public key" in private_refused(pair.private_openssh, other.public_line)
    assert private_refused(b"", pair.public_line) == "slice private key is empty"
    assert f"at most {MAX_PRIVATE_KEY_BYTES}" in private_refused(
        pair.private_openssh + b"\n" * MAX_PRIVATE_KEY_BYTES, pair.public_line)
    pkcs8 = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    assert "not in OpenSSH format" in private_refused(pkcs8, pair.public_line)
    assert "protected by a passphrase" in private_refused(encrypted_openssh_key(), pair.public_line)
    garbage = b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
    assert "slice private key is malformed" in private_refused(garbage, pair.public_line)
    rsa_private = rsa2048.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption())
    assert private_refused(rsa_private, pair.public_line) == "slice private key must be ed25519, not RSA"
    assert "must be ssh-ed25519, not ssh-rsa" in private_refused(rsa_private, openssh_line(rsa2048))
    assert "must be bytes, not str" in private_refused(pair.private_openssh.decode(), pair.public_line)
    assert "options" in private_refused(pair.private_openssh, "no-pty " + pair.public_line)


def test_public_key_is_a_value():
    key = parse_public_key(ED)
    assert isinstance(key, SshPublicKey)
    with pytest.raises(AttributeError):
        key.comment = "changed"
