"""Several coordinators on one lab: a database-only worker process and the dead-peer measurement."""
