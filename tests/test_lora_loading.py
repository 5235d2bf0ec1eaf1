"""Adapter loading never stalls the running batch: a job whose LoRA file is still being read
waits in admission while the engine keeps stepping the others; the read happens on the
library's loader thread, the layer installation on the engine's thread between steps; the
late job then gets its exact solo image. A failed read fails only its job."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from model import load_pipeline
from model.lora_files import read_lora
from model.lora_layers import LoraConv2d, LoraLinear
from model.pipeline import Pipeline
from service.engine import Engine
from service.engine_types import JobState
from tests import lora_kit
from tests.test_engine import assert_all_equal_solo, req, run_until_idle

KW = {"steps": 8, "sampler": "euler", "width": 64, "height": 64}
TIMEOUT_S = 60  # only so that a broken engine fails the test instead of hanging it


class GatedRead:
    """read_lora that starts, then waits for `release` before reading: a file that takes as
    long as the test wants. Records the thread it ran on."""

    def __init__(self) -> None:
        self.started, self.release, self.finished = (threading.Event() for _ in range(3))
        self.threads: list[threading.Thread] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.threads.append(threading.current_thread())
        self.started.set()
        assert self.release.wait(TIMEOUT_S), "the test never released the read"
        try:
            return read_lora(*args, **kwargs)
        finally:
            self.finished.set()


def _adapted(module: nn.Module) -> int:
    return sum(isinstance(m, LoraLinear | LoraConv2d) for m in module.modules())


@pytest.fixture
def fresh(tmp_path: Path) -> Pipeline:
    """A demo pipeline nobody has loaded an adapter into yet."""
    pipe = load_pipeline("demo", device="cpu")
    pipe.lora_dir = lora_kit.write_demo_loras(pipe, tmp_path / "loras")
    return pipe


def test_running_jobs_step_while_an_adapter_is_read(fresh: Pipeline) -> None:
    gate = GatedRead()
    fresh.loras.read_file = gate
    engine = Engine(fresh, max_batch=16)
    early = engine.submit(req("early", "a red fox", seed=1, **KW))
    engine.step()
    assert early.state is JobState.RUNNING and early.progress.step == 1
    late = engine.submit(req("late", "a red fox", seed=2, loras=[{"name": "ink"}], **KW))
    engine.step()  # admission starts the read on the loader thread and goes on
    assert gate.started.wait(TIMEOUT_S)
    assert gate.threads[0] is not threading.current_thread()
    for n in range(3, 6):  # the read is blocked: the early job keeps stepping alone
        out = engine.step()
        assert out.calls == [(2, 1)] and early.progress.step == n
        assert late.state is JobState.PENDING and late.start is None
    gate.release.set()
    assert gate.finished.wait(TIMEOUT_S)
    assert _adapted(fresh.unet) == 0, "layers are installed on the engine thread, not the loader"
    while late.start is None:
        engine.step()
    assert _adapted(fresh.unet) > 0 and late.state is JobState.RUNNING
    assert 0 < early.progress.step < KW["steps"], "the late job joins the running batch"
    out = engine.step()
    assert out.calls == [(4, 2)], "then both share the UNet call"
    run_until_idle(engine)
    assert_all_equal_solo(fresh, [early, late])


def test_a_failed_read_fails_only_its_job(fresh: Pipeline) -> None:
    layer = next(n for n in lora_kit.layers(fresh.unet) if n.endswith("to_k"))
    good = lora_kit.kohya_tensors({"lora_unet_": (fresh.unet, [layer])}, rank=2, alpha=1, seed=0)
    wrong = {k: v[:, :3] if "down" in k else v for k, v in good.items()}
    lora_kit.write(fresh.lora_dir / "narrow.safetensors", wrong)  # type: ignore[operator]
    engine = Engine(fresh, max_batch=16)
    ok = engine.submit(req("ok", "moss", seed=5, loras=[{"name": "neon"}], **KW))
    broken = engine.submit(req("broken", "moss", loras=[{"name": "ink"}, {"name": "broken"}], **KW))
    narrow = engine.submit(req("narrow", "moss", loras=[{"name": "narrow"}], **KW))
    run_until_idle(engine)
    assert broken.state is JobState.FAILED and "broken.safetensors" in (broken.error or "")
    key = f"lora_unet_{layer.replace('.', '_')}.lora_down.weight"
    assert narrow.state is JobState.FAILED
    assert f"narrow.safetensors: key '{key}'" in (narrow.error or ""), narrow.error
    assert_all_equal_solo(fresh, [ok])
