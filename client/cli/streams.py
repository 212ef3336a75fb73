"""`tidings streams`: the admin commands for streams and their consumer groups.

    tidings streams [--json]                      partitions (first/next offset) and consumer groups
                                                  (members, assignments, committed offsets, lag)
    tidings streams declare NAME --partitions P --bind PATTERN ..
                         [--max-age S --max-messages N --max-bytes N ...]
    tidings streams update NAME --max-age 7d --max-messages N ..   change settings in place
    tidings streams info|trim NAME
    tidings streams delete NAME [--keep-dlq]      delete a stream, its groups (and its dead-letter queue)
    tidings streams groups NAME                   consumer groups: members, partitions, offsets, lag
    tidings streams groups NAME delete GROUP [--force]   delete a group and its committed offsets
    tidings streams read NAME [--partition P] [--from earliest|latest|OFFSET|TIME] [--follow] [-n N]

They talk to a running broker through the client library with the options,
runner, exit statuses and JSON output of common.py, like the queue commands
(queues.py). :func:`register` adds them to the `tidings` parser (main.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
from typing import Any, Final

from tidings.cli.common import (add_bind_match, add_options, bind_entries, payload_json, print_json, printable,
                                 runner, table)
from tidings.cli.queues import changed, count_or_none, seconds

# --from 5m (or --from=-5m): a time this long ago (s, m, h, d)
_AGO: Final = re.compile(r"-?(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}

#: declare flags -> stream settings (see StreamConfig); None values are not sent.
_DECLARE_SETTINGS: Final = ("max_age", "max_messages", "max_bytes", "max_deliveries", "ack_deadline",
                            "backoff_initial", "backoff_multiplier", "backoff_max", "dead_letter")


def _member_label(m: dict[str, Any]) -> str:
    return f"{m.get('client') or '?'}#{m.get('connection')}/{m.get('cid')}"


def _owner_label(st: dict[str, Any], group: dict[str, Any], p: dict[str, Any]) -> str:
    for m in group.get("members") or []:
        if m.get("connection") == p.get("owner_connection") and m.get("cid") == p.get("owner"):
            return _member_label(m)
    return "-"


def _render(streams: list[dict[str, Any]], partitions: bool = True) -> str:
    """The two tables `tidings streams` prints: partitions, then groups."""
    prows = []
    for st in streams:
        for p in st["partitions"]:
            prows.append([st["name"], str(p["partition"]), str(p["first"]), str(p["next"]), str(p["messages"])])
    out = [table(prows, ["STREAM", "PARTITION", "FIRST", "NEXT", "MESSAGES"])]
    grows = []
    for st in streams:
        for gname, g in sorted((st.get("groups") or {}).items()):
            members = len(g.get("members") or [])
            for p in g["partitions"]:
                grows.append([f"{st['name']}/{gname}", str(g.get("generation", 0)), str(members),
                              str(p["partition"]), _owner_label(st, g, p), str(p["committed"]), str(p["lag"]),
                              str(p.get("in_flight", 0))])
    if partitions:
        out.append("")
    else:
        out = []
    if grows:
        out.append(table(grows, ["STREAM/GROUP", "GENERATION", "MEMBERS", "PARTITION", "ASSIGNED TO",
                                  "COMMITTED", "LAG", "IN-FLIGHT"]))
    else:
        out.append("no consumer groups")
    mrows = [[f"{st['name']}/{gname}", _member_label(m), ",".join(str(i) for i in m.get("partitions") or []) or "-"]
             for st in streams for gname, g in sorted((st.get("groups") or {}).items())
             for m in g.get("members") or []]
    if mrows:  # every member, also those left without a partition (more members than partitions)
        out += ["", table(mrows, ["STREAM/GROUP", "MEMBER", "PARTITIONS"])]
    return "\n".join(out)


async def _streams_ls(tc: Any, ns: argparse.Namespace) -> None:
    streams = await tc.list_streams()
    if ns.json:
        print_json(streams)
        return
    if not streams:
        print("no streams")
        return
    print(_render(streams))


async def _streams_declare(tc: Any, ns: argparse.Namespace) -> None:
    settings = {k: getattr(ns, k) for k in _DECLARE_SETTINGS if getattr(ns, k) is not None}
    info = await tc.declare_stream(ns.name, partitions=ns.partitions, bind=bind_entries(ns), **settings)
    if ns.json:
        print_json(info)
        return
    what = "created" if info.get("created") else "exists with these settings:"
    conf = info.get("config") or {}
    bind = ", ".join(info.get("bind") or []) or "nothing"
    limits = [f"{k}={conf[k]}" for k in ("max_age", "max_messages", "max_bytes") if conf.get(k) is not None]
    print(f"stream {info['name']} {what} {len(info['partitions'])} partitions bound to {bind}; "
          f"retention {', '.join(limits) or 'unlimited'}; dead-letter queue {conf.get('dead_letter') or '-'}")


async def _streams_info(tc: Any, ns: argparse.Namespace) -> None:
    info = await tc.stream_info(ns.name)
    if ns.json:
        print_json(info)
        return
    print(_render([info]))
    print()
    for k in ("bind", "published", "dead_lettered", "trimmed", "readers"):
        print(f"{k:>16}: {info.get(k)}")
    print("          config:")
    for k, v in (info.get("config") or {}).items():
        print(f"{k:>24}: {v}")


async def _streams_trim(tc: Any, ns: argparse.Namespace) -> None:
    res = await tc.call("stream.trim", {"name": ns.name}, timeout=max(ns.timeout, 60.0))
    if ns.json:
        print_json({"stream": ns.name, **res})
    else:
        print(f"retention removed {res['removed']} messages from {ns.name}")


async def _streams_delete(tc: Any, ns: argparse.Namespace) -> None:
    res = await tc.delete_stream(ns.name, keep_dlq=ns.keep_dlq)
    if ns.json:
        print_json(res)
        return
    print(f"deleted stream {res['deleted']}")
    dl = res.get("dead_letter")
    if dl:
        print(f"deleted its dead-letter queue {dl['deleted']} and its {dl['messages']} messages")


#: update flags -> stream settings: the mutable ones (settings.STREAM_IMMUTABLE are refused).
_UPDATE_SETTINGS: Final = ("max_age", "max_messages", "max_bytes", "max_deliveries", "ack_deadline",
                           "backoff_initial", "backoff_multiplier", "backoff_max")


async def _streams_update(tc: Any, ns: argparse.Namespace) -> None:
    settings = changed(ns, _UPDATE_SETTINGS)
    if not settings:
        from tidings.client.errors import InvalidArgumentError
        raise InvalidArgumentError("streams update: give at least one setting to change (see --help)")
    info = await tc.update_stream(ns.name, **settings)
    if ns.json:
        print_json(info)
        return
    conf = info.get("config") or {}
    print(f"stream {info['name']} updated: " + ", ".join(f"{k}={conf.get(k)}" for k in settings))


async def _streams_groups(tc: Any, ns: argparse.Namespace) -> None:
    if ns.action is not None:
        if ns.action != "delete" or ns.group is None:
            from tidings.client.errors import InvalidArgumentError
            raise InvalidArgumentError("usage: tidings streams groups NAME [delete GROUP [--force]]")
        res = await tc.delete_group(ns.name, ns.group, force=ns.force)
        print_json(res) if ns.json else print(f"deleted consumer group {ns.name}/{res['deleted']} "
                                              "and its committed offsets")
        return
    groups = await tc.stream_groups(ns.name)
    if ns.json:
        print_json(groups)
        return
    if not groups:
        print(f"stream {ns.name} has no consumer groups")
        return
    # the groups half of the `tidings streams` tables, for this one stream
    print(_render([{"name": ns.name, "partitions": [], "groups": groups}], partitions=False))


def start_position(text: str) -> Any:
    """``--from``: "earliest", "latest", an offset, an ISO 8601 time (no zone = UTC), or
    a time ago (``30s``, ``5m``, ``2h``, ``1d``; ``-5m`` too, written ``--from=-5m``) ->
    what ``read_stream`` takes as ``start``."""
    if text in ("earliest", "latest"):
        return text
    if text.isdigit():
        return int(text)
    ago = _AGO.fullmatch(text)
    if ago:
        return dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=float(ago[1]) * _UNIT_SECONDS[ago[2]])
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use earliest, latest, an offset, an ISO 8601 time (2026-01-31T12:00:00Z) "
            "or a time ago (5m)") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.timezone.utc)


async def _streams_read(tc: Any, ns: argparse.Namespace) -> None:
    n = 0
    if ns.limit == 0:
        return
    async for m in tc.read_stream(ns.name, ns.partition, ns.start, follow=ns.follow):
        if ns.json:
            headers = {k: (printable(v) if isinstance(v, bytes) else v) for k, v in (m.headers or {}).items()}
            print(json.dumps({"partition": m.partition, "offset": m.offset, "key": m.key, "subject": m.subject,
                              "timestamp_ms": m.timestamp_ms, **payload_json(m.payload), "headers": headers}),
                  flush=True)
        else:
            key = f" key={printable(m.key.encode())}" if m.key is not None else ""
            print(f"{m.partition}:{m.offset} [{m.subject}]{key} {printable(m.payload)}", flush=True)
        n += 1
        if ns.limit is not None and n >= ns.limit:
            return


def register(sp: Any) -> None:
    """Add the `streams` command to the `tidings` subparsers ``sp``."""
    q = sp.add_parser(
        "streams", help="list, declare and inspect streams and their consumer groups",
        description="Without a subcommand: list every stream partition with its first (oldest retained) "
        "and next offset, then every consumer group with its generation, member count, and per partition "
        "the member it is assigned to, the committed offset and the lag (next - committed). "
        "Declare a stream with `tidings streams declare NAME --partitions P --bind PATTERN`.")
    add_options(q)
    q.set_defaults(fn=runner(_streams_ls))
    qs = q.add_subparsers(dest="streams_command", metavar="SUBCOMMAND")

    s = qs.add_parser("ls", help="list streams and groups (the default)", description="List every stream.")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_streams_ls))

    s = qs.add_parser(
        "declare", help="create a stream",
        description="Create the stream NAME with P ordered partitions, bound to the given subject patterns "
        "(a publish's key picks its partition). Declaring a stream that exists with the same settings is a "
        "no-op; with different settings it fails. Retention limits apply per partition.")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--partitions", "-p", type=int, default=1, metavar="P", help="number of partitions (default 1)")
    s.add_argument("--bind", action="append", metavar="PATTERN",
                   help="subject pattern to store in the stream (repeatable; `*` one token, `>` the rest)")
    add_bind_match(s, "stream")
    s.add_argument("--max-age", type=float, metavar="S", help="retention: drop messages older than S seconds")
    s.add_argument("--max-messages", type=int, metavar="N", help="retention: keep at most N messages per partition")
    s.add_argument("--max-bytes", type=int, metavar="N", help="retention: keep at most N bytes per partition")
    s.add_argument("--max-deliveries", type=int, metavar="N",
                   help="group deliveries of one message before it goes to the DLQ (0 = unlimited; default 5)")
    s.add_argument("--ack-deadline", type=float, metavar="S", help="seconds a group delivery may stay unacked")
    s.add_argument("--backoff-initial", type=float, metavar="S", help="delay before the first retry")
    s.add_argument("--backoff-multiplier", type=float, metavar="X", help="growth of the delay per attempt")
    s.add_argument("--backoff-max", type=float, metavar="S", help="largest retry delay")
    s.add_argument("--dead-letter", metavar="QUEUE", help="dead-letter queue (default NAME.dlq)")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_streams_declare))

    s = qs.add_parser(
        "read", help="print a partition's messages from a position, without a consumer group",
        description="Print the messages of one partition of stream NAME, one line each "
        "(PARTITION:OFFSET [SUBJECT] key=KEY PAYLOAD; payloads that are not UTF-8 print with \\xNN "
        "escapes), from --from to the end of the partition, or with --follow as they come until "
        "interrupted. Reading commits nothing and moves no consumer group.")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--partition", "-p", type=int, default=0, metavar="P", help="partition to read (default 0)")
    s.add_argument("--from", dest="start", type=start_position, default="earliest", metavar="WHERE",
                   help="earliest (default), latest, an OFFSET, an ISO 8601 TIME (no zone = UTC) or a time "
                   "ago such as 5m (s, m, h, d)")
    s.add_argument("--follow", "-f", action="store_true", help="keep printing new messages until interrupted")
    s.add_argument("-n", "--limit", type=int, metavar="N", help="exit after N messages")
    add_options(s, leaf=True, json_help="print one JSON object per message")
    s.set_defaults(fn=runner(_streams_read, interrupted=0))

    for name, fn, text in (("info", _streams_info, "show a stream's partitions, groups, counters and settings"),
                           ("trim", _streams_trim, "apply the stream's retention limits now")):
        s = qs.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        s.add_argument("name", metavar="NAME")
        add_options(s, leaf=True)
        s.set_defaults(fn=runner(fn))

    s = qs.add_parser("delete", help="delete a stream, its messages, its groups and its dead-letter queue",
                      description="Delete the stream NAME, its messages and consumer groups, and its dead-letter "
                      "queue unless --keep-dlq (a dead-letter queue another queue or stream also uses is kept).")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--keep-dlq", action="store_true", help="keep the dead-letter queue and its messages")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_streams_delete))

    s = qs.add_parser(
        "update", help="change a stream's settings in place",
        description="Change settings of the stream NAME while it runs; they are stored and survive a restart. "
        "Tighter retention applies at once; --ack-deadline, --max-deliveries and --backoff-* apply to the "
        "groups' next deliveries. Durations take a unit (500ms, 30s, 5m, 2h, 7d; plain numbers are seconds); "
        "'none' removes a retention limit. The partition count, bindings and dead-letter queue cannot change "
        "in place (a key's partition is its hash modulo the count).")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--retention", "--max-age", dest="max_age", type=seconds, metavar="DURATION",
                   help="drop messages older than this ('none': no age limit)")
    s.add_argument("--max-messages", type=count_or_none, metavar="N", help="keep at most N messages per partition")
    s.add_argument("--max-bytes", type=count_or_none, metavar="N", help="keep at most N bytes per partition")
    s.add_argument("--max-deliveries", type=int, metavar="N",
                   help="group deliveries of one message before it goes to the DLQ (0 = unlimited)")
    s.add_argument("--ack-deadline", type=seconds, metavar="DURATION", help="how long a group delivery may stay unacked")
    s.add_argument("--backoff", "--backoff-initial", dest="backoff_initial", type=seconds, metavar="DURATION",
                   help="delay before the first retry")
    s.add_argument("--backoff-multiplier", type=float, metavar="X", help="growth of the delay per attempt")
    s.add_argument("--backoff-max", type=seconds, metavar="DURATION", help="largest retry delay")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_streams_update))

    s = qs.add_parser(
        "groups", help="list a stream's consumer groups, or delete one",
        description="`tidings streams groups NAME` lists the consumer groups of stream NAME: generation, "
        "members and per partition the member it is assigned to, the committed offset, the lag (next - "
        "committed) and the in-flight count. `tidings streams groups NAME delete GROUP` deletes a group and "
        "its committed offsets (joining it again starts a new group from --start); a group with live members "
        "is refused unless --force, which ends their consumers.")
    s.add_argument("name", metavar="NAME")
    s.add_argument("action", nargs="?", choices=["delete"], help="delete GROUP")
    s.add_argument("group", nargs="?", metavar="GROUP")
    s.add_argument("--force", action="store_true", help="delete a group with live members (their consumers end)")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_streams_groups))
