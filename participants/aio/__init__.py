"""asyncio participants: PostgreSQL on psycopg's AsyncConnection, ActiveMQ over asyncio STOMP."""
