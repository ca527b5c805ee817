"""twopc's engine: the two-phase-commit coordinator, its decision log and its recovery."""
