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
# Written by a redrive (which first drops every other tidings- header):
H_REDRIVEN_FROM: Final = "tidings-redriven-from"  # the dead-letter queue it was moved out of

# The payload's format, set by a client's codec (the Python client's ``json=`` writes
# CONTENT_TYPE_JSON); the broker never reads it.
HDR_CONTENT_TYPE: Final = "content-type"
CONTENT_TYPE_JSON: Final = "application/json"

# The broker's answer to a request nobody is subscribed to: an empty MSG on the reply
# subject whose headers are {HDR_STATUS: STATUS_NO_RESPONDERS}.
HDR_STATUS: Final = "status"
STATUS_NO_RESPONDERS: Final = "503"
