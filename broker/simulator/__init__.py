"""broker.simulator."""
