"""Resource adapters: PostgreSQL branches, the ActiveMQ last resource, and their STOMP client."""
