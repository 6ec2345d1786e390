"""broker.engine."""
