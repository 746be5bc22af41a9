"""Tests of the accounts file: scrypt hashes, name rules, file parsing, hostile parameters."""
from __future__ import annotations

import base64
import time

import pytest

from dsmt.transports.psepr import accounts
from dsmt.transports.psepr.accounts import (
    LOG2_N, P, R, Accounts, AccountsError, check_name, hash_password, passwd_line, verify_password)


@pytest.fixture(scope="module")
def secret_hash() -> str:
    return hash_password("s3cret pässword")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encoded(log2_n=LOG2_N, r=R, p=P, salt=b"s" * 16, digest=b"d" * 32) -> str:
    return f"scrypt${log2_n}${r}${p}${b64(salt)}${b64(digest)}"


def test_hash_format(secret_hash):
    tag, log2_n, r, p, salt, digest = secret_hash.split("$")
    assert (tag, int(log2_n), int(r), int(p)) == ("scrypt", LOG2_N, R, P)
    assert len(base64.b64decode(salt)) == accounts.SALT_BYTES
    assert len(base64.b64decode(digest)) == accounts.HASH_BYTES
    assert ":" not in secret_hash


def test_round_trip_and_wrong_password(secret_hash):
    assert verify_password("s3cret pässword", secret_hash)
    assert not verify_password("s3cret password", secret_hash)
    assert not verify_password("", secret_hash)


def test_salts_differ():
    assert hash_password("same") != hash_password("same")


def test_empty_password_is_refused():
    with pytest.raises(AccountsError, match="empty"):
        hash_password("")


def test_default_parameters_are_within_the_verification_caps():
    accounts._decode(encoded())  # does not raise


@pytest.mark.parametrize("bad, message", [
    ("", "is not scrypt$"),
    ("bcrypt$14$8$5$AAAA$AAAA", "is not scrypt$"),
    ("scrypt$14$8$5$" + b64(b"s" * 16), "is not scrypt$"),
    ("scrypt$١٤$8$5$" + b64(b"s" * 16) + "$" + b64(b"d" * 32), "is not scrypt$"),  # non-ASCII digits
    ("scrypt$14$8$5$" + b64(b"s" * 16) + "$" + b64(b"d" * 32) + "\n", "is not scrypt$"),
    ("scrypt$14$8$5$A===$" + b64(b"d" * 32), "is not scrypt$"),
    ("scrypt$14$8$5$AAAAA$" + b64(b"d" * 32), "invalid base64"),
    (encoded(log2_n=0), "out of range"),
    (encoded(r=0), "out of range"),
    (encoded(p=0), "out of range"),
    (encoded(salt=b"s" * 4), "salt must be"),
    (encoded(digest=b"d" * 8), "hash 16–64 bytes"),
    (encoded(digest=b"d" * 65), "hash 16–64 bytes"),
])
def test_malformed_encodings_raise(bad, message):
    with pytest.raises(AccountsError) as caught:
        verify_password("x", bad)
    assert message in str(caught.value)


@pytest.mark.parametrize("log2_n, r, p", [
    (99, 8, 1),    # 2**99 blocks
    (20, 8, 1),    # 1 GiB
    (17, 8, 1),    # 128 MiB: over the memory cap
    (10, 999, 1),  # memory through r
    (14, 8, 999),  # minutes of work through p
    (16, 8, 8),    # 64 MiB but 8× the default work... over both caps
])
def test_hostile_parameters_are_refused_before_any_hashing(log2_n, r, p):
    started = time.perf_counter()
    with pytest.raises(AccountsError, match="exceed the limits"):
        verify_password("x", encoded(log2_n, r, p))
    assert time.perf_counter() - started < 0.05


def test_cheaper_parameters_still_verify():
    salt = b"salt" * 4
    digest = accounts._derive("pw", 10, 8, 1, salt, 32)
    assert verify_password("pw", encoded(10, 8, 1, salt, digest))
    assert not verify_password("pW", encoded(10, 8, 1, salt, digest))


@pytest.mark.parametrize("name", ["a", "xyz1_mgr", "org.dsmt.component.sliver-mgr", "A-Z_0.9", "x" * 255])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 256, "a b", "a:b", "a/b", "é", "a\n", "#a", None])
def test_invalid_names(name):
    with pytest.raises(AccountsError, match="invalid account name"):
        check_name(name)


def test_passwd_line_parses_back():
    line = passwd_line("xyz1_mgr", "secret")
    assert line.startswith("xyz1_mgr:scrypt$")
    table = Accounts.parse(line + "\n")
    assert "xyz1_mgr" in table and len(table) == 1
    assert table.check("xyz1_mgr", "secret")
    assert not table.check("xyz1_mgr", "Secret")
    with pytest.raises(AccountsError):
        passwd_line("bad name", "secret")


def test_parse_comments_blank_lines_and_crlf(secret_hash):
    text = f"# accounts of the router\r\n\r\n  \nxyz1_mgr:{secret_hash}\r\n   # indented comment\nother:{secret_hash}"
    table = Accounts.parse(text)
    assert len(table) == 2 and "other" in table and "#" not in table
    assert table.check("other", "s3cret pässword")


@pytest.mark.parametrize("text, message", [
    ("# c\nxyz1_mgr\n", "accounts:2: expected name:hash"),
    ("\n\nbad name:{h}\n", "accounts:3: invalid account name 'bad name'"),
    ("a:{h}\nb:scrypt$14$8$5$x$y\n", "accounts:2: hash has invalid base64"),
    ("a:{h}\nb:{h}\n\na:{h}\n", "accounts:4: duplicate account 'a' (first on line 1)"),
    ("a:scrypt$30$8$1$c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "=\n", "accounts:1: scrypt parameters"),
    (":{h}", "accounts:1: invalid account name ''"),
])
def test_malformed_files_name_the_line(text, message, secret_hash):
    with pytest.raises(AccountsError) as caught:
        Accounts.parse(text.format(h=secret_hash))
    assert message in str(caught.value)


def test_load_from_a_file(tmp_path, secret_hash):
    path = tmp_path / "accounts"
    path.write_text(f"xyz1_mgr:{secret_hash}\n", encoding="utf-8")
    assert Accounts.load(path).check("xyz1_mgr", "s3cret pässword")
    path.write_text("a\nb:nohash\n", encoding="utf-8")
    with pytest.raises(AccountsError, match=f"{path}:1: expected name:hash"):
        Accounts.load(path)
    path.write_bytes(b"caf\xe9:x\n")
    with pytest.raises(AccountsError, match="not UTF-8"):
        Accounts.load(path)
    with pytest.raises(OSError):
        Accounts.load(tmp_path / "missing")


def test_constructor_validates():
    with pytest.raises(AccountsError):
        Accounts({"ok": "not-a-hash"})
    with pytest.raises(AccountsError):
        Accounts({"bad name": encoded()})
    assert len(Accounts({})) == 0


def test_unknown_names_cost_a_hash_too(secret_hash):
    table = Accounts.parse(f"known:{secret_hash}\n")
    timings = {}
    for name in ("known", "unknown", "bad name"):
        started = time.perf_counter()
        assert not table.check(name, "wrong")
        timings[name] = time.perf_counter() - started
    assert timings["unknown"] > timings["known"] / 3
    assert timings["bad name"] > timings["known"] / 3


def test_with_account_is_a_copy_with_one_more(secret_hash):
    original = Accounts({"alice": secret_hash})
    more = original.with_account("internal", "random secret")
    assert "internal" in more and "alice" in more and len(more) == 2
    assert "internal" not in original and len(original) == 1  # the original is unchanged
    assert more.check("internal", "random secret") and not more.check("internal", "wrong")
    with pytest.raises(AccountsError, match="already exists"):
        more.with_account("alice", "x")
    with pytest.raises(AccountsError, match="invalid account name"):
        original.with_account("no spaces", "x")
