"""Publish the deployment's request limits in /openapi.json.

The limits are settings, checked per request (service.api_checks), so the pydantic model
cannot carry them; without them the schema would promise that, say, width=-5 is valid.
This writes the limits in force into the JobRequest schema when the document is built.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.settings import Settings

# Control characters (C0 but tab/newline/CR, DEL, C1) are refused; a prompt needs a non-space.
_NO_CONTROL = "[^\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f-\\u009f]"
_TEXT = f"^{_NO_CONTROL}*$"
_PROMPT = f"^{_NO_CONTROL}*[^\\s\\u0000-\\u001f\\u007f-\\u009f]{_NO_CONTROL}*$"


def limits_schema(s: Settings) -> dict[str, dict[str, Any]]:
    """JSON-schema keywords per JobRequest property, from the settings in force."""
    side = {"minimum": s.min_side, "maximum": s.max_side, "multipleOf": s.side_multiple}
    return {
        "prompt": {"maxLength": s.max_prompt_chars, "pattern": _PROMPT},
        "negative_prompt": {"maxLength": s.max_prompt_chars, "pattern": _TEXT},
        "width": side,
        "height": side,
        "steps": {"minimum": s.min_steps, "maximum": s.max_steps},
        "guidance_scale": {"minimum": s.min_guidance, "maximum": s.max_guidance},
        "num_images": {"minimum": 1, "maximum": s.max_num_images},
        "loras": {"maxItems": s.max_loras_per_job},
    }


def install(app: FastAPI, settings: Settings) -> None:
    """Make `app.openapi()` include the limits (built once, like FastAPI's own)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            props = schema["components"]["schemas"]["JobRequest"]["properties"]
            for name, keywords in limits_schema(settings).items():
                props[name].update(keywords)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
