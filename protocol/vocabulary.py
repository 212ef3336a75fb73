"""The wire vocabulary: the names and numbers both sides must spell alike.

Frame layouts (op codes, field positions, PUB option keys) live in
:mod:`tidings.protocol.frames`; this module holds the words that travel
inside frames: the kinds of NOTICE, the header names the broker writes,
and the default port. The broker and the client import them from here, so
a name is written once (docs/PROTOCOL.md describes each).

Plain ``str`` constants, not an enum: they are compared and packed on hot
paths, and msgpack packs them as they are.
"""

from __future__ import annotations

from typing import Final

# The port a broker listens on and a client dials when none is given. Not used by NATS
# (4222), Redis (6379), AMQP (5672), Kafka (9092), MQTT (1883) or NSQ (4150).
DEFAULT_PORT: Final = 7421
# The URL a client dials when none is given (tidings.client.DEFAULT_URL, the CLI's default --url):
# here so that the command line knows it without importing the client library (`tidings serve`
# starts faster).
DEFAULT_URL: Final = f"tidings://127.0.0.1:{DEFAULT_PORT}"

# ---------------------------------------------------------------- NOTICE kinds
# NOTICE is [70, kind, info]; ``info`` is a map whose keys are given per kind.
NOTICE_BINDINGS: Final = "bindings"  # {epoch, patterns, more}: a chunk of the durable binding set
NOTICE_SLOW_CONSUMER: Final = "slow_consumer"  # {sid, dropped}: MSGs dropped for a slow subscriber
NOTICE_SHUTDOWN: Final = "shutdown"  # {}: the broker is stopping; the connection closes next
NOTICE_CONSUMER_CLOSED: Final = "consumer_closed"  # {cid, reason, ...}: the broker ended consumer cid
NOTICE_ASSIGNMENT: Final = "assignment"  # {cid, group, generation, partitions}: a stream group's new split
NOTICE_STALE_ACKS: Final = "stale_acks"  # {cid, count}: acks refused because their deliveries were void
NOTICE_KINDS: Final = frozenset({NOTICE_BINDINGS, NOTICE_SLOW_CONSUMER, NOTICE_SHUTDOWN,
                                 NOTICE_CONSUMER_CLOSED, NOTICE_ASSIGNMENT, NOTICE_STALE_ACKS})

# ---------------------------------------------------------------- headers
# Header names the broker writes itself (dead-letter origin and reason, redrive marks, ...).
# A publisher may not set them, in any letter case: a PUB message carrying one is refused,
# so a consumer can trust every such header it sees.
RESERVED_HEADER_PREFIX: Final = "tidings-"
# Written on a message when it is moved to a dead-letter queue:
H_DLQ_SOURCE: Final = "tidings-dlq-source"  # the queue or stream it came from (redrive's default target)
H_DLQ_REASON: Final = "tidings-dlq-reason"  # why: one of the DLQ_* reasons below
H_DELIVERY_COUNT: Final = "tidings-delivery-count"  # deliveries made before it was dead-lettered
H_LAST_ERROR: Final = "tidings-last-error"  # the last reject reason (at most 1000 characters)
H_DEAD_LETTERED_AT: Final = "tidings-dead-lettered-at"  # ms since the epoch
H_PUBLISHED_AT: Final = "tidings-published-at"  # ms since the epoch of the original publish
H_ORIGINAL_ID: Final = "tidings-original-id"  # the message's id in its source queue
H_STREAM_PARTITION: Final = "tidings-stream-partition"  # from a stream: where it sat
H_STREAM_OFFSET: Final = "tidings-stream-offset"
H_STREAM_KEY: Final = "tidings-stream-key"  # from a stream: its partition key, if it had one
# The values of H_DLQ_REASON:
DLQ_REJECTED: Final = "rejected"  # a consumer rejected it
DLQ_MAX_DELIVERIES: Final = "max_deliveries"  # it failed max_deliveries times
DLQ_EXPIRED: Final = "expired"  # its time to live ran out (queues with dead_letter_expired)
DLQ_MAX_LENGTH: Final = "max_length"  # pushed out by the dead_letter_oldest overflow policy
DLQ_SCHEMA_VIOLATION: Final = "schema_violation"  # refused by the schema bound to its subject (on_invalid dead_letter)
# The schema registry (docs/PROTOCOL.md, "Schemas"). On a schema-bound subject the broker
# writes both on every message it let through: what the payload was validated against.
H_SCHEMA: Final = "tidings-schema"  # the schema name
# The version: the one tidings- header a publisher may set too (PUBLISHER_HEADERS), to name
# the version to validate against; a str of digits or an int (the broker writes an int).
H_SCHEMA_VERSION: Final = "tidings-schema-version"
# On a message dead-lettered by a schema binding: the violation (message, JSON Pointer, rule).
H_SCHEMA_ERROR: Final = "tidings-schema-error"
H_SCHEMA_ERROR_POINTER: Final = "tidings-schema-error-pointer"
H_SCHEMA_ERROR_RULE: Final = "tidings-schema-error-rule"
# Reserved-prefix names a publisher may still set (the broker checks their values itself).
PUBLISHER_HEADERS: Final = frozenset({H_SCHEMA_VERSION})
# Written by a redrive (which first drops every other tidings- header):
H_REDRIVEN_FROM: Final = "tidings-redriven-from"  # the dead-letter queue it was moved out of

# The payload's media type, set by a client's codec (the Python client's ``json=`` writes CT_JSON);
# the broker reads it on schema-bound subjects only (no header: JSON).
CONTENT_TYPE: Final = "content-type"
CT_JSON: Final = "application/json"
CT_MSGPACK: Final = "application/msgpack"
# CloudEvents 1.0 attributes as headers (the binary content mode: the payload is the event's
# data, its datacontenttype is CONTENT_TYPE). Set and read by the client (publish_event, msg.event);
# the broker reads CE_DATASCHEMA's trailing number as the schema version to validate against.
CE_ID: Final = "ce-id"
CE_SOURCE: Final = "ce-source"
CE_TYPE: Final = "ce-type"
CE_SPECVERSION: Final = "ce-specversion"
CE_TIME: Final = "ce-time"
CE_DATASCHEMA: Final = "ce-dataschema"
CE_SUBJECT: Final = "ce-subject"
CE_SPEC: Final = "1.0"

# W3C trace context (https://www.w3.org/TR/trace-context/): the broker passes both through
# unchanged on every path (pub/sub, queues, streams, dead-letter moves, redrive); the client
# continues them across a handler (client/tracing.py) and OpenTelemetry injects/extracts them.
TRACEPARENT: Final = "traceparent"  # version-traceid-parentid-flags, lowercase hex
TRACESTATE: Final = "tracestate"  # vendor entries, carried as they are

# The broker's answer to a request nobody is subscribed to: an empty MSG on the reply
# subject whose headers are {HDR_STATUS: STATUS_NO_RESPONDERS}.
HDR_STATUS: Final = "status"
STATUS_NO_RESPONDERS: Final = "503"
