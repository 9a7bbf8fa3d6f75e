"""Public API schemas shared by the gateway and the services that answer them."""
