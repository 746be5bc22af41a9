"""What several benchmarks share: the 1 KB status event, best-of timing, child environments, percentiles.

Benchmarks run as scripts (``python bench/NAME.py``), so this folder is on
``sys.path`` and they import this module as ``_common``.
"""
from __future__ import annotations

import time

from dsmt.transports.psepr.stream import wrap_message

#: Bytes fed per call, as a socket read delivers them.
CHUNK_BYTES = 64 * 1024
#: Size of one benchmark event, message wrapper included.
STANZA_BYTES = 1024


def event_stanza(host_number: int) -> bytes:
    """A status event as a sliver manager sends it, padded to :data:`STANZA_BYTES` in its value."""
    host = f"planetlab{host_number % 1000}.nbgisp.com"
    head = (
        '<event xmlns="http://psepr.org/xs/event">'
        f"<to><channel>/org/dsmt/ns/deployment/xyz1/org.dsmt.component.sliver-mgr/status/{host}/</channel>"
        "<service>xyz1_mgr</service><instance/></to>"
        f"<from><service>xyz1_mgr</service><instance>{host}</instance></from>"
        '<payload xmlns="http://psepr.org/xs/payload/attribute">'
        f"<field>deployment-status</field><value>hostname={host},status=requested,detail="
    )
    tail = "</value><expire>90</expire></payload></event>"
    bare = len(wrap_message((head + tail).encode()))
    return wrap_message((head + "x" * (STANZA_BYTES - bare) + tail).encode())


def best_of(runs: int, function, *args) -> float:
    """The shortest of ``runs`` timed calls of ``function(*args)``, in seconds."""
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        function(*args)
        best = min(best, time.perf_counter() - started)
    return best


def child_env(**extra: str) -> dict[str, str]:
    """This environment plus ``extra``, with PYTHONPATH made absolute (children may run elsewhere)."""
    from dsmt.client.testbed import child_environment
    return child_environment(**extra)


def percentile(values, share: float) -> float:
    """The value at ``share`` (0–1) of the sorted values (rank rounded down); NaN when there are none."""
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(share * len(ordered)))]) if ordered else float("nan")
