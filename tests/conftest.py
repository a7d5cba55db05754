"""Fixtures every test may name: the real Redis and PostgreSQL servers (tests/servers.py)."""

from servers import postgres_server, postgres_url, redis_server

__all__ = ["postgres_server", "postgres_url", "redis_server"]
