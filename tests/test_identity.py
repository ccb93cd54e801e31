"""Identity resolution and rewriting, as pure functions over real SDK payload shapes."""

from __future__ import annotations

import copy

import pytest

from proxy.core import identity
from proxy.core.identity import SOURCE_ALIAS, SOURCE_COOKIE, SOURCE_NEW, SOURCE_NONE
from proxy.core.rewrite import map_id, rewrite_query
from proxy.pipeline.identity import MAX_RUNS, capped
from proxy.protocols import mixpanel, segment
from proxy.protocols.base import Run
from proxy.protocols.mixpanel import rewrite, rewrite_flags_context


def rewrite_events(route, events, mapping):
    """Every change the protocol reports over a batch, in order."""
    return [r for event in events for r in rewrite(route, event, mapping)]
from tests.conftest import js_event

D = "0b6f5c2e-9d1a-4a3c-8f7e-1a2b3c4d5e6f"
C = "c0ffee00-1111-4222-8333-444455556666"


def test_anonymous_ids_of_track_shapes():
    anon = js_event("a", D)
    identified = js_event("b", D, user="user-42")
    ident = js_event("$identify", D, user="user-42", **{"$anon_distinct_id": f"$device:{D}"})
    old_style = {"event": "c", "properties": {"distinct_id": D, "$device_id": D}}  # distinct_id == device id
    assert mixpanel.anonymous_ids("track", [anon]) == [D]
    assert mixpanel.anonymous_ids("track", [identified]) == [D]
    assert mixpanel.anonymous_ids("track", [ident]) == [D]
    assert mixpanel.anonymous_ids("track", [old_style]) == [D]
    # A user id is never anonymous, even without a device id.
    assert mixpanel.anonymous_ids("track", [{"event": "x", "properties": {"distinct_id": "user-42"}}]) == []


def test_anonymous_ids_engage_and_groups():
    engage = {"$token": "t", "$distinct_id": f"$device:{D}", "$device_id": D, "$set": {"a": 1}}
    assert mixpanel.anonymous_ids("engage", [engage]) == [D]
    assert mixpanel.anonymous_ids("groups", [{"$group_key": "company", "$group_id": "x"}]) == []


def test_anonymous_ids_of_a_batch_see_every_event_whose_ids_differ():
    """A batch of one visitor's events is read once per change of its id
    fields: a second device id after a run of the first, a merge's old id
    late in the batch, and the first device again, each counted once, in order."""
    first = [js_event(f"a{i}", D) for i in range(3)]
    other = js_event("b", C)
    merged = js_event("$identify", C, user="user-42", **{"$anon_distinct_id": "$device:old-device-1"})
    batch = [*first, other, merged, js_event("c", D)]
    assert mixpanel.anonymous_ids("track", batch) == [D, C, "old-device-1"]
    engage = [{"$token": "t", "$distinct_id": f"$device:{d}", "$device_id": d, "$set": {}} for d in (D, D, C)]
    assert mixpanel.anonymous_ids("engage", engage) == [D, C]


def test_runs_split_a_batch_at_each_new_device_with_its_own_ids_and_user():
    """One pass gives each device's run of a batch (identify, reset(), the next
    person's events), its anonymous ids, and whether a user is named in it;
    a server's request (``split=False``) is one run over every id."""
    batch = [js_event("a", D), js_event("$identify", D, user="user-42"), js_event("b", C), js_event("c", C)]
    assert mixpanel.runs("track", batch) == [Run(0, 2, [D], False), Run(2, 4, [C], True)]
    assert mixpanel.runs("track", batch, split=False) == [Run(0, 4, [D, C], False)]
    engage = [{"$token": "t", "$distinct_id": f"$device:{d}", "$device_id": d, "$set": {}} for d in (D, C)]
    engage[0]["$user_id"] = "user-42"
    assert mixpanel.runs("engage", engage) == [Run(0, 1, [D], False), Run(1, 2, [C], True)]
    # Groups carry no person id and never split; /import never splits either.
    groups = [{"$token": "t", "$group_key": "company", "$group_id": "acme", "$device_id": d} for d in (D, C)]
    assert mixpanel.runs("groups", groups) == [Run(0, 2, [], True)]
    assert mixpanel.runs("import", batch) == [Run(0, 4, [D, C], False)]
    calls = [{"type": "track", "anonymousId": a, **({"userId": "u1"} if n == 1 else {})} for n, a in enumerate("AAB")]
    assert segment.runs("batch", calls) == [Run(0, 2, ["A"], False), Run(2, 3, ["B"], True)]
    assert segment.runs("batch", calls, split=False) == [Run(0, 3, ["A", "B"], False)]


def test_a_batch_of_many_resets_is_capped_with_the_rest_in_the_last_run():
    """Past ``MAX_RUNS`` devices the last run holds every remaining event and id, in order."""
    devices = [f"device-{n:04d}" for n in range(MAX_RUNS + 2)]
    batch = [js_event("e", d) for d in devices]
    batch[-1]["properties"]["$user_id"] = "user-42"
    runs = capped(mixpanel.runs("track", batch))
    assert len(runs) == MAX_RUNS
    assert [r.start for r in runs] == list(range(MAX_RUNS))
    assert runs[-1] == Run(MAX_RUNS - 1, MAX_RUNS + 2, devices[MAX_RUNS - 1:], False)
    assert all(r.anonymous for r in runs[:-1])
    assert capped(runs[:3]) == runs[:3]


def test_resolve_browser_order():
    new = lambda: "fresh"  # noqa: E731
    r = identity.resolve_browser(C, [D], {}, new)
    assert (r.canonical, r.source, r.mapping, r.new_aliases) == (C, SOURCE_COOKIE, {D: C}, {D: C})
    r = identity.resolve_browser(None, [D], {D: C}, new)
    assert (r.canonical, r.source, r.mapping) == (C, SOURCE_ALIAS, {D: C})
    r = identity.resolve_browser(None, [D], {}, new)
    assert (r.canonical, r.source, r.mapping) == (D, SOURCE_NEW, {})  # first come: adopted, nothing to rewrite
    r = identity.resolve_browser(None, ["bad;id with spaces"], {}, new)
    assert (r.canonical, r.source, r.mapping) == ("fresh", SOURCE_NEW, {"bad;id with spaces": "fresh"})
    r = identity.resolve_browser(None, [], {}, new)
    assert (r.canonical, r.source) == (None, SOURCE_NONE)


def test_resolve_server_uses_only_the_alias_store():
    r = identity.resolve_server({D: C, C: C})
    assert r.canonical is None and r.mapping == {D: C} and r.new_aliases == {}
    assert identity.resolve_server({}).source == SOURCE_NONE


def test_rewrite_track_keeps_user_ids():
    events = [
        js_event("anon", D),
        js_event("$identify", D, user="user-42", **{"$anon_distinct_id": f"$device:{D}"}),
    ]
    before = copy.deepcopy(events)
    rewrites = rewrite_events("track", events, {D: C})
    a, i = events[0]["properties"], events[1]["properties"]
    assert a["distinct_id"] == f"$device:{C}" and a["$device_id"] == C
    assert i["distinct_id"] == "user-42" and i["$user_id"] == "user-42"
    assert i["$anon_distinct_id"] == f"$device:{C}" and i["$device_id"] == C
    assert {(r.field, r.original, r.canonical) for r in rewrites} == {
        ("distinct_id", f"$device:{D}", f"$device:{C}"),
        ("$device_id", D, C),
        ("$anon_distinct_id", f"$device:{D}", f"$device:{C}"),
    }
    # Nothing else changed.
    for ev, old in zip(events, before):
        for key in old["properties"]:
            if key not in ("distinct_id", "$device_id", "$anon_distinct_id"):
                assert ev["properties"][key] == old["properties"][key]


def test_rewrite_merge_and_engage():
    merge = [{"event": "$merge", "properties": {"$distinct_ids": [f"$device:{D}", "user-42"]}}]
    rewrite_events("import", merge, {D: C})
    assert merge[0]["properties"]["$distinct_ids"] == [f"$device:{C}", "user-42"]
    engage = [{"$token": "t", "$distinct_id": "user-42", "$device_id": D, "$user_id": "user-42", "$set": {"$device_id": D}}]
    rewrite_events("engage", engage, {D: C})
    assert engage[0]["$distinct_id"] == "user-42" and engage[0]["$device_id"] == C
    assert engage[0]["$set"] == {"$device_id": D}  # profile properties are data, not identity


def test_no_mapping_no_change():
    events = [js_event("x", D)]
    before = copy.deepcopy(events)
    assert rewrite_events("track", events, {}) == []
    assert events == before


@pytest.mark.parametrize(
    "value,expected",
    [(D, C), (f"$device:{D}", f"$device:{C}"), ("user-42", None), (None, None), (42, None), ("$device:", None)],
)
def test_map_id(value, expected):
    assert map_id(value, {D: C}) == expected


def test_query_identity_rewrites():
    out: list = []
    q = rewrite_query(
        [("format", "gzip"), ("distinct_id", f"$device:{D}"), ("$device_id", D), ("$user_id", "u"), ("replay_id", "r")],
        ("distinct_id", "$device_id"),
        {D: C},
        out,
    )
    assert q == [("format", "gzip"), ("distinct_id", f"$device:{C}"), ("$device_id", C), ("$user_id", "u"), ("replay_id", "r")]
    assert len(out) == 2
    ctx = rewrite_flags_context(f'{{"distinct_id":"$device:{D}","device_id":"{D}","x":1}}', {D: C}, out)
    assert ctx == f'{{"distinct_id":"$device:{C}","device_id":"{C}","x":1}}'
    assert rewrite_flags_context("not json", {D: C}, out) == "not json"


def test_query_anon_ids():
    assert mixpanel.query_ids(f"$device:{D}", D) == [D]
    assert mixpanel.query_ids("user-42", D) == [D]
    assert mixpanel.query_ids(f"$device:{D}", None) == [D]
    assert mixpanel.query_ids("user-42", None) == []


def test_device_change_at_the_window_edge_and_with_odd_ids():
    window = 7 * 86400
    assert identity.device_change("d1|1000", "d2", 1000 + window - 1, window, True) == identity.DEVICE_RESET
    assert identity.device_change("d1|1000", "d2", 1000 + window, window, True) == identity.DEVICE_RENEWED
    assert identity.device_change("d1|1000", "d2", 1001, window, False) == identity.DEVICE_RENEWED  # identified
    # A device id with a '|' in it (custom SDKs): the time is after the last one.
    assert identity.device_change("a|b|1000", "a|b", 2000, window, True) == identity.DEVICE_SAME
    assert identity.device_change("a|b|1000", "c", 2000, window, True) == identity.DEVICE_RESET
    assert identity.device_change(None, "c", 2000, window, True) == identity.DEVICE_FIRST
    assert identity.device_change("d1|junk", "c", 2000, window, True) == identity.DEVICE_FIRST
