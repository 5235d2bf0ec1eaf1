"""A1111 samplers and schedule types, and their native equivalents (by table).

A combination without a native equivalent is a 422 (:class:`A1111Error`), never a substitute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.compat.a1111_errors import A1111Error
from service.infotext import A1111_SAMPLERS


@dataclass(frozen=True)
class Sampler:
    """An A1111 sampler and the native sampler for each schedule type it supports."""

    name: str
    aliases: tuple[str, ...]
    schedules: Mapping[str, str]  # A1111 scheduler name → native sampler
    listed: bool = True


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"),
            {"automatic": "euler_a", "normal": "euler_a"}),
    Sampler("Euler", ("k_euler",), {"automatic": "euler", "normal": "euler"}),
    Sampler("Heun", ("k_heun",), {"automatic": "heun", "normal": "heun"}),
    # A1111's default ("Automatic") schedule for DPM++ 2M is Karras.
    Sampler("DPM++ 2M", ("k_dpmpp_2m",),
            {"automatic": "dpmpp_2m_karras", "karras": "dpmpp_2m_karras", "normal": "dpmpp_2m"}),
    Sampler("DPM++ 2M Karras", ("k_dpmpp_2m_ka",),  # the name before A1111 1.9
            {"automatic": "dpmpp_2m_karras", "karras": "dpmpp_2m_karras"}, listed=False),
    Sampler("DDIM", ("ddim",), {"automatic": "ddim"}),
    Sampler("PLMS", ("plms",), {"automatic": "pndm"}),
    Sampler("LCM", ("k_lcm",), {"automatic": "lcm"}),
)  # fmt: skip
SCHEDULERS: tuple[dict[str, Any], ...] = (
    {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
     "need_inner_model": False},
    {"name": "normal", "label": "Normal", "aliases": None, "default_rho": -1,
     "need_inner_model": True},
    {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
     "need_inner_model": False},
)  # fmt: skip
_SCHEDULER_NAMES = {s["name"]: s["name"] for s in SCHEDULERS} | {
    s["label"].lower(): s["name"] for s in SCHEDULERS
}


def find_sampler(name: str, scheduler: str | None) -> str:
    """The native sampler for an A1111 sampler + schedule type; A1111Error 422 if none."""
    wanted = name.strip().lower()
    sampler = next(
        (s for s in SAMPLERS if wanted in (s.name.lower(), *(a.lower() for a in s.aliases))),
        None,
    )
    if sampler is None:
        known = ", ".join(s.name for s in SAMPLERS if s.listed)
        raise A1111Error(422, "unknown_sampler", f"sampler {name!r} is not available here "
                         f"(available: {known})")  # fmt: skip
    schedule = _SCHEDULER_NAMES.get((scheduler or "automatic").strip().lower())
    native = sampler.schedules.get(schedule or "")
    if native is None:
        offered = ", ".join(sampler.schedules)
        raise A1111Error(422, "unsupported_scheduler", f"sampler {sampler.name!r} with "
                         f"schedule type {scheduler!r} is not available here (with "
                         f"{sampler.name!r}: {offered})")  # fmt: skip
    return native


def a1111_sampler_name(native: str) -> str:
    """The A1111 name shown for a native sampler (info, progress)."""
    return A1111_SAMPLERS.get(native, (native, ""))[0]
