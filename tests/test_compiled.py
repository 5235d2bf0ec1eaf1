"""The compiled UNet path: bucketed batch sizes, padded rows that change nothing, graphs built
at warm-up and reused. Dynamo runs with the aot_eager backend here (graph capture and
bucketing as in production, without inductor's minutes of C++ compilation on this CPU);
bench/unet.py --compile measures inductor against eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from model import load_pipeline
from model.compiled import BucketedUNet, default_buckets
from model.conditioning import Conditioning, pad_rows
from model.pipeline import Pipeline


def test_buckets_and_padding() -> None:
    assert default_buckets(16) == (1, 2, 4, 8, 16) and default_buckets(6) == (1, 2, 4, 6)
    t = torch.arange(6.0).reshape(3, 2)
    assert pad_rows(t, 5).tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]
    assert pad_rows(t, 2) is t
    cond = Conditioning(torch.randn(3, 4, 8), concat=torch.randn(3, 5, 2, 2))
    padded = cond.pad_rows(4)
    assert padded.rows == 4 and padded.concat is not None and padded.concat.shape[0] == 4
    assert torch.equal(padded.crossattn[3], cond.crossattn[2])
    part = cond.rows_slice(1, 3)
    assert torch.equal(part.crossattn, cond.crossattn[1:3]) and part.concat.shape[0] == 2  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="positive"):
        BucketedUNet(torch.nn.Linear(1, 1), [0, 2])


@pytest.fixture
def demo() -> Pipeline:
    torch._dynamo.reset()
    return load_pipeline("demo", device="cpu")


def test_padded_calls_equal_eager_and_reuse_the_warm_graphs(demo: Pipeline) -> None:
    torch.manual_seed(0)
    x, t = torch.randn(7, 4, 8, 8), torch.linspace(50, 900, 7)
    cond = demo.encode_prompts([f"p{i}" for i in range(7)])
    with torch.inference_mode():
        eager = demo.unet_forward(x, t, cond)
    compiled = demo.compile_unet((1, 2, 4), backend="aot_eager")
    assert compiled.bucket(3) == 4 and compiled.bucket(9) == 4
    assert demo.warm_compiled(64, 64) > 0
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for n in (1, 2, 3, 4):  # 3 pads to 4
            got = demo.unet_forward(x[:n], t[:n], cond.rows_slice(0, n))
            assert torch.allclose(got, eager[:n], atol=1e-5), n
        got = demo.unet_forward(x, t, cond)  # 7 > 4: calls of 4 and 3 (padded to 4)
        assert torch.allclose(got, eager, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs  # no compilation after warm-up


def test_shapes_not_warmed_run_eager(demo: Pipeline) -> None:
    """Another latent size or a longer prompt than warm-up's runs the eager module: compiling a
    new shape mid-batch would stall every running job for minutes on a CPU."""
    torch.manual_seed(1)
    x, t = torch.randn(2, 4, 6, 10), torch.tensor([900.0, 40.0])
    long = demo.encode_prompts([" ".join(["word"] * 90)] * 2)  # two 77-token chunks
    assert long.crossattn.shape[1] == 154
    with torch.inference_mode():
        eager = demo.unet_forward(x, t, long)
    demo.compile_unet((2,), backend="aot_eager")
    demo.warm_compiled(64, 64)
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        assert torch.equal(demo.unet_forward(x, t, long), eager)
        short = demo.encode_prompts(["a", "b"])
        assert torch.equal(demo.unet_forward(x, t, short), demo.unet(x, t, short).float())
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_pipeline_images_equal_eager(demo: Pipeline) -> None:
    kw = {"width": 64, "height": 64, "steps": 3, "seed": 5, "num_images": 3}
    eager = np.stack([np.asarray(im) for im in demo.generate("a fox", **kw)])
    demo.compile_unet(default_buckets(8), backend="aot_eager")
    demo.warm_compiled(64, 64)
    compiled = np.stack([np.asarray(im) for im in demo.generate("a fox", **kw)])
    assert int(np.abs(compiled.astype(int) - eager.astype(int)).max()) <= 1
