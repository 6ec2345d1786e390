"""Benchmark only: ``broker serve`` with the token path's audit replaced in-process by a no-op.

The product has no audit-off mode and must not get one: a credential broker
that can issue tokens without recording them is a finding, not a feature.
To measure what the audit costs, this script runs the very same command
(``broker.cli`` ``serve``: same settings from ``BROKER_*``, same Runtime,
same app, same uvicorn options) except that the ``BrokerService`` the routes
call is built with an audit port that does nothing. The Runtime's own
``AuditLog`` still starts and records ``broker.started`` / ``broker.stopped``
(once each, off the hot path).

Run as ``python tests/bench/_noaudit_server.py`` with the broker's
``BROKER_*`` environment; never use it outside a benchmark.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import broker.api.workers
import broker.runtime
from broker.service import BrokerService
from broker.settings import Settings

_Runtime = broker.runtime.Runtime


class NoAudit:
    """The service's ``AuditPort`` that records nothing (benchmark baseline only)."""

    async def arecord(
        self,
        action: str,
        outcome: str,
        *,
        principal: Any = None,
        ref: Any = None,
        rule_id: str | None = None,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
        secrets: Mapping[str, Any] | None = None,
    ) -> None:
        return None

    async def atoken_issued(self, principal: Any, ref: Any, issued: Any) -> None:
        return None


class NoAuditRuntime(_Runtime):
    """``Runtime`` whose service skips the audit; everything else as built by ``Runtime``."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.service = BrokerService(
            settings,
            authenticator=self.authenticator,
            policy=self.policy,
            cache=self.cache,
            audit=NoAudit(),
            engine=self.engine,
            desired=self.desired,
            metrics=self.metrics,
            trigger_reconcile=self.reconciler.trigger,
        )


def main() -> None:
    # `broker serve` imports Runtime from broker.runtime when it runs, so it picks this one up.
    broker.runtime.Runtime = NoAuditRuntime  # type: ignore[misc]
    # With server.workers > 1, the workers are this script too.
    broker.api.workers.WORKER_COMMAND = (sys.executable, __file__)
    from broker.cli import main as cli_main

    sys.argv = ["broker", *(sys.argv[1:] or ["serve"])]
    cli_main()


if __name__ == "__main__":
    main()
