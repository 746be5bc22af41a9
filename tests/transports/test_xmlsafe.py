"""The shared XML helpers: safe parsing and tag splitting."""
from __future__ import annotations

import pytest
from lxml import etree

from dsmt.transports.xmlsafe import NOT_XML_CHAR, XmlSafetyError, check_depth, escape_text, parse_xml, split_tag


@pytest.mark.parametrize("tag", ["{urn:a}b", "{http://x/y}z-1", "plain", "{}empty", "{urn:a:b}c.d"])
def test_split_tag_agrees_with_qname(tag):
    element = etree.Element(tag)
    qname = etree.QName(element)
    assert split_tag(element.tag) == (qname.namespace, qname.localname)


@pytest.mark.parametrize("data, max_bytes, problem", [
    (b"<a>", 100, "not well-formed"),
    (b'<!DOCTYPE a [<!ENTITY e "x">]><a>&e;</a>', 100, "DOCTYPE"),
    (b"<a>" * 40 + b"</a>" * 40, 1000, "deeper than 32"),
    (b"<a>" + b"x" * 100 + b"</a>", 50, "over the limit of 50"),
    ("<a/>", 100, "must be bytes"),
])
def test_parse_xml_refuses_with_a_message_naming_the_problem(data, max_bytes, problem):
    with pytest.raises(XmlSafetyError, match=problem):
        parse_xml(data, max_bytes=max_bytes)


def test_check_depth_counts_the_root():
    root = parse_xml(b"<a><b><c/></b></a>", max_bytes=100, max_depth=None)
    check_depth(root, 3)
    with pytest.raises(XmlSafetyError):
        check_depth(root, 2)


@pytest.mark.parametrize("text, written", [
    ("plain", "plain"),
    ("a & b < c > d", "a &amp; b &lt; c &gt; d"),
    ("line\r\nnext", "line&#13;\nnext"),
    ("&amp;", "&amp;amp;"),
    ("é\U0001f600\t", "é\U0001f600\t"),
])
def test_escape_text_reads_back_as_the_same_text(text, written):
    assert escape_text(text) == written
    assert etree.fromstring(f"<a>{escape_text(text)}</a>".encode()).text == text


@pytest.mark.parametrize("text, bad", [("ok\t\n\r", False), ("\x00", True), ("\x1f", True), ("\ufffe", True),
                                       ("\udc80", True), ("\U0010ffff", False), ("\ud7ff", False)])
def test_not_xml_char_finds_what_xml_cannot_carry(text, bad):
    assert (NOT_XML_CHAR.search(text) is not None) is bad
