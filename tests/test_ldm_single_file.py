"""CompVis LDM single files (model/ldm_single_file.py): a tiny diffusers LDMPipeline /
LDMSuperResolutionPipeline's weights written in the original `latent-diffusion` layout by a
writer of this file's own (openaimodel block order, legacy fused `qkv`, the DDPM buffers, an
EMA copy, first-stage loss weights), loaded by `load_pipeline` from the file alone, give the
diffusers folder's images exactly and diffusers' within 2/255 (fp32 CPU). The legacy head order
is checked against a reference QKVAttentionLegacy written here from the paper repo's
definition, so writer and reader cannot share a mistake there.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file
from torch import Tensor

from model import load_pipeline
from model.ldm import LDM_SCHEDULER_CONFIG, LDM_SR_SCHEDULER_CONFIG
from model.pipeline import Pipeline
from model.samplers import NoiseSchedule
from model.unet2d import Attention
from model.unet2d_convert import HEAD_CHANNELS, split_legacy_qkv
from model.unet_convert import _RESNET_RENAMES, unet_state_dict_to_ldm
from model.vae_convert import vae_state_dict_to_ldm
from model.vq_convert import vq_from_diffusers, vq_state_dict_to_ldm
from model.weights import CheckpointError
from tests.test_ldm_families import (
    LOW_RES,
    low_res_image,
    max_diff,
    reference_images,
    reference_pipeline,
    save_reference,
)
from tests.test_ldmbert import (
    LDM_TEXT_DDIM,
    LDM_TEXT_UNET,
    LDM_TEXT_VAE,
    TINY_LDMBERT,
    bert_tokenizer,
)
from tests.tiny import (
    UNET2D_IRREGULAR_SINGLE_FILE,
    UNET2D_IRREGULAR_SR_SINGLE_FILE,
    UNET2D_SR_SINGLE_FILE,
    UNET2D_UNCOND_SINGLE_FILE,
    VQ_IRREGULAR,
    VQ_IRREGULAR_SR,
    VQ_TEST,
    randomize_,
)

UNET = "model.diffusion_model."
SHAPES: dict[str, dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {
    "uncond": {
        "test": (VQ_TEST, UNET2D_UNCOND_SINGLE_FILE),
        "irregular": (VQ_IRREGULAR, UNET2D_IRREGULAR_SINGLE_FILE),
    },
    "sr": {
        "test": (VQ_TEST, UNET2D_SR_SINGLE_FILE),
        "irregular": (VQ_IRREGULAR_SR, UNET2D_IRREGULAR_SR_SINGLE_FILE),
    },
}
SEED = 31


# ---------------------------------------------------------------- the test-side writer


def merge_legacy_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Three (C, ...) projections -> QKVAttentionLegacy's fused rows: per head its q, k, v."""
    c = q.shape[0]
    per_head = [t.reshape(heads, c // heads, *t.shape[1:]) for t in (q, k, v)]
    return torch.stack(per_head, dim=1).reshape(3 * c, *q.shape[1:])  # (3C, ...)


def original_unet(unet: UNet2DModel) -> dict[str, Tensor]:
    """A diffusers UNet2DModel's weights under openaimodel's names (`model.diffusion_model.`)."""
    cfg, sd = unet.config, unet.state_dict()
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def plain(ours: str, orig: str) -> None:
        for key in [k for k in sd if k.startswith(ours + ".")]:
            out[UNET + orig + key[len(ours) :]] = sd[key]
            used.add(key)

    def res(ours: str, orig: str) -> None:
        for ours_name, orig_name in _RESNET_RENAMES.items():
            plain(f"{ours}.{ours_name}", f"{orig}.{orig_name}")

    def attn(ours: str, orig: str) -> None:
        heads = sd[f"{ours}.to_q.weight"].shape[0] // cfg.attention_head_dim
        plain(f"{ours}.group_norm", f"{orig}.norm")
        for p in ("weight", "bias"):
            parts = [sd[f"{ours}.to_{n}.{p}"] for n in "qkv"]
            used.update(f"{ours}.to_{n}.{p}" for n in ("q", "k", "v", "out.0"))
            fused = merge_legacy_qkv(*parts, heads)
            out[f"{UNET}{orig}.qkv.{p}"] = fused[..., None] if p == "weight" else fused
            proj = sd[f"{ours}.to_out.0.{p}"]
            out[f"{UNET}{orig}.proj_out.{p}"] = proj[..., None] if p == "weight" else proj

    n, layers = len(cfg.block_out_channels), cfg.layers_per_block
    attention = [t.startswith("Attn") for t in cfg.down_block_types]
    plain("conv_in", "input_blocks.0.0")
    plain("time_embedding.linear_1", "time_embed.0")
    plain("time_embedding.linear_2", "time_embed.2")
    i = 1
    for level in range(n):
        for j in range(layers):
            res(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{i}.0")
            if attention[level]:
                attn(f"down_blocks.{level}.attentions.{j}", f"input_blocks.{i}.1")
            i += 1
        if level != n - 1:
            plain(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{i}.0.op")
            i += 1
    res("mid_block.resnets.0", "middle_block.0")
    attn("mid_block.attentions.0", "middle_block.1")
    res("mid_block.resnets.1", "middle_block.2")
    i = 0
    for u in range(n):
        for j in range(layers + 1):
            res(f"up_blocks.{u}.resnets.{j}", f"output_blocks.{i}.0")
            k = 1
            if attention[n - 1 - u]:
                attn(f"up_blocks.{u}.attentions.{j}", f"output_blocks.{i}.1")
                k = 2
            if j == layers and u != n - 1:
                plain(f"up_blocks.{u}.upsamplers.0.conv", f"output_blocks.{i}.{k}.conv")
            i += 1
    plain("conv_norm_out", "out.0")
    plain("conv_out", "out.2")
    assert used == set(sd), f"UNet tensors not written: {sorted(set(sd) - used)[:3]}"
    return out


def ldm_betas(config: dict[str, Any]) -> Tensor:
    """The CompVis `linear` schedule (linear in sqrt(beta)) as its DDPM registers `betas`."""
    start, end = config["beta_start"] ** 0.5, config["beta_end"] ** 0.5
    return (torch.linspace(start, end, 1000, dtype=torch.float64) ** 2).float()


def write_original(
    ref: Any, folder: Path, path: Path, *, scale_factor: float | None, betas: bool = True
) -> dict[str, Tensor]:
    """The whole single file as a converted CompVis .ckpt holds it; returns what it wrote."""
    sd = original_unet(ref.unet)
    sd.update(vq_state_dict_to_ldm(vq_from_diffusers(folder / "vqvae")))
    if betas:
        b = ldm_betas(LDM_SCHEDULER_CONFIG)
        sd["betas"] = b
        sd["alphas_cumprod"] = torch.cumprod(1 - b, dim=0)
        sd["posterior_mean_coef1"] = torch.rand(1000)
    if scale_factor is not None:
        sd["scale_factor"] = torch.tensor(scale_factor)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    sd["model_ema.diffusion_modelinput_blocks00weight"] = torch.rand(3, 3)
    sd["first_stage_model.loss.discriminator.main.0.weight"] = torch.rand(4, 3, 4, 4)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return sd


# ---------------------------------------------------------------- fixtures and helpers


def build_reference(family: str, shape: str) -> Any:
    return reference_pipeline(family, *SHAPES[family][shape])


Models = tuple[Any, Pipeline, Pipeline, str, str, Path]


@pytest.fixture(scope="module", params=[(f, s) for f in SHAPES for s in ("test", "irregular")])
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Models:
    family, shape = request.param
    ref = build_reference(family, shape)
    root = tmp_path_factory.mktemp(f"{family}-{shape}")
    save_reference(ref, root / "pipeline")
    path = root / "compvis.safetensors"
    # The unconditional folder divides by its VQ scaling; a scale_by_std file says so itself.
    scale = ref.vqvae.config.scaling_factor if family == "uncond" else None
    write_original(ref, root / "pipeline", path, scale_factor=scale)
    folder = load_pipeline(str(root / "pipeline"), device="cpu")
    return ref, folder, load_pipeline(str(path), device="cpu"), family, shape, path


def images(pipe: Pipeline, family: str, shape: str, sampler: str, size: int) -> np.ndarray:
    steps = 5
    kw: dict[str, Any] = {"steps": steps, "sampler": sampler, "seed": SEED, "num_images": 2}
    if family == "sr":
        kw["image"] = low_res_image(LOW_RES[shape])
    else:
        kw["width"] = kw["height"] = size
    return np.stack([np.asarray(im) for im in pipe.generate(**kw)])


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_single_file_gives_the_folder_images(models: Models, sampler: str) -> None:
    """Same weights, same modules: the file's images are the folder's, pixel for pixel."""
    _, folder, single, family, shape, _ = models
    expected = images(folder, family, shape, sampler, folder.native_size)
    got = images(single, family, shape, sampler, folder.native_size)
    assert max_diff(got[0], got[1]) > 10, "images of seeds s and s+1 must differ"
    assert max_diff(got, expected) == 0


def test_single_file_matches_diffusers(models: Models) -> None:
    ref, folder, single, family, shape, _ = models
    expected = reference_images(ref, family, shape, "ddim", 2)
    got = images(single, family, shape, "ddim", folder.native_size)
    assert got.shape == expected.shape
    assert max_diff(got, expected) <= 2


def test_what_the_file_tells(models: Models) -> None:
    """Architecture from shapes, family from input channels, schedule from `betas`, latent
    scale from `scale_factor`, native size from the published latent side 64."""
    _, folder, single, family, _, _ = models
    a, b = folder.unet.config, single.unet.config
    for field in ("in_channels", "out_channels", "block_out_channels", "attention_levels"):
        assert getattr(a, field) == getattr(b, field), field
    assert (a.layers_per_block, a.scale_shift, a.time_dim) == (
        b.layers_per_block,
        b.scale_shift,
        b.time_dim,
    )
    assert single.capabilities.family == folder.capabilities.family
    assert single.capabilities.family == ("ldm" if family == "uncond" else "ldm-sr")
    assert single.native_size == 64 * single.vae.downsampling_factor
    assert single.schedule.alphas_cumprod == folder.schedule.alphas_cumprod
    assert single.vae.scaling_factor == folder.vae.scaling_factor


@pytest.mark.parametrize("family", ["uncond", "sr"])
def test_defaults_without_buffers(family: str, tmp_path: Path) -> None:
    """No `betas`: the family's published schedule; no `scale_factor`: latents unscaled."""
    ref = build_reference(family, "test")
    save_reference(ref, tmp_path / "pipeline")
    path = tmp_path / "bare.safetensors"
    write_original(ref, tmp_path / "pipeline", path, scale_factor=None, betas=False)
    pipe = load_pipeline(str(path), device="cpu")
    published = LDM_SCHEDULER_CONFIG if family == "uncond" else LDM_SR_SCHEDULER_CONFIG
    assert pipe.schedule == NoiseSchedule.from_config(published)
    assert published["beta_end"] == (0.0195 if family == "uncond" else 0.0155)
    assert pipe.vae.scaling_factor == 1.0


def test_lightning_ckpt_loads_as_its_safetensors(tmp_path: Path) -> None:
    """The published .ckpt (Lightning: weights under `state_dict`, beside `global_step`) gives
    the images of its .safetensors conversion."""
    ref = build_reference("sr", "test")
    save_reference(ref, tmp_path / "pipeline")
    path = tmp_path / "model.safetensors"
    write_original(ref, tmp_path / "pipeline", path, scale_factor=None)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 5}, ckpt)
    pipes = [load_pipeline(str(p), device="cpu") for p in (path, ckpt)]
    got = [images(p, "sr", "test", "ddim", 0) for p in pipes]
    assert pipes[1].capabilities.family == "ldm-sr"
    assert max_diff(got[0], got[1]) == 0


def legacy_attention_block(x: Tensor, w: dict[str, Tensor], heads: int) -> Tensor:
    """openaimodel's AttentionBlock with QKVAttentionLegacy (latent-diffusion's definition)."""
    B, C, H, W = x.shape
    flat = x.reshape(B, C, -1)
    qkv = F.conv1d(F.group_norm(flat, 32, w["norm.weight"], w["norm.bias"]), w["qkv.weight"],
                   w["qkv.bias"])  # fmt: skip
    q, k, v = qkv.reshape(B * heads, 3 * C // heads, -1).split(C // heads, dim=1)
    scale = 1 / math.sqrt(math.sqrt(C // heads))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(B, C, -1)
    return (flat + F.conv1d(a, w["proj_out.weight"], w["proj_out.bias"])).reshape(B, C, H, W)


def test_legacy_head_order_against_reference() -> None:
    """Three heads of 32: the split rows give the reference block's output; a plain
    (q | k | v) split would not."""
    gen = torch.Generator().manual_seed(3)
    C = 3 * HEAD_CHANNELS
    w = {
        "norm.weight": 1 + 0.1 * torch.randn(C, generator=gen),
        "norm.bias": 0.1 * torch.randn(C, generator=gen),
        "qkv.weight": torch.randn(3 * C, C, 1, generator=gen) / math.sqrt(C),
        "qkv.bias": 0.1 * torch.randn(3 * C, generator=gen),
        "proj_out.weight": torch.randn(C, C, 1, generator=gen) / math.sqrt(C),
        "proj_out.bias": 0.1 * torch.randn(C, generator=gen),
    }
    x = torch.randn(2, C, 4, 5, generator=gen)
    expected = legacy_attention_block(x, w, heads=3)

    def ours(split: Any) -> Tensor:
        block = Attention(C, HEAD_CHANNELS, 32, 1e-5, 1.0)
        q, k, v = split(w["qkv.weight"][..., 0])
        qb, kb, vb = split(w["qkv.bias"])
        state = {"group_norm.weight": w["norm.weight"], "group_norm.bias": w["norm.bias"],
                 "to_q.weight": q, "to_k.weight": k, "to_v.weight": v, "to_q.bias": qb,
                 "to_k.bias": kb, "to_v.bias": vb, "to_out.0.weight": w["proj_out.weight"][..., 0],
                 "to_out.0.bias": w["proj_out.bias"]}  # fmt: skip
        block.load_state_dict(state, strict=True)
        with torch.no_grad():
            return block(x)

    torch.testing.assert_close(ours(lambda t: split_legacy_qkv(t, 3)), expected)
    assert not torch.allclose(ours(lambda t: t.chunk(3)), expected, atol=1e-3)
    q, k, v = split_legacy_qkv(w["qkv.weight"], 3)
    torch.testing.assert_close(merge_legacy_qkv(q, k, v, 3), w["qkv.weight"])


def rewrite(path: Path, tmp_path: Path, change: dict[str, Tensor | None]) -> Path:
    sd = load_file(str(path))
    for key, value in change.items():
        if value is None:
            del sd[key]
        else:
            sd[key] = value
    out = tmp_path / "changed.safetensors"
    save_file(sd, str(out))
    return out


def test_refusals(tmp_path: Path) -> None:
    """Each change to a loadable file fails with a CheckpointError naming what is wrong."""
    ref = build_reference("uncond", "test")
    save_reference(ref, tmp_path / "pipeline")
    path = tmp_path / "good.safetensors"
    write_original(ref, tmp_path / "pipeline", path, scale_factor=None)
    cases: list[tuple[dict[str, Tensor | None], str]] = [
        ({"cond_stage_model.transformer.token_emb.weight": torch.zeros(4, 4)}, "conditional"),
        ({"some_other.weight": torch.zeros(1)}, "unexpected key 'some_other.weight'"),
        (
            {UNET + "input_blocks.1.2.weight": torch.zeros(1)},
            f"unexpected key '{UNET}input_blocks.1.2.weight'",
        ),
        ({UNET + "out.2.weight": None}, f"missing key '{UNET}out.2.weight'"),
        (
            {UNET + "input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)},
            f"'{UNET}input_blocks.0.0.weight' takes 4 channels",
        ),
        (
            {UNET + "input_blocks.4.1.qkv.weight": torch.zeros(3 * 48, 64, 1)},
            f"'{UNET}input_blocks.4.1.qkv.weight' is 48 channels wide",
        ),
        ({"betas": torch.linspace(1e-4, 0.02, 1000)}, "'betas' is not a schedule"),
    ]
    for change, message in cases:
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(".", r"\.")):
            load_pipeline(str(rewrite(path, tmp_path, change)), device="cpu")


# ---------------------------------------------------------------- text-to-image (txt2img-f8-large)

# x-transformers' attention has 64 channels per head (DEFAULT_DIM_HEAD): 2 heads over d_model 32.
LDMBERT_SINGLE_FILE = {**TINY_LDMBERT, "encoder_attention_heads": 2, "head_dim": 64}
TEXT = "cond_stage_model.transformer."
PROMPT = "a painting of a squirrel eating a burger"


def original_ldmbert(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers LDMBertModel weights under BERTEmbedder's x-transformers names."""
    out = {
        TEXT + "token_emb.weight": sd["model.embed_tokens.weight"],
        TEXT + "pos_emb.emb.weight": sd["model.embed_positions.weight"],
        TEXT + "to_logits.weight": sd["to_logits.weight"],
        TEXT + "to_logits.bias": sd["to_logits.bias"],
    }
    for p in ("weight", "bias"):
        out[f"{TEXT}norm.{p}"] = sd[f"model.layer_norm.{p}"]
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")}
    for i in layers:
        ours, a, f = (
            f"model.layers.{i}",
            f"{TEXT}attn_layers.layers.{2 * i}",
            f"{TEXT}attn_layers.layers.{2 * i + 1}",
        )
        for n in "qkv":
            out[f"{a}.1.to_{n}.weight"] = sd[f"{ours}.self_attn.{n}_proj.weight"]
        for p in ("weight", "bias"):
            out[f"{a}.0.{p}"] = sd[f"{ours}.self_attn_layer_norm.{p}"]
            out[f"{a}.1.to_out.{p}"] = sd[f"{ours}.self_attn.out_proj.{p}"]
            out[f"{f}.0.{p}"] = sd[f"{ours}.final_layer_norm.{p}"]
            out[f"{f}.1.net.0.0.{p}"] = sd[f"{ours}.fc1.{p}"]
            out[f"{f}.1.net.2.{p}"] = sd[f"{ours}.fc2.{p}"]
    assert len(out) == len(sd), "every LDMBert tensor written once"
    return out


@pytest.fixture(scope="module")
def text2im(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Pipeline, Pipeline, Path]:
    from diffusers import AutoencoderKL, DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
        LDMBertConfig,
        LDMBertModel,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("text2im")
    ref = LDMTextToImagePipeline(
        vqvae=AutoencoderKL(**LDM_TEXT_VAE), bert=LDMBertModel(LDMBertConfig(**LDMBERT_SINGLE_FILE)),
        tokenizer=bert_tokenizer(root / "vocab"),
        unet=randomize_(UNet2DConditionModel(**LDM_TEXT_UNET), seed=3),
        scheduler=DDIMScheduler(**LDM_TEXT_DDIM),
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    ref.bert.eval()
    ref.save_pretrained(root / "pipeline", safe_serialization=True)
    folder = load_pipeline(str(root / "pipeline"), device="cpu")
    sd = unet_state_dict_to_ldm(folder.unet)
    sd.update(vae_state_dict_to_ldm(folder.vae))  # type: ignore[arg-type]
    sd.update(original_ldmbert(ref.bert.state_dict()))
    sd["betas"] = ldm_betas(LDM_TEXT_DDIM)
    sd["alphas_cumprod"] = torch.cumprod(1 - sd["betas"], dim=0)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    path = root / "txt2img-f8-large.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    shutil.copytree(root / "pipeline" / "tokenizer", root / "tokenizer")  # the file's tokenizer
    return ref, folder, load_pipeline(str(path), device="cpu"), path


def text_images(pipe: Pipeline, guidance: float) -> np.ndarray:
    out = pipe.generate(PROMPT, negative_prompt="snow", steps=4, guidance_scale=guidance,
                        sampler="ddim", seed=5, num_images=2, width=64, height=64)  # fmt: skip
    return np.stack([np.asarray(im) for im in out])


@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_text2im_single_file_gives_the_folder_images(
    text2im: tuple[Any, Pipeline, Pipeline, Path], guidance: float
) -> None:
    ref, folder, single, _ = text2im
    got = text_images(single, guidance)
    assert max_diff(got[0], got[1]) > 10
    assert max_diff(got, text_images(folder, guidance)) == 0
    out = ref(PROMPT, num_inference_steps=4, guidance_scale=guidance, output_type="np",
              width=64, height=64, generator=[torch.Generator("cpu").manual_seed(5)]).images  # fmt: skip
    single_one = np.asarray(single.generate(PROMPT, steps=4, guidance_scale=guidance,
                                            sampler="ddim", seed=5, width=64, height=64)[0])  # fmt: skip
    assert max_diff(single_one, (out[0] * 255).round().astype(np.uint8)) <= 2
    caps = single.capabilities
    assert caps.family == "ldm-text2im" and caps.takes_prompt and caps.native_size == 256
    assert single.schedule.alphas_cumprod == folder.schedule.alphas_cumprod
    assert single.schedule.set_alpha_to_one is folder.schedule.set_alpha_to_one is False
    assert single.vae.scaling_factor == 0.18215


def test_text2im_refusals(text2im: tuple[Any, Pipeline, Pipeline, Path], tmp_path: Path) -> None:
    *_, path = text2im
    shutil.copytree(path.parent / "tokenizer", tmp_path / "tokenizer")
    q = f"{TEXT}attn_layers.layers.0.1.to_q.weight"
    cases: list[tuple[dict[str, Tensor | None], str]] = [
        ({f"{TEXT}attn_layers.layers.0.1.talking.weight": torch.zeros(1)}, "unexpected key"),
        ({q: torch.zeros(96, 32)}, "gives 96 channels, not heads of 64"),
        ({f"{TEXT}norm.bias": None}, "missing key 'layer_norm.bias'"),
        ({"cond_stage_model.embedding.weight": torch.zeros(2, 2)}, "conditional CompVis LDM"),
    ]
    for change, message in cases:
        with pytest.raises(CheckpointError, match=message):
            load_pipeline(str(rewrite(path, tmp_path, change)), device="cpu")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(path, alone / path.name)
    with pytest.raises(CheckpointError, match="no BERT tokenizer"):
        load_pipeline(str(alone / path.name), device="cpu")
    (alone / "tokenizer").mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(1000))]
    (alone / "tokenizer" / "vocab.txt").write_text("\n".join(words) + "\n")
    with pytest.raises(
        CheckpointError, match="tokenizer has 1005 tokens; the text encoder embeds 1000"
    ):
        load_pipeline(str(alone / path.name), device="cpu")
