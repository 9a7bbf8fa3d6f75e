"""One rule for "a dependency is down" (shared.db.is_transient): what is a 503 and a nak,
and what stays a real error. No servers: the exceptions are built as the drivers raise them."""

from __future__ import annotations

import asyncpg
import pytest
import redis.exceptions
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi
from sqlalchemy.exc import DBAPIError, IntegrityError

from shared.db import is_transient


def _wrapped(pg: Exception) -> DBAPIError:
    """An asyncpg error the way SQLAlchemy hands it to the caller."""
    adapted = AsyncAdapt_asyncpg_dbapi.Error(str(pg))
    adapted.sqlstate = getattr(pg, "sqlstate", None)  # type: ignore[attr-defined]
    adapted.__cause__ = pg
    return DBAPIError("SELECT 1", {}, adapted)


@pytest.mark.parametrize(
    "exc",
    [
        _wrapped(asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already")),
        _wrapped(asyncpg.exceptions.CannotConnectNowError("the database system is shutting down")),
        _wrapped(asyncpg.exceptions.AdminShutdownError("terminating connection")),
        asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
        ConnectionRefusedError(111, "Connection refused"),
        redis.exceptions.ConnectionError("Connection closed by server."),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:30],
)
def test_a_dependency_that_is_down_is_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        IntegrityError("INSERT", {}, Exception("duplicate key")),
        _wrapped(asyncpg.exceptions.UniqueViolationError("duplicate key")),
        _wrapped(asyncpg.exceptions.QueryCanceledError("canceling statement due to timeout")),
        redis.exceptions.ResponseError("WRONGTYPE"),
        ValueError("bad"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_real_error_is_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc)
