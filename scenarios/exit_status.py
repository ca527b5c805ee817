"""The exit statuses of every ``twopc`` command (scenarios.cli.errors says when each is used)."""

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1
EXIT_USAGE_ERROR = 2
EXIT_IN_DOUBT = 3
