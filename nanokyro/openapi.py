"""The OpenAPI document at /schema/openapi.json, made to say what the server does.

Litestar derives the document from the handlers and the msgspec structs of protocol.py; this module corrects what
that derivation can't know: every error is an OpenAI error body (not Litestar's), with the status codes each route
really answers; request bodies refuse unknown fields; /metrics is Prometheus text and /health an empty text body; a
generation request may be answered as an SSE stream; `model` must be the model this server serves (known once it
has loaded); messages and prompts must not be empty.
"""
from __future__ import annotations

import copy
import importlib.metadata
import inspect

import msgspec
from litestar import Request
from litestar.openapi.plugins import JsonRenderPlugin

from nanokyro import protocol
from nanokyro.request import MAX_N

TITLE = "nanokyro"
try:
    VERSION = importlib.metadata.version("nanokyro")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0"

ERROR = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "additionalProperties": False,
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }},
}  # fmt: skip

WHY = {
    400: "An invalid request: malformed JSON, an unknown field, a value out of range, a prompt too long",
    401: "A missing or wrong API key",
    404: "No such model, or no such route",
    409: "The LoRA adapter is in use by unfinished requests",
    413: "The body is larger than the server accepts",
    429: "Too many requests are waiting for their first token; retry after the Retry-After header's seconds",
    503: "The model is loading, failed to load, its engine died, or the server is shutting down",
}
# What each route can answer besides 200 (405, for a wrong method, any route can).
ERRORS = {
    "/v1/chat/completions": (400, 401, 404, 413, 429, 503),
    "/v1/completions": (400, 401, 404, 413, 429, 503),
    "/v1/models": (401, 503),
    "/v1/models/{model_id}": (401, 404, 503),
    "/tokenize": (400, 401, 404, 413, 503),
    "/detokenize": (400, 401, 404, 413, 503),
    "/v1/load_lora_adapter": (400, 401, 404, 413, 503),
    "/v1/unload_lora_adapter": (400, 401, 404, 409, 413, 503),
    "/health": (503,),
    "/metrics": (),
}
GENERATION = ("ChatCompletionRequest", "CompletionRequest")
# The ranges SamplingParams.verify and the server enforce, so that a schema-valid value is not refused for its range.
RANGES = {
    "n": {"minimum": 1, "maximum": MAX_N}, "max_tokens": {"minimum": 1}, "max_completion_tokens": {"minimum": 1},
    "temperature": {"minimum": 0, "maximum": 2}, "top_p": {"exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"minimum": -1, "maximum": 2**31 - 1}, "min_p": {"minimum": 0, "maximum": 1},
    "repetition_penalty": {"exclusiveMinimum": 0}, "presence_penalty": {"minimum": -2, "maximum": 2},
    "frequency_penalty": {"minimum": -2, "maximum": 2}, "seed": {"minimum": 0, "maximum": 2**63 - 1},
    "top_logprobs": {"minimum": 0, "maximum": 20}, "logprobs": {"minimum": 0, "maximum": 20},
}  # fmt: skip


def _request_structs() -> set[str]:
    """The names of the request body structs: they refuse unknown fields."""
    return {name for name, cls in inspect.getmembers(protocol, inspect.isclass)
            if issubclass(cls, msgspec.Struct) and cls.__struct_config__.forbid_unknown_fields}  # fmt: skip


def document(schema: dict, model_names: list[str] | None, api_key: bool) -> dict:
    """The corrected document, from Litestar's (left untouched). model_names: what a request's `model` may be
    (the served model, its LoRA adapters, `base:adapter`), None while the model loads."""
    doc = copy.deepcopy(schema)
    doc["info"]["title"] = TITLE
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = ERROR
    for name in _request_structs() & components.keys():
        components[name]["additionalProperties"] = False
    for name in ("TokenizeRequest", "DetokenizeRequest"):
        if name in components and model_names is not None:
            components[name]["properties"]["model"] = {"enum": [*model_names, None]}
    for name in GENERATION:
        if name not in components:
            continue
        properties = components[name]["properties"]
        if model_names is not None:
            properties["model"] = {"type": "string", "enum": model_names}
        for field, limits in RANGES.items():
            if field in properties:
                for branch in properties[field].get("oneOf", [properties[field]]):
                    if branch.get("type") in ("integer", "number"):
                        branch.update(limits)
    if "ChatCompletionRequest" in components:
        components["ChatCompletionRequest"]["properties"]["messages"]["minItems"] = 1
    if "CompletionRequest" in components:
        components["CompletionRequest"]["properties"]["prompt"] = {"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
            {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
            {"type": "array", "minItems": 1,
             "items": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}},
        ]}  # fmt: skip
    for path, item in doc.get("paths", {}).items():
        for op in item.values():
            _responses(path, op["responses"], api_key)
    return doc


def _responses(path: str, responses: dict, api_key: bool) -> None:
    for code in [c for c in responses if c != "200"]:
        del responses[code]  # Litestar's ValidationException body, which the server never sends
    ok = responses["200"]
    if path == "/metrics":
        ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
        ok["description"] = "Prometheus metrics, text format 0.0.4"
    elif path == "/health":
        ok["content"] = {"text/plain": {"schema": {"type": "string", "maxLength": 0}}}
        ok["description"] = "The model is loaded and the server is serving"
    elif path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
        ok["description"] = "The adapter was loaded (or unloaded)"
    elif path in ("/v1/chat/completions", "/v1/completions"):
        # With stream: true. Each event's data is one chunk as JSON (the 200 body's shape, its choices holding
        # deltas), an error body, or [DONE].
        ok["content"]["text/event-stream"] = {"schema": {
            "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}
    for code in ERRORS.get(path, ()):
        if code == 401 and not api_key:
            continue
        spec = {"description": WHY[code], "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        if code == 429:
            spec["headers"] = {"Retry-After": {"schema": {"type": "string"}, "required": True}}
        responses[str(code)] = spec


class DocumentPlugin(JsonRenderPlugin):
    """Serves `document(...)` of Litestar's schema at /schema/openapi.json, with the served model's names once the
    model has loaded."""

    def __init__(self, model_names, api_key: bool):
        super().__init__()
        self.model_names, self.api_key = model_names, api_key  # model_names: a callable, None while loading

    def render(self, request: Request, openapi_schema: dict) -> bytes:
        return self.render_json(request, document(openapi_schema, self.model_names(), self.api_key))
