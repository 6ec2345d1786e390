"""MSPC_TOKEN composition and parsing, exactly as the MSPC docs define it."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from broker.errors import InvalidMspcToken
from broker.mspc_token import compose, parse

vendor_keys = st.text(min_size=1, max_size=200).filter(lambda s: ":" not in s)
partner_keys = st.text(min_size=1, max_size=200)


class TestCompose:
    def test_documented_example(self) -> None:
        """vendorKey123 + partnerKey456 gives the docs' example token."""
        token = compose(SecretStr("vendorKey123"), SecretStr("partnerKey456"))
        assert token.get_secret_value() == "dmVuZG9yS2V5MTIzOnBhcnRuZXJLZXk0NTY="

    def test_standard_padded_alphabet(self) -> None:
        """The token uses '+' and '/' and keeps its '=' padding (not URL-safe)."""
        token = compose(SecretStr("\xfb\xff"), SecretStr("?>")).get_secret_value()
        assert token == base64.b64encode("\xfb\xff:?>".encode()).decode()
        assert "+" in token or "/" in token
        assert token.endswith("=") or len(token) % 4 == 0

    @pytest.mark.parametrize(("vendor", "partner"), [("", "p"), ("v", ""), ("v:x", "p")])
    def test_rejects_unparseable_halves(self, vendor: str, partner: str) -> None:
        """Empty halves and a colon in the vendor key are refused."""
        with pytest.raises(InvalidMspcToken):
            compose(SecretStr(vendor), SecretStr(partner))

    def test_token_is_secret(self) -> None:
        """The composed token is a SecretStr, so repr never shows it."""
        token = compose(SecretStr("vendorKey123"), SecretStr("partnerKey456"))
        assert "dmVuZG9y" not in repr(token)


class TestParse:
    @given(vendor_keys, partner_keys)
    def test_round_trip(self, vendor: str, partner: str) -> None:
        """parse(compose(v, p)) gives back v and p for any Unicode keys."""
        creds = parse(compose(SecretStr(vendor), SecretStr(partner)))
        assert creds.vendor_key.get_secret_value() == vendor
        assert creds.partner_key.get_secret_value() == partner

    def test_splits_at_first_colon(self) -> None:
        """A partner key may contain colons; the split is at the first one."""
        token = base64.b64encode(b"vendor:part:ner").decode()
        creds = parse(token)
        assert creds.vendor_key.get_secret_value() == "vendor"
        assert creds.partner_key.get_secret_value() == "part:ner"

    @pytest.mark.parametrize(
        "bad",
        [
            "",
            "not base64!",
            "dmVuZG9y",  # 'vendor', no colon
            base64.b64encode(b":partner").decode(),
            base64.b64encode(b"vendor:").decode(),
            base64.b64encode(b"\xff\xfe:\xff").decode(),  # not UTF-8
            "dmVuZG9yS2V5MTIzOnBhcnRuZXJLZXk0NTY",  # padding stripped
            base64.urlsafe_b64encode("\xfb\xff:?>".encode()).decode(),  # URL-safe alphabet
            "dmVuZG9yOnA=\n",
            "A" * 10000,
        ],
    )
    def test_rejects_malformed(self, bad: str) -> None:
        """Anything but strict padded standard base64 of 'v:p' is INVALID_MSPC_TOKEN."""
        with pytest.raises(InvalidMspcToken) as info:
            parse(bad)
        assert info.value.code == "INVALID_MSPC_TOKEN"

    @given(st.binary(max_size=64))
    def test_never_raises_anything_else(self, raw: bytes) -> None:
        """Arbitrary bytes either parse or raise InvalidMspcToken, nothing else."""
        with contextlib.suppress(InvalidMspcToken):
            parse(base64.b64encode(raw).decode())

    def test_error_does_not_echo_token(self) -> None:
        """The error message never contains the token."""
        token = base64.b64encode(b"SECRETVENDOR").decode()
        with pytest.raises(InvalidMspcToken) as info:
            parse(token)
        assert token not in str(info.value)
        assert "SECRETVENDOR" not in str(info.value)
