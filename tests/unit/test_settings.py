"""Settings: env prefix, nested groups, secrets from files, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.settings import Settings, load_settings


def _walk_fields(model: type, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]
        out.append((prefix + name, info))
        annotation = info.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            out.extend(_walk_fields(annotation, prefix + name + "."))
    return out


class TestSettings:
    def test_defaults_load(self) -> None:
        """With no environment the defaults form a valid configuration."""
        settings = load_settings()
        assert settings.store.backend == "vault"
        assert settings.oem.scope == "oem:partner_token"

    def test_nested_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """BROKER_<GROUP>__<FIELD> sets a nested field."""
        monkeypatch.setenv("BROKER_VAULT__URL", "http://127.0.0.1:1234")
        monkeypatch.setenv("BROKER_STORE__BACKEND", "aws")
        settings = load_settings()
        assert settings.vault.url == "http://127.0.0.1:1234"
        assert settings.store.backend == "aws"

    def test_secret_from_file(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, canary: str) -> None:
        """A *_FILE variable fills the secret from a mounted file, trailing newline stripped."""
        secret_file = tmp_path / "client-secret"
        secret_file.write_text(canary + "\n")
        monkeypatch.setenv("BROKER_OEM__CLIENT_SECRET_FILE", str(secret_file))
        settings = load_settings()
        assert settings.oem.client_secret is not None
        assert settings.oem.client_secret.get_secret_value() == canary
        assert canary not in settings.model_dump_json()
        assert canary not in repr(settings)

    def test_secret_and_file_both_set_is_an_error(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, canary: str
    ) -> None:
        """Setting a secret and its file is refused, naming the variable, not the value."""
        (tmp_path / "s").write_text("other")
        monkeypatch.setenv("BROKER_OEM__CLIENT_SECRET", canary)
        monkeypatch.setenv("BROKER_OEM__CLIENT_SECRET_FILE", str(tmp_path / "s"))
        with pytest.raises(ConfigError) as info:
            load_settings()
        assert "BROKER_OEM" in info.value.message
        assert canary not in str(info.value)

    def test_missing_secret_file(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """An unreadable secret file fails at start with the path in the message."""
        monkeypatch.setenv("BROKER_AUDIT__HMAC_KEY_FILE", str(tmp_path / "nope"))
        with pytest.raises(ConfigError, match="hmac_key_file"):
            load_settings()

    @pytest.mark.parametrize(
        ("var", "value"),
        [
            ("BROKER_VAULT__TIMEOUT_SECONDS", "soon"),
            ("BROKER_STORE__BACKEND", "etcd"),
            ("BROKER_SERVER__PORT", "70000"),
            ("BROKER_VAULT__NO_SUCH_FIELD", "unexpected-value-7"),
        ],
    )
    def test_bad_value_one_clear_line(self, monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
        """A bad setting gives one line naming the variable and never echoes the value."""
        monkeypatch.setenv(var, value)
        with pytest.raises(ConfigError) as info:
            load_settings()
        message = info.value.message
        assert var in message
        assert "\n" not in message
        assert value not in message

    def test_every_field_documented(self) -> None:
        """Every setting, nested ones included, has a description."""
        missing = [name for name, info in _walk_fields(Settings) if not getattr(info, "description", None)]
        assert missing == []

    def test_durations_name_their_unit(self) -> None:
        """Fields that hold durations or sizes end in a unit suffix."""
        suspicious = [
            name
            for name, _ in _walk_fields(Settings)
            if {"timeout", "interval", "ttl", "age", "grace", "stale", "backoff", "deadline"}
            & set(name.rsplit(".", 1)[-1].split("_"))
            and not name.endswith(("_seconds", "_ms", "_ratio", "_bytes"))
        ]
        assert suspicious == []


class TestCrossChecks:
    def test_grace_must_cover_token_ttl(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A grace period shorter than the longest token TTL is refused at start, naming both settings."""
        monkeypatch.setenv("BROKER_ENGINE__GRACE_SECONDS", "10")
        monkeypatch.setenv("BROKER_TOKENS__MAX_TTL_SECONDS", "60")
        with pytest.raises(ConfigError) as info:
            load_settings()
        assert "engine.grace_seconds (10)" in info.value.message
        assert "tokens.max_ttl_seconds (60)" in info.value.message
