"""mspc-broker: a credential broker for MSPCentric external integrations."""

__version__ = "0.1.0"
