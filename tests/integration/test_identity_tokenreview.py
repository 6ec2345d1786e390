"""Identity in TokenReview mode, against a fake TokenReview API served over loopback HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.errors import AuthenticationFailed, IdentityUnavailable
from broker.identity import Authenticator
from broker.metrics import Metrics
from broker.settings import IdentitySettings
from broker.testing.jwt import DevIssuer, TokenReviewServer

REVIEWER_TOKEN = "reviewer-sa-token"


@pytest.fixture
def issuer() -> DevIssuer:
    return DevIssuer(algorithm="ES256")


@pytest.fixture
def review_server(issuer: DevIssuer) -> Iterator[TokenReviewServer]:
    with TokenReviewServer(issuer, reviewer_token=REVIEWER_TOKEN) as server:
        yield server


def _settings(server: TokenReviewServer, tmp_path: Path, reviewer: str = REVIEWER_TOKEN) -> IdentitySettings:
    token_path = tmp_path / "token"
    token_path.write_text(reviewer + "\n")
    return IdentitySettings(mode="tokenreview", tokenreview_url=server.url, tokenreview_token_path=token_path)


@pytest.fixture
def auth(review_server: TokenReviewServer, tmp_path: Path) -> Iterator[Authenticator]:
    with Authenticator(_settings(review_server, tmp_path), metrics=Metrics()) as authenticator:
        yield authenticator


class TestTokenReviewMode:
    def test_authenticated_token(self, issuer: DevIssuer, auth: Authenticator) -> None:
        """A token the API server accepts yields the service account and pod from the review."""
        principal = auth.authenticate(issuer.mint("billing", "invoicer", pod_name="invoicer-1", pod_uid="p-uid"))
        assert principal.subject == "billing/invoicer"
        assert (principal.pod_name, principal.pod_uid) == ("invoicer-1", "p-uid")
        assert principal.expires_at is not None

    def test_review_sends_broker_audience_and_own_token(
        self, issuer: DevIssuer, auth: Authenticator, review_server: TokenReviewServer
    ) -> None:
        """A token for another audience is rejected by the review (the broker asks for its own audience)."""
        with pytest.raises(AuthenticationFailed, match="token rejected by TokenReview") as info:
            auth.authenticate(issuer.mint("billing", "invoicer", audience="vault"))
        assert not isinstance(info.value, IdentityUnavailable)
        assert review_server.requests == 1

    def test_reviews_are_cached(self, issuer: DevIssuer, auth: Authenticator, review_server: TokenReviewServer) -> None:
        """The same token twice costs one TokenReview call."""
        token = issuer.mint("billing", "invoicer")
        auth.authenticate(token)
        auth.authenticate(token)
        assert review_server.requests == 1

    def test_broker_credentials_refused(
        self, issuer: DevIssuer, review_server: TokenReviewServer, tmp_path: Path
    ) -> None:
        """If the API server refuses the broker's own token, authentication is unavailable (not the caller's fault)."""
        refused = r"refused the broker's own credentials \(HTTP 401\)"
        with (
            Authenticator(_settings(review_server, tmp_path, reviewer="wrong")) as auth,
            pytest.raises(IdentityUnavailable, match=refused),
        ):
            auth.authenticate(issuer.mint("billing", "invoicer"))

    def test_api_server_down(self, issuer: DevIssuer, review_server: TokenReviewServer, tmp_path: Path) -> None:
        """An unreachable API server makes authentication unavailable."""
        settings = _settings(review_server, tmp_path)
        review_server.stop()
        with Authenticator(settings) as auth, pytest.raises(IdentityUnavailable, match="TokenReview unreachable"):
            auth.authenticate(issuer.mint("billing", "invoicer"))

    def test_missing_reviewer_token_file(self, issuer: DevIssuer, review_server: TokenReviewServer) -> None:
        """A missing broker token file is reported as unavailable, naming the path."""
        settings = IdentitySettings(
            mode="tokenreview", tokenreview_url=review_server.url, tokenreview_token_path=Path("/nonexistent/token")
        )
        with Authenticator(settings) as auth, pytest.raises(IdentityUnavailable, match="/nonexistent/token"):
            auth.authenticate(issuer.mint("billing", "invoicer"))

    def test_oversized_token_not_sent(self, auth: Authenticator, review_server: TokenReviewServer) -> None:
        """An oversized token is refused locally, never forwarded to the API server."""
        with pytest.raises(AuthenticationFailed, match="token larger than"):
            auth.authenticate("x" * 10_000)
        assert review_server.requests == 0

    def test_https_api_server(self, issuer: DevIssuer, tmp_path: Path) -> None:
        """TokenReview over HTTPS verifies the API server with tokenreview_ca_bundle_path."""
        with TokenReviewServer(issuer, reviewer_token=REVIEWER_TOKEN, tls=True) as server:
            assert server.tls is not None
            ca = server.tls.write_ca(tmp_path / "ca.crt")
            settings = _settings(server, tmp_path).model_copy(update={"tokenreview_ca_bundle_path": ca})
            with Authenticator(settings) as auth:
                assert auth.authenticate(issuer.mint("billing", "invoicer")).subject == "billing/invoicer"
            with Authenticator(_settings(server, tmp_path)) as untrusting, pytest.raises(IdentityUnavailable):
                untrusting.authenticate(issuer.mint("billing", "invoicer"))
