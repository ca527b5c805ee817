"""The crash torture: fault schedules, the runner, the child it kills, the ledger, the report."""

#: The APIs the child the torture kills can run its coordinator on (``--api``).
APIS = ("threads", "asyncio")
