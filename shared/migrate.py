"""Alembic per service: each service's migrations live in ``services/<name>/migrations``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

ROOT = Path(__file__).resolve().parent.parent
MIGRATED = ("profile", "selection", "decision", "dispatch", "feedback")


def alembic_config(service: str, url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(ROOT / "services" / service / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url)
    cfg.attributes["schema"] = service
    return cfg


def upgrade(url: str, services: tuple[str, ...] = MIGRATED) -> None:
    """Apply every service's migrations up to head (idempotent)."""
    for s in services:
        command.upgrade(alembic_config(s, url), "heads")


def run_env(context: object, schema: str) -> None:
    """The body of every service's ``env.py``: online migrations over asyncpg."""
    from alembic import context as ctx

    config = ctx.config
    url = config.get_main_option("sqlalchemy.url")
    assert url is not None

    def do_run(conn: Connection) -> None:
        conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        ctx.configure(
            connection=conn,
            target_metadata=None,
            version_table="alembic_version",
            version_table_schema=schema,
        )
        with ctx.begin_transaction():
            ctx.run_migrations()

    async def main() -> None:
        engine = create_async_engine(url, poolclass=pool.NullPool)
        async with engine.begin() as conn:
            await conn.run_sync(do_run)
        await engine.dispose()

    asyncio.run(main())


async def ensure_database(url: str) -> None:
    """Create the database named in ``url`` if the server does not have it yet."""
    import asyncpg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    conn = await asyncpg.connect(
        host=u.host, port=u.port or 5432, user=u.username, password=u.password, database="postgres"
    )
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", u.database)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{u.database}"')
    finally:
        await conn.close()


async def drop_database(url: str) -> None:
    """Drop the database named in ``url`` (test teardown)."""
    import asyncpg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    conn = await asyncpg.connect(
        host=u.host, port=u.port or 5432, user=u.username, password=u.password, database="postgres"
    )
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{u.database}" WITH (FORCE)')
    finally:
        await conn.close()
