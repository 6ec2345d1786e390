"""broker.oem."""
