"""The embedded lab: the PostgreSQL and ActiveMQ services, the fault proxy, /proc readers."""
