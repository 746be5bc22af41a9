"""Command values and events of the deployment agent's command channel: every verb, hostile values, the verdicts."""
from __future__ import annotations

import pytest

from dsmt.server.deployment import commands
from dsmt.server.deployment.commands import (
    ALL_HOSTS, MAX_COMMAND_CHARS, Command, CommandError, command_channel, format_command, judge, parse_command,
)
from dsmt.server.statusevents import deployment_status
from dsmt.transports.psepr.event import Event

HOST = "planetlab5.nbgisp.com"
CHANNEL = "/org/dsmt/ns/deployment/xyz1/org.dsmt.component.deployment-agent/command/"


def event(value, *, channel=CHANNEL, field="status"):
    return Event.attribute(channel, field, value, to_service="xyz1_mgr", from_service="xyz1_mgr",
                           from_instance="planner")


def test_the_command_channel_is_the_references():
    assert command_channel("xyz1") == CHANNEL


@pytest.mark.parametrize("value, parsed", [
    ("APPCONFIG,planetlab5.nbgisp.com,XYZ,XYZ-proc", Command("APPCONFIG", HOST, "XYZ", "XYZ-proc")),
    ("APPCONFIG,*,XYZ,XYZ-proc", Command("APPCONFIG", "*", "XYZ", "XYZ-proc")),
    ("UPDATE,planetlab5.nbgisp.com,XYZ", Command("UPDATE", HOST, "XYZ")),
    ("UNINSTALL,*,XYZ", Command("UNINSTALL", "*", "XYZ")),
    ("UNINSTALL,*,XYZ,xyz-web", Command("UNINSTALL", "*", "XYZ", "xyz-web")),
    ("START,10.0.0.5,XYZ,xyz-echo", Command("START", "10.0.0.5", "XYZ", "xyz-echo")),
    ("STOP,2001:DB8::1,XYZ,xyz-echo", Command("STOP", "2001:db8::1", "XYZ", "xyz-echo")),
    ("START,PlanetLab5.NBGISP.com.,XYZ,xyz-web", Command("START", HOST, "XYZ", "xyz-web")),
])
def test_every_verb_is_read(value, parsed):
    assert parse_command(value) == parsed


def test_format_is_what_parse_reads_back():
    assert format_command("APPCONFIG", HOST, "XYZ", "XYZ-proc") == "APPCONFIG,planetlab5.nbgisp.com,XYZ,XYZ-proc"
    assert parse_command("UNINSTALL,*,XYZ").text() == "UNINSTALL,*,XYZ"
    with pytest.raises(CommandError):
        format_command("APPCONFIG", HOST, "XYZ", "a,b")


@pytest.mark.parametrize("value, code, words", [
    ("", "malformed", "empty"),
    ("appconfig,h.test,XYZ,p", "unknown-verb", "APPCONFIG, UPDATE"),
    ("REBOOT,h.test,XYZ", "unknown-verb", "'REBOOT' is not a command"),
    ("APPCONFIG,h.test,XYZ", "malformed", "3 parts"),
    ("APPCONFIG,h.test,XYZ,p,extra", "malformed", "not 4"),
    ("UNINSTALL,h.test", "malformed", "2 or 3 parts"),
    ("START,h.test,XYZ,", "malformed", "part 4"),
    ("STOP,,XYZ,c", "malformed", "part 2"),
    ("APPCONFIG,h.test,XYZ,p,", "malformed", "not 4"),
    ("APPCONFIG, h.test,XYZ,p", "malformed", "U+0020"),
    ("APPCONFIG,h.test,XYZ,p\n", "malformed", "U+000A"),
    ("APPCONFIG,h.test,XYZ,p\x00", "malformed", "U+0000"),
    ("APPCONFIG,h.test\u2028,XYZ,p", "malformed", "U+2028"),
    ("APPCONFIG,not_a_host!,XYZ,p", "bad-host", "node address"),
    ("APPCONFIG,1.2.3,XYZ,p", "bad-host", "node address"),
    ("APPCONFIG,**,XYZ,p", "bad-host", "neither '*'"),
    ("APPCONFIG,h.test,../etc,p", "bad-name", "application"),
    ("APPCONFIG,h.test,9XYZ,p", "bad-name", "application"),
    ("APPCONFIG,h.test,XYZ,-p", "bad-name", "proc"),
    ("START,h.test,XYZ,Web", "bad-name", "component"),
    ("START,h.test,XYZ," + "c" * 65, "bad-name", "component"),
    ("A" * (MAX_COMMAND_CHARS + 1), "oversized", str(MAX_COMMAND_CHARS)),
])
def test_bad_values_are_refused_precisely(value, code, words):
    with pytest.raises(CommandError) as caught:
        parse_command(value)
    assert caught.value.code == code
    assert words in caught.value.reason


def test_non_text_is_malformed():
    with pytest.raises(CommandError) as caught:
        parse_command(b"APPCONFIG,h,XYZ,p")
    assert caught.value.code == "malformed"


def test_an_event_for_this_host_or_every_host_is_run():
    for host in (HOST, ALL_HOSTS):
        verdict = judge(event(f"APPCONFIG,{host},XYZ,XYZ-proc"), host=HOST, slice_name="xyz1")
        assert verdict.command == Command("APPCONFIG", host, "XYZ", "XYZ-proc")
        assert verdict.ignored is None and verdict.refused is None


@pytest.mark.parametrize("received, words", [
    (event("APPCONFIG,other.test,XYZ,XYZ-proc"), "for other.test, not for planetlab5.nbgisp.com"),
    (event("APPCONFIG,*,XYZ,p", channel="/org/dsmt/ns/deployment/other/org.dsmt.component.deployment-agent/command/"),
     "not on this slice's command channel"),
    (event("APPCONFIG,*,XYZ,p", channel=CHANNEL + "deeper/"), "not on this slice's command channel"),
    (event("APPCONFIG,*,XYZ,p", field="deployment-status"), "field 'deployment-status'"),
    (deployment_status("xyz1", HOST, "org.dsmt.component.deployment-agent", "XYZ", "running"), "not on this slice"),
])
def test_events_not_for_this_engine_are_ignored_not_refused(received, words):
    verdict = judge(received, host=HOST, slice_name="xyz1")
    assert verdict.command is None and verdict.refused is None
    assert words in verdict.ignored


@pytest.mark.parametrize("received", [
    "REBOOT,*,XYZ", "x" * 10_000_000, event("APPCONFIG,*,XYZ"), event("STOP,*,XYZ,c;rm -rf"), 42, None, object(),
])
def test_hostile_input_is_refused_and_judge_never_raises(received):
    verdict = judge(received, host=HOST, slice_name="xyz1")
    assert verdict.command is None and verdict.ignored is None
    assert isinstance(verdict.refused, CommandError)
    assert verdict.refused.code in ("unknown-verb", "oversized", "malformed", "bad-name")


def test_judge_survives_a_payload_that_raises():
    class Hostile:
        channel = CHANNEL

        @property
        def payload(self):
            raise RuntimeError("boom")
    verdict = judge(Hostile(), host=HOST, slice_name="xyz1")
    assert verdict.refused.code == "malformed"


def test_verbs_table_matches_the_grammar():
    assert set(commands.VERBS) == {"APPCONFIG", "UPDATE", "UNINSTALL", "START", "STOP"}
