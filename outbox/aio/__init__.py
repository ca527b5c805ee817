"""The outbox component's asyncio sources (the synchronous modules are generated from them)."""
