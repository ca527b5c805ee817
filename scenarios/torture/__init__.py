"""The crash torture: fault schedules, the runner, the child it kills, the ledger, the report."""
