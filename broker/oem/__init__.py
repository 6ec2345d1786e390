"""The broker's MSPC OEM API / Vendor API client.

``OemClient`` is the Protocol the engine depends on; ``HttpOemClient`` is
the httpx implementation (retries, deadlines, error mapping); tests run it
against ``broker.simulator``.
"""

from broker.oem.base import CreatedIntegration, OemClient, OemIntegration
from broker.oem.client import HttpOemClient
from broker.oem.errors import Upstream, oem_error, parse_retry_after, read_upstream, vendor_api_error

__all__ = [
    "CreatedIntegration",
    "HttpOemClient",
    "OemClient",
    "OemIntegration",
    "Upstream",
    "oem_error",
    "parse_retry_after",
    "read_upstream",
    "vendor_api_error",
]
