"""A frame that decodes to far more objects than bytes (issue 10.18): the
sender gets a PROTOCOL_ERROR for that frame, its connection stays in sync,
and the broker keeps serving everyone (its memory does not jump by the
~70 MB such a frame used to cost)."""

from __future__ import annotations

import struct

from tidings.client import connect
from tidings.protocol import ErrorCode
from tidings.protocol import frames as F
from rawclient import RawClient, frame_bytes
from test_hostile_clients import WAIT, assert_control_works

MIB = 1024 * 1024


async def test_a_frame_of_empty_arrays_is_refused_and_the_broker_keeps_serving(broker) -> None:
    n = MIB - 16
    body = b"\x92\x0a\xdd" + struct.pack(">I", n) + b"\x90" * n  # PUB with a million empty "messages"
    async with connect(broker.url) as control:
        before = broker.rss_bytes()
        async with RawClient.open(broker.host, broker.port) as rc:
            await rc.hello()
            for _ in range(3):
                await rc.send_raw(frame_bytes(body))
                err = await rc.read_until(lambda f: isinstance(f, F.Err), WAIT)
                assert err.code == ErrorCode.PROTOCOL_ERROR and "arrays and maps" in err.message
            await rc.ping()  # the same connection is still usable
        await assert_control_works(control, "dense")
        assert broker.rss_bytes() - before < 40 * MIB
    assert broker.alive()
