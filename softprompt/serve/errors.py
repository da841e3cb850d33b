"""Errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, for every route and
for what Starlette refuses before a route runs (no such route, wrong method, unparsable body)."""

from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from softprompt.serve.guard import error_body

# The engine's error codes and the HTTP status each maps to.
STATUS = {"unknown_task": 404, "task_refused": 400, "task_not_approved": 403, "off_task": 422, "prompt_too_long": 400,
          "bad_request": 400, "invalid_text": 400,
          "internal_error": 500, "backend_unavailable": 503}
HTTP_CODES = {400: "bad_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
              413: "body_too_large", 415: "unsupported_media_type"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


class ErrorJSON(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote client text holding a lone surrogate."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def install(app: FastAPI) -> None:
    """Every error the app can answer, in OpenAI's shape with its status."""

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return ErrorJSON(error_body(exc.message, exc.type, exc.code, exc.param), exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}",
                   400: "the request body cannot be parsed"}.get(exc.status_code, str(exc.detail))
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ErrorJSON(error_body(message, type_, HTTP_CODES.get(exc.status_code)), exc.status_code,
                         headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _fault(request, exc: Exception):  # a bug, still in the API's shape (and logged by uvicorn)
        return ErrorJSON(error_body(f"internal error: {type(exc).__name__}", "server_error", "internal_error"), 500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return ErrorJSON(error_body("the body is not valid JSON", "invalid_request_error", "invalid_json"), 400)
        refused = next((e for e in errs if e.get("type") == "refused_parameter"), None)
        if refused is not None:  # an OpenAI field we do not implement, or a combination we refuse (schemas.py)
            return ErrorJSON(error_body(refused["ctx"]["message"], "invalid_request_error", "unsupported_parameter",
                                        refused["ctx"]["field"]), 400)
        bad_text = next((e for e in errs if e.get("type") == "string_unicode"), None)
        if bad_text is not None:  # a lone surrogate: text no tokenizer can encode, refused as the engine does
            param = _param(bad_text)
            return ErrorJSON(error_body(f"{param} is not valid Unicode text (it holds a lone surrogate)",
                                        "invalid_request_error", "invalid_text", param), 400)
        # 400, as OpenAI and vLLM answer a bad parameter (FastAPI's default 422 makes the openai client
        # raise UnprocessableEntityError where callers catch BadRequestError); pydantic's message
        # names the limit ("Input should be less than or equal to 4096")
        param = _param(errs[0]) if errs else None
        msg = "; ".join(f"{_param(e) or 'the body'}: {e.get('msg')}" for e in errs[:5])
        return ErrorJSON(error_body(msg or "invalid request", "invalid_request_error", "invalid_parameter", param),
                         400)


def _param(error: dict) -> str | None:
    """The field a validation error is about, dotted and without its place ("body", "query"):
    `messages.0.content`; None when it is about the body as a whole."""
    return ".".join(str(x) for x in error.get("loc", ())[1:]) or None
