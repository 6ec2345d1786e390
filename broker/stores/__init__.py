"""broker.stores."""
