"""Run the decision service: ``python -m services.decision``."""

from shared.runner import serve

serve("decision", "services.decision.app:create_app")
