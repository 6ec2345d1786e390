"""A simulator of the MSPC OEM API and Vendor API, with fault injection.

Real HTTP (Starlette under uvicorn), built from ``specs/mspc-api.md`` and the
MSPC contract decisions in ``DESIGN.md``. Run it with ``broker simulator``
or, in tests, with ``broker.testing.simulator``. It never imports the
broker's engine, stores or OEM client (import-linter enforces this).
"""

from broker.simulator.app import Simulator, SimulatorConfig, create_app
from broker.simulator.control import FaultSpec, RateLimitSpec
from broker.simulator.seed import PARTNER_TOKEN_SCOPE, VENDOR_MANAGE_SCOPE, Seed, load_seed, parse_seed
from broker.simulator.state import fingerprint

__all__ = [
    "PARTNER_TOKEN_SCOPE",
    "VENDOR_MANAGE_SCOPE",
    "FaultSpec",
    "RateLimitSpec",
    "Seed",
    "Simulator",
    "SimulatorConfig",
    "create_app",
    "fingerprint",
    "load_seed",
    "parse_seed",
]
