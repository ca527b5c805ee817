"""Settings fail closed: four connection settings, or none and a lab; the config file as dotenv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.errors import ConfigurationError
from scenarios.config import SETTING_NAMES, Settings, read_config_file

TWOPC = [sys.executable, "-m", "scenarios.cli"]
SERVERS = {
    "TWOPC_PG_A": "host=db-a port=5432 dbname=a",
    "TWOPC_PG_B": "host=db-b port=5432 dbname=b",
    "TWOPC_STOMP": "mq:61613",
    "TWOPC_OPENWIRE": "mq:61616",
}


def bare_env(home: Path, **settings: str) -> dict[str, str]:
    """This process's environment without any TWOPC_ setting, in state folder ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOPC_")}
    return {**env, "TWOPC_HOME": str(home), **settings}


def twopc(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process with ``env``."""
    return subprocess.run(
        [*TWOPC, *args], capture_output=True, text=True, env=env, check=False, timeout=120
    )


def make_lab_state(home: Path) -> None:
    """A state folder that 'twopc lab up' made: lab.json with its ports (nothing running)."""
    ports = {"pg_a": 1, "pg_b": 2, "stomp": 3, "openwire": 4, "stomp_tls": 5}
    (home / "lab.json").write_text(json.dumps({"ports": ports}))


def test_no_settings_and_no_lab_is_an_error_naming_every_connection_setting(
    tmp_path: Path,
) -> None:
    """Nothing set and no lab in TWOPC_HOME: a ConfigurationError naming the four settings."""
    with pytest.raises(ConfigurationError) as info:
        Settings.load(bare_env(tmp_path))
    for name in SETTING_NAMES:
        assert name in str(info.value)
    assert str(tmp_path) in str(info.value) and "twopc lab up" in str(info.value)


def test_indoubt_without_settings_or_lab_exits_1_naming_the_missing_settings(
    tmp_path: Path,
) -> None:
    """'twopc indoubt' with no settings and no lab: exit 1, one line naming the four settings."""
    done = twopc(bare_env(tmp_path), "indoubt")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "nothing in doubt" not in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("twopc: error: ")]
    assert len(errors) == 1, done.stderr
    for name in SETTING_NAMES:
        assert name in errors[0]


def test_indoubt_with_only_pg_a_names_the_other_settings(tmp_path: Path) -> None:
    """Only TWOPC_PG_A set: exit 1, an error naming PG_B, STOMP and OPENWIRE as missing."""
    done = twopc(bare_env(tmp_path, TWOPC_PG_A=SERVERS["TWOPC_PG_A"]), "indoubt")
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("twopc: error: ")]
    assert len(errors) == 1, done.stderr
    missing = errors[0].split(" not set")[0]
    assert missing == "twopc: error: TWOPC_PG_B, TWOPC_STOMP, TWOPC_OPENWIRE"


def test_a_partial_configuration_is_refused_even_where_a_lab_is(tmp_path: Path) -> None:
    """With a lab in TWOPC_HOME, three settings given and one not is still an error."""
    make_lab_state(tmp_path)
    partial = {k: v for k, v in SERVERS.items() if k != "TWOPC_OPENWIRE"}
    with pytest.raises(ConfigurationError, match="TWOPC_OPENWIRE not set"):
        Settings.load(bare_env(tmp_path, **partial))


def test_the_lab_supplies_the_settings_only_when_none_is_given(tmp_path: Path) -> None:
    """No connection setting and a lab's state folder: the lab's addresses, and Settings.lab."""
    make_lab_state(tmp_path)
    from_lab = Settings.load(bare_env(tmp_path))
    assert from_lab.lab == tmp_path.resolve()
    assert from_lab.stomp == "127.0.0.1:3" and "port=1" in from_lab.pg_a
    given = Settings.load(bare_env(tmp_path, **SERVERS))
    assert given.lab is None and given.stomp == "mq:61613"


def test_a_command_on_the_lab_says_so_on_stderr(tmp_path: Path) -> None:
    """A command whose settings the lab supplied names the lab in one stderr line."""
    make_lab_state(tmp_path)
    done = twopc(bare_env(tmp_path), "indoubt")  # nothing listens on the ports: exit 1
    assert done.returncode == 1, done.stdout + done.stderr
    told = [line for line in done.stderr.splitlines() if "using the lab" in line]
    assert told == [
        f"twopc: using the lab in {tmp_path.resolve()} (no TWOPC_PG_A, TWOPC_PG_B, "
        "TWOPC_STOMP or TWOPC_OPENWIRE set)"
    ]


def test_the_config_file_keeps_inner_quotes_drops_comments_and_reads_export(
    tmp_path: Path,
) -> None:
    """twopc.conf: quoted values keep their inner quotes, '# ...' comments go, export is read."""
    (tmp_path / "twopc.conf").write_text(
        "# where the servers are\n"
        "export TWOPC_PG_A=\"host=db sslrootcert='/etc/ssl/my ca.pem'\"\n"
        "TWOPC_PG_B='host=db2 dbname=b'\n"
        "TWOPC_STOMP=mq:61613 # the broker\n"
        "TWOPC_OPENWIRE=mq:61616\n"
        "TWOPC_STOMP_PASSWORD='pa$$word #1'\n"
        "TWOPC_STOMP_USER=app\n"
    )
    settings = Settings.load(bare_env(tmp_path))
    assert settings.pg_a == "host=db sslrootcert='/etc/ssl/my ca.pem'"
    assert settings.pg_b == "host=db2 dbname=b"
    assert settings.stomp == "mq:61613"
    assert settings.stomp_password == "pa$$word #1"
    assert settings.lab is None


def test_the_environment_wins_over_the_config_file(tmp_path: Path) -> None:
    """A setting in the environment is used over the same one in TWOPC_CONFIG's file."""
    conf = tmp_path / "elsewhere.conf"
    conf.write_text("".join(f"{k}={v}\n" for k, v in SERVERS.items()))
    env = bare_env(tmp_path, TWOPC_CONFIG=str(conf), TWOPC_STOMP="other:61613")
    settings = Settings.load(env)
    assert settings.stomp == "other:61613" and settings.openwire == "mq:61616"


@pytest.mark.parametrize("line", ["TWOPC_STOMP", "TWOPC_PG_A='never closed", "= value"])
def test_a_config_line_that_is_not_a_setting_names_the_file_and_line(
    tmp_path: Path, line: str
) -> None:
    """A line without NAME=value is a ConfigurationError naming the file and its line number."""
    conf = tmp_path / "twopc.conf"
    conf.write_text(f"TWOPC_OPENWIRE=mq:61616\n{line}\n")
    with pytest.raises(ConfigurationError, match=f"{conf}:2: expected NAME=value"):
        read_config_file(conf)
