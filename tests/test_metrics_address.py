"""TWOPC_METRICS_ADDRESS: /metrics listens on 127.0.0.1 unless the setting names another address."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.errors import ConfigurationError
from scenarios.config import Settings

SERVERS = {
    "TWOPC_PG_A": "host=127.0.0.1 port=5432 dbname=a",
    "TWOPC_PG_B": "host=127.0.0.1 port=5432 dbname=b",
    "TWOPC_STOMP": "127.0.0.1:61613",
    "TWOPC_OPENWIRE": "127.0.0.1:61616",
}


def test_metrics_address_defaults_to_this_host_and_is_checked(tmp_path: Path) -> None:
    """Unset: 127.0.0.1; 0.0.0.0 and ::1 are taken; a host:port or spaces are refused by name."""
    env = {"TWOPC_HOME": str(tmp_path), **SERVERS}
    assert Settings.load(env).metrics_address == "127.0.0.1"
    assert Settings.load({**env, "TWOPC_METRICS_ADDRESS": "0.0.0.0"}).metrics_address == "0.0.0.0"
    assert Settings.load({**env, "TWOPC_METRICS_ADDRESS": "::1"}).metrics_address == "::1"
    for bad in ("127.0.0.1:9464", "a b"):
        with pytest.raises(ConfigurationError, match="TWOPC_METRICS_ADDRESS"):
            Settings.load({**env, "TWOPC_METRICS_ADDRESS": bad})


@pytest.mark.parametrize(("setting", "bound"), [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
def test_the_metrics_server_listens_where_the_setting_says(
    tmp_path: Path, setting: str | None, bound: str
) -> None:
    """serve() binds TWOPC_METRICS_ADDRESS: 127.0.0.1 by default, never 0.0.0.0 unasked."""
    pytest.importorskip("prometheus_client")
    from scenarios import metrics

    env = {"TWOPC_HOME": str(tmp_path), **SERVERS}
    if setting is not None:
        env["TWOPC_METRICS_ADDRESS"] = setting
    server = metrics.serve(Settings.load(env), 0)
    try:
        assert server.address == bound
    finally:
        server.close()
