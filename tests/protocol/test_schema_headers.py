"""The one reserved-prefix header a publisher may set: tidings-schema-version."""

from __future__ import annotations

import pytest

from tidings.protocol import ErrorCode, RemoteProtocolError
from tidings.protocol import vocabulary as V
from tidings.protocol.codec import check_headers


def test_a_publisher_may_name_the_schema_version_and_nothing_else_reserved() -> None:
    check_headers({V.H_SCHEMA_VERSION: 2, "content-type": "application/json"}, published=True)
    check_headers({V.H_SCHEMA_VERSION: "2"}, published=True)
    for name in (V.H_SCHEMA, "TIDINGS-SCHEMA-VERSION", V.H_SCHEMA_ERROR, V.H_DLQ_REASON):
        with pytest.raises(RemoteProtocolError) as info:
            check_headers({name: "x"}, published=True)
        assert info.value.code == ErrorCode.INVALID_ARGUMENT
    check_headers({V.H_SCHEMA: "x"})  # the broker's own messages may carry it
