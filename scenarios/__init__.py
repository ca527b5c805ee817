"""What users run: the embedded lab, the transfer scenario and its strategies, the CLI."""
