"""A tool's input JSON Schema, as the policy declares it: checked on load, enforced per call.

The policy's `input_schema` is what MCP clients see in `tools/list` and what
every call's arguments must satisfy (through `CallTool` and MCP alike), so a
model that invents an argument is refused before anything runs. The schema is
JSON Schema 2020-12 (MCP's dialect), must describe an object (MCP requires
`"type": "object"`), may use only local `$ref`s (`#/...`: nothing is ever
fetched) and is bounded in size and nesting. Pure: no I/O.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

# jsonschema (with its format checkers: about 6 MB resident) is imported only when a policy
# declares an input schema, not by every process that loads a policy (the sidecar's budget).
if TYPE_CHECKING:
    import jsonschema

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32


def parse_input_schema(value: Any, fail: Callable[[str], Exception]) -> Mapping[str, Any]:
    """Validates a policy's `input_schema` (a TOML table or a string of JSON).

    Args:
        value: the raw policy value.
        fail: makes the error to raise from a problem (names the key path and line).

    Raises:
        whatever `fail` returns: not an object schema, not valid JSON Schema,
            a remote `$ref`, too large or too deeply nested.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise fail(f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise fail("must be a table (or a string of JSON) holding a JSON Schema object")
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise fail(f"larger than {MAX_SCHEMA_BYTES} bytes")
    if value.get("type") != "object":
        raise fail('must declare "type" = "object" (MCP tools take an object of arguments)')
    _check_refs(value, fail, 0)
    import jsonschema
    from jsonschema.exceptions import SchemaError

    try:
        jsonschema.Draft202012Validator.check_schema(value)
    except SchemaError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "<root>"
        raise fail(f"not a valid JSON Schema at {where}: {err.message}") from err
    result: dict[str, Any] = json.loads(text)  # a private copy, key order normalised
    return result


def _check_refs(node: Any, fail: Callable[[str], Exception], depth: int) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise fail(f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, dict):
        for key, item in node.items():
            if key in ("$ref", "$dynamicRef") and not (
                isinstance(item, str) and item.startswith("#")
            ):
                raise fail(f"{key} {item!r} is not local ('#/...'): a schema never fetches")
            _check_refs(item, fail, depth + 1)
    elif isinstance(node, list):
        for item in node:
            _check_refs(item, fail, depth + 1)


@functools.lru_cache(maxsize=256)
def _validator(text: str) -> jsonschema.Draft202012Validator:
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(text))


def argument_problem(schema: Mapping[str, Any], arguments: Mapping[str, Any]) -> str | None:
    """The first way `arguments` break `schema` ("at /path: message"), or None when they fit."""
    from jsonschema.exceptions import best_match

    validator = _validator(json.dumps(schema, sort_keys=True))
    error = best_match(validator.iter_errors(dict(arguments)))
    if error is None:
        return None
    where = "/" + "/".join(str(p) for p in error.absolute_path)
    return f"at {where}: {error.message[:300]}"
