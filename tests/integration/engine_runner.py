"""Run one engine operation in its own process (for race and crash tests).

    python engine_runner.py CONFIG.json OP ORG VENDOR [--crash-at STEP] [--go-file F]

CONFIG.json holds a plain settings dict. ``--ready-file`` is touched once
the runner has read what it will act on. ``--crash-at`` SIGKILLs this process
at that step boundary (the engine's ``on_step`` hook); ``--go-file`` makes
the process wait until the file exists, so several runners start together.
Prints the outcome as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from broker.audit import AuditLog
from broker.engine.core import Engine, Outcome
from broker.engine.desired import DesiredIntegration
from broker.models import IntegrationRef, Stage
from broker.oem.client import HttpOemClient
from broker.settings import load_settings
from broker.stores.factory import build_store


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("op", choices=["provision", "rotate", "reconcile", "revoke"])
    parser.add_argument("org")
    parser.add_argument("vendor")
    parser.add_argument("--crash-at")
    parser.add_argument("--go-file")
    parser.add_argument("--ready-file", help="Touched once the runner has read the current version.")
    args = parser.parse_args()
    settings = load_settings(**json.loads(Path(args.config).read_text()))
    ref = IntegrationRef(args.org, args.vendor)

    def on_step(step: str, _ref: IntegrationRef) -> None:
        if step == args.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    store = build_store(settings)
    oem = HttpOemClient(settings.oem)
    audit = AuditLog(settings.audit).start()
    engine = Engine(settings, store, oem, audit=audit, on_step=on_step)
    expected = None
    if args.op == "rotate":
        expected = store.describe(engine.partner_path(ref)).stages.get(Stage.CURRENT)
    if args.ready_file:
        Path(args.ready_file).touch()
    if args.go_file:
        deadline = time.monotonic() + 30
        while not Path(args.go_file).exists():
            if time.monotonic() > deadline:
                return 3
            time.sleep(0.005)
    desired = DesiredIntegration(ref)
    outcome: Outcome
    if args.op == "provision":
        outcome = engine.provision(desired)
    elif args.op == "rotate":
        outcome = _rotate(engine, desired, expected)
    elif args.op == "revoke":
        outcome = engine.revoke(desired)
    else:
        outcome = engine.reconcile_one(desired)
    audit.close()
    print(json.dumps({"action": outcome.action, "ok": outcome.ok, "version": outcome.version, "code": outcome.code}))
    return 0


def _rotate(engine: Engine, desired: DesiredIntegration, expected: str | None) -> Outcome:
    from broker.errors import Conflict

    try:
        return engine.rotate(desired, expected_current=expected)
    except Conflict as exc:
        return Outcome(desired.ref, "busy", code=exc.code, message=exc.message)


if __name__ == "__main__":
    sys.exit(main())
