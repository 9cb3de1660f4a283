"""OpenAI-shaped errors for the HTTP API: `APIError` (what a handler raises), the app's exception handlers that turn
it and Litestar's own errors (validation, 404/405/413, bad UTF-8, a bug) into `{"error": {...}}` bodies, and strict
body decoding, where "10" is not an int and an unknown field is a 400 naming it."""
from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from nanokyro.client import EngineDead, RequestFailed

log = logging.getLogger("nanokyro.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _api_error(_: Request, exc: APIError) -> Response:
    return Response(exc.body(), status_code=exc.status, headers=exc.headers)


def _validation_error(request: Request, exc: ValidationException) -> Response:
    # Litestar puts msgspec's message ("Object contains unknown field `x`", "Expected `int`, got `str`") in extra,
    # with the field as key, or "data" (the whole body) where msgspec names the field in the message.
    extra = exc.extra[0] if isinstance(exc.extra, list) and exc.extra and isinstance(exc.extra[0], dict) else {}
    message, param = extra.get("message") or exc.detail, extra.get("key")
    if param == "data":
        param = _field_in(message)
    if message == "'data'":  # no body at all
        message = "the request needs a JSON object as its body"
    return _api_error(request, APIError(400, message, param=param))


def _field_in(message: str) -> str | None:
    """The field a msgspec error names: "... at `$.messages[0].content`" or "unknown field `x`"."""
    named = re.search(r"at `\$\.([A-Za-z_]+)", message) or re.search(r"field `([^`]+)`", message)
    return named[1] if named else None


def _http_error(request: Request, exc: HTTPException) -> Response:
    codes = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return _api_error(request, APIError(exc.status_code, exc.detail, kind, code=codes.get(exc.status_code),
                                        headers=exc.headers))  # a 405's Allow  # fmt: skip


def _not_utf8(request: Request, exc: UnicodeDecodeError) -> Response:
    return _api_error(request, APIError(400, f"the body is not valid UTF-8: {exc.reason} at byte {exc.start}"))


def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return _api_error(request, APIError(500, f"internal error: {exc!r}", "server_error"))


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, "service_unavailable", code=code)


def engine_error(exc: BaseException) -> APIError:
    """An exception from a request's stream, as the error its client sees."""
    if isinstance(exc, EngineDead):
        return unavailable(str(exc), "engine_dead")
    if isinstance(exc, RequestFailed):
        if exc.status == 400:
            return APIError(400, str(exc))
        if exc.status == 404:  # a LoRA adapter unloaded while the request was on its way
            return APIError(404, str(exc), param="model", code="model_not_found")
        if exc.status == 503:
            return unavailable(str(exc), "engine_unhealthy")
    return APIError(500, str(exc), "server_error")


async def strict(request: Request, cls: type) -> Any:
    """The body decoded without coercion: "10" is not an int, 1 is not a bool (Litestar's own decoding coerces)."""
    try:
        return msgspec.json.decode(await request.body(), type=cls)  # read already, when Litestar decoded `data`
    except msgspec.ValidationError as e:
        raise APIError(400, str(e), param=_field_in(str(e))) from None



EXCEPTION_HANDLERS = {APIError: _api_error, ValidationException: _validation_error, HTTPException: _http_error,
                      UnicodeDecodeError: _not_utf8, Exception: _internal_error}  # fmt: skip
