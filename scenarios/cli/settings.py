"""The commands' settings: loaded once per process, saying on stderr when the lab supplied them."""

from __future__ import annotations

import click

from scenarios.config import Settings

_told: set[str] = set()  # the labs already named on stderr by this process


def load_settings() -> Settings:
    """Settings.load(); when the lab supplies them, one line on stderr names it (once).

    Settings fail closed (scenarios.config): a partial configuration, or none and
    no lab, is a ConfigurationError that the command turns into its one
    ``twopc: error:`` line.
    """
    settings = Settings.load()
    if settings.lab is not None and str(settings.lab) not in _told:
        _told.add(str(settings.lab))
        click.echo(
            f"twopc: using the lab in {settings.lab} (no TWOPC_PG_A, TWOPC_PG_B, TWOPC_STOMP "
            "or TWOPC_OPENWIRE set)",
            err=True,
        )
    return settings
