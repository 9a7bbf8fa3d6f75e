"""Alembic environment of the dispatch service (schema `dispatch`)."""

from alembic import context

from shared.migrate import run_env

run_env(context, "dispatch")
