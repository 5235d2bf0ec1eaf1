"""AUTOMATIC1111 compatibility, driven by the real ``webuiapi`` client against real
processes (redis-server, ``ldmserve api`` under uvicorn, a demo worker whose ``slow:``
prompts take 0.25 s per step so that progress and interrupt can be watched)."""

from __future__ import annotations

import base64
import io
import json
import threading
from typing import Any

import httpx
import pytest
import webuiapi
from PIL import Image

from tests.conftest import LIVE_KEYS
from tests.processes import wait_until
from tests.tiny import demo_solo, max_pixel_diff

pytestmark = pytest.mark.slow


def make_api(base: str, key: str = LIVE_KEYS["a1111"], **kwargs: Any) -> webuiapi.WebUIApi:
    api = webuiapi.WebUIApi(baseurl=f"{base}/sdapi/v1", **kwargs)
    api.session.headers["Authorization"] = f"Bearer {key}"
    return api


@pytest.fixture
def api(live_stack: Any) -> webuiapi.WebUIApi:
    return make_api(live_stack.base, sampler="DPM++ 2M", scheduler="karras", steps=2)


def native(live_stack: Any, key: str = LIVE_KEYS["a1111"]) -> httpx.Client:
    return httpx.Client(base_url=live_stack.base, headers={"Authorization": f"Bearer {key}"})


def test_txt2img_answers_images_parameters_and_info(api: webuiapi.WebUIApi) -> None:
    result = api.txt2img(
        prompt="a lighthouse", negative_prompt="fog", seed=7, batch_size=2, n_iter=2,
        cfg_scale=1.5, width=64, height=96, restore_faces=False,
    )  # fmt: skip
    assert [im.size for im in result.images] == [(64, 96)] * 4
    info = result.info
    assert info["all_seeds"] == [7, 8, 9, 10] and info["seed"] == 7
    assert info["sampler_name"] == "DPM++ 2M" and info["steps"] == 2
    assert info["cfg_scale"] == 1.5 and (info["width"], info["height"]) == (64, 96)
    assert info["sd_model_name"] == "demo" and len(info["infotexts"]) == 4
    assert info["infotexts"][3].startswith("a lighthouse\nNegative prompt: fog\nSteps: 2,")
    assert "Seed: 10," in info["infotexts"][3]
    # Everything webuiapi sends that ldmserve does not act on is listed, not silently used.
    assert {"enable_hr", "restore_faces", "alwayson_scripts", "styles"} <= set(
        info["ldmserve_ignored_fields"]
    )
    assert "prompt" not in info["ldmserve_ignored_fields"]
    assert result.parameters["prompt"] == "a lighthouse"
    assert "Schedule type: Karras" in result.images[0].info["parameters"]
    # The pixels are the native pipeline's for the same fields (batched vs solo: <= 2/255).
    expected = demo_solo(prompt="a lighthouse", negative_prompt="fog", seed=7, num_images=4,
                         guidance_scale=1.5, width=64, height=96, steps=2,
                         sampler="dpmpp_2m_karras")  # fmt: skip
    assert max_pixel_diff(result.images, expected) <= 2


def test_http_basic_auth_as_a1111_api_auth(live_stack: Any) -> None:
    """webuiapi's set_auth (A1111's --api-auth): HTTP Basic with the API key as password."""
    api = webuiapi.WebUIApi(baseurl=f"{live_stack.base}/sdapi/v1", steps=2)
    api.set_auth("anyone", LIVE_KEYS["a1111"])
    result = api.txt2img(prompt="a fox", width=64, height=64, seed=3)
    assert result.image.size == (64, 64) and result.info["seed"] == 3
    api.set_auth("anyone", "wrong")
    with pytest.raises(RuntimeError) as err:
        api.txt2img(prompt="a fox", width=64, height=64)
    assert err.value.args[0] == 401
    basic = httpx.get(f"{live_stack.base}/sdapi/v1/samplers")
    assert basic.status_code == 401 and basic.headers["www-authenticate"].startswith("Basic")
    # Basic is for the A1111 routes only; the native API wants a bearer key.
    r = httpx.get(f"{live_stack.base}/v1/jobs", auth=("anyone", LIVE_KEYS["a1111"]))
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")


def test_null_and_unknown_fields_are_accepted(live_stack: Any) -> None:
    with native(live_stack) as client:
        body = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": None,
                "cfg_scale": None, "made_up_field": {"x": 1}}  # fmt: skip
        r = client.post("/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["cfg_scale"] == 7.0 and info["sampler_name"] == "Euler"  # A1111 defaults
        assert info["ldmserve_ignored_fields"] == ["made_up_field"]


def test_samplers_schedulers_and_refused_combinations(api: webuiapi.WebUIApi) -> None:
    names = [s["name"] for s in api.get_samplers()]
    assert names == ["Euler a", "Euler", "Heun", "DPM++ 2M", "DDIM", "PLMS", "LCM"]
    assert {s["name"] for s in api.get_schedulers()} == {"automatic", "normal", "karras"}
    for sampler, scheduler in [("DDIM", "karras"), ("UniPC", "automatic"), ("Euler", "sgm")]:
        with pytest.raises(RuntimeError) as err:
            api.txt2img(prompt="a fox", sampler_name=sampler, scheduler=scheduler, width=64,
                        height=64)  # fmt: skip
        assert err.value.args[0] == 422 and sampler in err.value.args[1]


def test_models_and_options_pick_the_callers_model(api: webuiapi.WebUIApi, live_stack: Any) -> None:
    assert [m["title"] for m in api.get_sd_models()] == ["demo"]
    assert api.get_options()["sd_model_checkpoint"] == "demo"
    r = api.session.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "sdxl"})
    assert r.status_code == 422 and "sdxl" in r.json()["detail"]
    api.set_options({"sd_model_checkpoint": "demo [0123abcd]", "samples_format": "jpg"})
    assert api.get_options()["sd_model_checkpoint"] == "demo"
    with pytest.raises(RuntimeError) as err:
        api.txt2img(prompt="a fox", width=64, height=64,
                    override_settings={"sd_model_checkpoint": "missing"})  # fmt: skip
    assert err.value.args[0] == 422


def _progress_when_running(api: webuiapi.WebUIApi) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def stepping() -> bool:
        seen.update(api.get_progress())
        return seen["state"]["sampling_step"] >= 2

    wait_until(stepping, 120, "the job to take two steps", 0.1)
    return seen


def test_progress_and_interrupt_of_the_callers_running_job(
    api: webuiapi.WebUIApi, live_stack: Any
) -> None:
    results: list[Any] = []
    call = threading.Thread(
        target=lambda: results.append(
            api.txt2img(prompt="slow: a castle", steps=40, width=64, height=64)
        )
    )
    call.start()
    try:
        progress = _progress_when_running(api)
        assert progress["state"]["sampling_steps"] == 40 and progress["state"]["job_count"] == 1
        assert 0 < progress["progress"] < 1
        job_id = progress["current_task"]
        # Live preview: every 5 evaluations (preview_every_steps), a PNG at latent resolution.
        seen: dict[str, Any] = {}
        wait_until(lambda: seen.update(api.get_progress()) or seen["current_image"], 60,
                   "a live preview", 0.1)  # fmt: skip
        assert seen["state"]["sampling_step"] >= 5
        preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
        assert preview.size == (8, 8) and preview.mode == "RGB"
        with native(live_stack) as client:
            r = client.get("/sdapi/v1/progress", params={"skip_current_image": "true"})
            assert r.json()["current_image"] is None and r.json()["current_task"] == job_id
        other = make_api(live_stack.base, key=LIVE_KEYS["other"])
        assert other.get_progress()["state"]["job_count"] == 0  # another key's view
        assert other.interrupt() == {}  # another key cannot stop it
        with native(live_stack) as client:
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        assert api.interrupt() == {}
    finally:
        call.join(120)
    (result,) = results
    assert result.images == [] and result.info["interrupted"] is True
    assert result.info["ldmserve_job_id"] == job_id
    with native(live_stack) as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
    assert api.get_progress()["state"]["job_count"] == 0


def test_skip_stops_only_the_current_job(api: webuiapi.WebUIApi, live_stack: Any) -> None:
    results: dict[str, Any] = {}

    def run(name: str, steps: int) -> None:
        results[name] = api.txt2img(prompt=f"slow: {name}", steps=steps, width=64, height=64)

    first = threading.Thread(target=run, args=("first", 40))
    first.start()
    _progress_when_running(api)
    second = threading.Thread(target=run, args=("second", 6))
    second.start()
    wait_until(lambda: api.get_progress()["state"]["job_count"] == 2, 60, "two jobs")
    assert api.skip() == {}
    first.join(120)
    second.join(120)
    assert results["first"].info["interrupted"] is True and results["first"].images == []
    assert results["second"].info["interrupted"] is False
    assert len(results["second"].images) == 1


def test_img2img_with_a_mask(api: webuiapi.WebUIApi, live_stack: Any) -> None:
    """Inpainting with webuiapi (mask white = repaint)."""
    init = Image.new("RGB", (64, 64), "gray")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    result = api.img2img(
        images=[init], mask_image=mask, prompt="a hat", denoising_strength=0.5, seed=4,
        width=64, height=64, inpainting_mask_invert=0, resize_mode=0,
    )  # fmt: skip
    assert [im.size for im in result.images] == [(64, 64)]
    assert result.info["denoising_strength"] == 0.5 and result.info["all_seeds"] == [4]
    assert "mask_blur" in result.info["ldmserve_ignored_fields"]
    expected = demo_solo(prompt="a hat", image=init, mask=mask, strength=0.5, seed=4, width=64,
                         height=64, steps=2, sampler="dpmpp_2m_karras", guidance_scale=7.0)  # fmt: skip
    assert max_pixel_diff(result.images, expected) <= 2  # webuiapi's cfg_scale default: 7
    with pytest.raises(RuntimeError) as err:
        api.img2img(images=[init], prompt="a hat", resize_mode=1, width=64, height=64)
    assert err.value.args[0] == 422
