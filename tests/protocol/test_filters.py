"""The content-filter compiler (protocol/filters.py): each operator, any-of,
AND across keys, header vs payload keys, and bad filters named by key and operator."""

from __future__ import annotations

from typing import Any

import pytest

from tidings.protocol.filters import MISSING, FilterError, compile_filter


def hdr(spec: dict[str, Any], headers: dict[str, Any] | None) -> bool:
    return compile_filter(spec).matches(headers)


def data(spec: dict[str, Any], payload: Any) -> bool:
    return compile_filter({"data": spec}).matches(None, payload)


def test_exact_strings_are_any_of_and_read_bytes_headers():
    f = {"region": ["eu-west", "eu-north"]}
    assert hdr(f, {"region": "eu-west"}) and hdr(f, {"region": b"eu-north"})
    assert not hdr(f, {"region": "us-east"}) and not hdr(f, {}) and not hdr(f, None)


def test_exact_numbers_bools_and_null():
    assert data({"n": [100]}, {"n": 100}) and data({"n": [100]}, {"n": 100.0})
    assert not data({"n": [100]}, {"n": 101}) and not data({"n": [1]}, {"n": True})
    assert hdr({"n": [100]}, {"n": "100"}) and hdr({"n": [7]}, {"n": 7})
    assert data({"ok": [True]}, {"ok": True}) and not data({"ok": [True]}, {"ok": 1})
    assert data({"x": [None]}, {"x": None}) and not data({"x": [None]}, {})


def test_prefix_and_suffix():
    assert hdr({"r": [{"prefix": "eu-"}]}, {"r": "eu-west"})
    assert not hdr({"r": [{"prefix": "eu-"}]}, {"r": "us-east"})
    assert not hdr({"r": [{"prefix": "eu-"}]}, {"r": 5})
    assert data({"f": [{"suffix": ".png"}]}, {"f": "a.png"}) and not data({"f": [{"suffix": ".png"}]}, {"f": "a.jpg"})


def test_anything_but_value_list_and_prefix():
    assert hdr({"s": [{"anything-but": "cancelled"}]}, {"s": "placed"})
    assert not hdr({"s": [{"anything-but": "cancelled"}]}, {"s": "cancelled"})
    assert not hdr({"s": [{"anything-but": ["a", "b"]}]}, {"s": "b"})
    assert hdr({"s": [{"anything-but": ["a", "b"]}]}, {"s": "c"})
    assert not hdr({"s": [{"anything-but": {"prefix": "test-"}}]}, {"s": "test-1"})
    assert hdr({"s": [{"anything-but": {"prefix": "test-"}}]}, {"s": "prod-1"})
    assert not hdr({"s": [{"anything-but": "x"}]}, {})  # a missing key is not "anything but"
    assert data({"n": [{"anything-but": [1, 2]}]}, {"n": 3}) and not data({"n": [{"anything-but": [1, 2]}]}, {"n": 2})


def test_numeric_ranges():
    gt = {"amount": [{"numeric": [">", 100]}]}
    assert data(gt, {"amount": 100.5}) and not data(gt, {"amount": 100}) and not data(gt, {"amount": "x"})
    band = {"amount": [{"numeric": [">=", 0, "<", 10]}]}
    assert data(band, {"amount": 0}) and data(band, {"amount": 9.99})
    assert not data(band, {"amount": 10}) and not data(band, {"amount": -1}) and not data(band, {})
    assert not data(band, {"amount": True})  # a bool is not a number
    assert hdr({"n": [{"numeric": ["=", 5]}]}, {"n": "5"}) and hdr({"n": [{"numeric": ["<=", 5]}]}, {"n": 5})


def test_exists():
    assert hdr({"trace": [{"exists": True}]}, {"trace": ""})
    assert not hdr({"trace": [{"exists": True}]}, {})
    assert hdr({"trace": [{"exists": False}]}, None) and not hdr({"trace": [{"exists": False}]}, {"trace": "x"})


def test_mixed_any_of_and_and_across_keys_and_data():
    f = compile_filter({"region": [{"prefix": "eu-"}, "global"],
                        "data": {"amount": [{"numeric": [">", 100]}], "status": ["placed"]}})
    assert f.needs_data
    assert f.matches({"region": "eu-1"}, {"amount": 200, "status": "placed"})
    assert f.matches({"region": "global"}, {"amount": 200, "status": "placed"})
    assert not f.matches({"region": "us-1"}, {"amount": 200, "status": "placed"})
    assert not f.matches({"region": "eu-1"}, {"amount": 50, "status": "placed"})
    assert not f.matches({"region": "eu-1"}, {"amount": 200, "status": "paid"})
    assert not f.matches({"region": "eu-1"}, MISSING)  # payload not readable: its fields are missing
    assert not f.matches({"region": "eu-1"}, [1, 2])  # not an object
    assert not compile_filter({"region": ["eu"]}).needs_data


@pytest.mark.parametrize("spec, words", [
    ({}, ["non-empty"]),
    ([], ["map"]),
    ({"region": "eu"}, ["'region'", "list"]),
    ({"region": []}, ["'region'", "empty"]),
    ({"region": [{"prefix": 5}]}, ["'region'", "'prefix'", "string"]),
    ({"region": [{"suffix": None}]}, ["'region'", "'suffix'"]),
    ({"region": [{"startswith": "x"}]}, ["'region'", "unknown operator", "'startswith'"]),
    ({"region": [{"prefix": "a", "suffix": "b"}]}, ["'region'", "exactly one operator"]),
    ({"amount": [{"numeric": [">"]}]}, ["'amount'", "'numeric'"]),
    ({"amount": [{"numeric": ["!", 1]}]}, ["'amount'", "'numeric'", "'!'"]),
    ({"amount": [{"numeric": [">", "1"]}]}, ["'amount'", "'numeric'", "number"]),
    ({"amount": [{"numeric": ["=", 1, "<", 3]}]}, ["'amount'", "'='"]),
    ({"x": [{"exists": "yes"}]}, ["'x'", "'exists'"]),
    ({"x": [{"anything-but": []}]}, ["'x'", "'anything-but'"]),
    ({"x": [{"anything-but": {"suffix": "a"}}]}, ["'x'", "'anything-but'"]),
    ({"x": [{"anything-but": [{"prefix": "a"}]}]}, ["'x'", "'anything-but'"]),
    ({"x": [[1]]}, ["'x'", "condition"]),
    ({"data": {}}, ["'data'"]),
    ({"data": {"amount": 5}}, ["'amount'", "list"]),
    ({"k%d" % i: ["v"] for i in range(40)}, ["at most"]),
])
def test_bad_filters_name_the_key_and_operator(spec: Any, words: list[str]):
    with pytest.raises(FilterError) as info:
        compile_filter(spec)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
