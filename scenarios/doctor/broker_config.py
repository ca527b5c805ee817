"""``twopc doctor``'s checks of the broker's activemq.xml (``TWOPC_BROKER_CONFIG``): the
journal's sync, the marker queues' browse page and memory limit, link stealing and
``tcpNoDelay`` on the STOMP connectors. Read as XML, without the broker.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from participants.activemq import MARKER_QUEUE_PREFIX
from scenarios.config_values import BROKER_CONFIG
from scenarios.doctor.check import Check, Status, finding, ok
from scenarios.lab.templates import QUEUE_MEMORY

#: ActiveMQ's maxBrowsePageSize when a policyEntry matches the queue without setting it.
DEFAULT_BROWSE_PAGE = 400
#: The browse page doctor asks for: markers of this many committed transactions may wait
#: to be swept (a crash under load leaves them all) and recovery must see every one.
MIN_BROWSE_PAGE = 10_000


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _elements(root: ET.Element, tag: str) -> list[ET.Element]:
    return [e for e in root.iter() if isinstance(e.tag, str) and _local(e.tag) == tag]


def parse_broker_config(text: str) -> ET.Element:
    """The root of an activemq.xml; ValueError if it is not XML."""
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise ValueError(f"not XML: {exc}") from exc


def journal_sync_check(root: ET.Element, where: str) -> Check:
    """KahaDB must sync its journal on every commit (the marker is the commit point)."""
    name = "broker journal sync"
    for broker in _elements(root, "broker"):
        if broker.get("persistent", "true").lower() == "false":
            return finding(
                name,
                f'{where}: the broker is not persistent (persistent="false"): a commit '
                "marker is lost when the broker stops",
                f'set persistent="true" on <broker> in {where} and restart the broker',
            )
    fix = (
        f'in {where}, set journalDiskSyncStrategy="always" on <kahaDB> (and remove '
        'enableJournalDiskSyncs="false"), then restart the broker'
    )
    stores = _elements(root, "kahaDB")
    for store in stores:
        if store.get("enableJournalDiskSyncs", "true").lower() == "false":
            return finding(
                name,
                f'{where}: kahaDB enableJournalDiskSyncs="false": a COMMIT receipt does '
                "not mean the commit marker is on disk",
                fix,
            )
        strategy = store.get("journalDiskSyncStrategy", "always")
        if strategy.lower() != "always":
            return finding(
                name,
                f'{where}: kahaDB journalDiskSyncStrategy="{strategy}": a COMMIT receipt '
                "does not mean the commit marker is on disk",
                fix,
            )
    if stores:
        return ok(name, f"{where}: KahaDB syncs its journal on every commit")
    return ok(name, f"{where}: no <kahaDB> override: ActiveMQ's default KahaDB syncs always")


def _destination_matches(pattern: str, name: str) -> bool:
    """ActiveMQ's destination wildcards: ``>`` the rest, ``*`` one segment, ``.`` a separator."""
    parts, names = pattern.split("."), name.split(".")
    for index, part in enumerate(parts):
        if part == ">":
            return True
        if index >= len(names) or part not in ("*", names[index]):
            return False
    return len(parts) == len(names)


def _queue_policy(root: ET.Element, queue_name: str) -> ET.Element | None:
    """The policyEntry ActiveMQ applies to queue ``queue_name``, if any matches: the most
    specific one (fewest wildcards, then the longest pattern)."""
    matching = [
        entry
        for entry in _elements(root, "policyEntry")
        if entry.get("queue") is not None
        and _destination_matches(str(entry.get("queue")), queue_name)
    ]
    if not matching:
        return None
    return min(
        matching,
        key=lambda e: (
            str(e.get("queue")).count(">") + str(e.get("queue")).count("*"),
            -len(str(e.get("queue"))),
        ),
    )


def browse_page_check(
    root: ET.Element, where: str, queue: str = MARKER_QUEUE_PREFIX + "twopc"
) -> Check:
    """The marker queues' maxBrowsePageSize: recovery must browse every marker (a
    coordinator's queue is ``/queue/twopc.markers.<coordinator id>``)."""
    name = "maxBrowsePageSize"
    queue_name = queue.removeprefix("/queue/")
    entry = _queue_policy(root, queue_name)
    if entry is None:
        return finding(
            name,
            f"{where}: no policyEntry matches queue {queue_name}, so a browse stops after "
            f"{DEFAULT_BROWSE_PAGE} messages",
            f'add <policyEntry queue=">" maxBrowsePageSize="1000000"/> (or at least '
            f"{MIN_BROWSE_PAGE}) to the destinationPolicy in {where} and restart the broker",
        )
    value = entry.get("maxBrowsePageSize", str(DEFAULT_BROWSE_PAGE))
    try:
        size = int(value)
    except ValueError:
        size = -1
    detail = (
        f'{where}: policyEntry queue="{entry.get("queue")}" gives {queue_name} '
        f"maxBrowsePageSize {value}"
    )
    if size >= MIN_BROWSE_PAGE:
        return ok(name, detail)
    return finding(
        name,
        detail + f": recovery cannot see markers beyond the first {value}",
        f'set maxBrowsePageSize="1000000" (at least {MIN_BROWSE_PAGE}) on that policyEntry '
        f"in {where} and restart the broker",
    )


def queue_memory_check(
    root: ET.Element, where: str, queue: str = MARKER_QUEUE_PREFIX + "twopc"
) -> Check:
    """Each queue's cache of pending messages must be bounded (``memoryLimit`` on its
    policyEntry): without one, a queue nobody consumes keeps every message in the heap
    until the broker dies of OutOfMemoryError; with only the broker's shared limit, such
    a queue fills it and no other queue can page its messages in, the marker queue that
    recovery browses included."""
    name = "queue memory limit"
    queue_name = queue.removeprefix("/queue/")
    entry = _queue_policy(root, queue_name)
    fix = (
        f'set memoryLimit="{QUEUE_MEMORY}" on the policyEntry matching the queues (queue=">") in '
        f"{where} and restart the broker"
    )
    if entry is None or entry.get("memoryLimit") is None:
        which = (
            "no policyEntry matches"
            if entry is None
            else (f'policyEntry queue="{entry.get("queue")}" sets no memoryLimit for')
        )
        return finding(
            name,
            f"{where}: {which} queue {queue_name}: a queue's pending messages are cached "
            "in the heap up to the broker's shared limit (none, if <systemUsage> sets no "
            "<memoryUsage>), so a backlog nobody consumes ends the broker with "
            "OutOfMemoryError, or fills the shared limit so that recovery's browse of the "
            "markers sees nothing",
            fix,
        )
    return ok(
        name,
        f'{where}: policyEntry queue="{entry.get("queue")}" caches at most '
        f"{entry.get('memoryLimit')} of each queue's pending messages",
    )


def link_stealing_config_check(root: ET.Element, where: str) -> Check:
    """No STOMP connector may let a new connection take over a live one's client-id."""
    name = "link stealing (config)"
    stealing = []
    for connector in _elements(root, "transportConnector"):
        uri = connector.get("uri", "")
        if not uri.lower().startswith("stomp"):
            continue
        attribute = connector.get("allowLinkStealing", "false").lower() == "true"
        in_uri = "allowlinkstealing=true" in uri.lower().replace(" ", "")
        if attribute or in_uri:
            stealing.append(connector.get("name") or uri)
    if not stealing:
        return ok(name, f"{where}: no STOMP connector allows link stealing")
    return finding(
        name,
        f"{where}: connector {', '.join(stealing)} allows link stealing: a new connection "
        "takes a live one's client-id, which defeats client-id fencing",
        f"remove allowLinkStealing (attribute or URI option) from those connectors in "
        f"{where} and restart the broker",
    )


def _stomp_connectors(root: ET.Element) -> list[tuple[str, str]]:
    """Each STOMP transportConnector's name (or URI) and URI."""
    return [
        (connector.get("name") or connector.get("uri") or "", connector.get("uri") or "")
        for connector in _elements(root, "transportConnector")
        if connector.get("uri", "").lower().startswith("stomp")
    ]


def stomp_nodelay_config_check(root: ET.Element, where: str) -> Check:
    """Every STOMP connector must turn Nagle's algorithm off (``transport.tcpNoDelay=true``)."""
    name = "STOMP tcpNoDelay (config)"
    missing = [
        shown
        for shown, uri in _stomp_connectors(root)
        if "transport.tcpnodelay=true" not in uri.lower().replace(" ", "")
    ]
    if not missing:
        return ok(name, f"{where}: every STOMP connector sets transport.tcpNoDelay=true")
    return finding(
        name,
        f"{where}: connector {', '.join(missing)} leaves Nagle's algorithm on: a frame the "
        "broker writes right after another (a RECEIPT, then the next MESSAGE) waits for the "
        "client's delayed ACK, about 40 ms, on every 2pc consumer transaction",
        f"add ?transport.tcpNoDelay=true to those connectors' uri in {where} and restart "
        "the broker",
    )


def broker_config_checks(path: str | None) -> list[Check]:
    """The checks of the broker's activemq.xml at ``path`` (TWOPC_BROKER_CONFIG)."""
    names = (
        "broker journal sync",
        "maxBrowsePageSize",
        "link stealing (config)",
        "STOMP tcpNoDelay (config)",
        "queue memory limit",
    )
    if not path:
        return [
            Check(
                name,
                Status.SKIPPED,
                f"{BROKER_CONFIG} is not set, so the broker's activemq.xml was not read",
                f"set {BROKER_CONFIG} to the broker's activemq.xml to check it",
            )
            for name in names
        ]
    try:
        root = parse_broker_config(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return [
            finding(
                names[0],
                f"cannot read the broker's configuration {path} ({BROKER_CONFIG}): {exc}",
                f"set {BROKER_CONFIG} to a readable activemq.xml",
            )
        ]
    return [
        journal_sync_check(root, path),
        browse_page_check(root, path),
        link_stealing_config_check(root, path),
        stomp_nodelay_config_check(root, path),
        queue_memory_check(root, path),
    ]
