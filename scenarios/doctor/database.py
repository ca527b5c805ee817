"""``twopc doctor``'s checks of each PostgreSQL database: the login, prepared transactions,
``wal_level``, the clock, no superuser and no ``trust``.

Each check is a function from what was observed to a :class:`~scenarios.doctor.check.Check`,
tested without a server; :func:`database_checks` observes one database and runs them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import psycopg

from participants.pg_commands import describe_dsn
from scenarios.doctor.check import Check, Status, finding, first_line, ok

#: The clock skew doctor accepts between this host and a database, in seconds.
DEFAULT_MAX_SKEW = 1.0


def max_prepared_check(
    database: str, setting: str, max_prepared: int, prepared_now: int, concurrency: int
) -> Check:
    """max_prepared_transactions of one database against the transactions run at once."""
    name = f"max_prepared_transactions ({database})"
    detail = (
        f"database {database} ({setting}): max_prepared_transactions = {max_prepared}, "
        f"{prepared_now} prepared now, concurrency {concurrency}"
    )
    fix = (
        f"set max_prepared_transactions = {max(2 * concurrency, concurrency + prepared_now)} "
        f"(at least the {concurrency} transactions run at once, plus those left prepared) "
        f"in database {database}'s postgresql.conf and restart PostgreSQL"
    )
    if max_prepared == 0:
        return finding(name, detail + ": PREPARE TRANSACTION is disabled", fix)
    if max_prepared - prepared_now < concurrency:
        return finding(name, detail + f": room for only {max_prepared - prepared_now} more", fix)
    return ok(name, detail)


def wal_level_check(database: str, setting: str, wal_level: str) -> Check:
    """wal_level on the database the CDC strategies decode (A)."""
    name = f"wal_level ({database})"
    detail = f"database {database} ({setting}): wal_level = {wal_level}"
    if wal_level == "logical":
        return ok(name, detail)
    return finding(
        name,
        detail + ": CDC (--strategy cdc, cdc-fanout) cannot decode its WAL",
        f"set wal_level = logical in database {database}'s postgresql.conf and restart "
        "PostgreSQL (only the CDC strategies need it)",
    )


def clock_skew_check(database: str, setting: str, skew: float, max_skew: float) -> Check:
    """This host's clock against a database's (``skew``: the server minus this host)."""
    name = f"clock skew ({database})"
    detail = f"database {database} ({setting}) is {skew:+.3f} s from this host's clock"
    if abs(skew) <= max_skew:
        return ok(name, detail)
    return finding(
        name,
        detail + f" (more than {max_skew:g} s): the ages of prepared branches are off by as much",
        "synchronise both clocks with NTP (chrony or systemd-timesyncd) on this host and on "
        "the database server",
    )


def database_login_check(database: str, setting: str, dsn: str, error: str | None) -> Check:
    """Whether a database accepted the connection string's login."""
    name = f"credentials ({database})"
    where = f"database {database} ({setting}, {describe_dsn(dsn)})"
    if error is None:
        return ok(name, f"{where} accepted the login")
    return finding(
        name,
        f"cannot connect to {where}: {error}",
        f"check {setting}: host, port, user, dbname, password (or ~/.pgpass) and "
        "pg_hba.conf; for the lab run 'twopc lab up'",
    )


OWN_SERVERS_DOC = "docs/own-servers.md"
NO_PASSFILE = "/nonexistent/.pgpass"  # a passfile libpq finds absent, quietly (/dev/null: warns)


def superuser_check(database: str, setting: str, role: str, superuser: bool) -> Check:
    """Whether the role twopc logs in as is a superuser (it needs not be, and should not)."""
    name = f"superuser ({database})"
    detail = f"database {database} ({setting}): role {role!r} is "
    if not superuser:
        return ok(name, detail + "not a superuser")
    return finding(
        name,
        detail + "a superuser: whoever logs in as it runs shell commands as the server's OS "
        "user (COPY ... TO PROGRAM) and reads every database",
        f"connect as a role without SUPERUSER that owns twopc's tables and holds REPLICATION "
        f"(CDC), CREATEDB (tests) and pg_signal_backend (fencing); see {OWN_SERVERS_DOC}",
    )


def password_required_check(
    database: str,
    setting: str,
    dsn: str,
    let_in: bool | None,
    *,
    reason: str = "",
    trust_rules: Sequence[str] = (),
) -> Check:
    """Whether the server asks for a password: ``let_in`` is what a login attempt without
    any password did (None: the attempt could not tell, ``reason`` says why); with
    ``trust_rules`` (pg_hba.conf's, when the role may read them) those are the evidence."""
    name = f"password required ({database})"
    where = f"database {database} ({setting}, {describe_dsn(dsn)})"
    fix = (
        "replace 'trust' by 'scram-sha-256' in pg_hba.conf (host and local lines), give "
        "the roles passwords, and reload PostgreSQL (SELECT pg_reload_conf()); twopc then "
        "reads its password from the connection string, PGPASSFILE or ~/.pgpass"
    )
    if trust_rules:
        return finding(
            name,
            f"{where}: pg_hba.conf trusts without a password: {'; '.join(trust_rules)}",
            fix,
        )
    if let_in is None:
        return Check(name, Status.SKIPPED, f"{where}: cannot check ({reason})")
    if let_in:
        return finding(
            name,
            f"{where} let this role in without any password (trust): every local user "
            "can log in as it",
            fix,
        )
    return ok(name, f"{where} asks for a password")


def database_checks(
    database: str, setting: str, dsn: str, concurrency: int, max_skew: float
) -> list[Check]:
    """Every check of database ``database`` (``setting`` names its connection string ``dsn``)."""
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        return [database_login_check(database, setting, dsn, first_line(exc))]
    with conn:
        checks = [database_login_check(database, setting, dsn, None)]
        row = conn.execute(
            "SELECT current_setting('max_prepared_transactions')::int,"
            " (SELECT count(*) FROM pg_prepared_xacts)::int, current_setting('wal_level')"
        ).fetchone()
        assert row is not None
        checks.append(max_prepared_check(database, setting, row[0], row[1], concurrency))
        if database == "a":
            checks.append(wal_level_check(database, setting, row[2]))
        checks.append(clock_skew_check(database, setting, _skew(conn), max_skew))
        role = conn.execute(
            "SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert role is not None
        checks.append(superuser_check(database, setting, role[0], bool(role[1])))
        checks.append(_password_check(database, setting, dsn, conn))
    return checks


def _password_check(database: str, setting: str, dsn: str, conn: psycopg.Connection[Any]) -> Check:
    """pg_hba.conf's trust rules if this role may read them, else a login with no password."""
    try:
        rows = conn.execute(
            "SELECT line_number, type, database::text, user_name::text, address"
            " FROM pg_hba_file_rules WHERE auth_method = 'trust' AND error IS NULL"
        ).fetchall()
    except psycopg.errors.InsufficientPrivilege:
        pass  # only superusers (and whom they grant it) read pg_hba_file_rules
    else:
        rules = [f"line {r[0]}: {r[1]} {r[2]} {r[3]} {r[4] or ''}".strip() for r in rows]
        return password_required_check(database, setting, dsn, bool(rules), trust_rules=rules)
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    host = str(info.get("host") or "")
    if not host or host.startswith("/") or host.startswith("@"):
        return password_required_check(
            database,
            setting,
            dsn,
            None,
            reason="twopc connects over a Unix socket, where peer authentication (safe) and "
            "trust (not) both let a login in without a password; a superuser can tell them "
            "apart in pg_hba_file_rules",
        )
    # The same login with no password at all: none given, none from PGPASSWORD or a passfile.
    info.update(password="", passfile=NO_PASSFILE, connect_timeout="5")
    try:
        psycopg.connect(**info).close()  # type: ignore[arg-type]
    except psycopg.OperationalError as exc:
        text = str(exc)
        if "password" in text or "authentication" in text:
            return password_required_check(database, setting, dsn, False)
        return password_required_check(database, setting, dsn, None, reason=first_line(exc))
    return password_required_check(database, setting, dsn, True)


def _skew(conn: psycopg.Connection[Any]) -> float:
    """The server's clock minus this host's, taken at the middle of the round trip."""
    before = time.time()
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    after = time.time()
    assert row is not None
    return float(row[0]) - (before + after) / 2
