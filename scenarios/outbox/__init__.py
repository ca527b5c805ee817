"""The outbox's moving parts: the relays, the consumer, the failure log and CDC decoding."""
