"""``twopc doctor``'s checks of the live broker: the login, link stealing refused,
``tcpNoDelay`` measured, a persistent message stored, and a full browse of the markers.

Each check is a function from what was observed to a :class:`~scenarios.doctor.check.Check`,
tested without a broker; :func:`broker_checks` observes the broker and runs them.
"""

from __future__ import annotations

import contextlib
import secrets
import statistics

from coordinator.errors import TwoPhaseCommitError
from participants.activemq import MARKER_QUEUE_PREFIX
from scenarios.config import Settings
from scenarios.doctor.check import Check, Status, finding, first_line, ok
from scenarios.stomp_probe import receipt_gaps

#: The gap doctor accepts between two receipts the broker sends back to back (ms): with
#: Nagle's algorithm on its connector the second waits for this host's delayed ACK
#: (40 ms or more on Linux); without, it follows at once (well under a millisecond).
MAX_RECEIPT_GAP_MS = 20.0
#: Receipt pairs the live tcpNoDelay probe measures (their median gap is judged).
RECEIPT_PAIRS = 5
#: Where the live check stores one persistent message, and takes it back.
DOCTOR_QUEUE = "/queue/twopc.doctor"
#: How long it waits for the broker's RECEIPT of that SEND, in seconds.
PERSISTENT_SEND_TIMEOUT = 5.0


def broker_login_check(address: str, error: str | None) -> Check:
    """Whether the broker accepted the STOMP login."""
    name = "credentials (broker)"
    if error is None:
        return ok(name, f"the broker at {address} (TWOPC_STOMP) accepted the login")
    return finding(
        name,
        f"cannot connect to the broker at {address} (TWOPC_STOMP): {error}",
        "check TWOPC_STOMP, TWOPC_STOMP_USER and TWOPC_STOMP_PASSWORD (and TWOPC_STOMP_TLS, "
        "TWOPC_STOMP_CA); for the lab: eval \"$(twopc lab env)\" after 'twopc lab up'",
    )


def stomp_nodelay_probe_check(address: str, gap_ms: float) -> Check:
    """The live test: the median gap (ms) between two receipts the broker sent back to back."""
    name = "STOMP tcpNoDelay (broker)"
    detail = (
        f"the broker at {address} sent the second of two receipts {gap_ms:.1f} ms after the "
        f"first (median of {RECEIPT_PAIRS} pairs)"
    )
    if gap_ms <= MAX_RECEIPT_GAP_MS:
        return ok(name, detail)
    return finding(
        name,
        detail + f", more than {MAX_RECEIPT_GAP_MS:g} ms: its STOMP connector leaves Nagle's "
        "algorithm on, so each frame it writes right after another waits for this host's "
        "delayed ACK",
        "add ?transport.tcpNoDelay=true to the uri of the broker's STOMP transportConnector "
        "(activemq.xml) and restart the broker",
    )


def link_stealing_probe_check(address: str, second_connected: bool) -> Check:
    """The live test: a second CONNECT with a client-id a live connection holds."""
    name = "link stealing (broker)"
    if not second_connected:
        return ok(
            name, f"the broker at {address} refused a second connection with a held client-id"
        )
    return finding(
        name,
        f"the broker at {address} let a second connection take a live connection's "
        "client-id (link stealing): fencing cannot stop a coordinator that is still running",
        "turn allowLinkStealing off on the broker's STOMP transportConnector (activemq.xml) "
        "and restart the broker",
    )


def marker_browse_check(address: str, error: str | None, markers: int) -> Check:
    """The live test: a full browse of the marker queue."""
    name = "marker browse (broker)"
    if error is None:
        return ok(
            name,
            f"the broker at {address} browsed all {markers} markers on {MARKER_QUEUE_PREFIX}<id>",
        )
    return finding(
        name,
        f"the broker at {address}: {error}",
        "raise maxBrowsePageSize of the policyEntry matching the marker queue in "
        "activemq.xml (e.g. 1000000) and restart the broker",
    )


def persistent_send_check(address: str, error: str | None) -> Check:
    """The live test: the broker stores one persistent message and answers its SEND."""
    name = "persistent send (broker)"
    if error is None:
        return ok(name, f"the broker at {address} stored a persistent message on {DOCTOR_QUEUE}")
    return finding(
        name,
        f"the broker at {address} did not store a persistent message on {DOCTOR_QUEUE}: {error}",
        "a broker whose store is full (its log says 'Persistent store is Full') holds "
        "every producer: consume or purge the queues that nothing reads (a benchmark's, a "
        "dead-letter queue), or raise storeUsage in activemq.xml and restart the broker",
    )


def broker_checks(settings: Settings) -> list[Check]:
    """Every live check of the broker ``settings`` name (TWOPC_STOMP), in a fixed order."""
    from participants.activemq import ActiveMQ
    from scenarios.wiring import open_stomp

    try:
        open_stomp(settings, participant="mq").close()
    except TwoPhaseCommitError as exc:
        return [broker_login_check(settings.stomp, first_line(exc))]
    checks = [broker_login_check(settings.stomp, None)]
    client_id = f"twopc-doctor-{secrets.token_hex(4)}"
    first = open_stomp(settings, client_id=client_id)
    try:
        try:
            second = open_stomp(settings, client_id=client_id)
        except TwoPhaseCommitError:
            checks.append(link_stealing_probe_check(settings.stomp, False))
        else:
            second.close()
            checks.append(link_stealing_probe_check(settings.stomp, True))
    finally:
        with contextlib.suppress(Exception):
            first.close()
    try:
        checks.append(stomp_nodelay_probe_check(settings.stomp, receipt_gap(settings)))
    except TwoPhaseCommitError as exc:
        checks.append(
            Check(
                "STOMP tcpNoDelay (broker)",
                Status.SKIPPED,
                f"the broker at {settings.stomp}: cannot measure ({first_line(exc)})",
            )
        )
    checks.append(persistent_send_check(settings.stomp, store_one(settings)))
    mq = ActiveMQ(settings.stomp, settings.coordinator_id, pool_size=1, **settings.stomp_options())
    try:
        checks.append(marker_browse_check(settings.stomp, None, len(mq.markers())))
    except TwoPhaseCommitError as exc:
        checks.append(marker_browse_check(settings.stomp, first_line(exc), 0))
    finally:
        mq.close()
    return checks


def store_one(settings: Settings) -> str | None:
    """SEND one persistent message with a receipt, then consume it; None, or what failed."""
    from scenarios.transfer.model import drain
    from scenarios.wiring import open_stomp

    try:
        with open_stomp(settings) as client:
            client.send(DOCTOR_QUEUE, "twopc doctor", receipt_timeout=PERSISTENT_SEND_TIMEOUT)
    except TwoPhaseCommitError as exc:
        return first_line(exc)
    drain(settings, DOCTOR_QUEUE)
    return None


def receipt_gap(settings: Settings, *, address: str | None = None) -> float:
    """The median gap (ms) between two receipts the broker wrote back to back
    (scenarios.stomp_probe), over RECEIPT_PAIRS pairs."""
    gaps = receipt_gaps(address or settings.stomp, pairs=RECEIPT_PAIRS, **settings.stomp_options())
    return statistics.median(gaps)
