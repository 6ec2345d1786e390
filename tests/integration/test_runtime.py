"""Runtime behaviours that span components: vendor-key changes and policy reloads, each audited."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from stack_support import REF, VENDOR_KEY, Stack, build_stack

from broker.testing.jwt import DevIssuer


@pytest.fixture
def stack(
    broker_config: Callable[..., dict[str, Any]], seed_vendor: Callable[..., None], tmp_path: Path
) -> Iterator[Stack]:
    issuer = DevIssuer().start()
    config = broker_config()
    seed_vendor(config, REF.vendor_id, VENDOR_KEY)
    s = build_stack(config, tmp_path, issuer)
    yield s
    s.broker.stop()
    issuer.stop()


def audit_records(stack: Stack) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stack.audit_path.read_text().splitlines()]


class TestVendorKeyRotation:
    def test_new_vendor_key_version_is_picked_up_and_audited(
        self, stack: Stack, broker_config: Callable[..., dict[str, Any]], seed_vendor: Callable[..., None]
    ) -> None:
        """A platform team writes a new vendor key: the next check drops the cached one, tokens use the new one."""
        first = stack.post_token().json()
        assert base64.b64decode(first["token"]).decode().startswith(VENDOR_KEY + ":")
        stack.runtime.check_dependencies()  # baseline seen
        seed_vendor(stack.config, REF.vendor_id, "acme-vendor-key-rotated")
        stack.runtime.check_dependencies()
        second = stack.post_token().json()
        assert second["vendor_key_version"] != first["vendor_key_version"]
        assert base64.b64decode(second["token"]).decode().startswith("acme-vendor-key-rotated:")
        changed = [r for r in audit_records(stack) if r["action"] == "vendor_key.version_changed"]
        assert len(changed) == 1
        assert changed[0]["vendor_id"] == REF.vendor_id
        assert changed[0]["details"]["new_version"] == second["vendor_key_version"]
        assert "acme-vendor-key-rotated" not in stack.audit_path.read_text()


class TestPolicyReload:
    def test_broken_policy_keeps_the_last_good_set_and_is_audited(self, stack: Stack) -> None:
        """A broken policy file is refused (tokens still issued under the old rules); the refusal is audited."""
        policy_file = Path(stack.config["policy"]["dir"]) / "test.yaml"
        good = policy_file.read_text()
        policy_file.write_text(good + "\n  - id: broken\n    effect: maybe\n")
        assert stack.runtime.policy.reload_if_changed().outcome == "rejected"
        assert stack.post_token().status_code == 201
        policy_file.write_text(good.replace("max_ttl_seconds: 300", "max_ttl_seconds: 120"))
        assert stack.runtime.policy.reload_if_changed().outcome == "reloaded"
        assert stack.post_token().json()["ttl_seconds"] == 120
        reloads = [r for r in audit_records(stack) if r["action"] == "policy.reloaded"]
        assert [r["outcome"] for r in reloads][-2:] == ["failure", "success"]
        assert "broken" in reloads[-2]["reason"]
