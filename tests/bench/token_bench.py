"""Token service benchmark: POST /v1/tokens against OpenBao's own KV read, on loopback.

    .venv/bin/python tests/bench/token_bench.py [--duration 2] [--repeats 15] [--connections 32] [--workers N]

Starts OpenBao (dev), the MSPC simulator and a dev JWT issuer on free
loopback ports, provisions one integration, then starts these brokers, each
with ``server.workers`` = ``--workers`` (default: the CPU count, since
OpenBao, a Go server, uses every core) unless said otherwise:

* ``broker audit on``: ``python -m broker serve`` configured by ``BROKER_*``
  variables: JWKS authentication, the shipped policies, the audit trail to a
  file on disk, ``audit.fsync: interval`` (the defaults: each record written
  before its token is answered, fsynced within 1 s);
* ``broker audit off``: ``tests/bench/_noaudit_server.py``, the same command
  with the service's audit replaced in-process by a no-op (there is no
  audit-off setting in the product, on purpose);
* ``broker audit on, 1 worker`` (for information): one process, one core;
* ``broker audit on, fsync always`` (for information): the product with
  ``audit.fsync: always``, each batch of records fsynced before its tokens
  are answered, to show what that guarantee costs;

and measures, with wrk (32 connections, keep-alive, warm cache), each of:
the brokers issuing tokens, and OpenBao answering the KV v2 read of one
secret (``GET /v1/secret/data/<vendor key path>`` with ``X-Vault-Token``),
which is what a workload would otherwise do (twice: vendor and partner key).
Each configuration runs ``--repeats`` times after a warm-up, in rounds: each
round runs the three compared configurations (audit on, audit off, OpenBao)
back to back, in alternating order, then the two informational ones. The
table shows medians; the ratios are medians of the per-round ratios, so
that a slow phase of this shared machine (it swings by 20% over tens of
seconds) weighs on both sides of a ratio alike; many short rounds (15 of
2 s, about 14,000 requests per run) beat a few long ones, whose per-round
audit cost ranged from -2% to 33% in one invocation. The ratios of the
medians are printed too. Then in-process micro-benchmarks of the identity and
policy decision. Every process started is stopped by PID at the end.

The last line is ``token_vs_openbao_read=<broker rps (audit on) / OpenBao rps>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stack import (
    PYTHON,
    SUBJECT,
    VENDOR_ID,
    VENDOR_KEY,
    Processes,
    bench_workdir,
    broker_settings,
    env_of,
    org_id,
    seed_vendor_key,
    write_seed,
)

from broker.engine.core import Engine
from broker.engine.desired import DesiredIntegration
from broker.models import IntegrationRef
from broker.oem.client import HttpOemClient
from broker.settings import load_settings
from broker.stores.factory import build_store

HERE = Path(__file__).resolve().parent
LUA = HERE / "report.lua"
REF = IntegrationRef(org_id(1), VENDOR_ID)

TARGET_RATIO = 1.0
STRETCH_RATIO = 1.5
TARGET_P99_MS = 10.0
TARGET_AUDIT_COST = 0.15


@dataclass
class Target:
    name: str
    url: str
    method: str
    body: str
    headers: dict[str, str]
    expect_status: int


# -- load generation ---------------------------------------------------------------------------


def ensure_wrk(allow_install: bool) -> str | None:
    """Path of wrk, installing the Debian package if it is missing; None if that fails."""
    found = shutil.which("wrk")
    if found or not allow_install:
        return found
    print("wrk not found: installing it with apt-get (Debian package 'wrk') ...", flush=True)
    try:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, capture_output=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"apt-get could not install wrk ({type(exc).__name__})", flush=True)
        return None
    return shutil.which("wrk")


def run_load(wrk: str | None, target: Target, connections: int, threads: int, seconds: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["BENCH_METHOD"] = target.method
    env["BENCH_BODY"] = target.body
    env["BENCH_HEADERS"] = "\n".join(f"{k}: {v}" for k, v in target.headers.items())
    if wrk is not None:
        argv = [
            wrk,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--timeout",
            "5s",
            "-s",
            str(LUA),
            target.url,
        ]
    else:
        argv = [PYTHON, str(HERE / "_stack.py"), target.url, str(connections), str(seconds)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_RESULT "))
            result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
            return result
    raise RuntimeError(f"load generator gave no result for {target.name}:\n{done.stdout}\n{done.stderr}")


# -- set-up --------------------------------------------------------------------------------------


def provision(groups: dict[str, dict[str, Any]]) -> None:
    """Provision the one integration the benchmark asks tokens for (in this process, before the brokers)."""
    settings = load_settings(**groups)
    store = build_store(settings)
    oem = HttpOemClient(settings.oem)
    try:
        outcome = Engine(settings, store, oem).provision(DesiredIntegration(REF))
        if not outcome.ok:
            raise RuntimeError(f"could not provision {REF}: {outcome.code} {outcome.message}")
    finally:
        oem.close()
        store.close()


def check_once(target: Target) -> None:
    response = httpx.request(target.method, target.url, content=target.body or None, headers=target.headers, timeout=10)
    if response.status_code != target.expect_status:
        raise RuntimeError(f"{target.name}: HTTP {response.status_code}: {response.text[:300]}")
    if target.method == "POST":
        body = response.json()
        assert body["token"] and body["ttl_seconds"] > 0 and body["stale"] is False, body


# -- micro-benchmarks ------------------------------------------------------------------------------


def per_call_us(func: Callable[[], Any], seconds: float = 1.0) -> float:
    """Median over 5 runs of the mean time of one call, in microseconds."""
    func()
    batch = 1
    while True:  # find a batch that takes ~seconds/5
        start = time.perf_counter()
        for _ in range(batch):
            func()
        took = time.perf_counter() - start
        if took > seconds / 5:
            break
        batch *= 2
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(batch):
            func()
        runs.append((time.perf_counter() - start) / batch * 1e6)
    return statistics.median(runs)


def micro(groups: dict[str, dict[str, Any]], bearer: str) -> list[tuple[str, float]]:
    from broker.identity import Authenticator
    from broker.metrics import Metrics
    from broker.policy import PolicyStore

    settings = load_settings(**groups)
    metrics = Metrics()
    auth = Authenticator(settings.identity, metrics=metrics)
    policy = PolicyStore(settings.policy, metrics=metrics)
    try:
        principal = auth.authenticate(bearer)
        cached = per_call_us(lambda: auth.authenticate(bearer))
        decide = per_call_us(lambda: policy.decide(principal, "token:issue", REF))
        both = per_call_us(lambda: policy.decide(auth.authenticate(bearer), "token:issue", REF))
        token = bearer.removeprefix("Bearer ")
        # Full verification (first sight of a token): signature + claims, keys already fetched.
        verify = per_call_us(lambda: auth._verify(token, time.time()))
    finally:
        auth.close()
    return [
        ("Authenticator.authenticate (cached token)", cached),
        ("PolicyStore.decide (token:issue, shipped policies)", decide),
        ("identity + policy decision (cached token)", both),
        ("JWT verification, uncached (RS256 signature + claims)", verify),
    ]


# -- main -------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measured run (default 2)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per configuration (default 3)")
    parser.add_argument("--repeats", type=int, default=15, help="rounds: runs per configuration (default 15)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: leaves a core to servers)")
    parser.add_argument("--python-loadgen", action="store_true", help="use the Python load generator, not wrk")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="server.workers of the measured brokers (default: the CPU count, as OpenBao uses every core)",
    )
    args = parser.parse_args()

    wrk = None if args.python_loadgen else ensure_wrk(allow_install=True)
    if wrk is None:
        print(
            "NOTE: using the Python load generator (wrk unavailable or --python-loadgen); it is slower than "
            "wrk and takes CPU from the servers, so absolute numbers are lower",
            flush=True,
        )
    loadgen = f"wrk ({wrk}), {args.threads} thread(s)" if wrk else "Python asyncio load generator"

    with (
        bench_workdir("token-bench-") as workdir,
        Processes(workdir) as procs,
    ):
        vault = procs.openbao()
        seed = write_seed(workdir / "seed.yaml", organizations=1)
        sim = procs.simulator(seed)
        issuer = procs.issuer()
        desired = workdir / "desired.yaml"
        desired.write_text(f"integrations:\n  - organizationId: {REF.organization_id}\n    vendorId: {VENDOR_ID}\n")

        base = broker_settings(vault=vault, sim=sim, issuer=issuer, workdir=workdir, desired_file=desired)
        vendor_path = load_settings(**base).store.vendor_key_path_template.format(vendor_id=VENDOR_ID)
        seed_vendor_key(vault, vendor_path, VENDOR_KEY)
        provision(base)

        def groups(audit_file: Path, workers: int) -> dict[str, dict[str, Any]]:
            made = broker_settings(
                vault=vault, sim=sim, issuer=issuer, workdir=workdir, desired_file=desired, audit_file=audit_file
            )
            made["server"]["workers"] = workers
            return made

        on_groups = groups(workdir / "audit-on" / "audit.jsonl", args.workers)
        off_groups = groups(workdir / "audit-off" / "audit.jsonl", args.workers)
        always_groups = groups(workdir / "audit-always" / "audit.jsonl", args.workers)
        always_groups["audit"]["fsync"] = "always"
        one_groups = groups(workdir / "audit-one" / "audit.jsonl", 1)
        broker_one = procs.spawn("broker-audit-on-1-worker", [PYTHON, "-m", "broker", "serve"], env_of(one_groups))
        broker_on = procs.spawn("broker-audit-on", [PYTHON, "-m", "broker", "serve"], env_of(on_groups))
        broker_always = procs.spawn("broker-fsync-always", [PYTHON, "-m", "broker", "serve"], env_of(always_groups))
        broker_off = procs.spawn("broker-audit-off", [PYTHON, str(HERE / "_noaudit_server.py")], env_of(off_groups))

        bearer = "Bearer " + issuer.mint(*SUBJECT, ttl_seconds=3600)
        body = json.dumps({"organization_id": REF.organization_id, "vendor_id": REF.vendor_id})
        token_headers = {"Authorization": bearer, "Content-Type": "application/json"}
        targets = [
            Target("broker, audit on", f"{broker_on.url}/v1/tokens", "POST", body, token_headers, 201),
            Target(
                "broker, audit off (bench-only server)", f"{broker_off.url}/v1/tokens", "POST", body, token_headers, 201
            ),
            Target(
                "broker, audit on, 1 worker (info)", f"{broker_one.url}/v1/tokens", "POST", body, token_headers, 201
            ),
            Target(
                "broker, audit on, fsync always (info)",
                f"{broker_always.url}/v1/tokens",
                "POST",
                body,
                token_headers,
                201,
            ),
            Target(
                "OpenBao KV v2 read (1 secret)",
                f"{vault.url}/v1/secret/data/{vendor_path}",
                "GET",
                "",
                {"X-Vault-Token": vault.extra["root_token"]},
                200,
            ),
        ]
        for target in targets:
            check_once(target)
        print(
            f"load: {loadgen}, {args.connections} connections, {args.duration:g} s per run, brokers with "
            f"server.workers={args.workers}, "
            f"{args.repeats} rounds after {args.warmup:g} s warm-up each",
            flush=True,
        )
        for target in targets:
            run_load(wrk, target, args.connections, args.threads, args.warmup)

        results: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        compared = [targets[0], targets[1], targets[4]]  # audit on, audit off, OpenBao: back to back
        for round_no in range(args.repeats):
            order = (compared if round_no % 2 == 0 else compared[::-1]) + targets[2:4]
            for target in order:
                result = run_load(wrk, target, args.connections, args.threads, args.duration)
                results[target.name].append(result)
                errors = {k.removeprefix("errors_"): v for k, v in result.items() if k.startswith("errors_") and v}
                print(
                    f"  run {round_no + 1} {target.name:<40} {result['rps']:>9.0f} req/s  "
                    f"p50 {result['p50_us'] / 1000:6.2f} ms  p99 {result['p99_us'] / 1000:6.2f} ms"
                    + (f"  errors {errors}" if errors else ""),
                    flush=True,
                )

        audit_report = verify_audit(on_groups)
        audit_failures = {
            line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in httpx.get(f"{broker_on.url}/metrics", timeout=10).text.splitlines()
            if line.startswith("broker_audit_failures_total{")
        }
        micro_rows = micro(on_groups, bearer)

    rows = []
    for target in targets:
        runs = results[target.name]
        errors = sum(v for r in runs for k, v in r.items() if k.startswith("errors_"))
        rows.append(
            (
                target.name,
                statistics.median(r["rps"] for r in runs),
                statistics.median(r["p50_us"] for r in runs) / 1000,
                statistics.median(r["p99_us"] for r in runs) / 1000,
                errors,
            )
        )
    on, off, _one, _always, bao = rows
    print()
    print(
        f"{'configuration':<40} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}   (medians of "
        f"{args.repeats} runs)"
    )
    for name, rps, p50, p99, errors in rows:
        print(f"{name:<40} {rps:>10.0f} {p50:>8.2f} {p99:>8.2f} {errors:>7}")
    print()
    print(
        f"audit trail after the run: {audit_report}; audit failures (503 AUDIT_UNAVAILABLE): {audit_failures or 'none'}"
    )
    print(f"load average at the end (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("identity + policy decision, in-process (median per call):")
    for name, us in micro_rows:
        print(f"  {name:<56} {us:8.1f} us")
    print()
    on_runs, off_runs, bao_runs = (results[t.name] for t in (targets[0], targets[1], targets[4]))
    ratios = [a["rps"] / b["rps"] for a, b in zip(on_runs, bao_runs, strict=True)]
    costs = [1 - a["rps"] / b["rps"] for a, b in zip(on_runs, off_runs, strict=True)]
    ratio = statistics.median(ratios)
    cost = statistics.median(costs)
    print("per round (audit on vs the runs next to it):")
    print(f"  token_vs_openbao_read {'  '.join(f'{r:.2f}' for r in ratios)}  -> median {ratio:.2f}")
    print(f"  audit cost            {'  '.join(f'{c:.3f}' for c in costs)}  -> median {cost:.3f}")
    print(f"ratios of the medians: token_vs_openbao_read {on[1] / bao[1]:.2f}, audit cost {1 - on[1] / off[1]:.3f}")
    checks = [
        (f"token_vs_openbao_read >= {TARGET_RATIO} (stretch {STRETCH_RATIO})", ratio >= TARGET_RATIO),
        (f"broker p99 (audit on) <= {TARGET_P99_MS} ms", on[3] <= TARGET_P99_MS),
        (f"audit cost < {TARGET_AUDIT_COST:.0%}", cost < TARGET_AUDIT_COST),
        ("no errors / non-2xx (audit on, audit off, OpenBao)", all(r[4] == 0 for r in (on, off, bao))),
    ]
    for label, ok in checks:
        print(f"target {'met   ' if ok else 'MISSED'} {label}")
    for name, _rps, _p50, _p99, errors in (_one, _always):
        if errors:  # an information row's errors are shown (its runs above say which), not a target
            print(f"information: {name}: {errors} errors / non-2xx (see its runs above)")
    print(f"audit_cost={cost:.3f}")
    print(f"token_vs_openbao_read={ratio:.2f}")
    return 0


def verify_audit(groups: dict[str, dict[str, Any]]) -> str:
    """Verify the audit-on broker's chain (hashes, links, checkpoint MACs) and count its records."""
    from broker.audit import default_chains, verify_chain
    from broker.audit.records import AuditKey

    settings = load_settings(**groups)
    path = settings.audit.file_path
    assert path is not None
    reports = [verify_chain(chain, key=AuditKey.from_settings(settings.audit)) for chain in default_chains(path)]
    broken = [str(r.problem) for r in reports if not r.ok]
    state = f"{len(reports)} chain(s) OK" if not broken else "BROKEN: " + "; ".join(broken)
    return f"{sum(r.records for r in reports)} records, {state}"


if __name__ == "__main__":
    sys.exit(main())
