"""The embedded lab: idempotent up, restart after kill -9, port clashes, env exports, down."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from scenarios.lab.errors import LabError
from scenarios.lab.layout import PASSFILE
from scenarios.lab.ports import ephemeral_hint, ephemeral_range
from scenarios.lab.probes import pg_answers, processes_of, stomp_connect_ok
from scenarios.lab.services import Lab
from tests.conftest import free_port

pytestmark = pytest.mark.lab

TWOPC = [sys.executable, "-m", "scenarios.cli"]


def pids(lab: Lab) -> dict[str, int | None]:
    return {s.name: s.pid for s in lab.status()}


def test_up_is_idempotent(lab: Lab) -> None:
    """A second 'up' starts nothing new: the same pids, all three services up."""
    before = pids(lab)
    statuses = lab.up()
    assert {s.name: s.pid for s in statuses} == before
    assert [s.state for s in statuses] == ["up", "up", "up"]


@pytest.mark.parametrize("service", ["pg-a", "activemq"])
def test_up_restarts_a_killed_service(lab: Lab, service: str) -> None:
    """After kill -9 of a service, 'up' starts it again on the same port, and it answers."""
    old_pid = lab.kill(service)
    status = {s.name: s for s in lab.up()}
    assert status[service].pid not in (None, old_pid)
    assert status[service].state == "up"
    if service == "activemq":
        login = lab.credentials()
        assert stomp_connect_ok(
            "127.0.0.1", lab.ports.stomp, login=login.stomp_user, passcode=login.stomp_password
        )
    else:
        assert pg_answers(lab.ports.pg_a, lab.credentials().pg_admin_password)


def test_status_json_lists_three_services_up(lab: Lab) -> None:
    """'twopc lab status --json' reports each service with its port, pid and state."""
    out = subprocess.run(
        [*TWOPC, "lab", "status", "--json"], capture_output=True, text=True, check=True
    ).stdout
    services = json.loads(out)
    assert [s["name"] for s in services] == ["pg-a", "pg-b", "activemq"]
    assert all(s["state"] == "up" and isinstance(s["pid"], int) for s in services)
    assert services[0]["port"] == lab.ports.pg_a


def test_env_output_is_usable_by_eval(lab: Lab) -> None:
    """eval "$(twopc lab env)" exports connection settings that reach the lab."""
    script = (
        f'eval "$({" ".join(TWOPC)} lab env)" && '
        f'{sys.executable} -c "import os, psycopg; '
        "c = psycopg.connect(os.environ['TWOPC_PG_B']); "
        "print(c.execute('show max_prepared_transactions').fetchone()[0], "
        "os.environ['TWOPC_STOMP'])\""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOPC_PG")}
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    assert int(out[0]) >= 100
    assert out[1] == f"127.0.0.1:{lab.ports.stomp}"


def test_psql_reaches_the_lab_with_what_lab_env_exports(lab: Lab) -> None:
    """After eval "$(twopc lab env)", psql logs in by PGPASSFILE; no password in the strings."""
    script = (
        f'eval "$({" ".join(TWOPC)} lab env)" && '
        f'psql -w -h 127.0.0.1 -p {lab.ports.pg_a} -U twopc -d twopc -Atc "SELECT current_user" '
        '&& psql -w "$TWOPC_PG_B" -Atc "SELECT current_user" && echo "$TWOPC_PG_A"'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWOPC_PG", "PGPASS"))}
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, check=True, env=env
    ).stdout.splitlines()
    assert out[:2] == ["twopc", "twopc"]
    assert "password" not in out[2] and f"passfile={lab.home / PASSFILE}" in out[2]


@pytest.fixture
def spare_home() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="twopc-spare-", dir="/tmp"))
    home.chmod(0o755)
    yield home
    Lab(home).down()
    shutil.rmtree(home, ignore_errors=True)  # about 90 MB of clusters and broker data


def spare_env(home: Path, **ports: int) -> dict[str, str]:
    env = dict(os.environ, TWOPC_HOME=str(home))
    names = {
        "pg_a": "TWOPC_LAB_PG_A_PORT",
        "pg_b": "TWOPC_LAB_PG_B_PORT",
        "stomp": "TWOPC_LAB_STOMP_PORT",
        "openwire": "TWOPC_LAB_OPENWIRE_PORT",
        "stomp_tls": "TWOPC_LAB_STOMP_TLS_PORT",
    }
    for key, name in names.items():
        env[name] = str(ports.get(key) or free_port())
    return env


def test_port_clash_is_a_clear_error_and_starts_nothing(spare_home: Path) -> None:
    """A taken port fails 'up' with the port and the setting to change; nothing is left running."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        lab = Lab(spare_home, spare_env(spare_home, stomp=taken))
        with pytest.raises(LabError) as info:
            lab.up()
    message = str(info.value)
    assert f"port {taken}" in message
    assert "TWOPC_LAB_STOMP_PORT" in message
    assert list(processes_of(spare_home)) == []


def test_a_port_held_by_a_client_connection_is_refused_with_the_reason(
    spare_home: Path,
) -> None:
    """A service port in the kernel's range for outgoing connections, held as some client's
    local port: 'up' refuses, saying so and which ports cannot be taken that way."""
    low, high = ephemeral_range()
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client.connect(server.getsockname())
        held = client.getsockname()[1]  # the kernel's pick, in its ephemeral range
        assert low <= held <= high
        lab = Lab(spare_home, spare_env(spare_home, pg_b=held))
        with pytest.raises(LabError) as info:
            lab.up()
    message = str(info.value)
    assert f"port {held} for PostgreSQL B is already in use" in message
    assert f"in the kernel's range for outgoing connections ({low}-{high})" in message
    assert f"a port below {low} cannot be taken that way" in message
    assert ephemeral_hint(low - 1) == ""
    assert list(processes_of(spare_home)) == []


def test_missing_activemq_names_the_install_command(spare_home: Path) -> None:
    """Without ActiveMQ's jar, 'up' says which package to install and starts nothing."""
    env = spare_env(spare_home)
    env["TWOPC_ACTIVEMQ_JAR"] = "/nonexistent/activemq.jar"
    result = subprocess.run(
        [*TWOPC, "lab", "up"], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 1
    assert "apt-get install -y activemq" in result.stderr
    assert list(processes_of(spare_home)) == []


@pytest.mark.slow
def test_down_leaves_no_process_behind(spare_home: Path) -> None:
    """'up' then 'down' on a fresh state folder: three services ran, none is left."""
    lab = Lab(spare_home, spare_env(spare_home))
    assert [s.state for s in lab.up()] == ["up", "up", "up"]
    running = list(processes_of(spare_home))
    assert len(running) >= 3
    assert sorted(lab.down()) == ["activemq", "pg-a", "pg-b"]
    assert list(processes_of(spare_home)) == []
    assert [s.state for s in lab.status()] == ["down", "down", "down"]


@pytest.mark.slow
def test_up_upgrades_a_running_lab_without_credentials(spare_home: Path) -> None:
    """A lab whose state has no credentials: 'up' makes them, rewrites and restarts the broker."""
    lab = Lab(spare_home, spare_env(spare_home))
    lab.up()
    old = lab.credentials()
    broker_pid = pids(lab)["activemq"]
    # As a state folder from before the broker's login: only the clusters' passwords.
    kept = json.loads((spare_home / "credentials.json").read_text())
    for name in ("stomp_user", "stomp_password", "keystore_password"):
        del kept[name]
    (spare_home / "credentials.json").write_text(json.dumps(kept))
    statuses = {s.name: s for s in lab.up()}
    new = lab.credentials()
    assert new.stomp_user != old.stomp_user and new.stomp_password != old.stomp_password
    assert new.pg_admin_password == old.pg_admin_password
    assert [s.state for s in statuses.values()] == ["up", "up", "up"]
    assert statuses["activemq"].pid not in (None, broker_pid)
    assert statuses["activemq"].state == "up"
    assert ((spare_home / "credentials.json").stat().st_mode & 0o777) == 0o600
    stomp = lab.ports.stomp
    assert not stomp_connect_ok("127.0.0.1", stomp)
    assert not stomp_connect_ok(
        "127.0.0.1", stomp, login=old.stomp_user, passcode=old.stomp_password
    )
    assert stomp_connect_ok("127.0.0.1", stomp, login=new.stomp_user, passcode=new.stomp_password)


def test_credentials_from_before_the_postgres_passwords_are_completed(spare_home: Path) -> None:
    """An older credentials.json keeps its broker login and gains the clusters' passwords."""
    old = {"stomp_user": "twopc-abc", "stomp_password": "p" * 20, "keystore_password": "k" * 20}
    (spare_home / "credentials.json").write_text(json.dumps(old))
    credentials = Lab(spare_home, spare_env(spare_home)).credentials()
    assert (credentials.stomp_user, credentials.stomp_password) == ("twopc-abc", "p" * 20)
    assert len({credentials.pg_password, credentials.pg_admin_password}) == 2
    assert json.loads((spare_home / "credentials.json").read_text())["pg_password"]
    passfile = spare_home / PASSFILE
    assert (passfile.stat().st_mode & 0o777) == 0o600
    assert f"127.0.0.1:*:*:twopc:{credentials.pg_password}" in passfile.read_text()


def test_up_refuses_a_cluster_an_older_lab_made_with_trust(spare_home: Path) -> None:
    """A cluster whose pg_hba.conf trusts is refused, saying what to run; nothing starts."""
    data = spare_home / "pg-a" / "data"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("15\n")
    (data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
    with pytest.raises(LabError) as info:
        Lab(spare_home, spare_env(spare_home)).up()
    message = str(info.value)
    assert "without a password" in message and "superuser" in message
    assert "twopc lab down" in message and f"rm -rf {spare_home / 'pg-a'}" in message
    assert "twopc lab up" in message
    assert list(processes_of(spare_home)) == []
