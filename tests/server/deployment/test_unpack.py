"""Unpacking: good tar and zip archives, and hostile ones built here, none of which may write outside dest."""
from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile

import pytest

from dsmt.server.deployment import unpack as unpack_module
from dsmt.server.deployment.unpack import UnpackError, detect_format, unpack
from dsmt.server.refusal import Refusal


def tar_entry(name: str, data: bytes = b"", *, kind=tarfile.REGTYPE, mode=0o644, linkname: str = "", size=None):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, linkname
    info.size = len(data) if size is None else size
    return info, data


def make_tar(path: str, entries, compression: str = "", fmt=tarfile.PAX_FORMAT) -> str:
    with tarfile.open(path, "w:" + compression, format=fmt) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def make_zip(path: str, entries) -> str:
    """``entries``: (name, data, unix mode or None)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as package:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            package.writestr(info, data)
    return path


def snapshot(root: str) -> set[str]:
    return {os.path.join(base, name) for base, dirs, files in os.walk(root) for name in dirs + files}


def refused(archive: str, code: str, *fragments: str, dest: str = "out", **options) -> UnpackError:
    before = snapshot(".")
    with pytest.raises(UnpackError) as caught:
        unpack(archive, dest, **options)
    assert caught.value.code == code, str(caught.value)
    for fragment in fragments:
        assert fragment in caught.value.reason, caught.value.reason
    assert snapshot(".") == before, "a refused archive left files behind"
    return caught.value


GOOD = [
    tar_entry("./", kind=tarfile.DIRTYPE, mode=0o755),
    tar_entry("./bin/", kind=tarfile.DIRTYPE, mode=0o555),
    tar_entry("./bin/run", b"#!/bin/sh\necho hi\n", mode=0o4755),
    tar_entry("./lib/libx.so.1", b"ELF", mode=0o666),
    tar_entry("./lib/libx.so", kind=tarfile.SYMTYPE, linkname="libx.so.1"),
    tar_entry("./share/doc/README", b"read me"),
    tar_entry("./share/doc/LINK", kind=tarfile.SYMTYPE, linkname="../../lib/libx.so"),
    tar_entry("./share/copy", kind=tarfile.LNKTYPE, linkname="./share/doc/README"),
]


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_good_tar(compression):
    archive = make_tar("pkg.tar", GOOD, compression)
    assert detect_format(archive) == "tar"
    result = unpack(archive, "out")
    assert (result.files, result.symlinks, result.directories) == (4, 2, 1)
    assert result.bytes == len(b"#!/bin/sh\necho hi\n") + 3 + 2 * len(b"read me")
    assert open("out/bin/run", "rb").read().startswith(b"#!/bin/sh")
    assert stat.S_IMODE(os.stat("out/bin/run").st_mode) == 0o755        # setuid stripped
    assert stat.S_IMODE(os.stat("out/lib/libx.so.1").st_mode) == 0o644  # group/other write stripped
    assert stat.S_IMODE(os.stat("out/bin").st_mode) == 0o755
    assert os.readlink("out/lib/libx.so") == "libx.so.1"
    assert open("out/share/doc/LINK", "rb").read() == b"ELF"
    assert not os.path.islink("out/share/copy") and open("out/share/copy", "rb").read() == b"read me"
    assert os.stat("out/share/copy").st_ino != os.stat("out/share/doc/README").st_ino
    assert not any(name.startswith(".out.unpacking") for name in os.listdir("."))  # no staging left


def test_good_zip_with_symlink():
    archive = make_zip("pkg.zip", [("app/", b"", 0o40755), ("app/main.py", b"print(1)", 0o100755),
                                   ("app/data.txt", b"x" * 1000, None), ("app/latest", b"main.py", 0o120777)])
    assert detect_format(archive) == "zip"
    result = unpack(archive, "out")
    assert (result.files, result.symlinks) == (2, 1)
    assert stat.S_IMODE(os.stat("out/app/main.py").st_mode) == 0o755
    assert stat.S_IMODE(os.stat("out/app/data.txt").st_mode) == 0o644
    assert os.readlink("out/app/latest") == "main.py"


def test_empty_dest_directory_is_replaced_but_a_full_one_refused():
    archive = make_tar("pkg.tar", GOOD)
    os.mkdir("out")
    unpack(archive, "out")
    refused(archive, "dest-exists", "not an empty directory")


def test_refusal_type():
    archive = make_tar("pkg.tar", [tar_entry("/etc/passwd", b"x")])
    with pytest.raises(Refusal):
        unpack(archive, "out")


# -- names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, code, fragment", [
    ("/etc/cron.d/x", "absolute-path", "absolute"),
    ("../escape", "parent-reference", "'..'"),
    ("a/../../escape", "parent-reference", "'..'"),
    ("a\\..\\b", "bad-name", "backslash"),
    ("a\x01b", "bad-name", "control"),
    ("d/" + "x" * 256, "name-too-long", "segment"),
    ("d/" * 2100 + "f", "name-too-long", "4096"),
])
def test_hostile_tar_names(name, code, fragment):
    refused(make_tar("bad.tar", [tar_entry("ok", b"fine"), tar_entry(name, b"x")]), code, fragment)


def test_nul_in_a_name_is_refused():
    # zipfile cuts names at NUL when reading; the check still guards names from other readers
    with pytest.raises(UnpackError) as caught:
        unpack_module._normalise("a\x00/../../x")
    assert caught.value.code == "bad-name"


@pytest.mark.parametrize("name, code", [("/abs", "absolute-path"), ("../up", "parent-reference"),
                                        ("x/../../up", "parent-reference")])
def test_hostile_zip_names(name, code):
    refused(make_zip("bad.zip", [("ok", b"1", None), (name, b"x", None)]), code)


def test_duplicates_and_conflicts():
    refused(make_tar("dup.tar", [tar_entry("a", b"1"), tar_entry("./a", b"2")]), "duplicate", "'a'")
    refused(make_tar("conf.tar", [tar_entry("a", b"1"), tar_entry("a/b", b"2")]), "conflict", "not a directory")


# -- links ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("entries, fragment", [
    ([tar_entry("l", kind=tarfile.SYMTYPE, linkname="/etc/passwd")], "absolute"),
    ([tar_entry("l", kind=tarfile.SYMTYPE, linkname="../outside")], "leaves"),
    ([tar_entry("d/l", kind=tarfile.SYMTYPE, linkname="../../x")], "leaves"),
    ([tar_entry("l", kind=tarfile.SYMTYPE, linkname=".")], "destination itself"),
    ([tar_entry("l", kind=tarfile.SYMTYPE, linkname="")], "empty"),
    # the classic: a link to a directory outside, then a file through it
    ([tar_entry("d", kind=tarfile.SYMTYPE, linkname="sub"), tar_entry("d/evil", b"x")], "through the symlink"),
    # the file first, the link over its directory after
    ([tar_entry("d/evil", b"x"), tar_entry("d", kind=tarfile.SYMTYPE, linkname="sub")], "through the symlink"),
    # lexically inside, really outside: x -> . then y -> x/.. resolves to dest/..
    ([tar_entry("s/x", kind=tarfile.SYMTYPE, linkname="."), tar_entry("s/y", kind=tarfile.SYMTYPE,
                                                                         linkname="x/../../z")],
     "passes through"),
])
def test_symlinks_escaping(entries, fragment):
    refused(make_tar("links.tar", entries), "link-escape", fragment)


def test_symlink_to_symlink_inside_is_allowed():
    unpack(make_tar("ok.tar", [tar_entry("a", b"1"), tar_entry("b", kind=tarfile.SYMTYPE, linkname="a"),
                               tar_entry("d/c", kind=tarfile.SYMTYPE, linkname="../b")]), "out")
    assert open("out/d/c", "rb").read() == b"1"


def test_hardlinks():
    refused(make_tar("h1.tar", [tar_entry("h", kind=tarfile.LNKTYPE, linkname="/etc/shadow")]), "absolute-path")
    refused(make_tar("h2.tar", [tar_entry("h", kind=tarfile.LNKTYPE, linkname="missing")]), "bad-link", "missing")
    refused(make_tar("h3.tar", [tar_entry("s", kind=tarfile.SYMTYPE, linkname="a"), tar_entry("a", b"1"),
                                tar_entry("h", kind=tarfile.LNKTYPE, linkname="s")]), "bad-link")


def test_zip_symlink_escape():
    refused(make_zip("l.zip", [("l", b"../../etc", 0o120777)]), "link-escape", "leaves")
    refused(make_zip("l2.zip", [("l", b"/etc/passwd", 0o120777)]), "link-escape", "absolute")


# -- special files -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, code", [(tarfile.CHRTYPE, "device"), (tarfile.BLKTYPE, "device"),
                                        (tarfile.FIFOTYPE, "fifo"), (b"9", "unsupported-type")])
def test_special_tar_members(kind, code):
    refused(make_tar("s.tar", [tar_entry("ok", b"1"), tar_entry("dev", kind=kind)]), code)


@pytest.mark.parametrize("mode, code", [(0o020644, "device"), (0o060644, "device"), (0o010644, "fifo"),
                                        (0o140644, "unsupported-type")])
def test_special_zip_members(mode, code):
    refused(make_zip("s.zip", [("dev", b"", mode)]), code)


def test_encrypted_zip_member():
    archive = make_zip("e.zip", [("secret", b"x", None)])
    data = bytearray(open(archive, "rb").read())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        index = data.index(signature)
        data[index + flag_offset] |= 1
    open(archive, "wb").write(bytes(data))
    refused(archive, "unsupported-type", "encrypted")


# -- limits and bombs ----------------------------------------------------------------------------

def test_too_many_members(monkeypatch):
    monkeypatch.setattr(unpack_module, "MAX_MEMBERS", 5)
    refused(make_tar("many.tar", [tar_entry(f"f{i}", b"") for i in range(6)]), "too-many-members", "5")
    refused(make_zip("many.zip", [(f"f{i}", b"", None) for i in range(6)]), "too-many-members")


def test_tar_bomb_refused_from_declared_sizes(monkeypatch):
    monkeypatch.setattr(unpack_module, "MAX_TOTAL_BYTES", 100_000)
    entries = [tar_entry(f"f{i}", b"\0" * 60_000) for i in range(3)]
    refused(make_tar("bomb.tar.gz", entries, "gz"), "too-large", "100000")


def test_zip_bomb_refused_from_declared_sizes(monkeypatch):
    monkeypatch.setattr(unpack_module, "MAX_TOTAL_BYTES", 100_000)
    refused(make_zip("bomb.zip", [("z", b"\0" * 200_000, None)]), "too-large")


def test_zip_lying_about_its_size_is_caught_while_writing(monkeypatch):
    archive = make_zip("liar.zip", [("z", b"\0" * 50_000, None)])
    data = bytearray(open(archive, "rb").read())
    index = data.index(b"PK\x01\x02")  # central directory's uncompressed size: offset 24
    data[index + 24:index + 28] = (10).to_bytes(4, "little")
    open(archive, "wb").write(bytes(data))
    with pytest.raises(UnpackError) as caught:
        unpack(archive, "out")
    assert caught.value.code in ("corrupt", "too-large")
    assert not os.path.exists("out")


def test_oversized_pax_header_refused(monkeypatch):
    monkeypatch.setattr(unpack_module, "MAX_HEADER_BYTES", 4096)
    info = tarfile.TarInfo("f")
    info.pax_headers = {"comment": "x" * 10_000}
    with tarfile.open("pax.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b""))
    refused("pax.tar", "too-large", "extended header")


# -- broken input --------------------------------------------------------------------------------

def test_not_an_archive():
    open("junk.bin", "wb").write(b"hello world" * 100)
    refused("junk.bin", "unknown-format", "neither")
    refused("junk.bin", "corrupt", format="zip")


def test_truncated_compressed_tar():
    archive = make_tar("t.tar.gz", [tar_entry("a", os.urandom(100_000))], "gz")
    data = open(archive, "rb").read()
    open(archive, "wb").write(data[: len(data) // 2])
    refused(archive, "corrupt")


def test_corrupt_zip_crc():
    archive = make_zip("c.zip", [("a", b"hello" * 100, None)])
    data = bytearray(open(archive, "rb").read())
    index = data.index(b"PK\x03\x04") + 30 + 1
    data[index + 5] ^= 0xFF
    open(archive, "wb").write(bytes(data))
    refused(archive, "corrupt")


def test_missing_archive():
    refused("nope.tar", "io")
