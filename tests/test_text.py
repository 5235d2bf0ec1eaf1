"""CLIP text encoder: single-file and diffusers-folder loading, parity with diffusers, errors."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from model.text import ASSETS, TextEncoder, random_text_encoder, tiny_text_config
from model.text_diffusers import text_encoder_from_diffusers
from model.text_ldm import text_encoder_from_ldm, text_state_dict_to_ldm
from model.weights import CheckpointError
from tests.clip_reference import PROMPTS, reference_ids


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Distinct random values everywhere (norms around 1), so a swapped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name and name.endswith("weight")
            p.copy_(0.1 * torch.randn(p.shape, generator=gen) + float(is_norm))
    return model


def random_open_clip(width: int, blocks: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An SD 2.x-style OpenCLIP text tower in single-file layout, random weights."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, base: float = 0.0) -> torch.Tensor:
        return base + 0.1 * torch.randn(shape, generator=gen)

    sd = {
        "token_embedding.weight": rnd(49408, width),
        "positional_embedding": rnd(77, width),
        "ln_final.weight": rnd(width, base=1.0),
        "ln_final.bias": rnd(width),
        "text_projection": rnd(width, width),
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(blocks):
        b = f"transformer.resblocks.{i}."
        for name, shape in {
            "ln_1": (width,), "attn.in_proj_": (3 * width, width), "attn.out_proj": (width, width),
            "ln_2": (width,), "mlp.c_fc": (4 * width, width), "mlp.c_proj": (width, 4 * width),
        }.items():  # fmt: skip
            sep = "" if name.endswith("_") else "."
            sd[b + name + sep + "weight"] = rnd(*shape, base=1.0 if len(shape) == 1 else 0.0)
            sd[b + name + sep + "bias"] = rnd(shape[0])
    return {"cond_stage_model.model." + k: v for k, v in sd.items()}


def open_clip_penultimate(
    sd: dict[str, torch.Tensor], ids: torch.Tensor, heads: int
) -> torch.Tensor:
    """What SD 2.x's FrozenOpenCLIPEmbedder(layer='penultimate') computes, in plain torch."""
    p = "cond_stage_model.model."
    width = sd[p + "token_embedding.weight"].shape[1]
    x = sd[p + "token_embedding.weight"][ids] + sd[p + "positional_embedding"]
    n = ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    blocks = len({k.split(".")[4] for k in sd if ".resblocks." in k})
    for i in range(blocks - 1):
        b = f"{p}transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict(
            {k.removeprefix(b + "attn."): v for k, v in sd.items() if k.startswith(b + "attn.")}
        )
        ln = functools.partial(nn.functional.layer_norm, normalized_shape=(width,))
        h = ln(x, weight=sd[b + "ln_1.weight"], bias=sd[b + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = ln(x, weight=sd[b + "ln_2.weight"], bias=sd[b + "ln_2.bias"])
        h = nn.functional.gelu(h @ sd[b + "mlp.c_fc.weight"].T + sd[b + "mlp.c_fc.bias"])
        x = x + h @ sd[b + "mlp.c_proj.weight"].T + sd[b + "mlp.c_proj.bias"]
    return nn.functional.layer_norm(x, (width,), sd[p + "ln_final.weight"], sd[p + "ln_final.bias"])


# --- tokenizer ---


def _sd1_model(layers: int = 2, hidden: int = 64, seed: int = 0) -> CLIPTextModel:
    config = CLIPTextConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        intermediate_size=3 * hidden, hidden_act="quick_gelu",
    )  # fmt: skip
    return randomize_(CLIPTextModel(config), seed).eval()


@pytest.mark.parametrize("text_model_prefix", ["text_model.", ""])
def test_sd1_single_file_matches_diffusers(text_model_prefix: str) -> None:
    ref = _sd1_model()
    ckpt = {
        f"cond_stage_model.transformer.{text_model_prefix}{k}": v
        for k, v in ref.state_dict().items()
    }
    ckpt[f"cond_stage_model.transformer.{text_model_prefix}embeddings.position_ids"] = torch.arange(
        77
    )[None]
    ckpt["model.diffusion_model.out.0.weight"] = torch.zeros(4)  # other networks' keys are ignored
    ours = text_encoder_from_ldm(ckpt, source="sd1.safetensors")
    oracle = _sd1_model(seed=1)  # different weights until diffusers' conversion is loaded
    converted = convert_ldm_clip_checkpoint(ckpt)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    del converted["embeddings.position_ids"]
    oracle.load_state_dict(converted, strict=True)
    ids = ours.tokenize(PROMPTS)
    with torch.no_grad():
        expected = oracle(input_ids=ids).last_hidden_state
    assert (
        ours.model.config.num_attention_heads == 1 and ours.model.config.hidden_act == "quick_gelu"
    )
    torch.testing.assert_close(ours.encode(PROMPTS), expected, atol=1e-5, rtol=1e-5)


def test_sd2_single_file_matches_diffusers_and_open_clip() -> None:
    ckpt = random_open_clip(width=128, blocks=24)  # 24 blocks: diffusers drops resblocks.23
    ours = text_encoder_from_ldm(ckpt, source="sd2.safetensors")
    cfg = ours.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_act) == (23, 2, "gelu")
    assert cfg.intermediate_size == 512 and ours.pad_token_id == 0
    # SD 2.x's diffusers text_encoder/config.json conventions at this width.
    oracle = CLIPTextModel(CLIPTextConfig(
        hidden_size=128, num_hidden_layers=23, num_attention_heads=2, intermediate_size=512,
        hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )).eval()  # fmt: skip
    converted = convert_open_clip_checkpoint(oracle, ckpt)
    oracle.load_state_dict(
        {k.removeprefix("text_model."): v for k, v in converted.items()}, strict=True
    )
    ids = ours.tokenize(PROMPTS)
    got = ours.encode(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(
            got, oracle(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            got, open_clip_penultimate(ckpt, ids, heads=2), atol=1e-4, rtol=1e-4
        )


def test_ldm_round_trip_and_dtype() -> None:
    enc = random_text_encoder(tiny_text_config(hidden=32), seed=3)
    randomize_(enc.model, 3)
    sd = text_state_dict_to_ldm(enc)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd
    back = text_encoder_from_ldm(sd, source="rt", dtype=torch.bfloat16)
    assert back.dtype == torch.bfloat16 and back.hidden_size == 32 and back.device.type == "cpu"
    out = back.encode(["a photo of a cat", "a dog"])
    assert out.shape == (2, 77, 32) and out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), enc.encode(["a photo of a cat", "a dog"]), atol=0.1, rtol=0.05
    )
    assert text_encoder_from_ldm(sd, source="rt").encode([]).shape == (0, 77, 32)
    with pytest.raises(ValueError, match="quick_gelu"):
        text_state_dict_to_ldm(random_text_encoder(tiny_text_config(hidden_act="gelu")))


# --- diffusers folders ---


def test_diffusers_folder_round_trip(tmp_path: Path) -> None:
    enc = random_text_encoder(tiny_text_config(hidden=64, hidden_act="gelu"))
    randomize_(enc.model, 5)
    enc.model.save_pretrained(tmp_path / "text_encoder")
    enc.save_tokenizer(tmp_path / "tokenizer")
    loaded = text_encoder_from_diffusers(tmp_path)
    assert loaded.pad_token_id == 0 and loaded.tokenizer.pad_token_id == 49407
    assert torch.equal(loaded.tokenize(PROMPTS), enc.tokenize(PROMPTS))
    torch.testing.assert_close(loaded.encode(PROMPTS), enc.encode(PROMPTS), atol=0, rtol=0)


def test_diffusers_folder_legacy_bin_fp16_variant_and_bundled_tokenizer(tmp_path: Path) -> None:
    enc = random_text_encoder(tiny_text_config(hidden=64))
    randomize_(enc.model, 6)
    te = tmp_path / "text_encoder"
    te.mkdir()
    (te / "config.json").write_text(enc.model.config.to_json_string())
    legacy = {"text_model." + k: v for k, v in enc.model.state_dict().items()}
    legacy["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(legacy, te / "pytorch_model.bin")
    save_file({k: v.half() for k, v in legacy.items()}, te / "model.fp16.safetensors")
    loaded = text_encoder_from_diffusers(tmp_path)  # no tokenizer/: bundled, SD 1.x padding
    assert loaded.pad_token_id == 49407 and loaded.dtype == torch.float32
    torch.testing.assert_close(loaded.encode(PROMPTS), enc.encode(PROMPTS), atol=0, rtol=0)
    half = text_encoder_from_diffusers(tmp_path, dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(
        half.model.final_layer_norm.weight, enc.model.final_layer_norm.weight.half()
    )


def _added(content: str) -> dict[str, object]:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}  # fmt: skip


def test_diffusers_folder_with_hub_style_sd2_tokenizer(tmp_path: Path) -> None:
    """SD 2.x hub folders: vocab.json + merges.txt, pad '!' only in special_tokens_map.json."""
    enc = random_text_encoder(tiny_text_config(hidden=64))  # quick_gelu: heuristic would pad 49407
    enc.model.save_pretrained(tmp_path / "text_encoder")
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (tok / name).write_bytes((ASSETS / name).read_bytes())
    specials = {"bos_token": _added("<|startoftext|>"), "eos_token": _added("<|endoftext|>"),
                "unk_token": _added("<|endoftext|>")}  # fmt: skip
    config = {**specials, "pad_token": "<|endoftext|>", "model_max_length": 77,
              "do_lower_case": True, "errors": "replace", "tokenizer_class": "CLIPTokenizer"}  # fmt: skip
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    (tok / "special_tokens_map.json").write_text(json.dumps({**specials, "pad_token": "!"}))
    loaded = text_encoder_from_diffusers(tmp_path)
    assert loaded.pad_token_id == 0  # from special_tokens_map.json, yet "!!" is token 748:
    assert loaded.tokenize(PROMPTS)[:, :20].tolist() == [
        (reference_ids(p) + [0] * 20)[:20] for p in PROMPTS
    ]


# --- bad inputs ---


def _sd1_ckpt() -> dict[str, torch.Tensor]:
    return text_state_dict_to_ldm(random_text_encoder(tiny_text_config()))


def test_missing_key_names_it() -> None:
    ckpt = _sd1_ckpt()
    del ckpt["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"bad\.ckpt.*encoder\.layers\.1\.mlp\.fc2\.bias"):
        text_encoder_from_ldm(ckpt, source="bad.ckpt")


def test_wrong_shape_and_unexpected_key_name_it() -> None:
    ckpt = _sd1_ckpt()
    ckpt["cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"] = (
        torch.zeros(32, 31)
    )
    with pytest.raises(
        CheckpointError, match=r"bad\.ckpt.*layers\.0\.self_attn\.q_proj\.weight.*\(32, 31\)"
    ):
        text_encoder_from_ldm(ckpt, source="bad.ckpt")
    ckpt = _sd1_ckpt()
    ckpt["cond_stage_model.transformer.text_model.encoder.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError,
        match=r"unexpected key 'cond_stage_model\.transformer\.text_model\.encoder\.layers\.0\.extra\.weight'",
    ):
        text_encoder_from_ldm(ckpt, source="bad.ckpt")


def test_stray_key_below_cond_stage_model_is_named() -> None:
    ckpt = _sd1_ckpt()
    ckpt["cond_stage_model.transformer.position_ids"] = torch.arange(77)
    with pytest.raises(
        CheckpointError, match=r"unexpected key 'cond_stage_model\.transformer\.position_ids'"
    ):
        text_encoder_from_ldm(ckpt, source="bad.ckpt")
    sd2 = {**random_open_clip(width=64, blocks=2), "cond_stage_model.extra": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected key 'cond_stage_model\.extra'"):
        text_encoder_from_ldm(sd2, source="bad.ckpt")


def test_open_clip_bad_keys_name_them() -> None:
    ckpt = random_open_clip(width=64, blocks=3)
    del ckpt["cond_stage_model.model.transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(CheckpointError, match=r"missing key '.*resblocks\.1\.mlp\.c_fc\.bias'"):
        text_encoder_from_ldm(ckpt, source="sd2.ckpt")
    ckpt = random_open_clip(width=64, blocks=3)
    ckpt["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(
        100, 64
    )
    with pytest.raises(
        CheckpointError,
        match=r"cond_stage_model\.model\.transformer\.resblocks\.0\.attn\.in_proj_weight",
    ):
        text_encoder_from_ldm(ckpt, source="sd2.ckpt")
    ckpt = random_open_clip(width=64, blocks=3)
    ckpt["cond_stage_model.model.visual.proj"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError, match=r"unexpected key 'cond_stage_model\.model\.visual\.proj'"
    ):
        text_encoder_from_ldm(ckpt, source="sd2.ckpt")
    del (
        ckpt["cond_stage_model.model.visual.proj"],
        ckpt["cond_stage_model.model.positional_embedding"],
    )
    with pytest.raises(
        CheckpointError, match=r"missing key 'cond_stage_model\.model\.positional_embedding'"
    ):
        text_encoder_from_ldm(ckpt, source="sd2.ckpt")
    with pytest.raises(CheckpointError, match="no text encoder"):
        text_encoder_from_ldm({"model.diffusion_model.x": torch.zeros(1)}, source="unet-only.ckpt")


def test_diffusers_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json"):
        text_encoder_from_diffusers(tmp_path)
    te = tmp_path / "text_encoder"
    te.mkdir()
    (te / "config.json").write_text(tiny_text_config().to_json_string())
    with pytest.raises(CheckpointError, match="no text encoder weights"):
        text_encoder_from_diffusers(tmp_path)
    sd = random_text_encoder(tiny_text_config()).model.state_dict()
    sd.pop("final_layer_norm.bias")
    save_file(sd, te / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*final_layer_norm\.bias"):
        text_encoder_from_diffusers(tmp_path)
    assert isinstance(random_text_encoder(tiny_text_config()), TextEncoder)
