"""The transfer scenario: its model and SQL, its tables, its invariants and the narrated stories."""
