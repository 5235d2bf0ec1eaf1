"""CLIP text encoder: `transformers.CLIPTextModel` plus a tokenizer from the bundled BPE vocab.

Stable Diffusion conditions the UNet on the last hidden state (after the final layer norm)
of a CLIP text tower. SD 1.x uses OpenAI's CLIP ViT-L/14 tower (quick_gelu, prompts padded
with `<|endoftext|>` = 49407); SD 2.x uses OpenCLIP ViT-H/14 (gelu, padded with `!` = 0)
and conditions on its *penultimate* block, which is the same as a CLIPTextModel with the
last block dropped — exactly how diffusers ships SD 2.x text encoders.

Single-file checkpoints carry no tokenizer, so the CLIP vocabulary ships in `model/assets/`
(derived by `scripts/make_clip_vocab.py`; MIT, see `model/assets/README.md`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from model.weights import CheckpointError, build_module

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
SD1_PAD_ID = 49407  # <|endoftext|>
SD2_PAD_ID = 0  # "!"
LDM_PREFIX = "cond_stage_model."
SD1_LAYOUT = "cond_stage_model.transformer.text_model."
HEAD_DIM = 64  # CLIP convention; single-file checkpoints do not record the head count


def bundled_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The CLIP tokenizer from the vocabulary shipped in model/assets (no download).

    TextEncoder wants the default pad token (see its docstring); `pad_token="!"` builds the
    tokenizer diffusers' SD 2.x pipelines use, for reference pipelines in tests.
    """
    return CLIPTokenizer(
        vocab=str(ASSETS / "vocab.json"),
        merges=str(ASSETS / "merges.txt"),
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )


class TextEncoder:
    """A CLIP text tower and its tokenizer: prompts in, (N, 77, D) UNet context out.

    Padding is applied here, not by the tokenizer: a tokenizer whose pad token is "!" (as
    diffusers' SD 2.x ones) also splits every "!" in a prompt into a special token, whereas
    SD 2.x was trained with OpenCLIP's tokenizer, which pads with id 0 but reads "!!" as one
    ordinary token (748). So the tokenizer always pads with <|endoftext|> and `pad_token_id`
    overwrites the padded positions.
    """

    def __init__(
        self, model: CLIPTextModel, tokenizer: CLIPTokenizer, pad_token_id: int | None = None
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.pad_token_id: int = int(
            tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        )
        self.max_length: int = model.config.max_position_embeddings

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.token_embedding.weight.dtype

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (N, 77): <|startoftext|> ... <|endoftext|>, then padding; truncated."""
        if not prompts:
            return torch.empty((0, self.max_length), dtype=torch.long)
        batch = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = batch.input_ids  # (N, 77)
        ids[batch.attention_mask == 0] = self.pad_token_id
        return ids

    @property
    def bos_id(self) -> int:
        return int(self.tokenizer.bos_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def layers(self) -> int:
        """Transformer blocks: the largest clip_skip this encoder can honour."""
        return int(self.model.config.num_hidden_layers)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without BOS/EOS and never truncated (long-prompt chunking)."""
        if not texts:
            return []
        batch = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)
        return [list(ids) for ids in batch.input_ids]

    def encode_ids(
        self, ids: torch.Tensor, *, clip_skip: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, 77) ids -> hidden states (N, 77, D) and pooled output (N, D).

        clip_skip 1 is the last hidden state; n > 1 is the output of the n-th block from the
        end, through the final layer norm (A1111's "Clip skip"; diffusers' clip_skip=n-1).
        """
        if not 1 <= clip_skip <= self.layers:
            raise ValueError(f"clip_skip must be in 1..{self.layers} for this text encoder")
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(self.device), output_hidden_states=clip_skip > 1)
            if clip_skip == 1:
                return out.last_hidden_state, out.pooler_output
            tower = getattr(self.model, "text_model", self.model)  # transformers < 5 nests it
            hidden = tower.final_layer_norm(out.hidden_states[-clip_skip])
            return hidden, out.pooler_output

    def save_tokenizer(self, folder: Path) -> None:
        """Save as a diffusers `tokenizer/` folder declaring this encoder's pad token."""
        self.tokenizer.save_pretrained(str(folder))
        config_path = Path(folder) / "tokenizer_config.json"
        config = json.loads(config_path.read_text("utf-8"))
        config["pad_token"] = self.tokenizer.convert_ids_to_tokens(self.pad_token_id)
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), "utf-8")

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Last hidden state (N, 77, D) on the model's device and dtype."""
        ids = self.tokenize(prompts).to(self.device)
        if ids.shape[0] == 0:
            return torch.empty(
                (0, self.max_length, self.hidden_size), device=self.device, dtype=self.dtype
            )
        with torch.inference_mode():
            return self.model(input_ids=ids).last_hidden_state  # (N, 77, D)


def clip_text_config(
    *,
    hidden: int,
    layers: int,
    intermediate: int | None = None,
    max_positions: int = MAX_LENGTH,
    vocab: int = VOCAB_SIZE,
    hidden_act: str = "quick_gelu",
) -> CLIPTextConfig:
    """A CLIPTextConfig with heads = hidden / 64, the convention the single-file loader assumes."""
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // HEAD_DIM),
        max_position_embeddings=max_positions,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
    )


def tiny_text_config(
    hidden: int = 32,
    layers: int = 2,
    intermediate: int | None = None,
    hidden_act: str = "quick_gelu",
) -> CLIPTextConfig:
    """A tiny CLIP text config for tests and the demo model (real vocab, 77 positions)."""
    return clip_text_config(
        hidden=hidden, layers=layers, intermediate=intermediate, hidden_act=hidden_act
    )


def _pad_for(config: CLIPTextConfig) -> int:
    """SD 2.x (OpenCLIP, gelu) pads with 0 ('!'), SD 1.x (OpenAI CLIP, quick_gelu) with 49407."""
    return SD2_PAD_ID if config.hidden_act == "gelu" else SD1_PAD_ID


def _load(
    config: CLIPTextConfig,
    weights: Mapping[str, torch.Tensor],
    tokenizer: CLIPTokenizer,
    pad_token_id: int,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    **names: str,
) -> TextEncoder:
    """build_module (names: what, source, key_prefix), making position_ids for real."""

    def make() -> CLIPTextModel:
        model = CLIPTextModel(config)
        # No checkpoint has this buffer; build_module runs `make` under torch.device("meta")
        # and an explicit device escapes that.
        ids = torch.arange(config.max_position_embeddings, device=device).expand((1, -1))
        model.embeddings.register_buffer("position_ids", ids, persistent=False)
        return model

    model = build_module(make, weights, device=device, dtype=dtype, **names)
    return TextEncoder(model, tokenizer, pad_token_id)


def random_text_encoder(
    config: CLIPTextConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextEncoder:
    """A random-weight encoder (demo model, tests); pad token follows the config's family."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return TextEncoder(model.to(device=device, dtype=dtype), bundled_tokenizer(), _pad_for(config))


def _require(sd: Mapping[str, torch.Tensor], key: str, *, source: str, prefix: str) -> torch.Tensor:
    """A tensor the architecture is read from; CheckpointError naming its full key if absent."""
    if key not in sd:
        raise CheckpointError(f"{source}: text encoder weights are missing key '{prefix}{key}'")
    return sd[key]


def _block_indices(keys: list[str], pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def _hf_config(sd: Mapping[str, torch.Tensor], *, source: str, prefix: str) -> CLIPTextConfig:
    """Architecture of a HF-layout (SD 1.x) tower, read from tensor shapes."""
    token = _require(sd, "embeddings.token_embedding.weight", source=source, prefix=prefix)
    pos = _require(sd, "embeddings.position_embedding.weight", source=source, prefix=prefix)
    fc1 = _require(sd, "encoder.layers.0.mlp.fc1.weight", source=source, prefix=prefix)
    layers = _block_indices(list(sd), r"encoder\.layers\.(\d+)\.")
    return clip_text_config(
        hidden=token.shape[1],
        layers=max(layers) + 1,
        intermediate=fc1.shape[0],
        max_positions=pos.shape[0],
        vocab=token.shape[0],
        hidden_act="quick_gelu",
    )


_OPEN_CLIP_MODULES = {  # resblock module -> CLIPEncoderLayer module (attn.in_proj is split)
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# In SD 2.x files but not used for conditioning: the pooled projection, CLIP's contrastive
# temperature and (in some exports) the constant causal mask.
_OPEN_CLIP_UNUSED = {"text_projection", "logit_scale", "attn_mask"}


def _open_clip_to_hf(
    sd: Mapping[str, torch.Tensor], *, source: str, prefix: str, all_blocks: bool = False
) -> tuple[CLIPTextConfig, dict[str, torch.Tensor]]:
    """OpenCLIP text tower (keys below `prefix`) -> CLIPTextModel layout minus its last block
    (SD 2.x conditions on the penultimate one), or with every block (SDXL's bigG, which also
    needs the last one for its pooled vector).

    q/k/v are row slices (views) of in_proj, so no weight is copied.
    """
    blocks = _block_indices(list(sd), r"transformer\.resblocks\.(\d+)\.")
    if len(blocks) < 2:
        raise CheckpointError(f"{source}: text tower below '{prefix}' has {len(blocks)} blocks")
    kept = blocks[-1] + 1 if all_blocks else blocks[-1]  # blocks converted
    params = [f"{m}.{p}" for m in ("attn.in_proj", *_OPEN_CLIP_MODULES) for p in ("weight", "bias")]
    expected = [f"transformer.resblocks.{i}.{p}" for i in range(blocks[-1] + 1) for p in params]
    for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight", *expected):
        _require(sd, key.replace("in_proj.", "in_proj_"), source=source, prefix=prefix)
    token, fc = sd["token_embedding.weight"], sd["transformer.resblocks.0.mlp.c_fc.weight"]
    config = clip_text_config(
        hidden=token.shape[1],
        layers=kept,
        intermediate=fc.shape[0],
        max_positions=sd["positional_embedding"].shape[0],
        vocab=token.shape[0],
        hidden_act="gelu",
    )
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        block = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
        attn = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
        if key in _OPEN_CLIP_UNUSED or ((block or attn) and int((block or attn)[1]) >= kept):
            continue
        if key == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["embeddings.position_embedding.weight"] = value
        elif key in ("ln_final.weight", "ln_final.bias"):
            out["final_layer_norm." + key.split(".")[1]] = value
        elif attn and value.shape[0] % 3 == 0:
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"encoder.layers.{attn[1]}.self_attn.{name}_proj.{attn[2]}"] = part
        elif attn:
            raise CheckpointError(
                f"{source}: text encoder weight '{prefix}{key}' has shape {tuple(value.shape)}, "
                "expected (3 x width, ...)"
            )
        elif block and block[2] in _OPEN_CLIP_MODULES:
            out[f"encoder.layers.{block[1]}.{_OPEN_CLIP_MODULES[block[2]]}.{block[3]}"] = value
        else:
            raise CheckpointError(
                f"{source}: text encoder weights have unexpected key '{prefix}{key}'"
            )
    return config, out


def open_clip_state_dict(model: CLIPTextModel, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's weights as OpenCLIP text-tower keys below `prefix` (the inverse of
    the single-file loader's conversion, for writing checkpoints: SDXL's bigG, SD 2.x)."""
    sd = model.state_dict()
    out = {
        prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
    }
    for p in ("weight", "bias"):
        out[f"{prefix}ln_final.{p}"] = sd[f"final_layer_norm.{p}"]
    for i in range(model.config.num_hidden_layers):
        hf, block = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            qkv = [sd[f"{hf}self_attn.{n}_proj.{p}"] for n in "qkv"]
            out[f"{block}attn.in_proj_{p}"] = torch.cat(qkv)
            for theirs, ours in _OPEN_CLIP_MODULES.items():
                out[f"{block}{theirs}.{p}"] = sd[f"{hf}{ours}.{p}"]
    return out


def text_encoder_from_ldm(
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prefix: str = LDM_PREFIX,
    all_blocks: bool = False,
) -> TextEncoder:
    """Text encoder from a whole single-file checkpoint; only keys below `prefix` are read.

    Layouts (detected from the keys):
    - SD 1.x: `{prefix}transformer.text_model.*` (or `{prefix}transformer.*`), HF CLIPTextModel
      keys; `embeddings.position_ids` (a constant buffer some files carry) is ignored.
    - SD 2.x: `{prefix}model.*`, OpenCLIP keys; converted, last block dropped, pad token '!';
      `text_projection`, `logit_scale` and `attn_mask` are ignored (unused for conditioning);
      `all_blocks` keeps the last block (SDXL's bigG).
    Heads are hidden / 64 (CLIP convention). Any other key below the chosen layout's prefix,
    or a missing or mis-shaped one, raises CheckpointError naming it.
    """
    hf_prefix, oc_prefix = prefix + "transformer.", prefix + "model."
    if any(k.startswith(hf_prefix + "text_model.") for k in state_dict):
        hf_prefix += "text_model."
    layouts = [p for p in (hf_prefix, oc_prefix) if any(k.startswith(p) for k in state_dict)]
    if not layouts:
        raise CheckpointError(
            f"{source}: no text encoder (no keys below '{hf_prefix}' or '{oc_prefix}')"
        )
    layout = layouts[0]
    if stray := [k for k in state_dict if k.startswith(prefix) and not k.startswith(layout)]:
        raise CheckpointError(f"{source}: text encoder weights have unexpected key '{stray[0]}'")
    sub = {k.removeprefix(layout): v for k, v in state_dict.items() if k.startswith(layout)}
    if layout == oc_prefix:
        config, converted = _open_clip_to_hf(
            sub, source=source, prefix=layout, all_blocks=all_blocks
        )
        log.debug("%s: SD 2.x OpenCLIP text encoder %s", source, config.to_diff_dict())
        what = f"text encoder (converted from OpenCLIP keys below '{layout}')"
        return _load(
            config, converted, bundled_tokenizer(), SD2_PAD_ID, what=what, source=source,
            device=device, dtype=dtype,
        )  # fmt: skip
    sub.pop("embeddings.position_ids", None)
    config = _hf_config(sub, source=source, prefix=layout)
    log.debug("%s: SD 1.x CLIP text encoder %s", source, config.to_diff_dict())
    return _load(
        config, sub, bundled_tokenizer(), SD1_PAD_ID, what="text encoder", key_prefix=layout,
        source=source, device=device, dtype=dtype,
    )  # fmt: skip


def text_state_dict_to_ldm(encoder: TextEncoder) -> dict[str, torch.Tensor]:
    """Weights in the SD 1.x single-file layout (`cond_stage_model.transformer.text_model.*`).

    Only SD 1.x-style (quick_gelu) towers have that layout; an SD 2.x tower lost its last
    OpenCLIP block on loading and would reload with the wrong activation, so it is refused.
    """
    if encoder.model.config.hidden_act != "quick_gelu":
        raise ValueError(
            f"only quick_gelu (SD 1.x) text encoders have the SD 1.x layout, not {encoder.model.config.hidden_act}"
        )
    return {SD1_LAYOUT + k: v for k, v in encoder.model.state_dict().items()}
