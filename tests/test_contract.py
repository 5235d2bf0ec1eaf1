"""The generation contract is the one list of fields: generate()'s keywords, the engine's
request, the CLI's flags and the HTTP request all follow it; its submit-time strength rule is
the samplers' own."""

from __future__ import annotations

import inspect

import pytest

from model import samplers
from model.demo import build_demo
from model.pipeline import Pipeline
from service.cli import build_parser
from service.contract import (
    DEFAULT_STRENGTH,
    GENERATION_FIELDS,
    SAMPLER_NAMES,
    UPSCALE_INPUT_MULTIPLE,
    ContractError,
    GenerationParams,
    check_capabilities,
    steps_skipped,
)
from service.schemas import TRANSPORT_FIELDS, JobRequest


def test_generate_keywords_are_the_contract_fields() -> None:
    params = inspect.signature(Pipeline.generate).parameters
    assert tuple(p for p in params if p != "self") == GENERATION_FIELDS
    for name in GENERATION_FIELDS:
        default = params[name].default
        field = GenerationParams.model_fields[name]
        if name == "seed":  # None at the API means "draw one"; the library's default is 0
            assert default == 0 and field.default is None
        elif name == "loras":  # none either way (the library takes any sequence)
            assert tuple(default) == tuple(field.default) == ()
        else:
            assert default == field.default, name


def test_http_request_is_the_contract_plus_transport_fields() -> None:
    assert tuple(JobRequest.model_fields)[: len(GENERATION_FIELDS)] == GENERATION_FIELDS
    assert set(TRANSPORT_FIELDS) == {"output_format", "model", "webhook_url", "priority", "preview"}


def test_cli_generate_has_a_flag_per_field() -> None:
    sub = build_parser()._subparsers._group_actions[0].choices["generate"]  # type: ignore[union-attr]
    dests = {a.dest for a in sub._actions}
    assert set(GENERATION_FIELDS) <= dests


def test_sampler_names_and_strength_rule_mirror_the_model() -> None:
    assert SAMPLER_NAMES == samplers.SAMPLER_NAMES
    assert (
        DEFAULT_STRENGTH == __import__("model.generation_checks").generation_checks.DEFAULT_STRENGTH
    )
    assert UPSCALE_INPUT_MULTIPLE == __import__("model.pipeline").pipeline.UPSCALE_INPUT_MULTIPLE
    for steps in range(1, 40):
        for strength in (0.01, 0.1, 0.25, 0.3, 1 / 3, 0.5, 0.55, 0.7, 0.75, 0.999, 1.0):
            ours = steps_skipped(steps, strength)
            if ours >= steps:
                with pytest.raises(ValueError, match="leaves no step"):
                    samplers.start_step(steps, strength)
            else:
                assert samplers.start_step(steps, strength) == ours


def test_capability_checks_follow_the_pipeline() -> None:
    """The API's judgement (torch-free, from the published dict) and the pipeline's own agree."""
    pipe = build_demo()
    caps = pipe.capabilities.to_dict()
    from PIL import Image

    image, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64))
    cases = [
        {"sampler": "lcm", "steps": 50},
        {"sampler": "lcm", "steps": 51},
        {"sampler": "ddim", "steps": 999},
        {"width": 60, "height": 64},
        {"strength": 0.5},
        {"image": image, "strength": 0.2, "steps": 4},
        {"image": image, "strength": 0.3, "steps": 4},
        {"image": image, "mask": mask},
        {"mask": mask},
    ]
    for case in cases:
        kw = {"prompt": "x", "width": 64, "height": 64, "steps": 4, **case}
        img, msk = kw.pop("image", None), kw.pop("mask", None)
        params = GenerationParams(**kw)
        try:
            check_capabilities(params, caps, img and img.size, msk and msk.size)
            api_ok = True
        except ContractError:
            api_ok = False
        if msk is not None and img is None:
            api_ok = False  # the API refuses this while reading the images
        try:
            pipe.check(width=kw["width"], height=kw["height"], steps=kw["steps"],
                       sampler=params.sampler, num_images=1, image=img, mask=msk,
                       strength=params.strength)  # fmt: skip
            model_ok = True
        except ValueError:
            model_ok = False
        assert api_ok == model_ok, case


def test_model_fields_mirror_the_model_and_are_refused_where_not_read() -> None:
    from model.generation_checks import MODEL_FIELDS
    from service import contract

    assert contract.MODEL_FIELDS == MODEL_FIELDS
    caps = build_demo().capabilities.to_dict()
    assert caps["fields"] == []
    for name in MODEL_FIELDS:
        value: object = "x" if "prompt" in name else 5 if name == "noise_level" else 5.0
        params = GenerationParams(prompt="x", width=64, height=64, **{name: value})
        with pytest.raises(ContractError) as info:
            check_capabilities(params, caps)
        assert info.value.field == name
