"""The structlog event names the outbox component emits (relay, consumer, clean-up)."""

from __future__ import annotations

# The relay (outbox.relay).
RELAY_STARTED = "relay.started"
RELAY_STOPPED = "relay.stopped"
RELAY_BATCH = "relay.batch"
RELAY_IGNORED = "relay.ignored"
RELAY_DATABASE_LOST = "relay.database.lost"
RELAY_PUBLISH_RECOVERED = "relay.publish.recovered"
RELAY_PUBLISH_FAILED = "relay.publish.failed"
RELAY_FAILURE_LOGGED = "relay.failure_logged"
RELAY_FAILED = "relay.failed"
RELAY_POSITION_CREATED = "relay.position.created"
OUTBOX_FAILURES_RESENT = "outbox.failures.resent"

# The clean-up (outbox.clean): relayed rows deleted, by the relay or a command.
OUTBOX_CLEANED = "outbox.cleaned"

# The inbox consumer (outbox.consumer).
INBOX_CONSUMER_STARTED = "inbox.consumer.started"
INBOX_CONSUMER_STOPPED = "inbox.consumer.stopped"
INBOX_CONSUMER_CONNECTION_LOST = "inbox.consumer.connection.lost"
INBOX_CONSUMER_RETRYING = "inbox.consumer.retrying"
INBOX_CONSUMER_DEAD_LETTERED = "inbox.consumer.dead_lettered"
