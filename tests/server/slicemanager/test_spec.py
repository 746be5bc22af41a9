"""Slice specs: the dslice HOWTO's examples parse; everything hostile or wrong is a precise SliceSpecError."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsmt.server.slicemanager.spec import (
    MAX_LEASELEN, MAX_NUMNODES, MAX_PREFERRED_NODES, MAX_SPEC_BYTES, SliceSpec, SliceSpecError, check_slice_name, node_sort_key,
    normalize_node_address, parse_slice_spec)

#: The HOWTO's first example, as printed: oceanstore on 64 nodes for two weeks, any nodes.
HOWTO_ANY_NODES = (b'<?xml version="1.0" ?> <slice> <name>oceanstore</name> <numnodes>64</numnodes> '
                   b'<leaselen>1209600</leaselen> </slice>')
#: The HOWTO's second example: 2 nodes out of three preferred addresses.
HOWTO_PREFERRED = (b'<?xml version="1.0" ?> <slice> <name>oceanstore</name> <numnodes>2</numnodes> '
                   b'<leaselen>1209600</leaselen> <ips>141.213.4.201 216.165.109.81 216.165.109.82</ips> </slice>')


def spec(name="xyz1", numnodes="2", leaselen="3600", ips: str | None = None, extra: str = "") -> bytes:
    body = f"<name>{name}</name><numnodes>{numnodes}</numnodes><leaselen>{leaselen}</leaselen>"
    if ips is not None:
        body += f"<ips>{ips}</ips>"
    return f"<slice>{body}{extra}</slice>".encode()


def refused(data: bytes, pattern: str, **options) -> SliceSpecError:
    with pytest.raises(SliceSpecError) as caught:
        parse_slice_spec(data, **options)
    assert re.search(pattern, str(caught.value)), str(caught.value)
    return caught.value


# ------------------------------------------------------------------------------------- happy paths

def test_howto_example_any_nodes():
    assert parse_slice_spec(HOWTO_ANY_NODES) == SliceSpec("oceanstore", 64, 1209600, ())


def test_howto_example_preferred_nodes_keep_their_order():
    assert parse_slice_spec(HOWTO_PREFERRED) == SliceSpec(
        "oceanstore", 2, 1209600, ("141.213.4.201", "216.165.109.81", "216.165.109.82"))


def test_without_declaration_any_order_and_whitespace():
    data = b"<slice>\n  <leaselen> 60 </leaselen>\n  <ips>\n\tnode1.example  2001:DB8::1\n</ips>\n" \
           b"  <numnodes>\n2\n</numnodes><name> web_1-a </name>\n</slice>\n"
    assert parse_slice_spec(data) == SliceSpec("web_1-a", 2, 60, ("node1.example", "2001:db8::1"))


def test_utf8_declaration_and_comments_are_fine():
    data = b'<?xml version="1.0" encoding="UTF-8"?><!-- mine --><slice><name>a</name><!-- x -->' \
           b'<numnodes>1</numnodes><leaselen>1</leaselen></slice>'
    assert parse_slice_spec(data) == SliceSpec("a", 1, 1, ())


def test_limits_are_inclusive():
    assert parse_slice_spec(spec(numnodes=str(MAX_NUMNODES), leaselen=str(MAX_LEASELEN))).leaselen == MAX_LEASELEN
    assert parse_slice_spec(spec(name="a" * 32)).name == "a" * 32


def test_limits_are_configurable():
    assert parse_slice_spec(spec(leaselen=str(30 * 86400)), max_leaselen=30 * 86400).leaselen == 30 * 86400
    refused(spec(numnodes="5"), r"<numnodes> is 5; it must be between 1 and 4", max_numnodes=4)
    refused(spec(leaselen="59"), r"<leaselen> is 59 s; it must be between 60 and", min_leaselen=60)


# ------------------------------------------------------------------------------------ hostile XML

def test_dtd_and_billion_laughs_are_refused():
    laughs = (b'<?xml version="1.0"?><!DOCTYPE slice [<!ENTITY a "aaaaaaaaaa">'
              + b"".join(b'<!ENTITY %s "&%s;&%s;&%s;&%s;&%s;&%s;&%s;&%s;&%s;&%s;">' % ((bytes([98 + i]),)
                                                                                        + (bytes([97 + i]),) * 10)
                         for i in range(9))
              + b']><slice><name>&j;</name><numnodes>1</numnodes><leaselen>1</leaselen></slice>')
    refused(laughs, r"DOCTYPE")
    refused(b'<!DOCTYPE slice SYSTEM "file:///etc/passwd"><slice/>', r"DOCTYPE")


def test_entity_reference_without_dtd_is_refused():
    refused(spec(name="&foo;"), r"not well-formed")


def test_huge_spec_is_refused_before_parsing():
    refused(spec(ips=" ".join(["10.0.0.1"] * 40_000)), rf"over the limit of {MAX_SPEC_BYTES}")


def test_not_xml_empty_and_wrong_types():
    refused(b"", r"not well-formed|empty")
    refused(b"name: oceanstore", r"not well-formed")
    refused("<slice/>", r"must be bytes")


def test_unknown_encoding_is_a_spec_error():
    refused(b'<?xml version="1.0" encoding="x-nonsense"?><slice/>', r".")


@pytest.mark.parametrize("data, pattern", [
    (b"<slices/>", r"root element must be <slice>, not <slices>"),
    (b'<slice xmlns="urn:x"><name>a</name></slice>', r"not <\{urn:x\}slice>"),
    (b'<slice id="1"/>', r"<slice> takes no attributes \(found id\)"),
    (spec(extra="<numnode>3</numnode>"), r"unknown element <numnode>"),
    (spec(extra="<name>b</name>"), r"<name> appears more than once"),
    (spec(name='<b>x</b>'), r"<name> holds an element \(<b>\)"),
    (b"<slice>hello<name>a</name><numnodes>1</numnodes><leaselen>1</leaselen></slice>", r"text outside"),
    (b"<slice><name>a</name>x<numnodes>1</numnodes><leaselen>1</leaselen></slice>", r"text outside"),
    (b'<slice><name lang="en">a</name><numnodes>1</numnodes><leaselen>1</leaselen></slice>',
     r"<name> takes no attributes"),
    (b"<slice><name>a</name></slice>", r"lacks <numnodes>, <leaselen>"),
    (b"<slice><x><y><z/></y></x></slice>", r"nested deeper than 3"),
])
def test_structure_is_strict(data, pattern):
    refused(data, pattern)


# ------------------------------------------------------------------------------------------ names

@pytest.mark.parametrize("name", ["../x", "x/y", "Ocean", "1abc", "_x", "-x", "a.b", "a b", "a$", "é", "a" * 33,
                                  "", "   "])
def test_bad_slice_names(name):
    refused(spec(name=name), r"slice name( .*)? (is not a valid login|is empty)")


@pytest.mark.parametrize("name", ["root", "daemon", "nobody", "sshd", "www-data", "postgres", "dsmt",
                                  "systemd-network"])
def test_reserved_slice_names(name):
    refused(spec(name=name), rf"slice name '{name}' is reserved")


def test_check_slice_name_accepts_good_names():
    for name in ("oceanstore", "xyz1", "a", "web_1-a", "p" + "9" * 31):
        assert check_slice_name(name) == name


# ------------------------------------------------------------------------------ numbers

@pytest.mark.parametrize("value, pattern", [
    ("0", r"<numnodes> is 0; it must be between 1 and 1000"),
    ("1001", r"<numnodes> is 1001"),
    ("-1", r"decimal digits only, not '-1'"),
    ("+1", r"decimal digits only"),
    ("1e3", r"decimal digits only"),
    ("0x10", r"decimal digits only"),
    ("2.0", r"decimal digits only"),
    ("٣", r"decimal digits only"),            # Arabic-Indic three: int() would take it
    ("9" * 5000, r"<numnodes> has 5000 digits; it must be between 1 and 1000"),
    ("", r"<numnodes> is empty"),
])
def test_bad_numnodes(value, pattern):
    refused(spec(numnodes=value), pattern)


@pytest.mark.parametrize("value, pattern", [
    ("0", r"<leaselen> is 0 s; it must be between 1 and 1209600 s"),
    ("1209601", r"<leaselen> is 1209601 s"),
    ("-5", r"decimal digits only"),
    ("99999999999999999999", r"has 20 digits; it must be between 1 and 1209600 s"),
    ("1 h", r"decimal digits only"),
])
def test_bad_leaselen(value, pattern):
    refused(spec(leaselen=value), pattern)


# ---------------------------------------------------------------------------------------- ips

@pytest.mark.parametrize("ips, pattern", [
    ("10.0.0.1 10.0.0.256", r"'10.0.0.256' is neither an IPv4/IPv6 address nor a DNS host name"),
    ("10.0.0.1 010.0.0.2", r"'010.0.0.2' is neither"),
    ("10.0.0.1 1.2.3", r"'1.2.3' is neither"),
    ("10.0.0.1 -bad.example", r"'-bad.example' is neither"),
    ("10.0.0.1 a..b", r"'a..b' is neither"),
    ("10.0.0.1 fe80::1%eth0", r"zone index"),
    ("10.0.0.1 under_score.example", r"is neither"),
    ("10.0.0.1 " + "a" * 64 + ".example", r"is neither"),
    ("10.0.0.1 10.0.0.1", r"<ips> lists '10.0.0.1' more than once"),
    ("2001:db8::1 2001:DB8:0::1", r"'2001:DB8:0::1' more than once \(same node as '2001:db8::1'\)"),
    ("Node1.Example node1.example.", r"more than once \(same node as 'Node1.Example'\)"),
    ("", r"<ips> is empty; leave it out"),
    ("10.0.0.1", r"<ips> lists 1 node but <numnodes> is 2: nodes are taken only from that list"),
])
def test_bad_ips(ips, pattern):
    refused(spec(ips=ips), pattern)


def test_too_many_preferred_nodes():
    ips = " ".join(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(MAX_PREFERRED_NODES + 1))
    refused(spec(ips=ips), rf"<ips> lists {MAX_PREFERRED_NODES + 1} nodes, over the limit of {MAX_PREFERRED_NODES}")


def test_normalize_node_address():
    assert normalize_node_address("2001:0DB8:0000::0001") == "2001:db8::1"
    assert normalize_node_address("Planet1.CS.Example.") == "planet1.cs.example"
    assert normalize_node_address("localhost") == "localhost"
    assert normalize_node_address("::ffff:10.0.0.1") == "::ffff:a00:1"


def test_node_sort_key_orders_ipv4_numerically_then_ipv6_then_names():
    nodes = ["b.example", "2001:db8::2", "10.0.0.10", "a.example", "10.0.0.9", "::1"]
    assert sorted(nodes, key=node_sort_key) == ["10.0.0.9", "10.0.0.10", "::1", "2001:db8::2", "a.example",
                                                "b.example"]


# -------------------------------------------------------------------------------------- properties

@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_slice_spec_error(data):
    try:
        result = parse_slice_spec(data)
    except SliceSpecError:
        return
    assert isinstance(result, SliceSpec)


_FRAGMENTS = st.sampled_from([b"<slice>", b"</slice>", b"<name>", b"</name>", b"<numnodes>", b"</numnodes>",
                              b"<leaselen>", b"</leaselen>", b"<ips>", b"</ips>", b"oceanstore", b"12", b"0",
                              b"-1", b" ", b"10.0.0.1", b"::1", b"&amp;", b"&x;", b"<!--c-->", b"<?pi x?>",
                              b"<![CDATA[7]]>", b"<!DOCTYPE x>", b"\xff", b"\x00", b'<?xml version="1.0"?>'])


@settings(max_examples=400, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=20))
def test_near_specs_only_ever_raise_slice_spec_error(parts):
    try:
        result = parse_slice_spec(b"".join(parts))
    except SliceSpecError:
        return
    assert 1 <= result.numnodes <= MAX_NUMNODES and 1 <= result.leaselen <= MAX_LEASELEN
    assert len(result.ips) >= result.numnodes or not result.ips
