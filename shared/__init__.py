"""Kairos shared library: settings, bus, database, Redis, telemetry, auth, errors."""
