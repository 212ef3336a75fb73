"""`tidings queues` and `tidings dlq`: the admin commands for durable queues and dead-letter queues.

    tidings queues [--json]                       list queues: depth, in-flight, consumers, DLQ depth
    tidings queues declare NAME --bind PATTERN .. create a queue (or check an identical one exists)
    tidings queues update NAME --max-deliveries N --ack-deadline 30s ..   change settings in place
    tidings queues peek NAME [-n N]               show messages without consuming them
    tidings queues info|purge NAME
    tidings queues delete NAME [--keep-dlq]       delete a queue (and its dead-letter queue)
    tidings dlq ls|redrive|purge QUEUE            peek at, move back, or drop dead-lettered messages

They talk to a running broker through the client library with the options,
runner, exit statuses and JSON output of common.py (``--json`` prints the
broker's full answer for scripts). :func:`register` adds them to the
`tidings` parser (main.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any, Final

from tidings.cli.common import (
    BASE64_MARKER,
    add_bind_match,
    add_options,
    bind_entries,
    jsonable,
    print_json,
    runner,
    table,
    text_or_base64,
)

PAYLOAD_SHOWN: Final = 1000  # characters of a payload `dlq ls` prints before cutting it (--json has all)


# ----------------------------------------------------------------- output


def _shown(text: str) -> str:
    """``text`` safe for a terminal: control characters other than newline and
    tab appear as escapes, so a dead-lettered payload cannot drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _when(ms: Any) -> str:
    if type(ms) is not int:
        return "?"
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="milliseconds")


# ----------------------------------------------------------------- queues


async def _queues_ls(tc: Any, ns: argparse.Namespace) -> None:
    queues = await tc.list_queues()
    if ns.json:
        print_json(queues)
        return
    if not queues:
        print("no queues")
        return
    rows = [[q["name"], str(q["depth"]), str(q["in_flight"]), str(q["consumers"]),
             "-" if q.get("dlq_depth") is None else str(q["dlq_depth"])] for q in queues]
    print(table(rows, ["NAME", "DEPTH", "IN-FLIGHT", "CONSUMERS", "DLQ DEPTH"]))


#: declare flags -> queue settings (see QueueConfig); None values are not sent.
_DECLARE_SETTINGS: Final = ("ack_deadline", "max_deliveries", "backoff_initial", "backoff_multiplier",
                            "backoff_max", "backoff_jitter", "backoff_schedule", "dead_letter",
                            "message_ttl", "dead_letter_expired", "max_length", "overflow", "max_priority")


async def _queues_declare(tc: Any, ns: argparse.Namespace) -> None:
    settings = {k: getattr(ns, k) for k in _DECLARE_SETTINGS if getattr(ns, k) is not None}
    info = await tc.declare_queue(ns.name, bind=bind_entries(ns), **settings)
    if ns.json:
        print_json(info)
        return
    what = "created" if info.get("created") else "already exists with these settings,"
    bind = ", ".join(info.get("bind") or []) or "no subject"
    print(f"queue {info['name']} {what} bound to {bind}; dead-letter queue {info.get('dead_letter') or '-'}")


async def _queues_info(tc: Any, ns: argparse.Namespace) -> None:
    info = await tc.queue_info(ns.name)
    if ns.json:
        print_json(info)
        return
    conf = info.pop("config", {})
    for k, v in info.items():
        print(f"{k:>16}: {v}")
    print("          config:")
    for k, v in conf.items():
        print(f"{k:>24}: {v}")


async def _queues_peek(tc: Any, ns: argparse.Namespace) -> None:
    msgs = await tc.peek_queue(ns.name, limit=ns.limit, offset=ns.offset)
    # No depth (queue.info): it needs admin, and peeking needs only consume.
    title = (f"{ns.name}: {len(msgs)} message{'s' if len(msgs) != 1 else ''} from #{ns.offset + 1}, "
             "left in the queue" if msgs
             else f"{ns.name}: no messages from #{ns.offset + 1}")
    _print_messages(title, msgs, json=ns.json, key="queue", name=ns.name)


async def _queues_purge(tc: Any, ns: argparse.Namespace) -> None:
    n = await tc.purge_queue(ns.name)
    if ns.json:
        print_json({"queue": ns.name, "purged": n})
    else:
        print(f"purged {n} messages from {ns.name}")


async def _queues_delete(tc: Any, ns: argparse.Namespace) -> None:
    res = await tc.delete_queue(ns.name, keep_dlq=ns.keep_dlq)
    if ns.json:
        print_json(res)
        return
    print(f"deleted queue {res['deleted']} and its {res['messages']} messages")
    dl = res.get("dead_letter")
    if dl:
        print(f"deleted its dead-letter queue {dl['deleted']} and its {dl['messages']} messages")


#: update flags -> queue settings: the mutable ones (settings.QUEUE_IMMUTABLE are refused).
_UPDATE_SETTINGS: Final = ("ack_deadline", "max_deliveries", "backoff_initial", "backoff_multiplier",
                           "backoff_max", "backoff_jitter", "backoff_schedule", "message_ttl",
                           "dead_letter_expired", "max_length", "overflow")
UNSET: Final = "none"  # `--max-length none`, `--ttl none`: remove the limit


def seconds(text: str) -> Any:
    """A duration flag: seconds as a number or with a unit (500ms, 30s, 5m, 2h, 1d); "none" removes it."""
    t = text.strip().lower()
    if t == UNSET:
        return UNSET
    for unit, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0), ("d", 86400.0)):
        if t.endswith(unit):
            num, scale = t[:-len(unit)], mult
            break
    else:
        num, scale = t, 1.0
    try:
        value = float(num) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: seconds, or 500ms, 30s, 5m, 2h, 1d") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration cannot be negative")
    return value


def count_or_none(text: str) -> Any:
    """An integer flag that "none" removes (no limit)."""
    if text.strip().lower() == UNSET:
        return UNSET
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (or 'none')") from None


def changed(ns: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, Any]:
    """The settings an update command was given ("none" sent as nil)."""
    return {k: (None if v == UNSET else v) for k in keys if (v := getattr(ns, k)) is not None}


async def _queues_update(tc: Any, ns: argparse.Namespace) -> None:
    settings = changed(ns, _UPDATE_SETTINGS)
    if not settings:
        from tidings.client.errors import InvalidArgumentError
        raise InvalidArgumentError("queues update: give at least one setting to change (see --help)")
    info = await tc.update_queue(ns.name, **settings)
    if ns.json:
        print_json(info)
        return
    conf = info.get("config") or {}
    print(f"queue {info['name']} updated: " + ", ".join(f"{k}={conf.get(k)}" for k in settings))


def _schedule(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of seconds, e.g. 1,5,30") from None


def _add_queues(sp: Any) -> None:
    q = sp.add_parser(
        "queues", help="list, declare and inspect durable queues",
        description="Without a subcommand: list every queue with its depth (stored messages, in flight "
        "included), in-flight deliveries, consumers and the depth of its dead-letter queue. "
        "Declare a queue with `tidings queues declare NAME --bind PATTERN`.")
    add_options(q)
    q.set_defaults(fn=runner(_queues_ls))
    qs = q.add_subparsers(dest="queues_command", metavar="SUBCOMMAND")

    s = qs.add_parser("ls", help="list queues (the default)", description="List every queue.")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_queues_ls))

    s = qs.add_parser(
        "declare", help="create a durable queue",
        description="Create the durable queue NAME bound to the given subject patterns, so every publish "
        "to a matching subject is stored in it. Declaring a queue that exists with the same settings is a "
        "no-op; with different settings it fails (delete it first). Unset options keep the broker's "
        "defaults (max 5 deliveries, 30 s ack deadline, exponential backoff from 1 s, "
        "dead-letter queue NAME.dlq).")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--bind", action="append", metavar="PATTERN",
                   help="subject pattern to store in the queue (repeatable; `*` one token, `>` the rest)")
    add_bind_match(s, "queue")
    s.add_argument("--ack-deadline", type=float, metavar="S", help="seconds a delivery may stay unsettled")
    s.add_argument("--max-deliveries", type=int, metavar="N",
                   help="deliveries before the message is dead-lettered (0 = unlimited)")
    s.add_argument("--backoff-initial", type=float, metavar="S", help="delay before the first retry")
    s.add_argument("--backoff-multiplier", type=float, metavar="X", help="growth of the delay per attempt")
    s.add_argument("--backoff-max", type=float, metavar="S", help="largest retry delay")
    s.add_argument("--backoff-jitter", type=float, metavar="F", help="random +/- fraction of each delay")
    s.add_argument("--backoff-schedule", type=_schedule, metavar="S,S,..",
                   help="explicit retry delays per attempt (overrides the formula), e.g. 1,5,30")
    s.add_argument("--dead-letter", metavar="QUEUE", help="dead-letter queue (default NAME.dlq)")
    s.add_argument("--message-ttl", type=float, metavar="S", help="messages not delivered in time expire")
    s.add_argument("--dead-letter-expired", action="store_const", const=True,
                   help="move expired messages to the dead-letter queue instead of dropping them")
    s.add_argument("--max-length", type=int, metavar="N", help="most messages the queue holds")
    s.add_argument("--overflow", choices=["reject", "dead_letter_oldest"],
                   help="at max length: reject new publishes (QUEUE_FULL, default) or dead-letter the oldest")
    s.add_argument("--max-priority", type=int, metavar="N",
                   help="a priority queue: publishes carry a priority 0..N (1..9), higher delivered first")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_queues_declare))

    s = qs.add_parser(
        "update", help="change a queue's settings in place",
        description="Change settings of the queue NAME while it runs; they are stored and survive a "
        "restart. --ack-deadline applies to the next deliveries, --max-deliveries and --backoff-* to the "
        "next failure, --ttl to the next publishes, --max-length at once (with the dead_letter_oldest "
        "policy a lowered length moves the oldest messages to the dead-letter queue). Durations take "
        "a unit (500ms, 30s, 5m, 2h, 1d; plain numbers are seconds); 'none' removes a TTL or length "
        "limit. The bindings and the dead-letter queue cannot change in place (declare another queue).")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--ack-deadline", type=seconds, metavar="DURATION", help="how long a delivery may stay unsettled")
    s.add_argument("--max-deliveries", type=int, metavar="N",
                   help="deliveries before the message is dead-lettered (0 = unlimited)")
    s.add_argument("--backoff", "--backoff-initial", dest="backoff_initial", type=seconds, metavar="DURATION",
                   help="delay before the first retry")
    s.add_argument("--backoff-multiplier", type=float, metavar="X", help="growth of the delay per attempt")
    s.add_argument("--backoff-max", type=seconds, metavar="DURATION", help="largest retry delay")
    s.add_argument("--backoff-jitter", type=float, metavar="F", help="random +/- fraction of each delay")
    s.add_argument("--backoff-schedule", type=_schedule, metavar="S,S,..",
                   help="explicit retry delays per attempt in seconds (overrides the formula); '' clears it")
    s.add_argument("--ttl", "--message-ttl", dest="message_ttl", type=seconds, metavar="DURATION",
                   help="messages not delivered in time expire ('none': never)")
    s.add_argument("--dead-letter-expired", type=lambda t: t.lower() in ("1", "true", "yes", "on"),
                   metavar="BOOL", help="move expired messages to the dead-letter queue (true/false)")
    s.add_argument("--max-length", type=count_or_none, metavar="N", help="most messages the queue holds ('none')")
    s.add_argument("--overflow", choices=["reject", "dead_letter_oldest"], help="policy at max length")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_queues_update))

    s = qs.add_parser(
        "peek", help="show a queue's messages without consuming them",
        description="Print a queue's stored messages, oldest first (in flight included), with their "
        "subject, id, headers and payload (UTF-8 text, or base64 prefixed with "
        f"{BASE64_MARKER!r}). Nothing is delivered or consumed: the messages stay in the queue and "
        "their delivery counts do not change. Needs consume permission on the queue.")
    s.add_argument("name", metavar="NAME")
    s.add_argument("-n", "--limit", type=int, default=10, help="messages to show (1..10000, default 10)")
    s.add_argument("--offset", type=int, default=0, help="skip this many messages first")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_queues_peek))

    for name, fn, text in (("info", _queues_info, "show a queue's counters and settings"),
                           ("purge", _queues_purge, "drop every message of a queue")):
        s = qs.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        s.add_argument("name", metavar="NAME")
        add_options(s, leaf=True)
        s.set_defaults(fn=runner(fn))

    s = qs.add_parser("delete", help="delete a queue, its messages and its dead-letter queue",
                      description="Delete the queue NAME and its messages, and its dead-letter queue with its "
                      "messages unless --keep-dlq (a dead-letter queue another queue or stream also uses is "
                      "kept).")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--keep-dlq", action="store_true", help="keep the dead-letter queue and its messages")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_queues_delete))


# -------------------------------------------------------------------- dlq


async def _dlq_name(tc: Any, queue: str) -> str:
    """``queue`` itself if it is a dead-letter queue (of the broker's making or
    named as some queue's dead_letter), else the dead-letter queue of ``queue``."""
    queues = {q["name"]: q for q in await tc.list_queues()}
    q = queues.get(queue)
    if q is None:
        from tidings.client.errors import NotFoundError
        raise NotFoundError(f"no queue named {queue!r}")
    if q.get("is_dlq") or any(o.get("dead_letter") == queue for o in queues.values()):
        return queue
    if not q.get("dead_letter"):
        from tidings.client.errors import NotFoundError
        raise NotFoundError(f"queue {queue!r} has no dead-letter queue")
    return str(q["dead_letter"])


def _print_messages(title: str, msgs: list[dict[str, Any]], *, json: bool, key: str, name: str) -> None:
    """Messages as `dlq ls` and `queues peek` print them: ``--json`` as ``{key: name,
    "messages": [...]}`` with each payload's encoding, else a block per message under ``title``."""
    if json:
        for m in msgs:  # say how the payload is encoded, so a text payload starting "base64:" is not misread
            text = text_or_base64(m["payload"])
            binary = text.startswith(BASE64_MARKER) and not m["payload"].startswith(BASE64_MARKER.encode())
            m["payload"] = text[len(BASE64_MARKER):] if binary else text
            m["payload_encoding"] = "base64" if binary else "utf-8"
        print_json({key: name, "messages": msgs})
        return
    print(title)
    for m in msgs:
        h = dict(m.get("headers") or {})
        tid = {k[len("tidings-"):]: h.pop(k) for k in list(h) if k.startswith("tidings-")}
        print()
        msg_id = f"  msg_id {_shown(m['msg_id'])}" if m.get("msg_id") else ""
        print(f"id {m['id']}  subject {m['subject']}{msg_id}")
        if "dlq-reason" in tid or "dlq-source" in tid:
            print(f"  reason {tid.get('dlq-reason', '-')}  source {tid.get('dlq-source', '-')}  "
                  f"deliveries {tid.get('delivery-count', m.get('deliveries', 0))}  "
                  f"dead-lettered {_when(tid.get('dead-lettered-at'))}  published {_when(m.get('published_ms'))}")
        else:
            print(f"  deliveries {m.get('deliveries', 0)}  published {_when(m.get('published_ms'))}")
        if tid.get("last-error"):
            print(f"  last error: {_shown(str(tid['last-error']))}")
        if h:
            print("  headers: " + ", ".join(f"{k}={_shown(str(jsonable(v)))}" for k, v in h.items()))
        text = _shown(text_or_base64(m["payload"]))
        if len(text) > PAYLOAD_SHOWN:
            text = f"{text[:PAYLOAD_SHOWN]}... ({len(m['payload'])} bytes; --json shows all)"
        print(f"  payload: {text}")


async def _dlq_ls(tc: Any, ns: argparse.Namespace) -> None:
    name = await _dlq_name(tc, ns.queue)
    msgs = await tc.dlq_list(name, limit=ns.limit, offset=ns.offset)
    total = 0 if ns.json else (await tc.queue_info(name))["depth"]
    title = f"{name}: {total} messages" + (f", showing {len(msgs)} from #{ns.offset + 1}" if msgs else "")
    _print_messages(title, msgs, json=ns.json, key="dlq", name=name)


async def _dlq_redrive(tc: Any, ns: argparse.Namespace) -> None:
    name = await _dlq_name(tc, ns.queue)
    args: dict[str, Any] = {"name": name}
    if ns.count is not None:
        args["count"] = ns.count
    if ns.to is not None:
        args["to"] = ns.to
    res = await tc.call("dlq.redrive", args, timeout=max(ns.timeout, 60.0))
    if ns.json:
        print_json({"dlq": name, **res})
        return
    dest = ns.to or "their source queues"
    print(f"redrove {res['redriven']} messages from {name} to {dest}")
    if res.get("skipped"):
        print(f"{res['skipped']} messages stayed in {name}: their source queue no longer exists (use --to)")


async def _dlq_purge(tc: Any, ns: argparse.Namespace) -> None:
    name = await _dlq_name(tc, ns.queue)
    n = await tc.dlq_purge(name)
    if ns.json:
        print_json({"dlq": name, "purged": n})
    else:
        print(f"purged {n} messages from {name}")


def _add_dlq(sp: Any) -> None:
    d = sp.add_parser(
        "dlq", help="inspect, redrive and purge dead-letter queues",
        description="QUEUE is a dead-letter queue, or a queue whose dead-letter queue is meant "
        "(`tidings dlq ls orders` and `tidings dlq ls orders.dlq` are the same).")
    add_options(d)
    ds = d.add_subparsers(dest="dlq_command", metavar="SUBCOMMAND", required=True)

    s = ds.add_parser("ls", help="peek at dead-lettered messages (they stay)",
                      description="Print dead-lettered messages, oldest first, with the reason, source "
                      "queue, delivery count and last error; payloads print as UTF-8 text, or as base64 "
                      f"prefixed with {BASE64_MARKER!r} when they are not text. They stay in the queue.")
    s.add_argument("queue", metavar="QUEUE")
    s.add_argument("--limit", type=int, default=20, help="messages to show (1..10000, default 20)")
    s.add_argument("--offset", type=int, default=0, help="skip this many messages first")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_dlq_ls))

    s = ds.add_parser("redrive", help="move dead-lettered messages back to be processed again",
                      description="Move messages (oldest first) from the dead-letter queue back to the queue "
                      "each came from, or to --to; their delivery counts start again.")
    s.add_argument("queue", metavar="QUEUE")
    s.add_argument("--count", type=int, help="move at most this many (default all)")
    s.add_argument("--to", metavar="QUEUE", help="move them to this queue instead of their source")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_dlq_redrive))

    s = ds.add_parser("purge", help="drop every dead-lettered message", description="Drop every message "
                      "of the dead-letter queue.")
    s.add_argument("queue", metavar="QUEUE")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_dlq_purge))


def register(sp: Any) -> None:
    """Add the `queues` and `dlq` commands to the `tidings` subparsers ``sp``."""
    _add_queues(sp)
    _add_dlq(sp)
