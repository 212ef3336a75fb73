"""The schema compatibility checker (broker/schemas/compat.py): each rule, each mode,
and soundness against real validation (hypothesis: whatever it calls compatible
never refuses an instance the writer accepted)."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidings.broker.schemas.compat import MODES, can_read, check, pairs

OBJ: dict[str, Any] = {"type": "object", "properties": {"amount": {"type": "number"}, "id": {"type": "string"}},
                       "required": ["id"]}
CLOSED = {**OBJ, "additionalProperties": False}


def with_prop(base: dict[str, Any], name: str, schema: Any) -> dict[str, Any]:
    return {**base, "properties": {**base["properties"], name: schema}}


def without_prop(base: dict[str, Any], name: str) -> dict[str, Any]:
    return {**base, "properties": {k: v for k, v in base["properties"].items() if k != name}}


# (writer, reader, expected reasons: substrings, [] = compatible)
CASES = [
    ("type change", OBJ, with_prop(OBJ, "amount", {"type": "string"}),
     ["/properties/amount: type changed from number to string"]),
    ("type widened", with_prop(OBJ, "amount", {"type": "integer"}), OBJ, []),
    ("type narrowed", OBJ, with_prop(OBJ, "amount", {"type": "integer"}),
     ["/properties/amount: type narrowed from number to integer"]),
    ("required added", OBJ, {**OBJ, "required": ["id", "amount"]}, ["/properties/amount: required field added"]),
    ("required removed", {**OBJ, "required": ["id", "amount"]}, OBJ, []),
    ("property added to a closed writer", CLOSED, with_prop(CLOSED, "note", {"type": "string"}), []),
    ("property added to an open writer", OBJ, with_prop(OBJ, "note", {"type": "string"}),
     ["/properties/note: property added while the writer's additionalProperties is open"]),
    ("property removed, reader closed", CLOSED, without_prop(CLOSED, "amount"),
     ["/properties/amount: property removed while additionalProperties is false"]),
    ("property removed, reader open", CLOSED, without_prop(OBJ, "amount"), []),
    ("additionalProperties closed", OBJ, CLOSED, ["additionalProperties closed"]),
    ("enum widened", {"enum": ["a", "b"]}, {"enum": ["a", "b", "c"]}, []),
    ("enum narrowed", {"enum": ["a", "b"]}, {"enum": ["a"]}, ["enum narrowed: 'b' no longer allowed"]),
    ("enum added", {"type": "string"}, {"enum": ["a"]}, ["enum added"]),
    ("minimum tightened", {"type": "number", "minimum": 0}, {"type": "number", "minimum": 1},
     ["minimum tightened from 0 to 1"]),
    ("minimum loosened", {"type": "number", "minimum": 1}, {"type": "number", "minimum": 0}, []),
    ("exclusive at the same bound", {"type": "number", "minimum": 1}, {"type": "number", "exclusiveMinimum": 1},
     ["minimum tightened from 1 to 1 (exclusive)"]),
    ("maximum added", {"type": "number"}, {"type": "number", "maximum": 9}, ["maximum 9 added"]),
    ("maxLength tightened", {"type": "string", "maxLength": 10}, {"type": "string", "maxLength": 5},
     ["maxLength tightened from 10 to 5"]),
    ("pattern added", {"type": "string"}, {"type": "string", "pattern": "^a"}, ["pattern '^a' added or changed"]),
    ("nested object", {"type": "object", "properties": {"a": OBJ}},
     {"type": "object", "properties": {"a": with_prop(OBJ, "id", {"type": "integer"})}},
     ["/properties/a/properties/id: type changed from string to integer"]),
    ("array items", {"type": "array", "items": {"type": "integer"}}, {"type": "array", "items": {"type": "string"}},
     ["/items: type changed from integer to string"]),
    ("minItems added", {"type": "array"}, {"type": "array", "minItems": 1}, ["minItems tightened from 0 to 1"]),
    ("annotations only", {**OBJ, "title": "x"}, {**OBJ, "description": "y"}, []),
    ("unknown construct unchanged", {"anyOf": [{"type": "string"}, {"type": "null"}]},
     {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "t"}, []),
    ("unknown construct changed", {"anyOf": [{"type": "string"}]}, {"anyOf": [{"type": "string"}, {"type": "null"}]},
     ["anyOf changed"]),
    ("false reader", OBJ, False, ["no value is allowed"]),
]


@pytest.mark.parametrize("writer,reader,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_rule(writer: Any, reader: Any, expected: list[str]) -> None:
    reasons = can_read(reader, writer)
    if not expected:
        assert reasons == []
    for e in expected:
        assert any(e in r for r in reasons), (e, reasons)


def test_modes_pick_the_direction_and_the_history() -> None:
    v1 = {"enum": ["a"]}
    v2 = {"enum": ["a", "b"]}  # backward yes (reads v1 data), forward no (v1 cannot read "b")
    assert check([v1], v2, "backward") == []
    assert check([v1], v2, "forward") == ["forward: /: enum narrowed: 'b' no longer allowed"]
    assert check([v1], v2, "full") == ["full (forward): /: enum narrowed: 'b' no longer allowed"]
    assert check([v1], v2, "none") == []
    # transitive: v3 reads v2's data but not v1's
    h = [{"type": "integer"}, {"type": "integer", "minimum": 0}]
    v3 = {"type": "integer", "minimum": 0}
    assert check(h, v3, "backward") == []
    assert check(h, v3, "backward_transitive") == ["backward: /: minimum 0 added (against version 1)"]
    assert check([], v3, "full_transitive") == []
    with pytest.raises(ValueError):
        pairs("sideways")
    assert set(MODES) == {"none", "backward", "forward", "full", "backward_transitive", "forward_transitive",
                          "full_transitive"}


# --- soundness: "compatible" is never wrong ------------------------------------------------

LEAF = st.sampled_from([
    {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": ["string", "null"]},
    {"type": "integer", "minimum": 0}, {"type": "integer", "maximum": 5}, {"enum": ["a", "b"]}, {"enum": ["a"]},
    {"type": "string", "maxLength": 2}, {"type": "string", "minLength": 1}, True,
])
NAMES = st.sampled_from(["a", "b", "c"])
SCHEMA = st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(NAMES, LEAF, max_size=3),
                                "required": st.lists(NAMES, max_size=2, unique=True),
                                "additionalProperties": st.sampled_from([True, False, {"type": "integer"}])})
VALUE = st.one_of(st.none(), st.booleans(), st.integers(-3, 7), st.floats(-3, 7, allow_nan=False),
                  st.sampled_from(["", "a", "b", "abc"]))
INSTANCE = st.dictionaries(NAMES, VALUE, max_size=3)


@settings(max_examples=300, deadline=None)
@given(writer=SCHEMA, reader=SCHEMA, instances=st.lists(INSTANCE, min_size=1, max_size=20))
def test_compatible_means_every_writer_instance_is_readable(writer: Any, reader: Any, instances: list[Any]) -> None:
    if can_read(reader, writer):
        return  # refused: conservative refusals are allowed
    w = jsonschema_rs.Draft202012Validator(writer)
    r = jsonschema_rs.Draft202012Validator(reader)
    for inst in instances:
        if w.is_valid(inst):
            assert r.is_valid(inst), (writer, reader, inst)
