"""Reading docs/asyncapi.yaml in tests: load it, follow its local references, validate against its schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

ASYNCAPI = Path(__file__).parents[1] / "docs" / "asyncapi.yaml"


def load_asyncapi() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ASYNCAPI.read_text(encoding="utf-8"))
    return loaded


def resolve(spec: dict[str, Any], node: Any) -> Any:
    """Follow local ``#/a/b`` references until *node* is not one."""
    while isinstance(node, dict) and set(node) == {"$ref"} and node["$ref"].startswith("#/"):
        target: Any = spec
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        node = target
    return node


def event_message(spec: dict[str, Any]) -> dict[str, Any]:
    """The one message the document describes: ``message.revoked``."""
    found: dict[str, Any] = spec["components"]["messages"]["messageRevoked"]
    return found


def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
