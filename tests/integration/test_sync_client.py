"""tidings.sync: the blocking client, used as Django/Flask code and scripts use
it: plain functions, plain threads, no event loop in the caller. Several
threads publish through one client at once; closing it leaves no thread.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from queuetools import FAST, WAIT

import tidings.sync
from tidings.client.errors import ConnectError, ConnectionClosedError, TimeoutError

THREADS = 8
PER_THREAD = 200


def _sync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tidings-sync")]


def test_publish_subscribe_request_from_plain_threads(broker: Any) -> None:
    with tidings.sync.connect(broker.url) as tc:
        with tc.subscribe("sync.>") as sub:
            errors: list[BaseException] = []

            def publisher(n: int) -> None:
                try:
                    for i in range(PER_THREAD):
                        tc.publish(f"sync.t{n}", f"{n}:{i}")
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)

            threads = [threading.Thread(target=publisher, args=(n,)) for n in range(THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(WAIT * 6)
            assert not errors
            tc.flush()
            got = [sub.next(timeout=WAIT).payload.decode() for _ in range(THREADS * PER_THREAD)]
        assert sorted(got) == sorted(f"{n}:{i}" for n in range(THREADS) for i in range(PER_THREAD))
        for n in range(THREADS):  # one thread's messages stay in its order
            mine = [g for g in got if g.startswith(f"{n}:")]
            assert mine == [f"{n}:{i}" for i in range(PER_THREAD)]

        # a responder in another plain thread
        with tc.subscribe("sync-svc.echo") as svc:
            def respond_once() -> None:
                m = svc.next(timeout=WAIT)
                assert m.reply is not None
                tc.publish(m.reply, m.payload.upper())

            t = threading.Thread(target=respond_once)
            t.start()
            assert tc.request("sync-svc.echo", b"hi", timeout=WAIT).payload == b"HI"
            t.join(WAIT)
    assert _sync_threads() == []


def test_messages_ends_after_its_timeout(broker: Any) -> None:
    with tidings.sync.connect(broker.url) as tc:
        with tc.subscribe("quiet.>") as sub:
            tc.publish("quiet.a", b"1")
            assert [m.payload for m in sub.messages(timeout=0.5)] == [b"1"]
            with pytest.raises(TimeoutError):
                sub.next(timeout=0.1)


def test_durable_consume_ack_nack_and_declares(broker: Any) -> None:
    with tidings.sync.connect(broker.url) as tc:
        tc.declare_queue("sync-jobs", bind=["sync-jobs.>"], max_deliveries=2, backoff_schedule=[0.01], **FAST)
        ack = tc.publish("sync-jobs.a", b"job")
        assert ack is not None
        with tc.consume("sync-jobs") as deliveries:
            d = deliveries.next(timeout=WAIT)
            assert (d.payload, d.delivery_count) == (b"job", 1)
            d.nack(error="ValueError: try again")
            d = deliveries.next(timeout=WAIT)
            assert d.delivery_count == 2
            d.reject("gave up", wait=True)
        assert tc.queue_info("sync-jobs")["depth"] == 0
        with tc.consume("sync-jobs.dlq") as dlq:
            d = dlq.next(timeout=WAIT)
            assert d.headers["tidings-last-error"] == "gave up"
            d.ack(wait=True)
        assert [q["name"] for q in tc.list_queues() if q["name"].startswith("sync-jobs")]
        tc.delete_queue("sync-jobs")


def test_close_is_idempotent_errors_after_are_clear_and_no_thread_leaks(broker: Any) -> None:
    before = set(threading.enumerate())
    tc = tidings.sync.connect(broker.url)
    tc.publish("x.y", b"1")
    tc.close()
    tc.close()
    with pytest.raises(ConnectionClosedError, match="the client was closed"):
        tc.publish("x.y", b"2")
    with pytest.raises(ConnectionClosedError, match="the client was closed"):
        tc.request("x.y", b"2")
    assert set(threading.enumerate()) <= before


def test_connect_error_leaves_no_thread() -> None:
    with pytest.raises(ConnectError):
        tidings.sync.connect("tidings://127.0.0.1:1", timeout=2)
    assert _sync_threads() == []


def test_json_codec_through_the_sync_client(broker: Any) -> None:
    """The sync client passes the codecs through: publish(json=...) and request(json=...)."""
    with tidings.sync.connect(broker.url) as tc:
        with tc.subscribe("sync-json.>") as sub:
            tc.publish("sync-json.order", json={"id": 7, "amount": 12.5})
            m = sub.next(timeout=WAIT)
            assert m.json() == {"id": 7, "amount": 12.5}
            assert m.content_type == "application/json"

        with tc.subscribe("sync-json-svc.double") as svc:
            def respond_once() -> None:
                m = svc.next(timeout=WAIT)
                assert m.reply is not None
                tc.publish(m.reply, json={"n": m.json()["n"] * 2})

            t = threading.Thread(target=respond_once)
            t.start()
            assert tc.request("sync-json-svc.double", json={"n": 21}, timeout=WAIT).json() == {"n": 42}
            t.join(WAIT)
