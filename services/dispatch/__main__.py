"""Run the dispatch service: ``python -m services.dispatch``."""

from shared.runner import serve

serve("dispatch", "services.dispatch.app:create_app")
