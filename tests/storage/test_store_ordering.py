"""One transaction, many operations: the end state equals running them in submission order."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidings.broker.durable.store import (
    DeleteMessages,
    DeleteQueue,
    MoveMessages,
    PurgeQueue,
    PutMessages,
    PutQueue,
    SqliteStore,
    StorageError,
    StoredMessage,
    UpdateMessages,
)


def make_row(queue: str, id: int, *, payload: bytes | None = None, available_ms: int = 1_000,
             headers: dict[str, Any] | None = None) -> StoredMessage:
    # The `row` fixture's rows, for code that cannot take fixtures (hypothesis examples).
    return StoredMessage(queue, id, f"subj.{queue}", payload if payload is not None else f"{queue}:{id}".encode(),
                         headers, None, 500, available_ms)


async def _all_in_one_batch(store: SqliteStore, ops: list[Any]) -> list[Exception | None]:
    """Queue every op before the actor runs, then let it commit them; return the outcomes."""
    outcomes: list[Exception | None] = [None] * len(ops)
    done = [anyio.Event() for _ in ops]
    for i, op in enumerate(ops):
        def on_done(error: Exception | None, i: int = i) -> None:
            outcomes[i] = error
            done[i].set()
        op.on_done = on_done
        store.submit_nowait(op)
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        for ev in done:
            await ev.wait()
        await store.close()
    return outcomes


async def _state(path: str) -> dict[tuple[str, int], tuple[int, int]]:
    store = SqliteStore(path)
    await store.open()
    try:
        out = {}
        for q in ("a", "b"):
            for m in await store.load_messages(q, limit=10_000):
                out[(m.queue, m.id)] = (m.available_ms, m.deliveries)
        return out
    finally:
        await store.close()


async def test_put_then_delete_in_one_batch_ends_deleted(open_store, row):
    async with open_store(run=False) as store:
        outcomes = await _all_in_one_batch(store, [
            PutMessages([row("a", 1), row("a", 2)]),
            DeleteMessages("a", [1]),
            UpdateMessages("a", [(2, 5_000, 1, "boom")]),
        ])
        assert outcomes == [None, None, None] and store.commits == 1
    assert await _state(store.path) == {("a", 2): (5_000, 1)}


async def test_delete_then_put_in_one_batch_ends_present(open_store, row):
    async with open_store() as store:
        await store.write(PutMessages([row("a", 1, available_ms=1)]))
    async with open_store(run=False) as store:
        outcomes = await _all_in_one_batch(store, [
            DeleteMessages("a", [1]),
            PutMessages([row("a", 1, available_ms=2)]),
            PutMessages([row("a", 3)]),
        ])
        assert outcomes == [None, None, None] and store.commits == 1
    assert await _state(store.path) == {("a", 1): (2, 0), ("a", 3): (1_000, 0)}


async def test_queue_ops_keep_their_place(open_store, row):
    async with open_store(run=False) as store:
        outcomes = await _all_in_one_batch(store, [
            PutQueue("a", {"max_deliveries": 5}, 10),
            PutMessages([row("a", 1), row("b", 1)]),
            PurgeQueue("a"),
            PutMessages([row("a", 2)]),
            PutQueue("b", {}, 11),
            DeleteQueue("b"),
            PutQueue("a", {"max_deliveries": 7}, 99),
        ])
        assert outcomes == [None] * 7 and store.commits == 1
    assert await _state(store.path) == {("a", 2): (1_000, 0)}
    async with open_store() as store:
        assert await store.load_queues() == [("a", {"max_deliveries": 7}, 10)]  # created_ms kept


async def test_move_to_dead_letter_queue(open_store, row):
    async with open_store() as store:
        await store.write(PutMessages([row("a", i, headers={"k": "v"}) for i in (1, 2, 3)]))
        dlq_rows = [make_row("a.dlq", 100 + i, payload=f"a:{i}".encode(),
                             headers={"k": "v", "x-dlq-reason": "max_deliveries", "x-deliveries": 5})
                    for i in (1, 2)]
        await store.write(MoveMessages("a", [(1, dlq_rows[0]), (2, dlq_rows[1])]))
        assert [m.id for m in await store.load_messages("a")] == [3]
        moved = await store.list_messages("a.dlq")
        assert moved == dlq_rows
        assert await store.max_message_id() == 102


async def test_move_is_atomic(open_store, row):
    """If any inserted row clashes, no source row is deleted either."""
    async with open_store() as store:
        await store.write(PutMessages([row("a", 1), row("a", 2), row("a.dlq", 51)]))
        op = MoveMessages("a", [(1, make_row("a.dlq", 50)), (2, make_row("a.dlq", 51))])
        try:
            await store.write(op)
        except StorageError:
            pass
        else:
            raise AssertionError("the clashing move committed")
        assert [m.id for m in await store.load_messages("a")] == [1, 2]
        assert [m.id for m in await store.load_messages("a.dlq")] == [51]


# --- property: any mix of ops in one batch == the ops one by one -----------------

QUEUES = st.sampled_from(["a", "b"])
IDS = st.integers(1, 8)


@st.composite
def ops(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["put", "put", "delete", "update", "move", "purge"]))
    q = draw(QUEUES)
    if kind == "put":
        return kind, (q, draw(st.lists(IDS, min_size=1, max_size=3, unique=True)))
    if kind == "delete":
        return kind, (q, draw(st.lists(IDS, min_size=1, max_size=3)))
    if kind == "update":
        return kind, (q, draw(st.lists(st.tuples(IDS, st.integers(0, 9)), min_size=1, max_size=3)))
    if kind == "move":
        olds = draw(st.lists(IDS, min_size=1, max_size=2, unique=True))
        news = draw(st.lists(st.tuples(QUEUES, IDS), min_size=len(olds), max_size=len(olds), unique=True))
        news = [n for n in news if n not in {(q, o) for o in olds}]  # (a key is never moved onto itself)
        return kind, (q, list(zip(olds, news)))
    return kind, (q,)


def _model(spec: list[tuple[str, Any]], state: dict[tuple[str, int], tuple[int, int]]) -> list[bool]:
    """Apply ops one at a time, each atomically, skipping those that would fail. Returns ok flags."""
    oks = []
    for kind, args in spec:
        new = dict(state)
        ok = True
        if kind == "put":
            q, ids = args
            for i in ids:
                ok = ok and (q, i) not in new
                new[(q, i)] = (1_000, 0)
        elif kind == "delete":
            for i in args[1]:
                new.pop((args[0], i), None)
        elif kind == "update":
            for i, avail in args[1]:
                if (args[0], i) in new:
                    new[(args[0], i)] = (avail, 3)
        elif kind == "move":
            q, moves = args
            olds = {(q, o) for o, _ in moves}
            for _, key in moves:  # the inserts happen before the deletes (see batch.py)
                ok = ok and key not in new and key not in olds
                new[key] = (7, 0)
            for key in olds:
                new.pop(key, None)
        else:
            new = {k: v for k, v in new.items() if k[0] != args[0]}
        oks.append(ok)
        if ok:
            state.clear()
            state.update(new)
    return oks


def _op(kind: str, args: Any) -> Any:
    if kind == "put":
        return PutMessages([make_row(args[0], i) for i in args[1]])
    if kind == "delete":
        return DeleteMessages(args[0], list(args[1]))
    if kind == "update":
        return UpdateMessages(args[0], [(i, avail, 3, "e") for i, avail in args[1]])
    if kind == "move":
        return MoveMessages(args[0], [(o, make_row(k[0], k[1], available_ms=7)) for o, k in args[1]])
    return PurgeQueue(args[0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial=st.lists(st.tuples(QUEUES, IDS), unique=True, max_size=6),
       spec=st.lists(ops(), min_size=1, max_size=25))
def test_one_batch_equals_ops_in_order(initial: list[tuple[str, int]], spec: list[tuple[str, Any]]) -> None:
    state = {k: (1_000, 0) for k in initial}
    expected_ok = _model(spec, state)

    async def main(path: str) -> None:
        store = SqliteStore(path)
        await store.open()
        if initial:
            store.submit_nowait(PutMessages([make_row(q, i) for q, i in initial]))
            async with anyio.create_task_group() as tg:
                await tg.start(store.run)
                await store.close()
            store = SqliteStore(path)
            await store.open()
        outcomes = await _all_in_one_batch(store, [_op(k, a) for k, a in spec])
        assert [e is None for e in outcomes] == expected_ok
        if all(expected_ok):
            assert store.commits == 1  # really one transaction, not rescued by retries
        assert await _state(path) == state

    with tempfile.TemporaryDirectory() as d:
        anyio.run(main, str(Path(d) / "tidings.db"))
