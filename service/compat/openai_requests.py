"""OpenAI Images request bodies (JSON, or multipart for edits) → native job fields.

Fields are the ones the ``openai`` SDK sends; ldmserve's own ride along as top-level extras
(the SDK's ``extra_body``); anything else is a 400 ``unknown_parameter``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from service.compat.openai_errors import (
    OpenAIError,
    invalid,
)
from service.schemas import JobRequest

# The SDK's own fields (current `openai` images.generate / images.edit); accepted, those
# without an ldmserve meaning ignored (quality, style, background, moderation, user, ...).
_OPENAI_FIELDS = frozenset(
    {
        "prompt", "model", "n", "size", "response_format", "output_format",
        "output_compression", "quality", "style", "background", "moderation", "user",
        "stream", "partial_images", "safety_identifier", "complexity", "frame_count",
        "frame_duration_ms", "svg", "input_fidelity", "markup",
    }
)  # fmt: skip
# Native fields set from OpenAI's instead (n, size, output_format, model).
_DERIVED = frozenset({"prompt", "num_images", "width", "height", "output_format", "model"})
# Model names OpenAI clients send by default: they mean "this server's default model".
_OPENAI_MODELS = re.compile(r"^(dall-e-[23]|gpt-image-[\w.-]+|chatgpt-image-[\w.-]+)$")
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


async def json_object(request: Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise OpenAIError(
            400, "We could not parse the JSON body of your request.", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


def _choice(body: dict[str, Any], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise invalid(name, f"Invalid value: {value!r}. Supported values are: {shown}.")
    return str(value)


def _int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(name, f"Invalid value for {name!r}: expected an integer {low}-{high}.")
    return value


def native_fields(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """OpenAI request → (native fields, response_format). Raises OpenAIError (400)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid(
            "prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter"
        )
    if not isinstance(prompt, str) or not prompt.strip():
        raise invalid("prompt", "Invalid value for 'prompt': expected a non-empty string.")
    native_names = set(JobRequest.model_fields) - _DERIVED
    for name in body:
        if name not in _OPENAI_FIELDS and name not in native_names:
            raise invalid(name, f"Unknown parameter: {name!r}.", "unknown_parameter")
    fields: dict[str, Any] = {k: v for k, v in body.items() if k in native_names}
    fields["prompt"] = prompt
    n = _int(body, "n", 1, 10)
    if n is not None:
        fields["num_images"] = n
    size = body.get("size")
    if size not in (None, "auto"):
        match = _SIZE.fullmatch(size) if isinstance(size, str) else None
        if match is None:
            raise invalid("size", f"Invalid value: {size!r}. Use 'WIDTHxHEIGHT' or 'auto'.")
        fields["width"], fields["height"] = int(match.group(1)), int(match.group(2))
    fields["output_format"] = _choice(body, "output_format", ("png", "jpeg", "webp"), "png")
    _int(body, "output_compression", 0, 100)  # accepted; the worker's quality is fixed
    if _int(body, "partial_images", 0, 3) and body.get("stream"):
        fields["preview"] = True  # partial images are the job's live previews
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str) or not model:
            raise invalid("model", "Invalid value for 'model': expected a string.")
        if not _OPENAI_MODELS.match(model):
            fields["model"] = model
    if not isinstance(body.get("stream", False), bool):
        raise invalid("stream", "Invalid value for 'stream': expected a boolean.")
    response_format = _choice(body, "response_format", ("b64_json", "url"), "b64_json")
    return fields, response_format


_INT_FORM_FIELDS = frozenset({"n", "output_compression", "partial_images"})


async def read_form(request: Request) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """A multipart edit request → (typed fields, uploaded files by field name).

    Form values are text: OpenAI's integer and boolean fields are parsed as such, native
    extras as JSON when they parse ("20" → 20, "0.6" → 0.6), else kept as text."""
    try:
        form = await request.form()
    except (StarletteHTTPException, MultiPartException) as exc:  # a malformed body
        detail = getattr(exc, "detail", None) or getattr(exc, "message", "")
        raise OpenAIError(400, f"could not parse the multipart body: {detail}",
                          code="invalid_multipart") from None  # fmt: skip
    fields: dict[str, Any] = {}
    files: dict[str, list[bytes]] = {}
    for name, value in form.multi_items():
        if not isinstance(value, str):
            files.setdefault(name, []).append(await value.read())
            continue
        if name in _INT_FORM_FIELDS:
            try:
                fields[name] = int(value)
            except ValueError:
                raise invalid(name, f"Invalid value for {name!r}: expected an integer.") from None
        elif name == "stream":
            fields[name] = value.lower() == "true"
        elif name in _OPENAI_FIELDS:
            fields[name] = value
        else:
            try:
                fields[name] = json.loads(value)
            except ValueError:
                fields[name] = value
    return fields, files
