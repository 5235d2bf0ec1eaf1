"""VAE: parity with diffusers' AutoencoderKL on identical random weights, both checkpoint
layouts round-tripped through diffusers' own converters, and clear errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    create_vae_diffusers_config_from_ldm,
)
from safetensors.torch import load_file, save_file
from torch import nn

from model.vae import TINY_VAE_CONFIG, AutoencoderKL, LatentDistribution, VAEConfig
from model.vae_convert import (
    LDM_VAE_PREFIX,
    vae_config_from_diffusers,
    vae_config_from_ldm,
    vae_from_diffusers,
    vae_from_ldm,
    vae_state_dict_from_diffusers,
    vae_state_dict_to_ldm,
)
from model.weights import CheckpointError

# Two tiny shapes: SD-like f=8 with widths (32, 32, 64, 64); and f=4 with 16 norm groups,
# a non-power-of-two width multiplier and two res blocks per level.
CONFIGS = {
    "f8": TINY_VAE_CONFIG,
    "f4": VAEConfig(ch=16, ch_mult=(1, 2, 3), num_res_blocks=2, norm_groups=16, scaling_factor=0.5),
}


def _randomise(module: nn.Module, seed: int) -> None:
    """Give every parameter (norm affines included) distinct random values, so a swapped
    key cannot hide behind default initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                fan_in = p[0].numel()
                p.copy_(noise / fan_in**0.5)


def _diffusers_config(cfg: VAEConfig) -> dict:
    """diffusers' own single-file config builder, plus the group count it leaves at 32."""
    original = {
        "model": {
            "params": {
                "scale_factor": cfg.scaling_factor,
                "first_stage_config": {
                    "params": {
                        "ddconfig": {
                            "ch": cfg.ch,
                            "ch_mult": list(cfg.ch_mult),
                            "num_res_blocks": cfg.num_res_blocks,
                            "in_channels": cfg.in_channels,
                            "out_ch": cfg.out_channels,
                            "z_channels": cfg.z_channels,
                        }
                    }
                },
            }
        }
    }
    config = create_vae_diffusers_config_from_ldm(original, {})
    config["norm_num_groups"] = cfg.norm_groups
    return config


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


def _assert_parity(ours: AutoencoderKL, ref: DiffusersAutoencoderKL, cfg: VAEConfig) -> None:
    f = cfg.downsampling_factor
    g = torch.Generator().manual_seed(1)
    images = torch.rand((2, cfg.in_channels, 4 * f, 3 * f), generator=g) * 2 - 1
    latents = torch.randn((2, cfg.embed_dim, 4, 5), generator=g)
    with torch.no_grad():
        post = ours.encode(images)
        ref_post = ref.encode(images).latent_dist
        _assert_close(post.mean, ref_post.mean)
        _assert_close(post.logvar, ref_post.logvar)
        _assert_close(ours.decode(latents), ref.decode(latents).sample)
    assert post.mean.shape == (2, cfg.embed_dim, 4, 3)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_single_file_round_trip_matches_diffusers(name: str, tmp_path: Path) -> None:
    """Ours -> original single file -> diffusers' converter -> same outputs; and our own
    loader reads the same file back to the same module."""
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    ours = AutoencoderKL(cfg).eval()
    _randomise(ours, seed=2)
    path = tmp_path / "model.safetensors"
    save_file(vae_state_dict_to_ldm(ours), str(path))
    checkpoint = load_file(str(path))
    assert all(k.startswith(LDM_VAE_PREFIX) for k in checkpoint)

    config = _diffusers_config(cfg)
    ref = DiffusersAutoencoderKL(**config).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    _assert_parity(ours, ref, cfg)

    stripped = {k.removeprefix(LDM_VAE_PREFIX): v for k, v in checkpoint.items()}
    assert vae_config_from_ldm(stripped, cfg.scaling_factor) == cfg
    loaded = vae_from_ldm(stripped, source=str(path), scaling_factor=cfg.scaling_factor)
    assert loaded.config == cfg and not loaded.training
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    _assert_parity(loaded, ref, cfg)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_folder_round_trip(name: str, tmp_path: Path) -> None:
    """Random diffusers AutoencoderKL -> save_pretrained -> vae_from_diffusers -> same outputs."""
    cfg = CONFIGS[name]
    ref = DiffusersAutoencoderKL(**_diffusers_config(cfg)).eval()
    _randomise(ref, seed=3)
    ref.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert vae_config_from_diffusers(config) == cfg

    ours = vae_from_diffusers(tmp_path / "vae", device="cpu", dtype=torch.float32)
    assert ours.config == cfg
    _assert_parity(ours, ref, cfg)


def test_diffusers_bin_and_legacy_attention_names(tmp_path: Path) -> None:
    """Old diffusers files: pickled .bin weights and pre-refactor attention names
    (query/key/value/proj_attn) load to the same module."""
    cfg = CONFIGS["f4"]
    ref = DiffusersAutoencoderKL(**_diffusers_config(cfg)).eval()
    _randomise(ref, seed=4)
    ref.save_pretrained(tmp_path / "vae", safe_serialization=False)
    assert (tmp_path / "vae" / "diffusion_pytorch_model.bin").is_file()
    _assert_parity(vae_from_diffusers(tmp_path / "vae"), ref, cfg)

    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in ref.state_dict().items():
        for new, old in legacy_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = value
    assert any(".query." in k for k in legacy)
    converted = vae_state_dict_from_diffusers(legacy)
    ours = vae_from_ldm(converted, source="legacy", scaling_factor=cfg.scaling_factor)
    _assert_parity(ours, ref, cfg)


def test_encode_decode_shapes_sampling_and_dtype() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_VAE_CONFIG).eval()
    assert vae.downsampling_factor == 8 and vae.scaling_factor == 0.18215
    assert vae.latent_channels == 4
    images = torch.rand(1, 3, 32, 16) * 2 - 1
    with torch.no_grad():
        post = vae.encode(images)
        mean, logvar = post  # unpacks like a tuple
        assert isinstance(post, LatentDistribution) and mean.shape == logvar.shape == (1, 4, 4, 2)
        a = post.sample(torch.Generator().manual_seed(7))
        b = post.sample(torch.Generator().manual_seed(7))
        assert torch.equal(a, b) and not torch.equal(a, post.mode())
        assert vae.decode(a).shape == (1, 3, 32, 16)

    sd = {k.removeprefix(LDM_VAE_PREFIX): v for k, v in vae_state_dict_to_ldm(vae).items()}
    half = vae_from_ldm(sd, source="mem", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = half.decode(torch.randn(1, 4, 2, 2))  # float32 input is cast to the weights' dtype
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 16, 16)


@pytest.fixture
def ldm_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    vae = AutoencoderKL(CONFIGS["f4"])
    return {k.removeprefix(LDM_VAE_PREFIX): v for k, v in vae_state_dict_to_ldm(vae).items()}


def test_missing_key_is_named(ldm_weights: dict[str, torch.Tensor]) -> None:
    del ldm_weights["decoder.up.0.block.1.conv1.weight"]
    with pytest.raises(CheckpointError, match=r"my\.ckpt.*decoder\.up\.0\.block\.1\.conv1\.weight"):
        vae_from_ldm(ldm_weights, source="my.ckpt", scaling_factor=0.5)


def test_wrong_shape_is_named(ldm_weights: dict[str, torch.Tensor]) -> None:
    ldm_weights["encoder.mid.attn_1.q.weight"] = torch.zeros(48, 47, 1, 1)
    with pytest.raises(
        CheckpointError, match=r"my\.ckpt.*encoder\.mid\.attn_1\.q\.weight.*\(48, 47"
    ):
        vae_from_ldm(ldm_weights, source="my.ckpt")


def test_unexpected_and_unsupported_keys(ldm_weights: dict[str, torch.Tensor]) -> None:
    extra = dict(ldm_weights, **{"decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(
        CheckpointError, match=r"unexpected key 'first_stage_model\.decoder\.extra\.weight'"
    ):
        vae_from_ldm(extra, source="x")
    level_attn = dict(ldm_weights, **{"encoder.down.2.attn.0.q.weight": torch.zeros(48, 48, 1, 1)})
    with pytest.raises(CheckpointError, match=r"attention inside a resolution level"):
        vae_from_ldm(level_attn, source="x")
    prefixed = {LDM_VAE_PREFIX + k: v for k, v in ldm_weights.items()}
    with pytest.raises(CheckpointError, match=r"strip the 'first_stage_model\.' prefix"):
        vae_config_from_ldm(prefixed)
    # training-only loss entries of standalone VAE files are tolerated
    with_loss = dict(ldm_weights, **{"loss.logvar": torch.zeros(())})
    assert vae_from_ldm(with_loss, source="x").config.ch == 16


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"_class_name": "AutoencoderTiny"}, "only 'AutoencoderKL'"),
        ({"act_fn": "relu"}, "act_fn='relu'"),
        ({"down_block_types": ["AttnDownEncoderBlock2D"] * 3}, "AttnDownEncoderBlock2D"),
        ({"shift_factor": 0.1159}, "shift_factor"),
        ({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}, "latents_mean"),
        ({"use_quant_conv": False}, "use_quant_conv=false"),
        ({"mid_block_add_attention": False}, "mid_block_add_attention=false"),
        ({"norm_num_groups": 32}, "norm_groups=32 does not divide"),
        ({"block_out_channels": [16, 24, 48]}, "not multiples"),
    ],
)
def test_unsupported_diffusers_config(override: dict, message: str) -> None:
    config = dict(_diffusers_config(CONFIGS["f4"]), **override)
    with pytest.raises(CheckpointError, match="unsupported diffusers VAE config") as info:
        vae_config_from_diffusers(config)
    assert message in str(info.value)


def test_diffusers_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json"):
        vae_from_diffusers(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_diffusers_config(CONFIGS["f4"])))
    with pytest.raises(CheckpointError, match="no VAE weights found"):
        vae_from_diffusers(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read VAE weights"):
        vae_from_diffusers(tmp_path)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="norm_groups=32 does not divide"):
        VAEConfig(ch=16)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(VAEConfig(double_z=False))
    assert VAEConfig().downsampling_factor == 8 and CONFIGS["f4"].downsampling_factor == 4


def test_sd_sized_layout_matches_diffusers_on_meta() -> None:
    """The real SD 1.x/2.x VAE shape (83.7M parameters), built on the meta device: every key
    and shape agrees with diffusers in both directions, and detection finds the default config."""
    sd_config = {
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
    }
    assert vae_config_from_diffusers(sd_config) == VAEConfig()
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig())
        ref = DiffusersAutoencoderKL(**sd_config)
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    from_diffusers = vae_state_dict_from_diffusers(ref.state_dict())
    assert {k: tuple(v.shape) for k, v in from_diffusers.items()} == expected
    to_diffusers = convert_ldm_vae_checkpoint(vae_state_dict_to_ldm(ours), sd_config)
    assert {k: tuple(v.shape) for k, v in to_diffusers.items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }
    assert vae_config_from_ldm(ours.state_dict()) == VAEConfig()
