"""``twopc doctor``: check a deployment before use; exit 1 on a finding, each with its fix."""

from __future__ import annotations

import json
import sys

import click

from scenarios.doctor import DEFAULT_MAX_SKEW, Status, run_checks
from scenarios.exit_status import EXIT_RUNTIME_ERROR
from scenarios.wiring import DEFAULT_SESSIONS


@click.command("doctor")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=DEFAULT_SESSIONS,
    show_default=True,
    help="Global transactions this deployment runs at once (the coordinator's broker sessions).",
)
@click.option(
    "--max-skew",
    type=click.FloatRange(min=0),
    default=DEFAULT_MAX_SKEW,
    show_default=True,
    help="Seconds of clock skew accepted between this host and each PostgreSQL.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(concurrency: int, max_skew: float, as_json: bool) -> None:
    """Check the databases, the broker and the state folder; exit 1 on any finding.

    Each finding says what to change. The broker's activemq.xml is read from
    TWOPC_BROKER_CONFIG (the lab's own by default).
    """
    from scenarios.cli.settings import load_settings

    checks = run_checks(load_settings(), concurrency=concurrency, max_skew=max_skew)
    findings = [c for c in checks if c.failed]
    if as_json:
        click.echo(
            json.dumps({"ok": not findings, "checks": [c.as_dict() for c in checks]}, indent=2)
        )
    else:
        for check in checks:
            click.echo(f"{check.status.value:4} {check.name}: {check.detail}")
            if check.status is not Status.OK and check.fix:
                click.echo(f"     fix: {check.fix}")
        verdict = f"{len(findings)} finding(s)" if findings else "no findings"
        click.echo(f"twopc doctor: {len(checks)} checks, {verdict}")
    if findings:
        sys.exit(EXIT_RUNTIME_ERROR)
