"""Alembic environment of the selection service (schema `selection`)."""

from alembic import context

from shared.migrate import run_env

run_env(context, "selection")
