"""Generate the synchronous modules from their asyncio source (httpcore's unasync approach).

Every module that exists for threads and for asyncio is written once, for
asyncio; this script writes its synchronous counterpart by dropping
``async``/``await`` and mapping the asyncio names to their thread counterparts.
The names that differ at run time live in :mod:`coordinator.compat` (as
psycopg's ``_acompat.py``): an ``A``-prefixed name there is the asyncio one,
the same name without the prefix its thread counterpart.

The generator is strict, so that a source and its output cannot drift apart
unnoticed:

- a substitution that no source uses is an error (a renamed class would
  otherwise leave a stale rule behind, or a rule would silently stop applying);
- its output is formatted by the ruff version pinned in ``pyproject.toml``
  and by no other: with another one installed it refuses to run;
- ``tests/test_unasync.py`` fails while any generated file is not current.

Run ``python scripts/unasync.py`` after editing a source (``--check`` only reports).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: asyncio source -> generated synchronous module.
FILES = {
    "coordinator/aio/coordinator.py": "coordinator/coordinator.py",
    "coordinator/aio/driver.py": "coordinator/driver.py",
    "coordinator/aio/runtime.py": "coordinator/runtime.py",
    "coordinator/aio/transaction.py": "coordinator/transaction.py",
    "participants/aio/postgres.py": "participants/postgres.py",
    "participants/aio/pg_branch.py": "participants/pg_branch.py",
    "participants/aio/pg_commands.py": "participants/pg_commands.py",
    "participants/aio/stomp_ops.py": "participants/stomp_ops.py",
    "participants/aio/group_commit.py": "participants/group_commit.py",
    "participants/aio/marker_queue.py": "participants/marker_queue.py",
    "participants/aio/mq_session.py": "participants/mq_session.py",
    "participants/aio/activemq.py": "participants/activemq.py",
    "participants/aio/session_pool.py": "participants/session_pool.py",
    "outbox/aio/writer.py": "outbox/writer.py",
    "outbox/aio/deadletter.py": "outbox/deadletter.py",
    "outbox/aio/inbox.py": "outbox/inbox.py",
    "scenarios/outbox/consumer_2pc_aio.py": "scenarios/outbox/consumer_2pc.py",
    "scenarios/strategies/transfer_2pc_aio.py": "scenarios/strategies/transfer_2pc.py",
    "scenarios/transfer/batch_aio.py": "scenarios/transfer/batch.py",
}

#: Whole-word replacements, in order.
NAMES = {
    "AsyncXABranch": "XABranch",
    "AsyncWorkEnding": "WorkEnding",
    "AsyncXAResource": "XAResource",
    "AsyncLastResourceSession": "LastResourceSession",
    "AsyncLastResource": "LastResource",
    "AsyncTransactionHost": "TransactionHost",
    "AsyncCoordinator": "Coordinator",
    "AsyncTransaction": "Transaction",
    "AsyncDriverConfig": "DriverConfig",
    "AsyncCursor": "Cursor",
    "AsyncPostgresResource": "PostgresResource",
    "AsyncPostgresBranch": "PostgresBranch",
    "AsyncBranchHome": "BranchHome",
    "AsyncConnectionPoolLike": "ConnectionPoolLike",
    "AsyncConnectionPool": "ConnectionPool",
    "AsyncConnectionSource": "ConnectionSource",
    "AsyncConnection": "Connection",
    "amark": "mark",
    "AsyncIterator": "Iterator",
    "asynccontextmanager": "contextmanager",
    "AsyncActiveMQSession": "ActiveMQSession",
    "AsyncSessionHome": "SessionHome",
    "AsyncActiveMQ": "ActiveMQ",
    "AsyncSessionPool": "SessionPool",
    "AsyncGroupCommit": "GroupCommit",
    "AsyncStompClient": "StompClient",
    "AsyncStompOperations": "StompOperations",
    "AsyncSubscription": "Subscription",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "AsyncTwoPhaseConsumer": "TwoPhaseConsumer",
    "open_consuming_async_coordinator": "open_consuming_coordinator",
    "dead_letter_async": "dead_letter",
}

#: Modules imported from: the asyncio one -> the synchronous one (import lines only,
#: indented ones too: an import under ``if TYPE_CHECKING:``).
MODULES = {
    "coordinator.aio": "coordinator",
    "coordinator.aio.runtime": "coordinator.runtime",
    "coordinator.aio.transaction": "coordinator.transaction",
    "participants.aio.mq_session": "participants.mq_session",
    "participants.aio.pg_branch": "participants.pg_branch",
    "participants.aio.pg_commands": "participants.pg_commands",
    "participants.aio.group_commit": "participants.group_commit",
    "participants.aio.marker_queue": "participants.marker_queue",
    "participants.aio.recovery_view": "participants.recovery_view",
    "participants.aio.session_pool": "participants.session_pool",
    "participants.aio.stomp": "participants.stomp_client",
    "participants.aio.stomp_ops": "participants.stomp_ops",
}
# ``from coordinator.compat import ...`` stays as it is: the shim defines both names.

#: Syntax replacements (regular expressions), applied after the names.
SYNTAX = {
    # What only the asyncio module has (a view for code that runs in worker threads),
    # between a "# unasync: asyncio only" line and a "# unasync: end" line.
    r"(?s)^[ \t]*# unasync: asyncio only\n.*?^[ \t]*# unasync: end\n": "",
    r"\basync with\b": "with",
    # Awaitable[X] -> X (one level of brackets inside): a callable's awaited result.
    r"\bAwaitable\[((?:[^\[\]]|\[[^\[\]]*\])*)\]": r"\1",
    r"\basync def\b": "def",
    r"\bawait ": "",
}

#: The runtime shim: its asyncio names and their thread twins.
COMPAT_MODULE = ROOT / "coordinator" / "compat.py"


class GeneratorError(Exception):
    """The sources and the rules do not fit: a rule unused, the wrong formatter."""


def header(source: str) -> str:
    first = f"# Generated from {source} by scripts/unasync.py: edit that file, then run\n"
    if len(first) > 101:  # a long path: the line would pass ruff's limit of 100
        first = f"# Generated from {source} by scripts/unasync.py:\n# edit that file, then run\n"
    return first + (
        "# `python scripts/unasync.py` (tests/test_unasync.py checks this file is current).\n"
    )


def compat_names() -> dict[str, str]:
    """The shim's pairs: ``ALock`` -> ``Lock``, ``aspawn`` -> ``spawn``, for each
    asyncio name it defines whose thread twin it defines too."""
    text = COMPAT_MODULE.read_text()
    defined = set(re.findall(r"^(?:class |def |async def )?([A-Za-z]\w*)\b", text, flags=re.M))
    return {
        name: name[1:]
        for name in sorted(defined)
        if name[0] in "Aa" and name[1:] in defined and name[1:2].isalpha()
    }


class Unasync:
    """The rules, applied to any number of sources, counting which of them applied."""

    def __init__(self) -> None:
        self.used: Counter[str] = Counter()
        self.compat = compat_names()

    def _sub(self, rule: str, pattern: str, new: str, text: str, flags: int = 0) -> str:
        text, count = re.subn(pattern, new, text, flags=flags)
        self.used[rule] += count
        return text

    def unasync(self, text: str) -> str:
        """The synchronous text of an asyncio module (before formatting)."""
        for old, new in NAMES.items():
            text = self._sub(old, rf"(?<!\w){re.escape(old)}\b", new, text)
        for old, new in MODULES.items():
            text = self._sub(
                old, rf"^([ \t]*)from {re.escape(old)} import", rf"\1from {new} import", text, re.M
            )
        for old, new in self.compat.items():
            text = self._sub(old, rf"(?<![\w.]){re.escape(old)}\b", new, text)
        for pattern, new in SYNTAX.items():
            text = self._sub(pattern, pattern, new, text, re.M)
        return text

    def unused(self) -> list[str]:
        """The rules that changed nothing in any source."""
        rules = [*NAMES, *MODULES, *self.compat, *SYNTAX]
        return [rule for rule in rules if not self.used[rule]]


def pinned_ruff() -> str:
    """The ruff version pyproject.toml pins (``ruff==X.Y.Z``)."""
    match = re.search(r'"ruff==([\w.]+)"', (ROOT / "pyproject.toml").read_text())
    if match is None:
        raise GeneratorError('pyproject.toml must pin the formatter: "ruff==X.Y.Z" in dev')
    return match.group(1)


def check_ruff() -> None:
    """Refuse to format with any ruff but the pinned one: the output would differ."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "--version"], capture_output=True, text=True, check=False
    )
    found = done.stdout.split()[-1] if done.returncode == 0 and done.stdout else "none"
    if found != pinned_ruff():
        raise GeneratorError(
            f"the generated files are formatted by ruff {pinned_ruff()} (pyproject.toml); this "
            f"environment has ruff {found}: run `make setup` (or pip install ruff=={pinned_ruff()})"
        )


def _ruff(args: list[str], text: str, filename: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--stdin-filename", filename, "-"],
        input=text,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if done.returncode not in (0, 1) or not done.stdout:
        raise GeneratorError(f"ruff {' '.join(args)} failed on {filename}: {done.stderr}")
    return done.stdout


def generate(rules: Unasync, source: str, target: str) -> str:
    """The generated text of ``target`` from ``source``: unasynced, imports sorted, formatted."""
    text = header(source) + rules.unasync((ROOT / source).read_text())
    text = _ruff(["check", "--fix", "--select", "I,F401", "--quiet", "--exit-zero"], text, target)
    return _ruff(["format", "--quiet"], text, target)


def generate_all() -> dict[str, str]:
    """Every target's text; raises GeneratorError if a rule went unused."""
    check_ruff()
    rules = Unasync()
    texts = {target: generate(rules, source, target) for source, target in FILES.items()}
    unused = rules.unused()
    if unused:
        raise GeneratorError(
            "substitutions that no source uses (remove them from scripts/unasync.py): "
            + ", ".join(unused)
        )
    return texts


def main(argv: list[str]) -> int:
    check = "--check" in argv
    try:
        texts = generate_all()
    except GeneratorError as exc:
        print(f"unasync: error: {exc}", file=sys.stderr)
        return 2
    stale = []
    for target, text in texts.items():
        path = ROOT / target
        if path.exists() and path.read_text() == text:
            continue
        stale.append(target)
        if not check:
            path.write_text(text)
    for target in stale:
        print(f"{'stale' if check else 'written'}: {target}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
