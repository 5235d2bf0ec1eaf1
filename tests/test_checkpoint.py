"""load_pipeline's sources (single file, .ckpt, diffusers folder, hub cache, demo) and its errors."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model import load_pipeline
from model.pipeline import GenerationError, Pipeline
from model.text_ldm import text_state_dict_to_ldm
from model.unet_convert import unet_state_dict_to_ldm
from model.vae_convert import vae_state_dict_to_ldm
from model.weights import CheckpointError
from tests.reference import build_reference

KW = {
    "prompt": "a lighthouse",
    "steps": 4,
    "guidance_scale": 7.5,
    "width": 64,
    "height": 64,
    "seed": 3,
}


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd1") / "pipeline"
    build_reference("sd1").save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sd1(sd1_folder: Path) -> Pipeline:
    return load_pipeline(str(sd1_folder), device="cpu")


@pytest.fixture(scope="module")
def single_file_dict(sd1: Pipeline) -> dict[str, torch.Tensor]:
    return {
        **unet_state_dict_to_ldm(sd1.unet),
        **vae_state_dict_to_ldm(sd1.vae),
        **text_state_dict_to_ldm(sd1.text),
    }


def _images(pipe: Pipeline, sampler: str = "ddim") -> np.ndarray:
    return np.stack([np.asarray(im) for im in pipe.generate(sampler=sampler, **KW)])


def test_single_file_gives_the_same_images_as_the_folder(
    sd1: Pipeline, single_file_dict: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    save_file(single_file_dict, path)
    single = load_pipeline(str(path), device="cpu")
    assert single.unet.config == sd1.unet.config  # detected from shapes, heads by SD 1.x convention
    np.testing.assert_array_equal(_images(single), _images(sd1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_loads_read_conv_weights_channels_last_with_the_same_values(
    sd1: Pipeline, single_file_dict: dict[str, torch.Tensor], tmp_path: Path, dtype: torch.dtype
) -> None:
    """On CPU the UNet's conv weights are read straight into NHWC (not copied out of the
    file's memory map); every value equals the file's. The VAE's decoder runs channels_last
    on CPU too (converted after loading: its NCHW decode was 2x slower at 256x256); its
    encoder stays NCHW (thread-count-independent img2img starts)."""
    path = tmp_path / "model.safetensors"
    save_file({k: v.to(dtype) for k, v in single_file_dict.items()}, path)
    pipe = load_pipeline(str(path), device="cpu")
    assert pipe.unet.channels_last and pipe.dtype == torch.float32
    convs = {k: v for k, v in pipe.unet.state_dict().items() if v.dim() == 4}
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs.values())
    for key, value in convs.items():
        expected = single_file_dict["model.diffusion_model." + key].to(dtype).float()
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    vae_in = pipe.vae.state_dict()["decoder.conv_in.weight"]
    assert vae_in.is_contiguous(memory_format=torch.channels_last)
    expected = single_file_dict["first_stage_model.decoder.conv_in.weight"].to(dtype).float()
    torch.testing.assert_close(vae_in, expected, rtol=0, atol=0)
    assert pipe.vae.state_dict()["encoder.conv_in.weight"].is_contiguous()
    for name, sd in (("single file", pipe.unet.state_dict()), ("folder", sd1.unet.state_dict())):
        assert all(v.is_contiguous(memory_format=torch.channels_last) for k, v in sd.items()
                   if v.dim() == 4), name  # fmt: skip


def test_full_checkpoint_with_ema_and_training_keys_loads_the_model_weights(
    sd1: Pipeline, single_file_dict: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    full = dict(single_file_dict)
    full["model_ema.decay"] = torch.tensor(0.9999)
    full["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(1)
    full["alphas_cumprod"] = torch.ones(1000)
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": full, "global_step": 470000}, path)
    np.testing.assert_array_equal(_images(load_pipeline(str(path), device="cpu")), _images(sd1))


def test_ckpt_is_never_unpickled_unrestricted(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    with path.open("wb") as f:
        pickle.dump({"state_dict": Exploit()}, f)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: not a loadable checkpoint"):
        load_pipeline(str(path), device="cpu")
    assert not marker.exists()


def test_hub_repo_id_loads_offline_from_the_cache(
    sd1_folder: Path, sd1: Pipeline, tmp_path: Path
) -> None:
    """A repo id resolves through huggingface_hub's cache layout with HF_HUB_OFFLINE=1."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-sd"
    snapshot = repo / "snapshots" / commit
    for f in sd1_folder.rglob("*"):
        if f.is_file():
            dest = snapshot / f.relative_to(sd1_folder)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "hub.npy"
    code = (
        "import sys, numpy as np\n"
        "from model import load_pipeline\n"
        "p = load_pipeline('acme/tiny-sd', device='cpu')\n"
        f"ims = p.generate(sampler='ddim', **{KW!r})\n"
        "np.save(sys.argv[1], np.stack([np.asarray(i) for i in ims]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, timeout=240)
    np.testing.assert_array_equal(np.load(out), _images(sd1))


def test_unknown_repo_offline_is_a_clear_error(tmp_path: Path) -> None:
    code = "from model import load_pipeline\nload_pipeline('acme/missing', device='cpu')\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "acme/missing: not in the Hugging Face cache and offline" in proc.stderr


def test_demo_builds_fast_and_is_deterministic() -> None:
    start = time.perf_counter()
    a = load_pipeline("demo", device="cpu")
    elapsed = time.perf_counter() - start
    b = load_pipeline("demo", device="cpu")
    kw = {**KW, "steps": 2}
    np.testing.assert_array_equal(np.asarray(a.generate(**kw)[0]), np.asarray(b.generate(**kw)[0]))
    assert elapsed < 10, f"demo model took {elapsed:.1f}s to build"  # generous: shared CI cores


# --- bad input: a clear message naming the file and the reason -------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nothere\.safetensors: no such file or folder"):
        load_pipeline(str(tmp_path / "nothere.safetensors"), device="cpu")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_text("these are not weights")
    with pytest.raises(CheckpointError, match=r"notes\.safetensors: not a checkpoint"):
        load_pipeline(str(path), device="cpu")
    other = tmp_path / "picture.png"
    other.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(CheckpointError, match=r"picture\.png: not a checkpoint"):
        load_pipeline(str(other), device="cpu")


def test_truncated_safetensors(single_file_dict: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file(single_file_dict, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated safetensors file"):
        load_pipeline(str(path), device="cpu")


def test_unknown_architecture(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layers.0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(
        CheckpointError, match=r"other\.safetensors: not a Stable Diffusion checkpoint"
    ):
        load_pipeline(str(path), device="cpu")
    sdxl = tmp_path / "xl.safetensors"
    save_file(
        {"conditioner.embedders.0.x": torch.zeros(1), "model.diffusion_model.x": torch.zeros(1)},
        sdxl,
    )
    with pytest.raises(CheckpointError, match=r"xl\.safetensors: the checkpoint has no VAE"):
        load_pipeline(str(sdxl), device="cpu")  # SDXL's layout, parts missing


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("model.diffusion_model.output_blocks.2.0.in_layers.2.weight", "missing"),
        ("first_stage_model.decoder.conv_in.weight", "missing"),
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "missing"),
        ("model.diffusion_model.middle_block.1.proj_out.weight", "shape"),
    ],
)
def test_missing_key_or_shape_mismatch_is_named(
    single_file_dict: dict[str, torch.Tensor], tmp_path: Path, key: str, problem: str
) -> None:
    broken = dict(single_file_dict)
    if problem == "missing":
        del broken[key]
    else:
        broken[key] = torch.zeros(5, 5, 1, 1)
    path = tmp_path / "broken.safetensors"
    save_file(broken, path)
    short = key.split(".", 1)[1] if not key.startswith("cond_stage_model") else key
    with pytest.raises(
        CheckpointError, match=r"broken\.safetensors.*" + short.split(".")[-3]
    ) as info:
        load_pipeline(str(path), device="cpu")
    assert short.rsplit(".", 2)[0].split(".")[-1] in str(info.value)


def test_size_not_multiple_of_8_and_unknown_sampler(sd1: Pipeline) -> None:
    with pytest.raises(GenerationError, match="width must be a positive multiple of 8, got 100"):
        sd1.generate("x", width=100, height=64, steps=1)
    with pytest.raises(GenerationError, match="height must be a positive multiple of 8, got 60"):
        sd1.generate("x", width=64, height=60, steps=1)
    with pytest.raises(GenerationError, match="unknown sampler 'warp'"):
        sd1.generate("x", width=64, height=64, steps=1, sampler="warp")
