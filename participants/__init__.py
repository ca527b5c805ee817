"""Resource adapters: PostgreSQL branches, the ActiveMQ last resource, and their STOMP client.

Part of twopc's library, with ``coordinator``: its public API. The asyncio
participants are in ``participants.aio``; the decision rows and liveness locks
of several coordinators sharing the databases in ``participants.decision_table``
and ``participants.membership``.
"""
