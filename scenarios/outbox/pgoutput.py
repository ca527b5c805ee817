"""pgoutput's logical replication protocol, version 1, decoded with no I/O: bytes in, changes out.

PostgreSQL's built-in output plugin ``pgoutput`` (the one its own logical
replication uses) sends each change as one binary message. The layouts
(PostgreSQL 15 documentation, "Logical Replication Message Formats"; all
integers big-endian, strings NUL-terminated)::

    B  Begin     int64 final LSN, int64 commit time, int32 xid
    C  Commit    int8 flags, int64 commit LSN, int64 end LSN, int64 commit time
    O  Origin    int64 commit LSN on the origin, string name
    R  Relation  int32 oid, string schema, string name, int8 replica identity,
                 int16 columns, then per column: int8 flags (1 = key), string name,
                 int32 type oid, int32 type modifier
    Y  Type      int32 oid, string schema, string name
    I  Insert    int32 oid, 'N', tuple
    U  Update    int32 oid, optional ('K' | 'O', tuple), 'N', tuple
    D  Delete    int32 oid, 'K' | 'O', tuple
    T  Truncate  int32 relations, int8 options (1 cascade, 2 restart identity),
                 int32 oid per relation
    tuple        int16 columns, then per column: 'n' (NULL), 'u' (unchanged TOASTed
                 value, not sent), 't' int32 length + text, 'b' int32 length + binary

:func:`decode` turns one message into a value; :class:`TransactionAssembler`
is fed messages in the order the slot yields them (one call or many: a
transaction may be split across feeds, or several joined in one) and returns
each transaction once its Commit arrives, its row changes named by the
Relation messages that came before them. Where the bytes come from (the SQL
function ``pg_logical_slot_peek_binary_changes`` today, a replication
connection's XLogData payloads just as well) is the caller's business.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Literal

#: pgoutput's timestamps count microseconds from 2000-01-01 UTC.
POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class DecodeError(ValueError):
    """The bytes are not a pgoutput protocol v1 message this decoder knows."""


class Unchanged(Enum):
    """A TOASTed column an UPDATE did not change: pgoutput does not send its value."""

    TOAST = "unchanged-toast"


#: The value pgoutput sends for an unchanged TOASTed column ('u').
UNCHANGED_TOAST = Unchanged.TOAST

#: A column's value: its text form, bytes (binary format), None for NULL, or UNCHANGED_TOAST.
Value = str | bytes | None | Unchanged


@dataclass(frozen=True)
class Begin:
    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(frozen=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True)
class Origin:
    origin_lsn: int
    name: str


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    key: bool


@dataclass(frozen=True)
class Relation:
    oid: int
    schema: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.schema or 'pg_catalog'}.{self.name}"


@dataclass(frozen=True)
class Type:
    oid: int
    schema: str
    name: str


@dataclass(frozen=True)
class Insert:
    relation_oid: int
    new: tuple[Value, ...]


@dataclass(frozen=True)
class Update:
    relation_oid: int
    new: tuple[Value, ...]
    #: 'K': only the replica identity key's columns (others None); 'O': the whole old row.
    old_kind: Literal["K", "O"] | None = None
    old: tuple[Value, ...] | None = None


@dataclass(frozen=True)
class Delete:
    relation_oid: int
    old_kind: Literal["K", "O"]
    old: tuple[Value, ...]


@dataclass(frozen=True)
class Truncate:
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


Message = Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate


class _Reader:
    """A cursor over one message's bytes; every read past the end is a DecodeError."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise DecodeError(
                f"message {self.data[:1]!r} ends at byte {len(self.data)}, "
                f"{n} more needed at byte {self.at}"
            )
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def int8(self) -> int:
        return int(struct.unpack(">b", self.take(1))[0])

    def int16(self) -> int:
        return int(struct.unpack(">h", self.take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack(">i", self.take(4))[0])

    def uint32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def int64(self) -> int:
        return int(struct.unpack(">q", self.take(8))[0])

    def lsn(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def byte(self) -> str:
        return self.take(1).decode("ascii")

    def string(self) -> str:
        end = self.data.find(b"\0", self.at)
        if end < 0:
            raise DecodeError(f"message {self.data[:1]!r}: string at byte {self.at} has no NUL")
        text = self.data[self.at : end].decode("utf-8")
        self.at = end + 1
        return text

    def timestamp(self) -> datetime:
        return POSTGRES_EPOCH + timedelta(microseconds=self.int64())

    def tuple(self) -> tuple[Value, ...]:
        values: list[Value] = []
        for _ in range(self.int16()):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(UNCHANGED_TOAST)
            elif kind == "t":
                values.append(self.take(self.int32()).decode("utf-8"))
            elif kind == "b":
                values.append(self.take(self.int32()))
            else:
                raise DecodeError(f"tuple column of unknown kind {kind!r}")
        return tuple(values)

    def end(self, message: Message) -> Message:
        if self.at != len(self.data):
            raise DecodeError(
                f"message {self.data[:1]!r} has {len(self.data) - self.at} bytes after its end"
            )
        return message


def decode(data: bytes) -> Message:
    """One pgoutput protocol v1 message; DecodeError for anything else."""
    if not data:
        raise DecodeError("empty message")
    r = _Reader(data)
    kind = r.byte()
    if kind == "B":
        return r.end(Begin(r.lsn(), r.timestamp(), r.uint32()))
    if kind == "C":
        return r.end(Commit(r.int8(), r.lsn(), r.lsn(), r.timestamp()))
    if kind == "O":
        return r.end(Origin(r.lsn(), r.string()))
    if kind == "R":
        oid, schema, name, identity = r.uint32(), r.string(), r.string(), chr(r.int8())
        columns = []
        for _ in range(r.int16()):
            flags = r.int8()
            columns.append(Column(r.string(), r.uint32(), r.int32(), key=bool(flags & 1)))
        return r.end(Relation(oid, schema, name, identity, tuple(columns)))
    if kind == "Y":
        return r.end(Type(r.uint32(), r.string(), r.string()))
    if kind == "I":
        oid = r.uint32()
        if (marker := r.byte()) != "N":
            raise DecodeError(f"Insert: expected 'N' before the new row, got {marker!r}")
        return r.end(Insert(oid, r.tuple()))
    if kind == "U":
        oid = r.uint32()
        marker = r.byte()
        old_kind: Literal["K", "O"] | None = None
        old = None
        if marker in ("K", "O"):
            old_kind = "K" if marker == "K" else "O"
            old = r.tuple()
            marker = r.byte()
        if marker != "N":
            raise DecodeError(f"Update: expected 'N' before the new row, got {marker!r}")
        return r.end(Update(oid, r.tuple(), old_kind, old))
    if kind == "D":
        oid = r.uint32()
        marker = r.byte()
        if marker not in ("K", "O"):
            raise DecodeError(f"Delete: expected 'K' or 'O' before the old row, got {marker!r}")
        return r.end(Delete(oid, "K" if marker == "K" else "O", r.tuple()))
    if kind == "T":
        count, options = r.int32(), r.int8()
        oids = tuple(r.uint32() for _ in range(count))
        return r.end(Truncate(oids, bool(options & 1), bool(options & 2)))
    raise DecodeError(f"unknown pgoutput message type {kind!r}")


# -- transactions ------------------------------------------------------------------------


@dataclass(frozen=True)
class RowChange:
    """One row inserted, updated or deleted, its columns named.

    ``new`` is the row after an insert or update; ``old`` the row (or with the
    default replica identity, only its key) before an update or delete, and
    empty when pgoutput did not send it (an UPDATE that kept the key).
    """

    operation: Literal["insert", "update", "delete"]
    table: str
    new: dict[str, Value]
    old: dict[str, Value]


@dataclass(frozen=True)
class TableTruncate:
    tables: tuple[str, ...]
    cascade: bool
    restart_identity: bool


Change = RowChange | TableTruncate


@dataclass
class Transaction:
    """A committed transaction's changes, in the order it made them."""

    xid: int
    final_lsn: int
    commit_lsn: int = 0
    end_lsn: int = 0  # where decoding resumes after it: what a slot is advanced to
    commit_time: datetime | None = None
    origin: str | None = None
    changes: list[Change] = field(default_factory=list)


class TransactionAssembler:
    """Feeds of pgoutput messages in, committed transactions out (sans I/O).

    The Relation messages are remembered across feeds (pgoutput sends one
    before the first change of a table in each decoding session, and again
    after the table changes). A change outside Begin ... Commit is an error.
    """

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        self.types: dict[int, Type] = {}
        self._open: Transaction | None = None

    @property
    def in_transaction(self) -> bool:
        """Whether a Begin was fed and its Commit not yet (the rest comes in a later feed)."""
        return self._open is not None

    def feed(self, messages: bytes | list[bytes] | tuple[bytes, ...]) -> list[Transaction]:
        """Decode ``messages`` (one, or several in order); return the transactions they ended."""
        done: list[Transaction] = []
        for data in [messages] if isinstance(messages, bytes) else messages:
            finished = self._handle(decode(data))
            if finished is not None:
                done.append(finished)
        return done

    def _handle(self, message: Message) -> Transaction | None:
        if isinstance(message, Relation):
            self.relations[message.oid] = message
        elif isinstance(message, Type):
            self.types[message.oid] = message
        elif isinstance(message, Begin):
            if self._open is not None:
                raise DecodeError(
                    f"Begin of xid {message.xid} inside xid {self._open.xid}, not committed"
                )
            self._open = Transaction(message.xid, message.final_lsn)
        elif isinstance(message, Commit):
            txn = self._current(message)
            txn.commit_lsn, txn.end_lsn = message.commit_lsn, message.end_lsn
            txn.commit_time = message.commit_time
            self._open = None
            return txn
        elif isinstance(message, Origin):
            self._current(message).origin = message.name
        elif isinstance(message, Truncate):
            tables = tuple(self._relation(oid).qualified_name for oid in message.relation_oids)
            self._current(message).changes.append(
                TableTruncate(tables, message.cascade, message.restart_identity)
            )
        else:
            self._current(message).changes.append(self._row_change(message))
        return None

    def _current(self, message: Message) -> Transaction:
        if self._open is None:
            raise DecodeError(f"{type(message).__name__} outside a transaction")
        return self._open

    def _relation(self, oid: int) -> Relation:
        relation = self.relations.get(oid)
        if relation is None:
            raise DecodeError(f"change to relation {oid} before its Relation message")
        return relation

    def _row_change(self, message: Insert | Update | Delete) -> RowChange:
        relation = self._relation(message.relation_oid)
        names = [column.name for column in relation.columns]

        def named(values: tuple[Value, ...] | None) -> dict[str, Value]:
            if values is None:
                return {}
            if len(values) != len(names):
                raise DecodeError(
                    f"{relation.qualified_name}: {len(values)} values for {len(names)} columns"
                )
            return dict(zip(names, values, strict=True))

        if isinstance(message, Insert):
            return RowChange("insert", relation.qualified_name, named(message.new), {})
        if isinstance(message, Update):
            return RowChange(
                "update", relation.qualified_name, named(message.new), named(message.old)
            )
        return RowChange("delete", relation.qualified_name, {}, named(message.old))


def lsn_text(lsn: int) -> str:
    """An LSN as PostgreSQL writes it: '16/B374D848'."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_value(text: str) -> int:
    """'16/B374D848' as a number, to compare positions ('0/A' comes after '0/9')."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)
