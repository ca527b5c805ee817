"""The CLI after click's conventions: --json, bench subcommands, ranges, one error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from scenarios.bench import parts as bench_parts
from scenarios.cli import bench as cli_bench
from scenarios.cli.main import main
from scenarios.config import Settings
from scenarios.transfer.model import recover_and_reset
from tests.test_bad_input import BAD_CRC, E1, ENCODED_R2, R1, with_crc, write_log

ROOT = Path(__file__).resolve().parent.parent
TWOPC = [sys.executable, "-m", "scenarios.cli"]
#: Leaf commands that print no report, and why.
NO_REPORT = {
    "lab env": "prints shell exports for eval",
    "relay": "runs until SIGTERM and prints nothing; its logs are the record",
}
#: Number options that take any value, and why.
ANY_NUMBER = {"--seed": "any seed draws a plan"}


def leaf_commands(
    group: click.Group = main, prefix: str = ""
) -> Iterator[tuple[str, click.Command]]:
    """Every command of the tree that runs something, by its path ('log verify')."""
    for name, command in sorted(group.commands.items()):
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            if command.invoke_without_command:
                yield path, command
            yield from leaf_commands(command, f"{path} ")
        else:
            yield path, command


def options(command: click.Command) -> dict[str, click.Option]:
    """The command's options by their longest flag."""
    return {
        max(p.opts, key=len): p
        for p in command.params
        if isinstance(p, click.Option) and not p.hidden
    }


def twopc(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process."""
    return subprocess.run(
        [*TWOPC, *args], capture_output=True, text=True, env=env, check=False, timeout=300
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("twopc: error: ")]


# -- --json --------------------------------------------------------------------------------


def test_every_command_that_reports_has_json() -> None:
    """Every leaf command but the two that print no report takes --json."""
    lacking = [
        path
        for path, command in leaf_commands()
        if path not in NO_REPORT and "--json" not in options(command)
    ]
    assert not lacking, f"commands without --json: {lacking}"


def test_the_commands_the_issue_named_have_json() -> None:
    """log verify/truncate, lab down, scenario list/run and demo take --json."""
    commands = dict(leaf_commands())
    for path in ("log verify", "log truncate", "lab down", "scenario list", "scenario run", "demo"):
        assert "--json" in options(commands[path]), path


def test_scenario_list_json_names_every_scenario() -> None:
    """'twopc scenario list --json': a list of {name, description}, one per scenario."""
    from scenarios.stories import STORIES

    done = CliRunner().invoke(main, ["scenario", "list", "--json"])
    assert done.exit_code == 0, done.output
    listed = json.loads(done.stdout)
    assert [s["name"] for s in listed] == list(STORIES)
    assert all(s["description"] for s in listed)


def test_log_verify_json_reports_intact_torn_and_damaged(tmp_path: Path) -> None:
    """'twopc log verify --json': state, records, damaged_at; exit 1 only for mid-log damage."""
    env = {**os.environ, "TWOPC_HOME": str(tmp_path)}
    path = tmp_path / "decisions.log"
    write_log(path, R1, E1)
    clean = twopc(env, "log", "verify", "--json")
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["state"] == "intact"
    write_log(path, R1, with_crc(ENCODED_R2, BAD_CRC), E1)
    damaged = twopc(env, "log", "verify", "--json")
    assert damaged.returncode == 1
    verdict = json.loads(damaged.stdout)
    assert (verdict["state"], verdict["damaged_at"]) == ("damaged", 36)


def test_log_truncate_json_lists_what_it_dropped(tmp_path: Path) -> None:
    """'twopc log truncate --at N --i-know --json': the path, the offset, the dropped entries."""
    env = {**os.environ, "TWOPC_HOME": str(tmp_path)}
    write_log(tmp_path / "decisions.log", R1, with_crc(ENCODED_R2, BAD_CRC), E1)
    done = twopc(env, "log", "truncate", "--at", "36", "--i-know", "--json")
    assert done.returncode == 0, done.stderr
    cut = json.loads(done.stdout)
    assert cut["at"] == 36 and [e["type"] for e in cut["dropped"]] == ["DAMAGED", "END"]


def test_lab_down_json_in_a_folder_without_a_lab(tmp_path: Path) -> None:
    """'twopc lab down --json' where nothing runs: {"stopped": []}."""
    done = twopc({**os.environ, "TWOPC_HOME": str(tmp_path)}, "lab", "down", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"stopped": []}


# -- bench subcommands ---------------------------------------------------------------------


@pytest.fixture
def modes_run(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """The bench modes the CLI ran (nothing is measured)."""
    ran: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(cli_bench, "run_mode", lambda mode, **kw: ran.append((mode, kw)) or {})
    return ran


def test_bench_modes_are_subcommands_and_bare_bench_runs_strategies(
    modes_run: list[tuple[str, dict[str, Any]]],
) -> None:
    """'twopc bench MODE' for each mode and part; a bare 'twopc bench --quick' is strategies."""
    assert set(cli_bench.bench.commands) == {
        "strategies",
        "overhead",
        "consumers",
        "inflight",
        "decisions",
        *bench_parts.names(),
    }
    for mode in cli_bench.bench.commands:
        assert CliRunner().invoke(main, ["bench", mode, "--quick"]).exit_code == 0
    assert CliRunner().invoke(main, ["bench", "--quick"]).exit_code == 0
    assert [m for m, _ in modes_run] == [*cli_bench.bench.commands, "strategies"]
    assert all(kw["quick"] for _, kw in modes_run)


def test_an_old_bench_flag_runs_its_mode_and_names_the_subcommand(
    modes_run: list[tuple[str, dict[str, Any]]],
) -> None:
    """'twopc bench --overhead' still measures the overhead and says 'twopc bench overhead'."""
    done = CliRunner().invoke(main, ["bench", "--overhead"])
    assert done.exit_code == 0, done.output
    assert modes_run[0][0] == "overhead"
    assert "use 'twopc bench overhead'" in done.stderr


def test_two_bench_modes_at_once_are_a_usage_error(
    modes_run: list[tuple[str, dict[str, Any]]],
) -> None:
    """'twopc bench --overhead --consumers': exit 2 naming both; nothing runs."""
    done = CliRunner().invoke(main, ["bench", "--overhead", "--consumers"])
    assert done.exit_code == 2
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "--overhead" in lines[0] and "--consumers" in lines[0]
    assert modes_run == []


# -- ranges --------------------------------------------------------------------------------


def test_every_number_option_is_range_checked() -> None:
    """Each int or float option of every command has a range (IntRange, FloatRange)."""
    unchecked = []
    for path, command in leaf_commands():
        for flag, option in options(command).items():
            number = isinstance(option.type, click.types.IntParamType | click.types.FloatParamType)
            ranged = isinstance(option.type, click.IntRange | click.FloatRange)
            if number and not ranged and flag not in ANY_NUMBER:
                unchecked.append(f"{path} {flag}")
    assert not unchecked, unchecked


@pytest.mark.parametrize(
    "args",
    [
        ("consumer", "--prefetch", "-5"),
        ("consumer", "--batch-size", "0"),
        ("relay", "--mode", "status", "--batch-size", "0"),
        ("relay", "--mode", "status", "--poll-interval", "0"),
        ("relay", "--mode", "status", "--max-attempts", "0"),
        ("relay", "--mode", "status", "--backoff", "0"),
        ("transfer", "--count", "-1"),
        ("transfer", "--count", "5", "--concurrency", "0"),
        ("transfer", "--reset", "--balance", "-1"),
        ("demo", "--count", "0"),
        ("torture", "--schedules", "-1"),
        ("torture", "--concurrency", "0"),
        ("batch", "--chunk", "0"),
        ("log", "truncate", "--at", "-1"),
        ("recover", "--fence-timeout", "-1"),
    ],
    ids=lambda args: " ".join(args),
)
def test_an_out_of_range_number_is_a_usage_error(args: tuple[str, ...]) -> None:
    """A count, size or interval out of its range: exit 2, one 'twopc: error:' line naming it."""
    done = CliRunner().invoke(main, list(args))
    assert done.exit_code == 2, done.output
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert args[-2] in lines[0]


# -- one error line ------------------------------------------------------------------------


def test_log_verify_without_a_log_is_one_error_line(tmp_path: Path) -> None:
    """'twopc log verify' where there is no log: exit 1, the one 'twopc: error:' line only."""
    done = twopc({**os.environ, "TWOPC_HOME": str(tmp_path)}, "log", "verify")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"twopc: error: no decision log at {tmp_path / 'decisions.log'} (TWOPC_HOME)"
    ]


def test_a_bare_transfer_is_a_usage_error() -> None:
    """'twopc transfer' with neither --count nor --reset: exit 2, the usage, one error line."""
    done = twopc(dict(os.environ), "transfer")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("Usage: twopc transfer [OPTIONS]")
    assert error_lines(done.stderr) == [
        "twopc: error: nothing to do: give --count N (transfers to run), --reset, or both"
    ]
    assert "\nError:" not in done.stderr


def test_an_unknown_command_is_one_error_line_after_the_usage() -> None:
    """An unknown command: exit 2, the usage and the hint to -h, then 'twopc: error:'."""
    done = twopc(dict(os.environ), "no-such-command")
    assert done.returncode == 2
    assert "Try 'twopc -h' for help." in done.stderr
    assert len(error_lines(done.stderr)) == 1 and "no-such-command" in done.stderr


def test_a_bare_group_prints_its_help_not_an_error() -> None:
    """'twopc lab' with no subcommand: its help, as click prints it, and no error line."""
    done = CliRunner().invoke(main, ["lab"])
    assert "Commands:" in done.output and "up" in done.output
    assert error_lines(done.stderr) == []


# -- progress, logging, completion ---------------------------------------------------------


def test_progress_bars_draw_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """progress_bars() is disabled when stderr is not a terminal, drawn when it is."""
    from scenarios.cli.progress import progress_bars

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))  # noqa: SIM115
    try:
        assert progress_bars().disable
    finally:
        sys.stderr.close()
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert not progress_bars().disable


def test_no_command_has_its_own_log_json_flag() -> None:
    """JSON logs are asked for one way, TWOPC_LOG_FORMAT=json: no visible --log-json anywhere."""
    has_flag = [path for path, command in leaf_commands() if "--log-json" in options(command)]
    assert has_flag == []


def test_the_old_log_json_flag_says_what_replaces_it(tmp_path: Path) -> None:
    """'twopc consumer --log-json' (deprecated) names TWOPC_LOG_FORMAT=json on stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOPC_")}
    env["TWOPC_HOME"] = str(tmp_path)  # no settings, no lab: it stops after the warning
    done = twopc(env, "consumer", "--log-json")
    assert "--log-json is deprecated: set TWOPC_LOG_FORMAT=json" in done.stderr
    assert done.returncode == 1 and len(error_lines(done.stderr)) == 1


def test_shell_completion_is_documented_and_works() -> None:
    """_TWOPC_COMPLETE=bash_source prints click's completion script; the docs say how."""
    done = subprocess.run(
        TWOPC,
        env={**os.environ, "_TWOPC_COMPLETE": "bash_source"},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "_twopc_completion" in done.stdout
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert "_TWOPC_COMPLETE=bash_source twopc" in doc
    assert "_TWOPC_COMPLETE=zsh_source twopc" in doc


# -- on the lab ----------------------------------------------------------------------------


@pytest.mark.lab
def test_lab_up_json_leaves_stdout_to_the_json_and_draws_no_bar_off_a_terminal(
    lab: Any,
) -> None:
    """'twopc lab up --json' through pipes: stdout parses as JSON, stderr holds no progress."""
    done = twopc(dict(os.environ), "lab", "up", "--json")
    assert done.returncode == 0, done.stderr
    assert {s["state"] for s in json.loads(done.stdout)} == {"up"}
    assert "━" not in done.stderr and "lab up:" not in done.stderr


@pytest.mark.lab
def test_scenario_run_json_reports_the_story(settings: Settings) -> None:
    """'twopc scenario run happy --json': the scenario's name, verdict and lines as JSON."""
    recover_and_reset(settings, accounts=100, balance=10_000)  # the story's tables, on any lab
    done = twopc(dict(os.environ), "scenario", "run", "happy", "--json")
    assert done.returncode == 0, done.stderr
    ran = json.loads(done.stdout)
    assert ran["ok"] is True
    assert [s["name"] for s in ran["scenarios"]] == ["happy"]
    assert ran["scenarios"][0]["lines"]
