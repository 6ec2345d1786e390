"""``broker.jsonenc.encoder``: json.dumps with its encoder built once, the same output for every argument set used."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.jsonenc import encoder

_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # nan and infinities included: allow_nan decides
    | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
_ARGUMENTS: list[dict[str, Any]] = [
    {},  # json.dumps's defaults (the log line, with a default)
    {"separators": (",", ":"), "ensure_ascii": False, "check_circular": False},  # the token response
    {"sort_keys": True, "separators": (",", ":"), "ensure_ascii": False, "allow_nan": False, "check_circular": False},
]


def _same(arguments: dict[str, Any], value: Any) -> None:
    try:
        expected: str | type[Exception] = json.dumps(value, **arguments)
    except (ValueError, TypeError) as exc:
        expected = type(exc)
    try:
        got: str | type[Exception] = encoder(**arguments)(value)
    except (ValueError, TypeError) as exc:
        got = type(exc)
    assert got == expected


@pytest.mark.parametrize("arguments", _ARGUMENTS, ids=["defaults", "response", "canonical"])
@given(value=_VALUES)
def test_equals_json_dumps(arguments: dict[str, Any], value: Any) -> None:
    """Text, or the exception class, as json.dumps with the same arguments."""
    _same(arguments, value)


def test_default_and_its_absence() -> None:
    """``default`` renders unknown objects as json.dumps's does; without one they are refused alike."""

    class Thing:
        def __repr__(self) -> str:
            return "<thing é>"

    rendered = encoder(default=repr)({"a": Thing()})
    assert rendered == json.dumps({"a": Thing()}, default=repr) == '{"a": "<thing \\u00e9>"}'
    with pytest.raises(TypeError, match="Object of type Thing is not JSON serializable"):
        encoder()({"a": Thing()})


def test_circular_structures() -> None:
    """With the check (the default) a cycle is json's ValueError; the shared encoder is reusable after it."""
    loop: list[Any] = []
    loop.append(loop)
    dumps = encoder()
    with pytest.raises(ValueError, match="Circular reference"):
        dumps(loop)
    shared = [1]
    assert dumps([shared, shared]) == "[[1], [1]]"  # the same object twice is not a cycle


def test_threads_do_not_share_markers() -> None:
    """Many threads encoding the same object at once never see a false cycle (fresh markers per call)."""
    dumps = encoder()
    value = {"k": [list(range(50)) for _ in range(50)]}
    expected = json.dumps(value)
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(200):
                assert dumps(value) == expected
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
