"""Compose and parse MSPC_TOKEN values (pure functions, no I/O).

``MSPC_TOKEN = base64(utf8(vendor_key + ":" + partner_key))`` with the
standard, padded alphabet (RFC 4648 section 4), exactly like the Node.js
``Buffer.from(`${vendorApiKey}:${partnerApiKey}`).toString('base64')`` in the
MSPC docs. Parsing splits at the *first* colon, so a partner key may contain
colons but a vendor key may not.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from pydantic import SecretStr

from broker.errors import InvalidMspcToken

MAX_TOKEN_CHARS = 8192


@dataclass(frozen=True, slots=True)
class MspcCredentials:
    """The two halves of an MSPC_TOKEN."""

    vendor_key: SecretStr
    partner_key: SecretStr


def compose(vendor_key: SecretStr, partner_key: SecretStr) -> SecretStr:
    """Return the MSPC_TOKEN for a vendor key and a partner key.

    Raises ``InvalidMspcToken`` when a half is empty or the vendor key contains
    a colon (the token could not be parsed back unambiguously).
    """
    vendor = vendor_key.get_secret_value()
    partner = partner_key.get_secret_value()
    if not vendor or not partner:
        raise InvalidMspcToken("vendor key and partner key must both be non-empty")
    if ":" in vendor:
        raise InvalidMspcToken("vendor key must not contain ':'")
    raw = f"{vendor}:{partner}".encode()
    return SecretStr(base64.b64encode(raw).decode("ascii"))


def parse(token: SecretStr | str) -> MspcCredentials:
    """Split an MSPC_TOKEN into its vendor and partner keys.

    Strict: standard alphabet with padding, UTF-8 payload, a ``:`` separator
    and two non-empty halves; anything else raises ``InvalidMspcToken``
    (whose message never echoes the token).
    """
    value = token.get_secret_value() if isinstance(token, SecretStr) else token
    if not value or len(value) > MAX_TOKEN_CHARS:
        raise InvalidMspcToken("token is empty or too long")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidMspcToken("token is not standard padded base64") from None
    if base64.b64encode(raw).decode("ascii") != value:
        raise InvalidMspcToken("token is not canonical base64")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMspcToken("token payload is not UTF-8") from None
    vendor, sep, partner = text.partition(":")
    if not sep:
        raise InvalidMspcToken("token payload has no ':' separator")
    if not vendor or not partner:
        raise InvalidMspcToken("token payload has an empty vendor or partner key")
    return MspcCredentials(SecretStr(vendor), SecretStr(partner))
