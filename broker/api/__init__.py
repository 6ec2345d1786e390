"""broker.api."""
