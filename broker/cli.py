"""The one CLI: ``broker <command>`` (also ``python -m broker``).

Commands load settings once, print tables for people and ``--json`` for
scripts, and turn every ``BrokerError`` into one line ``error CODE: message``
with a non-zero exit (2 for configuration, 1 otherwise). No traceback, no
secret, ever reaches the terminal.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from broker import __version__
from broker.client import DEFAULT_SA_TOKEN_FILE, BrokerClient, BrokerClientError, write_token_files
from broker.engine.core import Outcome, find_desired
from broker.errors import BrokerError, ConfigError
from broker.log import configure_logging
from broker.models import IntegrationRef
from broker.runtime import build_engine
from broker.settings import Settings, load_settings

P = ParamSpec("P")
R = TypeVar("R")


def fail(message: str, code: int = 1) -> None:
    """Print one error line to stderr and exit."""
    click.echo(message, err=True)
    sys.exit(code)


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn ``BrokerError`` into a one-line message and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            fail(f"error {exc.code}: {exc.message}", 2)
        except BrokerError as exc:
            fail(f"error {exc.code}: {exc.message}", 1)
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper


def settings_from(ctx: click.Context) -> Settings:
    """Load settings once per invocation (errors become exit 2)."""
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "settings" not in obj:
        try:
            obj["settings"] = load_settings()
        except ConfigError as exc:
            fail(f"error {exc.code}: {exc.message}", 2)
    settings: Settings = obj["settings"]
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mspc-broker")
@click.option("-v", "--verbose", count=True, help="Log more to stderr (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """mspc-broker: short-lived MSPC_TOKENs for Kubernetes workloads."""
    configure_logging(("warning", "info", "debug")[min(verbose, 2)], "auto")


@cli.command("config")
@click.option("--reference", is_flag=True, help="Print the configuration reference (Markdown) instead.")
@click.pass_context
@handle_errors
def config_cmd(ctx: click.Context, reference: bool) -> None:
    """Validate the configuration from the environment and print it (secrets masked)."""
    if reference:
        from broker.settings import reference_markdown

        click.echo(reference_markdown(), nl=False)
        return
    settings = settings_from(ctx)
    click.echo(settings.model_dump_json(indent=2))


@cli.command("simulator")
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address.")
@click.option("--port", default=8300, show_default=True, type=click.IntRange(0, 65535), help="Listen port (0 = any).")
@click.option("--seed", "seed_path", type=click.Path(dir_okay=False), help="Seed YAML/JSON file.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False), help="Persist state in this JSON file.")
@click.option("--duplicate-mode", type=click.Choice(["new", "conflict"]), default="new", show_default=True)
@click.option("--latency-ms", type=click.FloatRange(min=0), default=0.0, help="Fault: added latency, in ms.")
@click.option("--error-rate", type=click.FloatRange(0, 1), default=0.0, help="Fault: share of 5xx answers.")
@click.option("--error-status", type=click.IntRange(500, 599), default=503, show_default=True)
@click.option("--hang-seconds", type=click.FloatRange(min=0), default=0.0, help="Fault: hang before answering.")
@click.option("--lose-response", is_flag=True, help="Fault: handle requests, then drop the connection.")
@click.option("--fault-endpoint", default=None, help="Faults only for this endpoint (e.g. integration.create).")
@click.option("--fault-requests", type=click.IntRange(min=1), default=None, help="Faults only for the next N.")
@click.option("--fault-seed", type=int, default=0, show_default=True, help="Seed of the fault RNG.")
@click.option("--rate-limit-capacity", type=click.IntRange(min=1), default=None, help="Per-client bucket size.")
@click.option("--rate-limit-refill-per-second", type=click.FloatRange(min=0.001), default=1.0, show_default=True)
@click.option("--admin-token", envvar="MSPC_SIMULATOR_ADMIN_TOKEN", default=None, help="Bearer token for /_sim/*.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@click.option("--tls-cert-file", type=click.Path(dir_okay=False), default=None, help="Serve HTTPS: PEM certificate.")
@click.option("--tls-key-file", type=click.Path(dir_okay=False), default=None, help="Serve HTTPS: PEM private key.")
@handle_errors
def simulator_cmd(host: str, port: int, seed_path: str | None, state_path: str | None, **options: Any) -> None:
    """Run the MSPC OEM / Vendor API simulator (test controls under /_sim/)."""
    from broker.simulator.server import serve_from_options

    serve_from_options(host=host, port=port, seed_path=seed_path, state_path=state_path, announce=click.echo, **options)


@cli.command("token")
@click.option("--org", "organization_id", required=True, help="MSPC organizationId.")
@click.option("--vendor", "vendor_id", required=True, help="MSPC vendorId.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Token file (0600, atomic).")
@click.option("--watch", is_flag=True, help="Keep running; refresh at about 2/3 of the TTL (sidecar mode).")
@click.option("--broker-url", envvar="BROKER_URL", default="http://127.0.0.1:8080", show_default=True)
@click.option(
    "--sa-token-file",
    envvar="BROKER_SA_TOKEN_FILE",
    type=click.Path(path_type=Path),
    default=str(DEFAULT_SA_TOKEN_FILE),
    show_default=True,
    help="Projected service-account token (audience: the broker's).",
)
@click.option("--min-ttl-seconds", type=click.IntRange(0, 86400), default=0, help="Refuse shorter tokens.")
@click.option("--deadline-seconds", type=click.FloatRange(1, 3600), default=60.0, show_default=True)
def token_cmd(
    organization_id: str,
    vendor_id: str,
    out: Path,
    watch: bool,
    broker_url: str,
    sa_token_file: Path,
    min_ttl_seconds: int,
    deadline_seconds: float,
) -> None:
    """Fetch an MSPC_TOKEN into a file (init container), or keep it fresh (--watch)."""
    client = BrokerClient(
        broker_url,
        organization_id=organization_id,
        vendor_id=vendor_id,
        sa_token_file=sa_token_file,
        min_ttl_seconds=min_ttl_seconds,
        deadline_seconds=deadline_seconds,
    )
    stop = threading.Event()
    if watch:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    while True:
        try:
            issued = client.token(force=True)
        except BrokerClientError as exc:
            if not watch:
                fail(f"error {exc.code}: {exc.message}", 1)
            click.echo(f"error {exc.code}: {exc.message} (retrying)", err=True)
            if stop.wait(min(30.0, deadline_seconds)):
                return
            continue
        write_token_files(issued, out)
        click.echo(
            f"wrote {out} (lease {issued.lease_id}, ttl {issued.ttl_seconds}s, "
            f"expires {issued.expires_at.isoformat()}, "
            f"partner key version {issued.partner_key_version}, vendor key version {issued.vendor_key_version}"
            + (", STALE" if issued.stale else "")
            + ")"
        )
        if not watch:
            return
        if stop.wait(max(1.0, issued.ttl_seconds * 2 / 3)):
            return


@cli.group("policy")
def policy_cmd() -> None:
    """Test policy files and explain decisions."""


@policy_cmd.command("test")
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.pass_context
@handle_errors
def policy_test_cmd(ctx: click.Context, directory: str | None) -> None:
    """Run the examples of every policy file in DIRECTORY (default: settings); exit 1 if any fails."""
    from pathlib import Path

    from broker.policy.examples import make_console, render_results, run_examples
    from broker.policy.loader import load_policy_dir

    results = run_examples(load_policy_dir(Path(directory) if directory else settings_from(ctx).policy.dir))
    render_results(results, make_console())
    if not all(r.passed for r in results):
        sys.exit(1)


@policy_cmd.command("check")
@click.option("--subject", required=True, help="Caller as namespace/service-account.")
@click.option("--org", "organization", default=None, help="Organization id (give with --vendor).")
@click.option("--vendor", default=None, help="Vendor id (give with --org).")
@click.option("--action", required=True, help="Action, e.g. token:issue.")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None, help="Policy directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
@click.pass_context
@handle_errors
def policy_check_cmd(
    ctx: click.Context,
    subject: str,
    organization: str | None,
    vendor: str | None,
    action: str,
    directory: str | None,
    as_json: bool,
) -> None:
    """Print the decision for one request and the rule that took it; exit 0 if allowed, 1 if denied."""
    import json
    from pathlib import Path

    from broker.policy.examples import decision_dict, explain, make_console, render_decision
    from broker.policy.loader import load_policy_dir

    policy_set = load_policy_dir(Path(directory) if directory else settings_from(ctx).policy.dir)
    decision, source = explain(policy_set, subject=subject, action=action, organization=organization, vendor=vendor)
    if as_json:
        click.echo(json.dumps(decision_dict(decision, source)))
    else:
        render_decision(decision, source, make_console())
    if not decision.allowed:
        sys.exit(1)


@cli.group("audit")
def audit_cmd() -> None:
    """Verify, search and look up the hash-chained audit trail."""


def _audit_key(ctx: click.Context, key_file: Path | None, *, required: bool) -> Any:
    from broker.audit import AuditKey

    key = AuditKey.from_file(key_file) if key_file else AuditKey.from_settings_optional(settings_from(ctx).audit)
    if key is None and required:
        raise ConfigError("no audit key: pass --key-file or set BROKER_AUDIT__HMAC_KEY_FILE")
    return key


def _audit_chains(ctx: click.Context, paths: tuple[Path, ...]) -> list[list[Path]]:
    """PATHS as one chain; without them the configured file's chains (its own, then each worker's)."""
    from broker.audit import default_chains

    if paths:
        return [list(paths)]
    file_path = settings_from(ctx).audit.file_path
    if file_path is None:
        raise ConfigError("no audit file configured (BROKER_AUDIT__FILE_PATH): pass PATH")
    return default_chains(file_path) or [[]]


def _audit_paths(ctx: click.Context, paths: tuple[Path, ...]) -> list[Path]:
    return [path for chain in _audit_chains(ctx, paths) for path in chain]


def _when(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    from broker.audit import parse_when

    try:
        return parse_when(value) if value else None
    except ValueError:
        raise click.BadParameter(
            "use ISO 8601 (2026-01-31, 2026-01-31T12:00:00Z) or an age (90s, 10m, 1h, 7d)"
        ) from None


_audit_paths_arg = click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
_audit_key_opt = click.option(
    "--key-file", type=click.Path(dir_okay=False, path_type=Path), help="Audit key file (default: settings)."
)


@audit_cmd.command("verify")
@_audit_paths_arg
@_audit_key_opt
@click.option("--partial", is_flag=True, help="Accept a chain whose oldest files were removed.")
@click.pass_context
@handle_errors
def audit_verify_cmd(ctx: click.Context, paths: tuple[Path, ...], key_file: Path | None, partial: bool) -> None:
    """Check every hash, link and checkpoint MAC in PATHS (one chain: files in any order or directories;
    default: the configured file and its rotations, and each server worker's chain). Exit 1 naming the
    first broken record."""
    from broker.audit import verify_chain

    key = _audit_key(ctx, key_file, required=False)
    chains = _audit_chains(ctx, paths)
    failed = False
    for chain in chains:
        report = verify_chain(chain, key=key, partial=partial)
        where = f"{chain[-1]}: " if len(chains) > 1 else ""  # several chains: name each
        click.echo(where + report.summary())
        failed = failed or not report.ok
    if failed:
        sys.exit(1)


@audit_cmd.command("hash")
@click.argument("value")
@_audit_key_opt
@click.pass_context
@handle_errors
def audit_hash_cmd(ctx: click.Context, value: str, key_file: Path | None) -> None:
    """Print the HMAC under which VALUE (a token or key) appears in records; '-' reads it from stdin."""
    if value == "-":
        value = sys.stdin.read().rstrip("\r\n")
    click.echo(_audit_key(ctx, key_file, required=True).hmac_hex(value))


@audit_cmd.command("query")
@_audit_paths_arg
@click.option("--since", callback=_when, help="From this time (ISO 8601, naive = UTC, or an age: 10m, 1h, 7d).")
@click.option("--until", callback=_when, help="Before this time (ISO 8601 or an age; exclusive).")
@click.option("--subject", help="Caller as namespace/service-account.")
@click.option("--org", "organization_id", help="Organization id.")
@click.option("--vendor", "vendor_id", help="Vendor id.")
@click.option("--action", "actions", multiple=True, help="Action, e.g. token.issued (repeatable).")
@click.option("--outcome", "outcomes", multiple=True, help="success, denied, failure or error (repeatable).")
@click.option("--hash", "hmac", help="An HMAC from `broker audit hash`: records about that token or key.")
@click.option("--json", "as_json", is_flag=True, help="Stream matching records as JSON lines (no limit).")
@click.option("--limit", type=click.IntRange(min=1), default=500, show_default=True, help="Table rows at most.")
@click.pass_context
@handle_errors
def audit_query_cmd(
    ctx: click.Context,
    paths: tuple[Path, ...],
    since: Any,
    until: Any,
    subject: str | None,
    organization_id: str | None,
    vendor_id: str | None,
    actions: tuple[str, ...],
    outcomes: tuple[str, ...],
    hmac: str | None,
    as_json: bool,
    limit: int,
) -> None:
    """Stream the records in PATHS (default: the configured file and its rotations) that match every filter."""
    from rich.console import Console

    from broker.audit import AuditQuery, query_records, render_table

    query = AuditQuery(since, until, subject, organization_id, vendor_id, frozenset(actions), frozenset(outcomes), hmac)
    matches = query_records(_audit_paths(ctx, paths), query)
    if as_json:
        out = sys.stdout.buffer
        for raw, _record in matches:
            out.write(raw)
        out.flush()
    else:
        render_table(matches, Console(), limit=limit)


# -- serve and the platform-team commands -------------------------------------------


@cli.command("dev")
@click.option("--backend", type=click.Choice(["vault", "aws"]), default="vault", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Broker port (0 = any).")
@click.option("--policies", type=click.Path(path_type=Path, file_okay=False), default="policies", show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), help="Keep state here (default: temp).")
@click.option("--once", is_flag=True, help="Stop after the demo instead of waiting for Ctrl-C.")
def dev_cmd(backend: str, port: int, policies: Path, workdir: Path | None, once: bool) -> None:
    """Run the whole stack locally: OpenBao (or moto), the OEM simulator, a dev issuer, the broker."""
    from broker.dev import DevOptions, main_dev

    options = DevOptions(backend=backend, port=port, policies=policies, workdir=workdir, once=once, say=click.echo)
    sys.exit(main_dev(options))


@cli.command("serve")
@click.option("--worker", "worker_index", type=int, default=None, hidden=True, help="Internal: worker index.")
@click.option("--listen-fd", type=int, default=None, hidden=True, help="Internal: inherited listening socket.")
@click.option("--ready-fd", type=int, default=None, hidden=True, help="Internal: closed once serving.")
@click.option("--balance", "balance_spec", default=None, hidden=True, help="Internal: connection balancing channels.")
@click.pass_context
@handle_errors
def serve_cmd(
    ctx: click.Context, worker_index: int | None, listen_fd: int | None, ready_fd: int | None, balance_spec: str | None
) -> None:
    """Run the broker: HTTP API, reconcile loop, policy reload, audit trail.

    With ``server.workers`` > 1 this process supervises that many workers
    on the one port (see ``broker.api.workers``).
    """
    import socket

    import uvicorn

    from broker.api.app import create_app
    from broker.api.balance import Balancer
    from broker.api.server import DrainingServer
    from broker.api.workers import Supervisor, worker_settings
    from broker.runtime import Runtime

    settings = settings_from(ctx)
    configure_logging(settings.log.level, settings.log.format)
    if worker_index is None and settings.server.workers > 1:
        sys.exit(Supervisor(settings).run())
    if worker_index is not None:
        settings = worker_settings(settings, worker_index)
    runtime = Runtime(settings)
    app = create_app(runtime)
    # What is alive now (imports, settings, the app) lives as long as the process: moved out of the
    # collector's generations, a full collection no longer walks it in the middle of requests.
    gc.freeze()
    balancer = Balancer.from_spec(balance_spec) if balance_spec is not None else None
    config = uvicorn.Config(
        app,
        http=balancer.protocol_class() if balancer is not None else "auto",
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        access_log=False,
        # Callers are known by their service-account token, never by address: X-Forwarded-* headers are not
        # interpreted, and no Server header advertises what answers.
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=int(settings.server.shutdown_grace_seconds),
    )
    server = DrainingServer(
        config,
        drain_seconds=settings.server.drain_seconds,
        on_drain=runtime.begin_drain,
        on_started=functools.partial(_signal_ready, ready_fd) if ready_fd is not None else None,
        balancer=balancer,
    )
    server.run(sockets=[socket.socket(fileno=listen_fd)] if listen_fd is not None else None)


def _signal_ready(ready_fd: int) -> None:
    """Tell the worker supervisor this worker is serving (a byte, then close)."""
    try:
        os.write(ready_fd, b"1")
    finally:
        os.close(ready_fd)


def _ref_option(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--vendor", "vendor_id", required=True, help="MSPC vendorId.")(func)
    return click.option("--org", "organization_id", required=True, help="MSPC organizationId.")(func)


def _outcome_table(outcomes: list[Outcome], title: str) -> Table:
    table = Table(title=title)
    for column in ("organization", "vendor", "result", "version", "code", "orphans"):
        table.add_column(column)
    for o in sorted(outcomes, key=lambda o: (o.ref.organization_id, o.ref.vendor_id)):
        style = "" if o.ok else "red"
        table.add_row(
            o.ref.organization_id,
            o.ref.vendor_id,
            o.action,
            o.version or "-",
            o.code or "",
            str(o.orphans),
            style=style,
        )
    return table


def _outcome_json(o: Outcome) -> dict[str, Any]:
    return {
        "organization_id": o.ref.organization_id,
        "vendor_id": o.ref.vendor_id,
        "result": o.action,
        "ok": o.ok,
        "version": o.version,
        "code": o.code,
        "message": o.message,
        "orphans": o.orphans,
    }


@cli.command("provision")
@click.option("--desired", "desired_file", type=click.Path(path_type=Path, dir_okay=False), help="Desired YAML.")
@click.option("--org", "organization_id", help="Provision only this organization (with --vendor).")
@click.option("--vendor", "vendor_id", help="Provision only this vendor (with --org).")
@click.option("--concurrency", type=click.IntRange(1, 256), default=None, help="Parallel sagas.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@click.pass_context
@handle_errors
def provision_cmd(
    ctx: click.Context,
    desired_file: Path | None,
    organization_id: str | None,
    vendor_id: str | None,
    concurrency: int | None,
    as_json: bool,
) -> None:
    """Reconcile desired integrations once: provision missing keys, rotate old ones, retire expired ones."""
    settings = settings_from(ctx)
    handle = build_engine(settings, audited=True, desired_file=desired_file)
    try:
        items = handle.desired
        if organization_id or vendor_id:
            if not (organization_id and vendor_id):
                fail("error INVALID_INPUT: give both --org and --vendor", 2)
            items = [find_desired(items, IntegrationRef(str(organization_id), str(vendor_id)))]
        if not items:
            fail("error INVALID_INPUT: nothing to provision: pass --desired FILE or --org/--vendor", 2)
        console = Console(stderr=True)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=as_json or not console.is_terminal,
        ) as progress:
            task = progress.add_task("reconciling", total=len(items))
            outcomes = handle.engine.reconcile_all(
                items, progress=lambda _o: progress.advance(task), concurrency=concurrency
            )
        if as_json:
            for o in outcomes:
                click.echo(json.dumps(_outcome_json(o)))
        else:
            Console().print(_outcome_table(outcomes, f"reconciled {len(outcomes)} integrations"))
        if any(not o.ok for o in outcomes):
            sys.exit(1)
    finally:
        handle.close()


def _one(ctx: click.Context, organization_id: str, vendor_id: str, op: str, as_json: bool, **kw: Any) -> None:
    settings = settings_from(ctx)
    handle = build_engine(settings, audited=True)
    try:
        ref = IntegrationRef(organization_id, vendor_id)
        desired = find_desired(handle.desired, ref)
        engine = handle.engine
        if op == "rotate":
            outcome = engine.rotate(desired, grace_seconds=kw.get("grace_seconds"))
        elif op == "rollback":
            outcome = engine.rollback(ref, grace_seconds=desired.grace_seconds)
        else:
            outcome = engine.revoke(desired)
        if as_json:
            click.echo(json.dumps(_outcome_json(outcome)))
        else:
            Console().print(_outcome_table([outcome], op))
        if not outcome.ok:
            sys.exit(1)
    finally:
        handle.close()


@cli.command("rotate")
@_ref_option
@click.option("--grace-seconds", type=click.IntRange(min=0), default=None, help="Override the grace period.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def rotate_cmd(
    ctx: click.Context, organization_id: str, vendor_id: str, grace_seconds: int | None, as_json: bool
) -> None:
    """Rotate a partner key now (new key -> pending -> probe -> current; old key kept for the grace)."""
    _one(ctx, organization_id, vendor_id, "rotate", as_json, grace_seconds=grace_seconds)


@cli.command("rollback")
@_ref_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def rollback_cmd(ctx: click.Context, organization_id: str, vendor_id: str, as_json: bool) -> None:
    """Promote the previous partner key back to current (only while it is not revoked)."""
    _one(ctx, organization_id, vendor_id, "rollback", as_json)


@cli.command("revoke")
@_ref_option
@click.option("--yes", is_flag=True, help="Confirm: the old key stops working at once.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def revoke_cmd(ctx: click.Context, organization_id: str, vendor_id: str, yes: bool, as_json: bool) -> None:
    """Break glass: rotate with zero grace and revoke the old key at the OEM at once."""
    if not yes:
        fail("error INVALID_INPUT: revoke breaks every token built from the current key; add --yes", 2)
    _one(ctx, organization_id, vendor_id, "revoke", as_json)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


@cli.command("status")
@click.option("--desired", "desired_file", type=click.Path(path_type=Path, dir_okay=False), help="Desired YAML.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def status_cmd(ctx: click.Context, desired_file: Path | None, as_json: bool) -> None:
    """A table of desired integrations: versions, key age, next rotation, state, orphans (no secrets)."""
    settings = settings_from(ctx)
    handle = build_engine(settings, audited=False, desired_file=desired_file)
    try:
        rows = [handle.engine.status(d) for d in handle.desired]
    finally:
        handle.close()
    now = time.time()
    if as_json:
        for r in rows:
            click.echo(
                json.dumps(
                    {
                        "organization_id": r.ref.organization_id,
                        "vendor_id": r.ref.vendor_id,
                        "state": r.state,
                        "current_version": r.current_version,
                        "pending_version": r.pending_version,
                        "previous_version": r.previous_version,
                        "key_age_seconds": r.key_age_seconds,
                        "next_rotation_at": r.next_rotation_at,
                        "retiring": [x.model_dump() for x in r.retiring],
                        "orphans": [x.model_dump() for x in r.orphans],
                        "last_error": r.last_error,
                    }
                )
            )
        return
    table = Table(title=f"{len(rows)} integrations ({settings.store.backend})")
    for column in ("organization", "vendor", "current", "key age", "next rotation", "state", "orphans"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r.ref.organization_id,
            r.ref.vendor_id,
            r.current_version or "-",
            _age(r.key_age_seconds),
            ("in " + _age(r.next_rotation_at - now)) if r.next_rotation_at else "-",
            r.state + (f" ({r.last_error})" if r.last_error else ""),
            str(len(r.orphans)),
        )
    Console().print(table)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="broker")
