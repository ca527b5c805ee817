"""The names of the structlog events the scenarios emit: relays, consumers, the fault proxy,
the torture and the CLI. The coordinator's are in ``coordinator.events``, the participants'
in ``participants.events``."""

from __future__ import annotations

# Relays: the outbox component's (outbox.events), and the CDC relay's
# (scenarios.outbox.relay).
from outbox.events import OUTBOX_FAILURES_RESENT as OUTBOX_FAILURES_RESENT
from outbox.events import RELAY_BATCH as RELAY_BATCH
from outbox.events import RELAY_DATABASE_LOST as RELAY_DATABASE_LOST
from outbox.events import RELAY_FAILED as RELAY_FAILED
from outbox.events import RELAY_FAILURE_LOGGED as RELAY_FAILURE_LOGGED
from outbox.events import RELAY_IGNORED as RELAY_IGNORED
from outbox.events import RELAY_PUBLISH_FAILED as RELAY_PUBLISH_FAILED
from outbox.events import RELAY_PUBLISH_RECOVERED as RELAY_PUBLISH_RECOVERED
from outbox.events import RELAY_STARTED as RELAY_STARTED
from outbox.events import RELAY_STOPPED as RELAY_STOPPED

RELAY_CDC_LEADING = "relay.cdc.leading"
RELAY_CDC_STANDBY = "relay.cdc.standby"
RELAY_CDC_SLOT_CREATED = "relay.cdc.slot_created"
RELAY_CDC_UNEXPLAINED = "relay.cdc.unexplained"

# The outbox consumer (scenarios.outbox.consumer).
CONSUMER_STARTED = "consumer.started"
CONSUMER_STOPPED = "consumer.stopped"
CONSUMER_BATCH = "consumer.batch"
CONSUMER_CONNECTION_LOST = "consumer.connection.lost"
CONSUMER_RETRYING = "consumer.retrying"
CONSUMER_DATABASE_UNREACHABLE = "consumer.database.unreachable"
CONSUMER_DEAD_LETTERED = "consumer.dead_lettered"
CONSUMER_FAILED = "consumer.failed"

# The batch job (scenarios.outbox.batchjob).
BATCH_STARTED = "batch.started"
BATCH_STOPPED = "batch.stopped"
BATCH_CHUNK = "batch.chunk"
BATCH_DATABASE_LOST = "batch.database.lost"
BATCH_FAILED = "batch.failed"

# The fire-and-forget thread pool (scenarios.strategies.thread).
THREAD_TASK_FAILED = "thread.task.failed"
THREAD_WORK_DROPPED = "thread.work.dropped"

# thread-sync's asynchronous retry (scenarios.strategies.thread_retry).
THREAD_RETRY_SCHEDULED = "thread.retry.scheduled"
THREAD_RETRY_RESUMED = "thread.retry.resumed"
THREAD_RETRY_DONE = "thread.retry.done"
THREAD_RETRY_FAILED = "thread.retry.failed"
THREAD_RETRY_DEAD = "thread.retry.dead"
THREAD_RETRY_DATABASE_LOST = "thread.retry.database.lost"

# The consumer inside a global transaction (scenarios.outbox.consumer_2pc).
CONSUMER_2PC_APPLIED = "consumer.2pc.applied"
CONSUMER_2PC_ABORTED = "consumer.2pc.aborted"
CONSUMER_2PC_IN_DOUBT = "consumer.2pc.in_doubt"
CONSUMER_2PC_RECOVERED = "consumer.2pc.recovered"

# The dead-letter queue (scenarios.outbox.deadletter).
DEAD_LETTERS_REQUEUED = "outbox.dead_letters.requeued"

# Relay and consumer threads of one process (scenarios.outbox.pipeline).
PIPELINE_WORKER_FAILED = "pipeline.worker.failed"
PIPELINE_WORKER_KILLED = "pipeline.worker.killed"

# The fault proxy (scenarios.lab.proxy).
PROXY_STARTED = "proxy.started"
PROXY_FAULT = "proxy.fault"

# The crash torture (scenarios.torture.runner).
SCHEDULE_STARTED = "torture.schedule.started"
SCHEDULE_FINISHED = "torture.schedule.finished"

# Long-running commands (scenarios.cli).
SHUTDOWN_REQUESTED = "shutdown.requested"
SHUTDOWN_FORCED = "shutdown.forced"  # a second signal: the process ends at once
SHUTDOWN_PARENT_GONE = "shutdown.parent_gone"  # TWOPC_STOP_WITH_PARENT's process ended
