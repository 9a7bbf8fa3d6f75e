"""Run the gateway: ``python -m gateway``."""

from shared.runner import serve

serve("gateway", "gateway.app:create_app")
