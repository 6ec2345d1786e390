"""The ``config`` section of the chart's values.schema.json, derived from ``broker.settings``.

``config.<group>.<field>`` in values.yaml becomes ``BROKER_<GROUP>__<FIELD>``.
Secret settings (and their ``*_file`` siblings) and the paths the chart itself
manages are left out, so values.yaml can never carry a secret or fight the chart.

Refresh the checked-in schema after a settings change::

    .venv/bin/python tests/helm/values_config_schema.py --write
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from broker.settings import Settings

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "helm" / "mspc-broker" / "values.schema.json"

# Set by the chart's templates from its own volumes and ports.
CHART_MANAGED = frozenset(
    {
        ("server", "host"),
        ("server", "port"),
        ("policy", "dir"),
        ("engine", "desired_file"),
        ("audit", "file_path"),
        ("vault", "kubernetes_jwt_path"),
        ("identity", "tokenreview_token_path"),
        # Static AWS keys are not offered: the chart uses IRSA / the default chain.
        ("aws", "access_key_id"),
    }
)


def _non_null(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def is_secret(annotation: Any) -> bool:
    """Whether a settings annotation holds a secret value."""
    return _non_null(annotation) is SecretStr


def secret_fields(group: type[BaseModel]) -> set[str]:
    """Secret fields of a settings group and their ``*_file`` siblings."""
    names = {name for name, field in group.model_fields.items() if is_secret(field.annotation)}
    return names | {f"{name}_file" for name in names if f"{name}_file" in group.model_fields}


def _json_type(annotation: Any) -> dict[str, Any]:
    annotation = _non_null(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return {"type": "string", "enum": list(typing.get_args(annotation))}
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return {"type": "array", "items": _json_type(item)}
    simple = {str: "string", Path: "string", bool: "boolean", int: "integer", float: "number"}
    if annotation in simple:
        return {"type": simple[annotation]}
    raise TypeError(f"no JSON type for setting annotation {annotation!r}")


def _bounds(field: FieldInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for meta in field.metadata:
        for attr, key in (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum"), ("lt", "exclusiveMaximum")):
            value = getattr(meta, attr, None)
            if value is not None:
                out[key] = value
    return out


def field_schema(field: FieldInfo) -> dict[str, Any]:
    """JSON schema of one setting: its type, bounds and description."""
    schema = _json_type(field.annotation) | _bounds(field)
    schema["description"] = field.description or ""
    return schema


def config_schema() -> dict[str, Any]:
    """The whole ``config`` object schema, closed at every level."""
    groups: dict[str, Any] = {}
    for group_name, group_field in Settings.model_fields.items():
        group = group_field.annotation
        assert isinstance(group, type) and issubclass(group, BaseModel)
        hidden = secret_fields(group)
        properties = {
            name: field_schema(field)
            for name, field in group.model_fields.items()
            if name not in hidden and (group_name, name) not in CHART_MANAGED
        }
        groups[group_name] = {
            "type": "object",
            "description": f"{group_field.description} {(group.__doc__ or '').strip()}".strip(),
            "additionalProperties": False,
            "properties": properties,
        }
    return {
        "type": "object",
        "description": "Broker settings: config.<group>.<field> becomes BROKER_<GROUP>__<FIELD>; "
        "unset keys keep the broker's defaults.",
        "additionalProperties": False,
        "properties": groups,
    }


def main(argv: list[str]) -> int:
    """Print the config schema, or write it into values.schema.json with ``--write``."""
    generated = config_schema()
    if "--write" in argv:
        schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
        schema["properties"]["config"] = generated
        SCHEMA_PATH.write_text(json.dumps(schema, indent=2) + "\n", encoding="utf-8")
    else:
        print(json.dumps(generated, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
