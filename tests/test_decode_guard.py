"""A half-precision VAE that overflows (SDXL's does in fp16) never yields a "succeeded" NaN or
black image: the decode (or encode) runs again in float32, and where float32 is non-finite
too, generate() raises and the engine fails the job with a clear error. Forced on CPU by
scaling a VAE weight past fp16's range (65504)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.demo import build_demo
from model.first_stage_guard import NonFiniteDecodeError
from model.pipeline import Pipeline
from service.engine import Engine
from service.engine_types import JobState
from tests.test_engine import req, run_until_idle

OVERFLOW = 1e5  # x a first conv's weights: past fp16's range, well within float32's


def _overflowing(part: str) -> Pipeline:
    """The demo model with a fp16 VAE whose `part` (encoder / decoder) overflows in fp16."""
    pipe = build_demo()
    pipe.vae.half()
    with torch.no_grad():
        getattr(pipe.vae, part).conv_in.weight.mul_(OVERFLOW)
    return pipe


def test_fp16_decode_overflow_is_decoded_again_in_float32() -> None:
    pipe = _overflowing("decoder")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert not torch.isfinite(pipe.vae.decode(z / pipe.vae.scaling_factor)).all()
    got = pipe.decode_latents(z)
    fp32 = build_demo()
    fp32.vae = pipe.first_stage_guard.float32(
        pipe.vae
    )  # the same (fp16-rounded) weights, in float32
    assert np.array_equal(got, fp32.decode_latents(z))
    assert got.std() > 1, "a real image, not a flat one"


def test_fp16_encode_overflow_is_encoded_again_in_float32() -> None:
    pipe = _overflowing("encoder")
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        assert not torch.isfinite(pipe.vae.encode(pixels)[0]).all()
        expected = pipe.first_stage_guard.float32(pipe.vae).encode(pixels)
    got = pipe.encode_image(pixels)
    torch.testing.assert_close(got.mean, expected.mean)
    torch.testing.assert_close(got.logvar, expected.logvar)


@pytest.fixture()
def broken() -> Pipeline:
    """A float32 VAE that decodes NaN: nothing can fix it."""
    pipe = build_demo()
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    return pipe


def test_non_finite_float32_decode_raises(broken: Pipeline) -> None:
    with pytest.raises(NonFiniteDecodeError, match="non-finite"):
        broken.generate("x", width=64, height=64, steps=2)


def test_engine_fails_the_job_instead_of_returning_a_broken_image(broken: Pipeline) -> None:
    engine = Engine(broken, max_batch=4)
    handle = engine.submit(req("nan", steps=2, width=64, height=64))
    run_until_idle(engine)
    assert handle.state is JobState.FAILED and not handle.images
    assert "non-finite" in (handle.error or "")


def test_img2img_through_the_guard_still_works() -> None:
    pipe = _overflowing("encoder")
    image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    assert len(pipe.generate("x", image=image, steps=4, strength=0.5)) == 1
