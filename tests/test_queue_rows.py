"""The queue's row format, in process: a meta read as columns in either stored
form, the facts of a batch, a request's events packed into rows (by project,
count and bytes), a row read back and split into its events, dead letters
from the start. Pure functions: no file, no loop."""

from __future__ import annotations

import time

import orjson
import pytest

from proxy.protocols.base import EventFacts
from proxy.services.queue.rows import (
    Columns,
    DeadLetter,
    EventGroup,
    NewRow,
    Row,
    columns,
    event_metas,
    facts_of,
    letters_of,
    request_rows,
)


def stored(meta: object, count: int = 1, body: bytes = b"{}", **kw: object) -> Row:
    """A row as read back from disk: its meta as bytes, not yet decoded."""
    return Row(kw.pop("id", 7), "track", "us", "p", True, body, orjson.dumps(meta), 1.0, 0, count=count, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ columns


@pytest.mark.parametrize("meta", [None, [], "n", 3, b"{}"])
def test_a_meta_that_is_no_object_reads_as_one_unnamed_event(meta):
    assert columns(meta) == Columns(None, None, [""], [None], [None], [])
    assert columns(meta, 3) == Columns(None, None, ["", "", ""], [None] * 3, [None] * 3, [])


def test_one_events_meta_reads_as_columns_of_one():
    meta = {"c": "canon", "s": "cookie", "n": "Buy", "i": "x1", "t": 12.5, "r": [["distinct_id", "a", "b"], ["$device_id", "d", "e"]]}
    cols = columns(meta)
    assert cols == ("canon", "cookie", ["Buy"], ["x1"], [12.5], [[0, "distinct_id", "a", "b"], [0, "$device_id", "d", "e"]])
    # A name that is not a string (a damaged meta) is no name; no rewrites: none.
    assert columns({"n": 5, "r": []}) == (None, None, [""], [None], [None], [])
    assert columns({"n": None}).names == [""]


def test_one_events_meta_under_a_larger_count_is_padded_to_it():
    cols = columns({"c": "k", "n": "Buy", "i": "x1", "t": 3.0}, 3)
    assert cols == ("k", None, ["Buy", "", ""], ["x1", None, None], [3.0, None, None], [])
    assert columns({"n": "Buy"}, 2) == (None, None, ["Buy", ""], [None, None], [None, None], [])


def test_a_rows_columns_are_read_as_stored_and_not_padded_when_whole():
    meta = {"c": "k", "s": "alias", "n": ["a", "b"], "i": ["1", None], "t": [5.0, 6.0], "r": [[1, "distinct_id", "o", "k"]]}
    assert columns(meta, 2) == ("k", "alias", ["a", "b"], ["1", None], [5.0, 6.0], [[1, "distinct_id", "o", "k"]])
    # A row's meta read with a smaller count keeps every column whole.
    assert columns(meta, 1).names == ["a", "b"]
    # Missing columns are empty lists, then padded to the count.
    assert columns({"n": ["a", "b"]}, 2) == (None, None, ["a", "b"], [None, None], [None, None], [])
    assert columns({"n": []}, 0) == (None, None, [], [], [], [])


@pytest.mark.parametrize("short", ["n", "i", "t"])
def test_any_one_short_column_pads_them_all_to_the_count(short):
    meta = {"n": ["a", "b", "c"], "i": ["1", "2", "3"], "t": [1.0, 2.0, 3.0]}
    meta[short] = meta[short][:1]
    cols = columns(meta, 3)
    assert (len(cols.names), len(cols.insert_ids), len(cols.times)) == (3, 3, 3)
    fill = {"n": "", "i": None, "t": None}[short]
    column = {"n": cols.names, "i": cols.insert_ids, "t": cols.times}[short]
    assert column[1:] == [fill, fill]
    # The other columns, already whole, are unchanged.
    assert cols.names[0] == "a" and cols.insert_ids[0] == "1" and cols.times[0] == 1.0
    assert cols.names == (["a", "", ""] if short == "n" else ["a", "b", "c"])


# ----------------------------------------------------------------- facts_of


def test_the_facts_of_a_batch_come_in_event_order_from_either_form():
    rows = [
        stored({"n": ["first"], "r": [[0, "$user_id", "u", "k0"]]}),
        stored({"c": "k1", "s": "cookie", "n": "One", "i": "i1", "r": [["distinct_id", "a", "k1"]]}),
        stored({"n": "Bare"}),  # no id, no identity, no rewrites
        stored({"c": "k2", "s": "alias", "n": ["m1", "m2", "m3"], "i": ["i2", None, "i3"], "t": [1.0, 2.0, 3.0],
                "r": [[2, "$device_id", "d", "k2"]]}, count=3),
        stored({"n": ["listed"], "i": ["i4"], "c": "k3", "s": "header"}),  # one event stored in the row form
        Row(8, "track", "us", None, False, b"{}", b"not json", 1.0, 0),  # a meta that cannot be read
        stored({"c": None, "s": None, "n": ["x", "y"], "i": [None, None]}, count=2),
    ]
    facts = facts_of(rows)
    assert facts.names == ["first", "One", "Bare", "m1", "m2", "m3", "listed", "", "x", "y"]
    assert facts.insert_ids == ["i1", "i2", "i3", "i4"]
    assert facts.canonical == {"k1", "k2", "k3"}
    assert facts.sources == {"cookie", "alias", "header"}
    assert facts.rewrites == [["$user_id", "u", "k0"], ["distinct_id", "a", "k1"], ["$device_id", "d", "k2"]]
    assert facts_of([]) == ([], [], set(), set(), [])


def test_the_facts_of_a_damaged_meta_still_name_every_event_of_the_row():
    # A row of several whose meta is one event's, or whose columns are short: padded to its count.
    assert facts_of([stored({"n": "x", "c": "k"}, count=3)]).names == ["x", "", ""]
    assert facts_of([stored({"n": ["a"]}, count=2)]).names == ["a", ""]
    # A meta that is JSON but no object: one unnamed event.
    assert facts_of([Row(1, "track", "us", None, True, b"{}", b"[1, 2]", 1.0, 0)]) == ([""], [], set(), set(), [])


def test_a_single_events_facts_skip_empty_values():
    facts = facts_of([stored({"c": "", "s": "", "n": "", "i": "", "r": []})])
    assert facts == ([""], [], set(), set(), [])


# -------------------------------------------------------------- event_metas


def test_each_events_own_meta_has_its_rewrites_only():
    meta = {"c": "k", "s": "cookie", "n": ["a", "b"], "i": ["1", "2"], "t": [1.0, None],
            "r": [[1, "distinct_id", "o", "k"], [0, "$device_id", "d", "k"], [1, "$user_id", "u", "k"]]}
    assert event_metas(meta, 2) == [
        {"c": "k", "s": "cookie", "n": "a", "i": "1", "t": 1.0, "r": [["$device_id", "d", "k"]]},
        {"c": "k", "s": "cookie", "n": "b", "i": "2", "t": None, "r": [["distinct_id", "o", "k"], ["$user_id", "u", "k"]]},
    ]


@pytest.mark.parametrize("index", [2, -1, "0", None, 1.0])
def test_a_rewrite_naming_no_event_of_the_row_is_dropped(index):
    meta = {"n": ["a", "b"], "r": [[index, "distinct_id", "o", "k"]]}
    assert [m["r"] for m in event_metas(meta, 2)] == [[], []]


def test_event_metas_gives_exactly_count_events_and_at_least_one():
    meta = {"n": ["a", "b", "c"]}
    assert [m["n"] for m in event_metas(meta, 2)] == ["a", "b"]
    assert [m["n"] for m in event_metas(meta, 1)] == ["a"]
    assert [m["n"] for m in event_metas(meta, 4)] == ["a", "b", "c", ""]
    # One event's meta gives one event, even under a count of 0.
    assert [m["n"] for m in event_metas({"n": "solo"})] == ["solo"]
    assert [m["n"] for m in event_metas({"n": "solo"}, 0)] == ["solo"]


# ---------------------------------------------------------- rows and groups


def test_one_event_is_a_row_with_its_own_meta():
    group = EventGroup()
    group.add_run("eu", "proj", b'{"event":"a"}', [EventFacts("a", "i1", "proj", 42.0)], [[("distinct_id", "o", "k")]])
    assert group.size == len(b'{"event":"a"}') + 1
    row = group.row("track", True, "mixpanel", "k", "cookie")
    meta = {"c": "k", "s": "cookie", "n": "a", "i": "i1", "r": [["distinct_id", "o", "k"]]}
    assert row == NewRow("track", "eu", "proj", True, b'{"event":"a"}', orjson.dumps(meta), 42.0, "mixpanel", meta, 1)
    assert row.columns() == ("k", "cookie", ["a"], ["i1"], [None], [[0, "distinct_id", "o", "k"]])


def test_several_runs_make_one_row_whose_rewrites_are_indexed_within_it():
    group = EventGroup()
    group.add_run("us", "p", b'{"e":1},{"e":2}', [EventFacts("a", "1", "p", 9.0), EventFacts("b", "2", "p", None)],
                  [[], [("distinct_id", "o", "k")]])
    group.add_run("us", "p", b'{"e":3}', [EventFacts("c", None, "p", 7.0)], [[("$device_id", "d", "k")]])
    assert group.size == len(b'{"e":1},{"e":2}') + 1 + len(b'{"e":3}') + 1
    row = group.row("engage", False, "segment", None, "alias")
    assert (row.route, row.region, row.project, row.ip, row.protocol, row.count) == ("engage", "us", "p", False, "segment", 3)
    assert row.body == b'{"e":1},{"e":2},{"e":3}'
    assert row.event_time == 7.0  # its oldest event's time
    meta = {"c": None, "s": "alias", "n": ["a", "b", "c"], "i": ["1", "2", None], "t": [9.0, None, 7.0],
            "r": [[1, "distinct_id", "o", "k"], [2, "$device_id", "d", "k"]]}
    assert row.info == meta and orjson.loads(row.meta) == meta
    assert row.columns().rewrites == meta["r"]


def test_a_row_of_events_without_times_has_none():
    group = EventGroup()
    group.add_run("us", None, b"1,2", [EventFacts("a", None, None, None), EventFacts("b", None, None, None)])
    row = group.row("track", True, "mixpanel", None, None)
    assert row.event_time is None and row.count == 2 and row.info["r"] == []


def events_of(projects: str, pad: int = 20) -> tuple[list[dict], list[EventFacts]]:
    events = [{"event": f"e{i}", "properties": {"token": p, "pad": "x" * pad}} for i, p in enumerate(projects)]
    facts = [EventFacts(e["event"], f"id{i}", e["properties"]["token"], 100.0 + i) for i, e in enumerate(events)]
    return events, facts


def test_runs_are_cut_at_each_change_of_project_and_at_most_events():
    events, facts = events_of("aaabbc")
    asked: list[str | None] = []

    def region_for(project):
        asked.append(project)
        return {"a": "us", "b": "eu", "c": "in"}[project]

    rows = request_rows("track", True, "mixpanel", events, facts, [], region_for, 2, None, "k", "cookie")
    assert [(r.project, r.region, r.count) for r in rows] == [("a", "us", 2), ("a", "us", 1), ("b", "eu", 2), ("c", "in", 1)]
    assert asked == ["a", "a", "b", "c"]
    assert [r.columns().names for r in rows] == [["e0", "e1"], ["e2"], ["e3", "e4"], ["e5"]]
    assert all(r.info["c"] == "k" and r.info["s"] == "cookie" and r.protocol == "mixpanel" and r.ip for r in rows)
    assert rows[3].body == orjson.dumps(events[5])
    whole = request_rows("track", True, "mixpanel", events[:3], facts[:3], [], region_for, 3, None, None, None)
    assert [r.count for r in whole] == [3] and whole[0].body == orjson.dumps(events[:3])[1:-1]


def test_a_run_is_cut_event_by_event_at_the_byte_limit_to_the_byte():
    events, facts = events_of("aaa")
    sizes = [len(orjson.dumps(e)) for e in events]
    region = lambda p: "us"  # noqa: E731
    changes = [[], [("distinct_id", "o", "k")], [("$device_id", "d", "k")]]
    # The whole run fits exactly: its joined JSON and one byte (a batch's bracket).
    exact = sum(sizes) + 2 + 1
    [whole] = request_rows("t", True, "m", events, facts, changes, region, 10, exact, None, None)
    assert whole.count == 3 and whole.info["r"] == [[1, "distinct_id", "o", "k"], [2, "$device_id", "d", "k"]]
    # One byte less: cut; the first two still fit together, to the byte.
    two = sizes[0] + 1 + sizes[1] + 1
    rows = request_rows("t", True, "m", events, facts, changes, region, 10, two, "canon", "cookie")
    assert [r.count for r in rows] == [2, 1]
    assert [(r.route, r.region, r.project, r.ip, r.protocol, r.info["c"], r.info["s"]) for r in rows] == [
        ("t", "us", "a", True, "m", "canon", "cookie")] * 2
    # Two events over the limit are two rows too.
    assert [r.count for r in request_rows("t", True, "m", events[:2], facts[:2], [], region, 10, two - 1, None, None)] == [1, 1]
    assert rows[0].body == orjson.dumps(events[0]) + b"," + orjson.dumps(events[1])
    assert rows[0].info["r"] == [[1, "distinct_id", "o", "k"]]
    assert rows[1].info["r"] == [["$device_id", "d", "k"]]
    assert [r.event_time for r in rows] == [100.0, 102.0]
    rows = request_rows("t", True, "m", events, facts, changes, region, 10, two - 1, None, None)
    assert [r.count for r in rows] == [1, 1, 1]
    assert [r.body for r in rows] == [orjson.dumps(e) for e in events]
    # An event larger than the limit is still a row of its own (the sender dead-letters it).
    assert [r.count for r in request_rows("t", True, "m", events[:1], facts[:1], [], region, 10, 5, None, None)] == [1]
    # A run cut after another run: its own events only, in order.
    mixed, mixed_facts = events_of("baaa")
    cut = request_rows("t", False, "m", mixed, mixed_facts, [], {"a": "us", "b": "eu"}.get, 10, two - 1, None, None)
    assert [(r.region, r.project, r.body) for r in cut] == [
        ("eu", "b", orjson.dumps(mixed[0]))] + [("us", "a", orjson.dumps(e)) for e in mixed[1:]]
    # Without rewrites (an empty list), the cut rows have none.
    plain = request_rows("t", True, "m", events, facts, [], region, 10, two - 1, None, None)
    assert [r.info["r"] for r in plain] == [[], [], []]


# ------------------------------------------------------------ rows read back


def test_a_stored_meta_is_decoded_once_and_a_bad_one_is_empty():
    row = stored({"n": "a", "i": "x"})
    assert row.info is None
    assert row.decoded_meta() == {"n": "a", "i": "x"}
    assert row.info == {"n": "a", "i": "x"}
    row.meta = b"garbage"  # the decoded meta is kept: not read again
    assert row.decoded_meta() == {"n": "a", "i": "x"}
    bad = Row(1, "track", "us", None, True, b"{}", b"{not json", 1.0, 0)
    assert bad.decoded_meta() == {} and bad.info == {}
    assert bad.columns() == (None, None, [""], [None], [None], [])


def test_a_rows_columns_use_its_count():
    row = stored({"n": ["a"], "i": ["1"]}, count=2)
    assert row.columns().names == ["a", ""]
    new = NewRow("track", "us", None, True, b"1,2", b"{}", None, "mixpanel", {"n": ["a"]}, 2)
    assert new.columns().names == ["a", ""]


def test_a_row_of_one_event_splits_into_itself():
    row = stored({"n": "a"})
    assert row.split()[0] is row and len(row.split()) == 1


def test_a_row_splits_into_views_of_its_events_under_its_id():
    meta = {"c": "k", "s": "cookie", "n": ["a", "b"], "i": ["1", "2"], "t": [5.0, None], "r": [[1, "distinct_id", "o", "k"]]}
    row = Row(9, "engage", "eu", "p", False, b'{"e":1},{"e":[2,3]}', orjson.dumps(meta), 33.0, 4, 5.0, "segment", None, 2)
    views = row.split()
    assert [(v.id, v.route, v.region, v.project, v.ip, v.enqueued_at, v.attempts, v.protocol, v.count) for v in views] == [
        (9, "engage", "eu", "p", False, 33.0, 4, "segment", 1)
    ] * 2
    assert [v.body for v in views] == [b'{"e":1}', b'{"e":[2,3]}']
    assert [v.event_time for v in views] == [5.0, None]
    own = [{"c": "k", "s": "cookie", "n": "a", "i": "1", "r": []},
           {"c": "k", "s": "cookie", "n": "b", "i": "2", "r": [["distinct_id", "o", "k"]]}]
    assert [v.info for v in views] == own and [orjson.loads(v.meta) for v in views] == own
    # A view reads as the event it is.
    assert views[1].columns() == ("k", "cookie", ["b"], ["2"], [None], [[0, "distinct_id", "o", "k"]])


def test_dead_letters_from_the_start_are_rows_never_queued():
    meta = {"n": "old"}
    rows = [NewRow("track", "us", "p", True, b'{"e":1}', orjson.dumps(meta), 5.0, "segment", meta),
            NewRow("import", "eu", None, False, b'{"e":2},{"e":3}', b"{}", None, "mixpanel", None, 2)]
    before = time.time()
    letters = letters_of(rows, "expired", "event older than 5 days")
    after = time.time()
    assert [type(d) for d in letters] == [DeadLetter, DeadLetter]
    assert [(d.reason, d.detail, d.status) for d in letters] == [("expired", "event older than 5 days", None)] * 2
    first, second = (d.row for d in letters)
    assert (first.id, first.attempts, first.route, first.region, first.project, first.ip, first.body, first.meta) == (
        0, 0, "track", "us", "p", True, b'{"e":1}', orjson.dumps(meta))
    assert (first.event_time, first.protocol, first.info, first.count) == (5.0, "segment", meta, 1)
    assert (second.route, second.region, second.project, second.ip, second.event_time, second.protocol, second.count) == (
        "import", "eu", None, False, None, "mixpanel", 2)
    assert before <= first.enqueued_at <= after and first.enqueued_at == second.enqueued_at
    assert letters_of([], "expired", "x") == []
