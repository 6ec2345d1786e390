"""Provisioning benchmark: Engine.reconcile_all for N = 100, 1,000, 5,000 new integrations.

    .venv/bin/python tests/bench/provision_bench.py [--sizes 100,1000,5000] [--concurrency 32]

Starts OpenBao (dev) and the MSPC simulator as separate processes on free
loopback ports; the simulator's seed has 5,000 organizations allowing one
vendor, and every OEM and Vendor API call gets 20 ms of added latency (the
simulator's ``latency_ms`` fault). Each N runs in its own engine process
(``--worker``): the broker's Engine with the real HTTP OEM client, the
OpenBao store and an audit file (default ``audit.fsync``), as ``broker serve`` wires it,
provisions N integrations nobody has provisioned yet (fresh store paths per
run) with ``Engine.reconcile_all(concurrency=C)``. Every saga is complete:
intent, OEM create, key write, pending, Vendor API probe, promote, close.

Reported per N: wall seconds of reconcile_all, integrations per second,
OEM/Vendor API calls (the simulator's own request counts), store reads and
writes (the engine's backend-call counters), and the engine process's peak
RSS. The last line is ``provision_scaling=<s per integration at the largest
N / at the smallest>`` (linear scaling is about 1.0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stack import (
    PYTHON,
    VENDOR_ID,
    VENDOR_KEY,
    Processes,
    bench_workdir,
    broker_settings,
    env_of,
    org_id,
    proc_cpu_seconds,
    proc_rss_mib,
    seed_vendor_key,
    write_seed,
)

HERE = Path(__file__).resolve()
LATENCY_MS = 20
ORGANIZATIONS = 5000
TARGET_RATE_AT_1000 = 100.0
TARGET_SCALING = 1.3


def _count_store_http_requests() -> list[int]:
    """Count every HTTP request the Vault store sends (its private HTTP client), for the report."""
    from broker.stores import vault

    count = [0]
    send = vault._Http._send

    def counted(self: vault._Http, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return send(self, *args, **kwargs)

    vault._Http._send = counted  # type: ignore[method-assign]
    return count


def worker(n: int, concurrency: int) -> None:
    """One engine process: provision org-00001..N for VENDOR_ID; print one JSON result line."""
    import os

    from broker.audit import AuditLog
    from broker.engine.core import Engine
    from broker.engine.desired import DesiredIntegration
    from broker.log import configure_logging
    from broker.metrics import Metrics
    from broker.models import IntegrationRef
    from broker.oem.client import HttpOemClient
    from broker.settings import load_settings
    from broker.stores.factory import build_store

    configure_logging("warning", "json", open(os.devnull, "w"))  # noqa: SIM115 - for the process's life
    http_requests = _count_store_http_requests()
    settings = load_settings()
    metrics = Metrics()
    store = build_store(settings, metrics=metrics)
    oem = HttpOemClient(settings.oem, metrics=metrics)
    audit = AuditLog(settings.audit, metrics=metrics).start()
    engine = Engine(settings, store, oem, audit=audit, metrics=metrics)
    desired = [DesiredIntegration(IntegrationRef(org_id(i), VENDOR_ID)) for i in range(1, n + 1)]
    cpu_started = sum(os.times()[:2])
    started = time.perf_counter()
    outcomes = engine.reconcile_all(desired, concurrency=concurrency)
    seconds = time.perf_counter() - started
    cpu_seconds = sum(os.times()[:2]) - cpu_started
    audit.close()
    oem.close()
    store.close()
    actions: dict[str, int] = {}
    for outcome in outcomes:
        actions[outcome.action] = actions.get(outcome.action, 0) + 1

    def calls(backend: str, operation: str) -> int:
        return int(
            metrics.registry.get_sample_value(
                "broker_backend_calls_total", {"backend": backend, "operation": operation}
            )
            or 0
        )

    _, peak = proc_rss_mib(os.getpid())
    print(
        "BENCH_RESULT "
        + json.dumps(
            {
                "n": n,
                "seconds": seconds,
                "actions": actions,
                "store_http_requests": http_requests[0],
                "store_reads": calls("vault", "read") + calls("vault", "describe"),
                "store_writes": calls("vault", "write") + calls("vault", "move_stage") + calls("vault", "promote"),
                "audit_records": int(
                    metrics.registry.get_sample_value("broker_audit_records_total", {"sink": "file"}) or 0
                ),
                "audit_failures": sum(
                    int(sample.value)
                    for family in metrics.registry.collect()
                    if family.name == "broker_audit_failures"
                    for sample in family.samples
                    if sample.name == "broker_audit_failures_total"
                ),
                "peak_rss_mib": peak,
                "cpu_seconds": cpu_seconds,
            }
        ),
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,5000", help="comma-separated N (default 100,1000,5000)")
    parser.add_argument("--concurrency", type=int, default=32, help="reconcile_all concurrency (default 32)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.concurrency)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) > ORGANIZATIONS:
        parser.error(f"N at most {ORGANIZATIONS} (organizations in the seed)")

    rows: list[dict[str, Any]] = []
    with bench_workdir("provision-bench-") as workdir, Processes(workdir) as procs:
        vault = procs.openbao()
        seed = write_seed(workdir / "seed.yaml", organizations=ORGANIZATIONS)
        sim = procs.simulator(seed, "--latency-ms", str(LATENCY_MS), "--log-level", "warning")
        vendor_path = "mspc/vendor-keys/" + VENDOR_ID
        seed_vendor_key(vault, vendor_path, VENDOR_KEY)
        print(
            f"simulator: {ORGANIZATIONS} organizations, +{LATENCY_MS} ms on every OEM / Vendor API call; "
            f"engine: reconcile_all(concurrency={args.concurrency}), audit file (default fsync); OpenBao dev server",
            flush=True,
        )
        for run, n in enumerate(sizes):
            groups = broker_settings(
                vault=vault, sim=sim, issuer=None, workdir=workdir, audit_file=workdir / f"audit-{run}" / "audit.jsonl"
            )
            prefix = f"bench-{run}"
            groups["store"] = {
                "backend": "vault",
                "vendor_key_path_template": "mspc/vendor-keys/{vendor_id}",
                "partner_key_path_template": prefix + "/partner-keys/{organization_id}/{vendor_id}",
            }
            groups["engine"] = {
                "state_path_template": prefix + "/state/{organization_id}/{vendor_id}",
                "leader_path": prefix + "/leader",
            }
            groups["oem"].update({"read_timeout_seconds": 30.0, "deadline_seconds": 60.0})
            before = sim.request_counts()
            cpu_before = {"openbao": proc_cpu_seconds(vault.pid), "simulator": proc_cpu_seconds(sim.pid)}
            done = subprocess.run(
                [PYTHON, str(HERE), "--worker", str(n), "--concurrency", str(args.concurrency)],
                env=env_of(groups),
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            result = next(
                (
                    json.loads(line.removeprefix("BENCH_RESULT "))
                    for line in done.stdout.splitlines()
                    if line.startswith("BENCH_RESULT ")
                ),
                None,
            )
            if result is None:
                raise RuntimeError(
                    f"engine run N={n} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
                )
            after = sim.request_counts()
            result["cpu_ms_per_integration"] = {
                "engine": result.pop("cpu_seconds") * 1000 / n,
                **{
                    k: (proc_cpu_seconds(pid) - cpu_before[k]) * 1000 / n
                    for k, pid in (("openbao", vault.pid), ("simulator", sim.pid))
                },
            }
            oem = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
            result["oem_calls"] = sum(oem.values())
            result["oem_detail"] = oem
            rows.append(result)
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in result["cpu_ms_per_integration"].items())
            print(
                f"  N={n}: {result['seconds']:.1f} s, outcomes {result['actions']}, OEM {oem}, "
                f"CPU ms per integration: {cpu}",
                flush=True,
            )
        _, sim_peak = proc_rss_mib(sim.pid)
        _, bao_peak = proc_rss_mib(vault.pid)

    print()
    print(
        f"{'N':>6} {'seconds':>9} {'integr./s':>10} {'OEM calls':>10} {'store reads':>12} {'store writes':>13} "
        f"{'audit recs':>11} {'peak RSS MiB':>13}"
    )
    for r in rows:
        print(
            f"{r['n']:>6} {r['seconds']:>9.1f} {r['n'] / r['seconds']:>10.1f} {r['oem_calls']:>10} "
            f"{r['store_reads']:>12} {r['store_writes']:>13} {r['audit_records']:>11} {r['peak_rss_mib']:>13.0f}"
        )
    print(
        f"(per integration: {rows[-1]['oem_calls'] / rows[-1]['n']:.1f} OEM calls, "
        f"{rows[-1]['store_reads'] / rows[-1]['n']:.1f} store reads, "
        f"{rows[-1]['store_writes'] / rows[-1]['n']:.1f} store writes, "
        f"{rows[-1]['store_http_requests'] / rows[-1]['n']:.1f} HTTP requests to OpenBao; "
        f"simulator peak RSS {sim_peak:.0f} MiB, "
        f"OpenBao peak RSS {bao_peak:.0f} MiB)"
    )
    print()
    for r in rows:
        if r["audit_failures"]:
            print(f"N={r['n']}: {r['audit_failures']} audit writes failed or timed out (broker_audit_failures_total)")
    ok_all = all(r["actions"].get("provisioned", 0) == r["n"] for r in rows)
    by_n = {r["n"]: r for r in rows}
    checks = [("every integration provisioned", ok_all)]
    if 1000 in by_n:
        rate = 1000 / by_n[1000]["seconds"]
        checks.append(
            (f"at least {TARGET_RATE_AT_1000:.0f} integrations/s at N=1000 ({rate:.1f})", rate >= TARGET_RATE_AT_1000)
        )
    first, last = rows[0], rows[-1]
    scaling = (last["seconds"] / last["n"]) / (first["seconds"] / first["n"])
    checks.append((f"provision_scaling <= {TARGET_SCALING}", scaling <= TARGET_SCALING))
    for label, ok in checks:
        print(f"target {'met   ' if ok else 'MISSED'} {label}")
    print(f"provision_scaling={scaling:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
