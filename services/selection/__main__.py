"""Run the selection service: ``python -m services.selection``."""

from shared.runner import serve

serve("selection", "services.selection.app:create_app")
