"""schemathesis against the live /openapi.json: no 5xx, every response matches the documented schema."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from stack_support import REF, VENDOR_KEY, Stack, build_stack

from broker.testing.jwt import DevIssuer


@pytest.fixture
def backend() -> str:
    """One backend is enough here: the HTTP contract does not depend on it."""
    return "vault"


@pytest.fixture
def live(
    broker_config: Callable[..., dict[str, Any]], seed_vendor: Callable[..., None], tmp_path: Path
) -> Iterator[Stack]:
    issuer = DevIssuer().start()
    config = broker_config()
    seed_vendor(config, REF.vendor_id, VENDOR_KEY)
    stack = build_stack(config, tmp_path, issuer)
    yield stack
    stack.broker.stop()
    issuer.stop()


def _each_operation(live: Stack, check: Callable[[Any], None], max_examples: int) -> list[str]:
    """Run ``check`` on generated cases of every operation; return the operations exercised."""
    schema = schemathesis.openapi.from_url(f"{live.broker.url}/openapi.json")
    seen = []
    for result in schema.get_all_operations():
        operation = result.ok()
        seen.append(f"{operation.method.upper()} {operation.path}")

        @given(case=operation.as_strategy())
        @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: Any) -> None:
            check(case)

        run()
    return seen


class TestOpenApiContract:
    def test_no_5xx_and_responses_match_schema(self, live: Stack) -> None:
        """Generated requests (as an admin, who may call every route) never get a 5xx or an undocumented answer."""
        admin = live.bearer("platform", "admin")
        seen = _each_operation(live, lambda case: case.call_and_validate(headers=admin), 25)
        assert "POST /v1/tokens" in seen and "POST /v1/authz/check" in seen and len(seen) >= 8

    def test_unauthenticated_is_always_401(self, live: Stack) -> None:
        """Without credentials every API route answers 400 or 401 problem+json, never anything else."""

        def check(case: Any) -> None:
            response = case.call()
            assert response.status_code in (400, 401), response.text
            assert response.headers["content-type"][0].startswith("application/problem+json")

        _each_operation(live, check, 10)
