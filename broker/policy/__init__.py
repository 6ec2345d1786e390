"""broker.policy."""
