"""The error-code registry is a wire contract: every code has exactly one
entry, codes are unique and stable, and each says whether a retry can help.

docs/PROTOCOL.md holds the registry as a table; regenerate it with
``PYTHONPATH=. python tests/protocol/test_error_registry.py``.
"""

from __future__ import annotations

import pathlib

import pytest

from tidings.protocol import REGISTRY, ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError, describe
from tidings.protocol.errors import ErrorInfo


def test_codes_are_unique() -> None:
    # an IntEnum silently turns a duplicate value into an alias; catch that
    values = [m.value for m in ErrorCode.__members__.values()]
    assert len(values) == len(set(values))
    assert len(ErrorCode.__members__) == len(list(ErrorCode))


def test_every_code_has_an_entry_and_nothing_else_does() -> None:
    assert set(REGISTRY) == {int(c) for c in ErrorCode}
    for code in ErrorCode:
        info = REGISTRY[code]
        assert isinstance(info, ErrorInfo)
        assert info.code is code
        assert type(info.retriable) is bool
        assert isinstance(info.description, str) and len(info.description) > 10
        assert info.description.endswith(".")


def test_codes_are_positive_and_fit_in_a_small_int() -> None:
    for code in ErrorCode:
        assert 0 < code < 128  # one msgpack byte on the wire; 0 means "no error" in CONFIRM/ACK results


def test_stable_numbers() -> None:
    # codes never change meaning; this pins the ones clients act on
    assert ErrorCode.PROTOCOL_ERROR == 1
    assert ErrorCode.FRAME_TOO_LARGE == 2
    assert ErrorCode.UNSUPPORTED_VERSION == 3
    assert ErrorCode.BAD_STATE == 4
    assert ErrorCode.NO_RESPONDERS == 20
    assert ErrorCode.NOT_FOUND == 30
    assert ErrorCode.QUEUE_FULL == 33
    assert ErrorCode.SLOW_CONSUMER == 40
    assert ErrorCode.INTERNAL == 43


@pytest.mark.parametrize("code,retriable", [
    (ErrorCode.PROTOCOL_ERROR, False), (ErrorCode.AUTH_FAILED, False), (ErrorCode.NOT_FOUND, False),
    (ErrorCode.TIMEOUT, True), (ErrorCode.QUEUE_FULL, True), (ErrorCode.STORAGE_ERROR, True),
    (ErrorCode.SHUTTING_DOWN, True), (ErrorCode.OVERLOADED, True),
])
def test_retriable_flags(code: ErrorCode, retriable: bool) -> None:
    assert REGISTRY[code].retriable is retriable


def test_describe_unknown_code_is_internal() -> None:
    assert describe(ErrorCode.NOT_FOUND) is REGISTRY[ErrorCode.NOT_FOUND]
    assert describe(9999).code is ErrorCode.INTERNAL
    assert describe(0).code is ErrorCode.INTERNAL


def test_exception_tree_and_attributes() -> None:
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)
    e = RemoteProtocolError("bad", ErrorCode.INVALID_SUBJECT, fatal=True, rid=7)
    assert (e.message, e.code, e.fatal, e.rid) == ("bad", ErrorCode.INVALID_SUBJECT, True, 7)
    assert str(e) == "bad"
    d = LocalProtocolError("oops")
    assert (d.code, d.fatal, d.rid) == (ErrorCode.PROTOCOL_ERROR, False, 0)


DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def error_table() -> str:
    """The markdown table of docs/PROTOCOL.md section "Error codes", built from REGISTRY."""
    rows = ["| Code | Name | Retriable | Description |", "| ---: | --- | --- | --- |"]
    for code, info in sorted(REGISTRY.items()):
        rows.append(f"| {code} | `{info.code.name}` | {'yes' if info.retriable else 'no'} | {info.description} |")
    return "\n".join(rows)


def test_protocol_doc_error_table_matches_registry() -> None:
    text = DOC.read_text(encoding="utf-8")
    start, end = "<!-- error-table:start -->\n", "\n<!-- error-table:end -->"
    assert start in text and end in text
    documented = text[text.index(start) + len(start):text.index(end)]
    assert documented == error_table(), "regenerate the table: see this module's docstring"


if __name__ == "__main__":
    print(error_table())
