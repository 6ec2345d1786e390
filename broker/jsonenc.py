"""JSON encoders built once, for the token hot path.

``json.dumps`` with any non-default argument builds a ``JSONEncoder``, and
that its C encoder, on every call: a few microseconds, which a token request
paid three times (its response, its audit record, its log line).
``encoder(...)`` builds the C encoder once and returns a function that gives
what ``json.dumps`` with the same arguments gives (a test holds them equal);
without the C accelerator it is ``json.dumps`` itself.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

_C_MAKE_ENCODER: Any = getattr(json.encoder, "c_make_encoder", None)


def not_json(value: object) -> Any:
    """json's own refusal of a value it has no type for (the default ``default``)."""
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def encoder(
    *,
    sort_keys: bool = False,
    separators: tuple[str, str] = (", ", ": "),
    ensure_ascii: bool = True,
    allow_nan: bool = True,
    default: Callable[[Any], Any] = not_json,
    check_circular: bool = True,
) -> Callable[[Any], str]:
    """``json.dumps(obj, <the same arguments>)`` as a function of ``obj``, its encoder built once.

    With ``check_circular`` (json's default) each call gets fresh markers, so
    calls from several threads cannot see each other's objects; without it a
    circular structure ends in ``RecursionError`` instead of ``ValueError``.
    """
    if _C_MAKE_ENCODER is None:
        return functools.partial(
            json.dumps,
            sort_keys=sort_keys,
            separators=separators,
            ensure_ascii=ensure_ascii,
            allow_nan=allow_nan,
            default=default,
            check_circular=check_circular,
        )
    item_separator, key_separator = separators
    string = json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring

    def build(markers: dict[int, Any] | None) -> Any:
        return _C_MAKE_ENCODER(
            markers, default, string, None, key_separator, item_separator, sort_keys, False, allow_nan
        )

    if not check_circular:
        shared = build(None)

        def dumps(obj: Any) -> str:
            return "".join(shared(obj, 0))

        return dumps

    def dumps_checked(obj: Any) -> str:
        return "".join(build({})(obj, 0))

    return dumps_checked
