"""The names of the structlog events the participants emit (the coordinator's are in
``coordinator.events``). Per-step events are DEBUG; failures WARNING under failure names."""

from __future__ import annotations

# ActiveMQ, the last resource (participants.activemq).
MQ_CONNECTED = "mq.connected"
MQ_SENT = "mq.send"
MQ_SENT_AHEAD = "mq.send.ahead"  # BEGIN and the messages sent while the databases prepare
MQ_SEND_REFUSED = "mq.send.refused"  # a header the message may not carry; nothing sent
MQ_ACKED = "mq.ack"
MQ_COMMITTED = "mq.commit.committed"
MQ_COMMIT_REFUSED = "mq.commit.refused"
MQ_COMMIT_UNKNOWN = "mq.commit.unknown"
MQ_ABORTED = "mq.abort"
MQ_ABORT_FAILED = "mq.abort.failed"
MQ_SESSION_DROPPED = "mq.session.dropped"
MQ_FENCE_STARTED = "mq.fence.started"
MQ_FENCE_RETRY = "mq.fence.retry"
MQ_FENCE_DONE = "mq.fence.done"
MQ_FENCE_REFUSED = "mq.fence.refused"
MQ_MARKERS_REMOVED = "mq.markers.removed"

# STOMP connections (participants.stomp_client).
STOMP_CONNECTED = "stomp.connected"
STOMP_ERROR = "stomp.error"
STOMP_CALLBACK_FAILED = "stomp.callback.failed"
STOMP_DROP_FAILED = "stomp.drop.failed"
STOMP_BROWSE_RETRIED = "stomp.browse.retried"  # a browse ended before its sentinel: tried again

# PostgreSQL, the XA resource (participants.postgres).
PG_ADMIN_RECONNECT = "postgres.admin.reconnect"
PG_POOLED_LOST = "postgres.pooled.lost"
PG_ROLLBACK_FAILED = "postgres.rollback.failed"
PG_BRANCH_ENDED = "postgres.branch.ended"  # the work ran COMMIT/ROLLBACK/PREPARE in a branch

# Membership: liveness locks and fencing on the commit-markable database
# (participants.membership).
PEER_LOCK_TAKEN = "peers.lock.taken"
PEER_LOCK_LOST = "peers.lock.lost"
PEER_LOCK_RELEASED = "peers.lock.released"
PEER_FENCED = "peers.fenced"
