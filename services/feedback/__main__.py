"""Run the feedback service: ``python -m services.feedback``."""

from shared.runner import serve

serve("feedback", "services.feedback.app:create_app")
