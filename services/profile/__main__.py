"""Run the profile service: ``python -m services.profile``."""

from shared.runner import serve

serve("profile", "services.profile.app:create_app")
