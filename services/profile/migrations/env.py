"""Alembic environment of the profile service (schema `profile`)."""

from alembic import context

from shared.migrate import run_env

run_env(context, "profile")
