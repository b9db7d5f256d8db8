"""Test helpers: validate a Klaviyo request body against Klaviyo's published contract, two ways.

- `validate_with_sdk`: the request models of Klaviyo's official Python SDK (`klaviyo-api`, a dev dependency,
  importable as `openapi_client`). Works on every clone. The models are pydantic v2 and check required keys,
  types and enum values, but silently drop unknown keys: the helper also fails on any key the model dropped.
- `validate_with_openapi`: Klaviyo's published OpenAPI spec (revision 2026-07-15, OAS 3.0.2), with an OAS-3.0-aware
  validator (`openapi-schema-validator`: OAS 3.0 marks optional-null fields with `nullable: true`, which a plain
  JSON Schema validator would reject). The repo holds the part of the spec that the client and the emulator use,
  `tests/contract/klaviyo-openapi-2026-07-15.json`: its source, licence and extraction rule are in
  `tests/contract/KLAVIYO-OPENAPI-NOTICE.md`.

Neither checks Klaviyo's prose limits (counts, sizes, time range, identifiers): `upstack_pipeline.klaviyo.limits`
does.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import pydantic

from upstack_pipeline.sandbox.klaviyo_emulator import sdk_models

SPEC_PATH = Path(__file__).resolve().parent / "contract" / "klaviyo-openapi-2026-07-15.json"
# Any absolute URI will do: the spec is registered under it, nothing is fetched.
SPEC_URI = "urn:klaviyo:openapi-stable"


def validate_with_sdk(model_name: str, body: dict, *, allow_unknown_keys: bool = False) -> Any:
    """Parses `body` with the SDK's request model `model_name` (`Model.from_dict`); returns the model.

    Raises AssertionError with pydantic's error text when the SDK rejects the body. The SDK silently drops keys it
    does not know (a typo such as `unique-id` would vanish, and so would `anonymous_id` on a profile import), so
    unless `allow_unknown_keys`, a key of `body` that is missing from the model's `to_dict()` fails too.
    """
    models = sdk_models()
    if model_name not in models:
        raise ValueError(f"unknown SDK model {model_name!r}; known: {', '.join(models)}")
    try:
        model = models[model_name].from_dict(body)
    except pydantic.ValidationError as exc:
        raise AssertionError(f"klaviyo-api's {model_name} rejects the body:\n{exc}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        # The generated from_dict indexes into nested dicts before pydantic sees them.
        raise AssertionError(f"klaviyo-api's {model_name} cannot read the body: {exc!r}") from None
    if not allow_unknown_keys:
        dropped = list(_dropped_keys(body, model.to_dict(), ""))
        if dropped:
            raise AssertionError(f"klaviyo-api's {model_name} ignores these keys (not in Klaviyo's contract): "
                                 + ", ".join(dropped))
    return model


def _dropped_keys(sent: Any, kept: Any, path: str):
    """Paths of keys in `sent` that the SDK's `to_dict()` (`kept`) does not have."""
    if isinstance(sent, dict) and isinstance(kept, dict):
        for key, value in sent.items():
            child = f"{path}.{key}" if path else str(key)
            if key not in kept:
                yield child
            else:
                yield from _dropped_keys(value, kept[key], child)
    elif isinstance(sent, list) and isinstance(kept, list):
        for index, (value, kept_value) in enumerate(zip(sent, kept)):
            yield from _dropped_keys(value, kept_value, f"{path}[{index}]")


@lru_cache(maxsize=1)
def _spec_registry() -> Any:
    """The spec, parsed once per test session and registered for $ref resolution."""
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4

    spec = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    # OAS 3.0 Schema Objects are an extended subset of JSON Schema draft 4 (draft 4 $ref semantics).
    return spec, Registry().with_resource(SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT4))


def openapi_spec() -> dict:
    """The parsed spec (the part of Klaviyo's that the repo holds)."""
    return _spec_registry()[0]


def validate_with_openapi(schema_name: str, body: dict) -> None:
    """Validates `body` against `#/components/schemas/<schema_name>` of Klaviyo's OpenAPI spec (OAS 3.0).

    Uses the write (request) flavour of the OAS 3.0 validator, with `nullable`, `readOnly` and formats (date-time)
    enforced. Raises AssertionError listing every error.
    """
    spec = openapi_spec()
    from openapi_schema_validator import OAS30WriteValidator, oas30_format_checker

    if schema_name not in spec["components"]["schemas"]:
        raise ValueError(f"the spec has no components/schemas/{schema_name}")
    _, registry = _spec_registry()
    validator = OAS30WriteValidator(
        {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"},
        registry=registry,
        format_checker=oas30_format_checker,
    )
    errors = sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"  at /{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors]
        raise AssertionError(f"Klaviyo's OpenAPI schema {schema_name} rejects the body:\n" + "\n".join(lines))
