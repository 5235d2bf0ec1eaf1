"""LoRA in the engine: jobs with different adapter sets (and none) share every UNet call and
each equals its solo image; a corrupt or unknown adapter fails only the job naming it; the
prompt cache keys on the text-encoder adapters; the library's byte budget and name rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import load_pipeline
from model.lora_files import LoraError
from model.lora_library import NAME
from model.pipeline import GenerationError, Pipeline
from service.contract import LORA_NAME_PATTERN, GenerationParams
from service.engine import Engine
from service.engine_types import JobState
from service.infotext import infotext
from service.prompt_cache import prompt_key
from tests import lora_kit
from tests.test_engine import assert_all_equal_solo, max_diff, req, run_until_idle, solo


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    pipe = load_pipeline("demo", device="cpu")
    pipe.lora_dir = lora_kit.write_demo_loras(pipe, tmp_path_factory.mktemp("loras"))
    return pipe


KW = {"steps": 4, "sampler": "euler", "width": 64, "height": 64}


def test_jobs_with_different_adapters_share_calls_and_equal_solo(demo: Pipeline) -> None:
    jobs = [
        req("none", "a red fox", seed=1, **KW),
        req("ink", "a red fox", seed=1, loras=[{"name": "ink", "scale": 0.8}], **KW),
        req(
            "both",
            "a red fox",
            seed=2,
            loras=[{"name": "ink"}, {"name": "neon", "scale": 0.5}],
            **KW,
        ),
        req("neon", "a boat <lora:neon:1.3>", seed=3, **KW),  # A1111 tag
    ]
    demo.adapter_set([{"name": "ink"}, {"name": "neon"}])  # resident: no read to wait for
    engine = Engine(demo, max_batch=16)
    handles = [engine.submit(j) for j in jobs]
    outputs = run_until_idle(engine)
    calls = [c for o in outputs for c in o.calls]
    assert calls == [(8, 4)] * 4, "every UNet call holds the 4 jobs' 8 rows"
    assert_all_equal_solo(demo, handles)
    plain, ink = (solo(demo, j) for j in jobs[:2])
    assert max_diff(plain, ink) > 20, "the adapter changes the image"
    assert handles[3].request.params.prompt == "a boat"


def test_corrupt_or_unknown_adapter_fails_only_its_job(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=16)
    good = engine.submit(req("good", "moss", seed=5, loras=[{"name": "ink"}], **KW))
    broken = engine.submit(req("broken", "moss", loras=[{"name": "broken"}], **KW))
    unknown = engine.submit(req("unknown", "moss", loras=[{"name": "nowhere"}], **KW))
    run_until_idle(engine)
    assert broken.state is JobState.FAILED and "broken.safetensors" in (broken.error or "")
    assert unknown.state is JobState.FAILED and "nowhere" in (unknown.error or "")
    assert_all_equal_solo(demo, [good])


def test_prompt_cache_keys_on_text_adapters(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=16)
    ink = demo.adapter_set([{"name": "ink"}], allow_paths=False)
    neon = demo.adapter_set([{"name": "neon"}], allow_paths=False)  # UNet only
    plain, with_ink, with_neon = engine.prompts.get_many([prompt_key("owl")] * 3, [(), ink, neon])
    assert not torch.equal(plain.crossattn, with_ink.crossattn)
    assert torch.equal(plain.crossattn, with_neon.crossattn), "a UNet-only adapter shares it"
    assert len(engine.prompts) == 2


def test_bad_files_name_file_and_key(demo: Pipeline, tmp_path: Path) -> None:
    unet = demo.unet
    layer = next(n for n in lora_kit.layers(unet) if n.endswith("to_q"))
    flat = "lora_unet_" + layer.replace(".", "_")
    good = lora_kit.kohya_tensors({"lora_unet_": (unet, [layer])}, rank=2, alpha=None, seed=0)
    cases = {
        "extra": {**good, "lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 4)},
        "shape": {k: v[:, :1] if "down" in k else v for k, v in good.items()},
        "loha": {f"{flat}.hada_w1_a": torch.zeros(2, 2)},
    }
    for name, tensors in cases.items():
        path = lora_kit.write(tmp_path / f"{name}.safetensors", tensors)
        with pytest.raises(GenerationError, match=rf"{name}\.safetensors: key 'lora_unet_"):
            demo.adapter_set([{"name": str(path)}])
    with pytest.raises(GenerationError, match="unknown LoRA"):
        demo.adapter_set([{"name": "../ink"}], allow_paths=False)


def test_budget_keeps_recent_adapters(demo: Pipeline) -> None:
    library = demo.loras
    saved = library.budget_bytes
    try:
        library.budget_bytes = 1
        first = library.load("ink")
        library.load("neon")
        assert library.load("ink") is not first, "evicted beyond the budget, read again"
        library.budget_bytes = 1 << 30
        assert library.load("ink") is library.load("ink")
    finally:
        library.budget_bytes = saved
    with pytest.raises(LoraError):
        library.load("broken")


def test_names_and_tags_follow_the_contract(demo: Pipeline) -> None:
    assert NAME.pattern == LORA_NAME_PATTERN
    assert demo.loras.names() == ["broken", "ink", "neon"]
    p = GenerationParams(prompt="<lora:ink:0.5>a fox <lora:neon>", loras=[])
    assert p.prompt == "a fox" and [(lo.name, lo.scale) for lo in p.loras] == [
        ("ink", 0.5),
        ("neon", 1.0),
    ]
    prompt_line = infotext(p.model_dump(), 1).splitlines()[0]  # A1111's PNG Info keeps the tags
    assert prompt_line == "a fox <lora:ink:0.5> <lora:neon:1>"
    assert GenerationParams(prompt=prompt_line).loras == p.loras
    twice = demo.adapter_set([{"name": "ink", "scale": 0.25}, {"name": "ink", "scale": 0.5}])
    once = demo.adapter_set([{"name": "ink", "scale": 0.75}])
    a, b = demo.encode_prompts(["owl", "owl"], adapters=[twice, once]).crossattn
    assert torch.allclose(a, b, atol=1e-5), "a name given twice: the multipliers add up"
