"""Reading a projection hash back as one document (``merge_parts``)."""

from __future__ import annotations

import orjson

from shared.redis import merge_parts


def test_the_behaviour_part_wins_where_both_parts_name_a_key() -> None:
    p = b'{"customer_id" : "c1", "tags" : ["a"], "updated_at" : "2026-01-01T00:00:00+00:00"}'
    c = b'{"counters" : {"open": {"total": 2}}, "last" : {}, "updated_at" : "2026-02-02T00:00:00+00:00"}'
    doc = merge_parts([b"7", p, c])
    expected = orjson.loads(p) | orjson.loads(c) | {"version": 7}
    assert doc == expected
    assert doc is not None and doc["updated_at"] == "2026-02-02T00:00:00+00:00"


def test_a_profile_without_its_behaviour_part_or_with_an_empty_one_reads_alone() -> None:
    p = b'{"customer_id": "c1", "tags": []}'
    assert merge_parts([b"1", p, None]) == {"customer_id": "c1", "tags": [], "version": 1}
    assert merge_parts([b"1", p, b"{}"]) == {"customer_id": "c1", "tags": [], "version": 1}
    assert merge_parts([b"1", p, b" {}"]) == {"customer_id": "c1", "tags": [], "version": 1}


def test_an_absent_or_erased_projection_reads_as_none() -> None:
    assert merge_parts([None, None, None]) is None
    assert merge_parts([b"3", None, b'{"counters": {}}']) is None
