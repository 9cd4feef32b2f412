#!/usr/bin/env python3
"""Write `.cog/openapi_schema.json` for a predictor, using Cog's own inspector.

The Cog CLI (`cog build`) normally writes this file into the image; Cog's HTTP server (coglet)
reads it from `.cog/openapi_schema.json` in its working directory to validate inputs and to serve
`/openapi.json`. Without Docker and the CLI we produce it here from the same introspection Cog
uses at run time (`cog._inspector.create_predictor`), so the schema always matches `predict.py`.

    python scripts/write_openapi_schema.py                 # predictor from cog.yaml, into .cog/
    python scripts/write_openapi_schema.py --print         # to stdout
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def predictor_ref_from_cog_yaml(path: Path) -> str:
    """The `predict:` entry of cog.yaml (a flat `key: "value"` line; no YAML library needed)."""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("predict:") and not line.startswith((" ", "\t")):
            return stripped.split(":", 1)[1].strip().strip("'\"")
    raise SystemExit(f"no top-level 'predict:' entry in {path}")


def _title(name: str) -> str:
    return name.replace("_", " ").title()


def _input_property(field: Any) -> dict[str, Any]:
    prop: dict[str, Any] = dict(field.type.json_type())
    prop["title"] = _title(field.name)
    if field.description is not None:
        prop["description"] = field.description
    if field.default is not None:
        prop["default"] = field.type.json_encode(field.default)
    if field.ge is not None:
        prop["minimum"] = _number(field.ge)
    if field.le is not None:
        prop["maximum"] = _number(field.le)
    if field.min_length is not None:
        prop["minLength"] = field.min_length
    if field.max_length is not None:
        prop["maxLength"] = field.max_length
    if field.regex is not None:
        prop["pattern"] = field.regex
    if field.choices is not None:
        prop["enum"] = list(field.choices)
    if field.deprecated:
        prop["deprecated"] = True
    prop["x-order"] = field.order
    return prop


def _number(value: float) -> float | int:
    # The inspector stores bounds as floats; whole bounds are written as integers (0, not 0.0),
    # as in the schemas Cog's CLI writes.
    return int(value) if float(value).is_integer() else value


def declares_streaming(module_name: str, class_name: str) -> bool:
    """Whether the predictor's predict (or run) carries ``@cog.streaming``. The decorator does nothing at run
    time; Cog's CLI finds it in the source and marks the schema (``x-cog-streaming``), which coglet needs to
    answer ``Accept: text/event-stream`` (Server-Sent Events). So do we."""
    import importlib
    import inspect

    cls = getattr(importlib.import_module(module_name), class_name)
    method = getattr(cls, "run", None) if "run" in cls.__dict__ else getattr(cls, "predict", None)
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError):
        return False
    decorators = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith(("def ", "async def ")):
            break
        decorators.append(stripped)
    return any(d.split("#")[0].split("(")[0].strip() in ("@streaming", "@cog.streaming") for d in decorators)


def build_schema(predictor_ref: str, project_dir: Path = ROOT) -> dict[str, Any]:
    module_file, _, class_name = predictor_ref.partition(":")
    module_path = (project_dir / module_file).resolve()
    sys.path.insert(0, str(module_path.parent))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from cog import _inspector

        info = _inspector.create_predictor(module_path.stem, class_name)
        streaming = declares_streaming(module_path.stem, class_name)

    fields = sorted(info.inputs.values(), key=lambda f: f.order)
    properties = {f.name: _input_property(f) for f in fields}
    required = [
        f.name
        for f in fields
        if f.default is None and f.type.repetition.name in ("REQUIRED", "REPEATED")
    ]
    input_schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        input_schema["required"] = required

    status = {
        "title": "Status",
        "description": "An enumeration.",
        "type": "string",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
    }
    request = {
        "title": "PredictionRequest",
        "type": "object",
        "properties": {
            "id": {"title": "Id", "type": "string"},
            "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
            "input": {"$ref": "#/components/schemas/Input"},
            "webhook": {"title": "Webhook", "type": "string", "format": "uri", "maxLength": 65536, "minLength": 1},
            "webhook_events_filter": {
                "type": "array",
                "items": {"type": "string", "enum": ["start", "output", "logs", "completed"]},
                "default": ["start", "output", "logs", "completed"],
            },
            "output_file_prefix": {"title": "Output File Prefix", "type": "string"},
        },
    }
    response = {
        "title": "PredictionResponse",
        "type": "object",
        "properties": {
            "id": {"title": "Id", "type": "string"},
            "version": {"title": "Version", "type": "string"},
            "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
            "started_at": {"title": "Started At", "type": "string", "format": "date-time"},
            "completed_at": {"title": "Completed At", "type": "string", "format": "date-time"},
            "status": {"$ref": "#/components/schemas/Status"},
            "input": {"$ref": "#/components/schemas/Input"},
            "output": {"$ref": "#/components/schemas/Output"},
            "error": {"title": "Error", "type": "string"},
            "logs": {"title": "Logs", "type": "string", "default": ""},
            "metrics": {"title": "Metrics", "type": "object"},
        },
    }
    validation_error = {
        "title": "ValidationError",
        "type": "object",
        "required": ["loc", "msg", "type"],
        "properties": {
            "loc": {"title": "Location", "type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "msg": {"title": "Message", "type": "string"},
            "type": {"title": "Error Type", "type": "string"},
        },
    }
    http_validation_error = {
        "title": "HTTPValidationError",
        "type": "object",
        "properties": {
            "detail": {"title": "Detail", "type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}}
        },
    }

    def json_body(ref: str) -> dict[str, Any]:
        return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}

    predict_op = {
        "summary": "Predict",
        "operationId": "predict_predictions_post",
        "parameters": [
            {"in": "header", "name": "prefer", "required": False, "schema": {"title": "Prefer", "type": "string"}}
        ],
        "requestBody": json_body("PredictionRequest"),
        "responses": {
            "200": {"description": "Successful Response", **json_body("PredictionResponse")},
            "422": {"description": "Validation Error", **json_body("HTTPValidationError")},
        },
    }
    if streaming:
        predict_op["x-cog-streaming"] = True
    ok_any = {"200": {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}}
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {
            "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": ok_any}},
            "/health-check": {
                "get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get", "responses": ok_any}
            },
            "/predictions": {"post": predict_op},
            "/predictions/{prediction_id}/cancel": {
                "post": {
                    "summary": "Cancel",
                    "operationId": "cancel_predictions__prediction_id__cancel_post",
                    "parameters": [
                        {"in": "path", "name": "prediction_id", "required": True,
                         "schema": {"title": "Prediction ID", "type": "string"}}
                    ],
                    "responses": ok_any,
                }
            },
            "/shutdown": {"post": {"summary": "Shutdown", "operationId": "shutdown_shutdown_post", "responses": ok_any}},
        },
        "components": {
            "schemas": {
                "Input": input_schema,
                "Output": info.output.json_type(),
                "Status": status,
                "PredictionRequest": request,
                "PredictionResponse": response,
                "ValidationError": validation_error,
                "HTTPValidationError": http_validation_error,
            }
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=ROOT, help="project directory (holds cog.yaml)")
    parser.add_argument("--predictor", help="module file and class, e.g. predict.py:Predictor (default: cog.yaml)")
    parser.add_argument("--output", type=Path, help="schema file (default: <project>/.cog/openapi_schema.json)")
    parser.add_argument("--print", action="store_true", help="write the schema to stdout instead")
    args = parser.parse_args(argv)

    project = args.project.resolve()
    ref = args.predictor or predictor_ref_from_cog_yaml(project / "cog.yaml")
    schema = build_schema(ref, project)
    text = json.dumps(schema, indent=2) + "\n"
    if args.print:
        sys.stdout.write(text)
        return 0
    out = args.output or project / ".cog" / "openapi_schema.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(f"wrote {out} ({len(schema['components']['schemas']['Input']['properties'])} inputs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
