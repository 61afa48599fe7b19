"""Checks `qemu-unit list/status --json` output against docs/qemu-unit.schema.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "qemu-unit.schema.json"


def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate(doc: Any, kind: str) -> None:
    """Raise jsonschema.ValidationError unless DOC is a valid KIND ('list' or 'status')."""
    full = schema()
    jsonschema.Draft202012Validator.check_schema(full)
    jsonschema.Draft202012Validator(full).validate(doc)
    # And the specific form, not merely one of the two.
    jsonschema.Draft202012Validator({**full, "$ref": f"#/$defs/{kind}"}).validate(doc)
