"""pgoutput protocol v1, decoded with no database: every message type, tuples, transactions.

The bytes are built here by the layout PostgreSQL documents ("Logical
Replication Message Formats"); tests/test_cdc.py decodes what the lab's
PostgreSQL really sends.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest

from scenarios.outbox.cdc import describe, explain
from scenarios.outbox.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Commit,
    DecodeError,
    Delete,
    Insert,
    Origin,
    Relation,
    RowChange,
    TableTruncate,
    Transaction,
    TransactionAssembler,
    Truncate,
    Type,
    Update,
    decode,
    lsn_text,
    lsn_value,
)
from scenarios.transfer.model import Transfer

# -- a tiny encoder, for the tests only ---------------------------------------------------

MOMENT = datetime(2026, 12, 3, 4, 5, 6, 789000, tzinfo=UTC)
MICROS = int((MOMENT - datetime(2000, 1, 1, tzinfo=UTC)).total_seconds() * 1_000_000)
ACCOUNTS_OID, TRANSFERS_OID = 16390, 16385


def s(text: str) -> bytes:
    return text.encode() + b"\0"


def tup(*values: object) -> bytes:
    out = struct.pack(">h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is UNCHANGED_TOAST:
            out += b"u"
        elif isinstance(value, bytes):
            out += b"b" + struct.pack(">i", len(value)) + value
        else:
            data = str(value).encode()
            out += b"t" + struct.pack(">i", len(data)) + data
    return out


def begin(xid: int, final_lsn: int) -> bytes:
    return b"B" + struct.pack(">QqI", final_lsn, MICROS, xid)


def commit(commit_lsn: int, end_lsn: int) -> bytes:
    return b"C" + struct.pack(">bQQq", 0, commit_lsn, end_lsn, MICROS)


def relation(oid: int, name: str, columns: list[tuple[str, int, bool]]) -> bytes:
    out = b"R" + struct.pack(">I", oid) + s("public") + s(name) + b"d"
    out += struct.pack(">h", len(columns))
    for column, type_oid, key in columns:
        out += struct.pack(">b", 1 if key else 0) + s(column) + struct.pack(">Ii", type_oid, -1)
    return out


ACCOUNTS_REL = relation(ACCOUNTS_OID, "accounts", [("id", 25, True), ("balance", 20, False)])
TRANSFERS_REL = relation(
    TRANSFERS_OID,
    "transfers",
    [("transfer_id", 25, True), ("amount", 20, False), ("counterparty", 25, False),
     ("created_at", 1184, False)],
)  # fmt: skip


def insert(oid: int, *values: str | None) -> bytes:
    return b"I" + struct.pack(">I", oid) + b"N" + tup(*values)


def update(oid: int, new: bytes, old: tuple[str, bytes] | None = None) -> bytes:
    before = old[0].encode() + old[1] if old else b""
    return b"U" + struct.pack(">I", oid) + before + b"N" + new


def debit_transaction(xid: int, lsn: int, tid: str, source: str, target: str) -> list[bytes]:
    """What the transfer writer's commit looks like in pgoutput."""
    return [
        begin(xid, lsn),
        ACCOUNTS_REL,
        update(ACCOUNTS_OID, tup(source, "9950")),
        TRANSFERS_REL,
        insert(TRANSFERS_OID, tid, "50", target, "2026-12-03 04:05:06+00"),
        commit(lsn, lsn + 0x30),
    ]


# -- one message at a time ---------------------------------------------------------------


def test_begin_and_commit_carry_their_lsns_xid_and_time() -> None:
    """Begin gives the final LSN, the xid and the commit time; Commit both LSNs and flags."""
    assert decode(begin(726, 0x16_B374D848)) == Begin(0x16_B374D848, MOMENT, 726)
    assert decode(commit(0x100, 0x130)) == Commit(0, 0x100, 0x130, MOMENT)


def test_origin_type_and_relation_are_decoded_with_their_strings() -> None:
    """Origin names its node; Type its schema and name; Relation its columns and key flags."""
    assert decode(b"O" + struct.pack(">Q", 7) + s("node-b")) == Origin(7, "node-b")
    assert decode(b"Y" + struct.pack(">I", 90001) + s("public") + s("mood")) == Type(
        90001, "public", "mood"
    )
    rel = decode(ACCOUNTS_REL)
    assert isinstance(rel, Relation)
    assert rel.qualified_name == "public.accounts"
    assert rel.replica_identity == "d"
    assert [(c.name, c.type_oid, c.key) for c in rel.columns] == [
        ("id", 25, True),
        ("balance", 20, False),
    ]


def test_insert_update_delete_and_truncate_are_decoded() -> None:
    """Each row message keeps its relation and tuples; Truncate its options and relations."""
    assert decode(insert(5, "a", None)) == Insert(5, ("a", None))
    assert decode(update(5, tup("a", "2"))) == Update(5, ("a", "2"))
    assert decode(update(5, tup("a", "2"), ("K", tup("a", None)))) == Update(
        5, ("a", "2"), "K", ("a", None)
    )
    assert decode(update(5, tup("b", "2"), ("O", tup("a", "1")))) == Update(
        5, ("b", "2"), "O", ("a", "1")
    )
    assert decode(b"D" + struct.pack(">I", 5) + b"K" + tup("a", None)) == Delete(
        5, "K", ("a", None)
    )
    truncate = b"T" + struct.pack(">ib", 2, 3) + struct.pack(">II", 5, 6)
    assert decode(truncate) == Truncate((5, 6), cascade=True, restart_identity=True)


def test_null_unchanged_toast_text_and_binary_columns_are_told_apart() -> None:
    """'n' is None, 'u' UNCHANGED_TOAST (no value sent), 't' text, 'b' bytes; UTF-8 kept."""
    message = decode(update(5, tup(None, UNCHANGED_TOAST, "héllo", b"\x00\x01")))
    assert isinstance(message, Update)
    assert message.new == (None, UNCHANGED_TOAST, "héllo", b"\x00\x01")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"X\0\0\0\0",
        begin(1, 2)[:-1],
        begin(1, 2) + b"\0",
        b"R" + struct.pack(">I", 1) + b"public",
        b"I" + struct.pack(">I", 5) + b"K" + tup("a"),
        b"D" + struct.pack(">I", 5) + b"N" + tup("a"),
        b"I" + struct.pack(">I", 5) + b"N" + struct.pack(">h", 1) + b"x",
    ],
    ids=["empty", "unknown", "short", "trailing", "unterminated", "insert-K", "delete-N", "kind"],
)
def test_malformed_messages_are_refused(data: bytes) -> None:
    """Truncated, overlong, unknown or misordered bytes raise DecodeError, never a guess."""
    with pytest.raises(DecodeError):
        decode(data)


def test_lsn_text_round_trips_and_compares_by_value() -> None:
    """'16/B374D848' <-> int; '0/A' comes after '0/9'."""
    assert lsn_text(lsn_value("16/B374D848")) == "16/B374D848"
    assert lsn_value("0/A") > lsn_value("0/9")
    assert lsn_value("1/0") > lsn_value("0/FFFFFFFF")


# -- transactions --------------------------------------------------------------------------


def test_a_transaction_split_across_feeds_is_joined_at_its_commit() -> None:
    """Messages fed one by one give nothing until Commit, then one whole transaction."""
    assembler = TransactionAssembler()
    messages = debit_transaction(900, 0x1000, "t-1", "acc-00001", "acc-00002")
    for message in messages[:-1]:
        assert assembler.feed(message) == []
        assert assembler.in_transaction
    (txn,) = assembler.feed(messages[-1])
    assert not assembler.in_transaction
    assert (txn.xid, txn.final_lsn, txn.commit_lsn, txn.end_lsn) == (900, 0x1000, 0x1000, 0x1030)
    assert txn.commit_time == MOMENT
    assert txn.changes == [
        RowChange("update", "public.accounts", {"id": "acc-00001", "balance": "9950"}, {}),
        RowChange(
            "insert",
            "public.transfers",
            {
                "transfer_id": "t-1",
                "amount": "50",
                "counterparty": "acc-00002",
                "created_at": "2026-12-03 04:05:06+00",
            },
            {},
        ),
    ]


def test_transactions_joined_in_one_feed_are_split_in_commit_order() -> None:
    """Two transactions in one feed come back as two, in order; the Relation cache carries over."""
    first = debit_transaction(900, 0x1000, "t-1", "acc-00001", "acc-00002")
    second = [
        begin(901, 0x2000),
        update(ACCOUNTS_OID, tup("acc-00003", "1"), ("K", tup("acc-00009", None))),
        b"D" + struct.pack(">I", TRANSFERS_OID) + b"K" + tup("t-1", None, None, None),
        b"O" + struct.pack(">Q", 5) + s("elsewhere"),
        b"T" + struct.pack(">ib", 1, 0) + struct.pack(">I", TRANSFERS_OID),
        commit(0x2000, 0x2040),
    ]
    assembler = TransactionAssembler()
    one, two = assembler.feed(first + second)
    assert [one.xid, two.xid] == [900, 901]
    assert two.origin == "elsewhere"
    moved, deleted, truncated = two.changes
    assert moved == RowChange(
        "update",
        "public.accounts",
        {"id": "acc-00003", "balance": "1"},
        {"id": "acc-00009", "balance": None},
    )
    assert deleted == RowChange(
        "delete",
        "public.transfers",
        {},
        {"transfer_id": "t-1", "amount": None, "counterparty": None, "created_at": None},
    )
    assert truncated == TableTruncate(("public.transfers",), cascade=False, restart_identity=False)


def test_out_of_order_messages_are_refused() -> None:
    """A change outside Begin..Commit, a nested Begin, or an unknown relation is a DecodeError."""
    with pytest.raises(DecodeError, match="outside a transaction"):
        TransactionAssembler().feed([ACCOUNTS_REL, update(ACCOUNTS_OID, tup("a", "1"))])
    with pytest.raises(DecodeError, match="inside xid 1"):
        TransactionAssembler().feed([begin(1, 1), begin(2, 2)])
    with pytest.raises(DecodeError, match="before its Relation"):
        TransactionAssembler().feed([begin(1, 1), insert(77, "x")])
    with pytest.raises(DecodeError, match="2 values for 4 columns"):
        TransactionAssembler().feed([begin(1, 1), TRANSFERS_REL, insert(TRANSFERS_OID, "a", "b")])


# -- what a transaction means ------------------------------------------------------------------


def test_a_debit_transaction_is_the_credit_command_the_consumer_expects() -> None:
    """The account update and transfers insert become the body every other relay sends."""
    (txn,) = TransactionAssembler().feed(
        debit_transaction(900, 0x1000, "t-1", "acc-00001", "acc-00002")
    )
    explained = explain(txn, "/queue/transfers.credit")
    assert explained.unexplained == []
    (credit,) = explained.credits
    assert credit.transfer_id == "t-1"
    assert credit.destination == "/queue/transfers.credit"
    assert credit.body == Transfer("t-1", "acc-00001", "acc-00002", 50).body()


def test_a_bare_balance_update_is_a_change_without_a_reason() -> None:
    """An accounts update no transfer follows is no credit: it says what changed, not why."""
    txn = Transaction(7, 1, changes=[
        RowChange("update", "public.accounts", {"id": "acc-00003", "balance": "9993"}, {}),
    ])  # fmt: skip
    explained = explain(txn, "/queue/transfers.credit")
    assert explained.credits == []
    (change,) = explained.unexplained
    assert describe(change) == "update public.accounts: id='acc-00003' balance='9993'"
