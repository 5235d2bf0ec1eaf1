"""LDMBert: the text encoder of the LDM paper's text-to-image model (ldm-text2im-large-256).

A BERT-vocabulary transformer trained from scratch with the diffusion model (Rombach et al.
2022, §4.3.2 and Appendix): token + learned position embeddings, pre-LayerNorm blocks of
multi-head self-attention (no bias on q/k/v) and a GELU MLP, a final LayerNorm; no attention
mask (the pipeline feeds padded 77-token sequences as they are). Its last hidden states are
the UNet's cross-attention context.

`BertTextEncoder` gives it the interface the rest of the model code expects of a text
encoder (model.text.TextEncoder: hidden size, device, ids and chunked encoding through
model.prompt_encoding), so long and weighted prompts work with it too. The checkpoint's
language-model head (`to_logits`) is not part of conditioning and is dropped by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.weights import CheckpointError


@dataclass(frozen=True)
class LDMBertConfig:
    """Shapes of an LDMBert encoder (diffusers' LDMBertConfig field names in comments)."""

    vocab_size: int = 30522
    max_positions: int = 77  # max_position_embeddings
    layers: int = 32  # encoder_layers
    ffn_dim: int = 5120  # encoder_ffn_dim
    heads: int = 8  # encoder_attention_heads
    head_dim: int = 64
    d_model: int = 1280


class _Attention(nn.Module):
    def __init__(self, cfg: LDMBertConfig) -> None:
        super().__init__()
        inner = cfg.heads * cfg.head_dim
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.out_proj = nn.Linear(inner, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as BART's
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class _Layer(nn.Module):
    def __init__(self, cfg: LDMBertConfig) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.self_attn = _Attention(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class LDMBert(nn.Module):
    """The encoder: ids (N, L) -> hidden states (N, L, d_model)."""

    def __init__(self, cfg: LDMBertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, ids: Tensor, skip: int = 1) -> Tensor:
        """Last hidden states; ``skip`` n > 1 stops n - 1 blocks early (A1111's clip skip),
        through the final LayerNorm."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed_tokens(ids) + self.embed_positions(positions)[None]
        for layer in self.layers[: len(self.layers) - (skip - 1)]:
            x = layer(x)
        return self.layer_norm(x)


def ldmbert_config_from_diffusers(config: Mapping[str, Any], *, source: str) -> LDMBertConfig:
    """Our config from a diffusers `bert/config.json` (LDMBertConfig)."""
    try:
        return LDMBertConfig(
            vocab_size=int(config["vocab_size"]),
            max_positions=int(config["max_position_embeddings"]),
            layers=int(config["encoder_layers"]),
            ffn_dim=int(config["encoder_ffn_dim"]),
            heads=int(config["encoder_attention_heads"]),
            head_dim=int(config["head_dim"]),
            d_model=int(config["d_model"]),
        )
    except KeyError as exc:
        raise ValueError(f"{source}: LDMBert config lacks {exc.args[0]!r}") from None


UNUSED_KEYS = ("to_logits.",)  # the language-model head: not part of conditioning


def ldmbert_state_dict_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers LDMBertModel keys (``model.*``; ``to_logits.*`` dropped) -> ours."""
    out = {}
    for key, value in sd.items():
        if key.startswith(UNUSED_KEYS):
            continue
        out[key.removeprefix("model.")] = value
    return out


COMPVIS_PREFIX = "cond_stage_model.transformer."  # BERTEmbedder's x-transformers TransformerWrapper
COMPVIS_HEAD_DIM = 64  # x-transformers' DEFAULT_DIM_HEAD; BERTEmbedder sets no other
_COMPVIS_LAYER = re.compile(r"attn_layers\.layers\.(\d+)\.(0|1)\.(.+)")
_COMPVIS_ATTENTION = {"to_q.weight": "q_proj.weight", "to_k.weight": "k_proj.weight",
                      "to_v.weight": "v_proj.weight", "to_out.weight": "out_proj.weight",
                      "to_out.bias": "out_proj.bias"}  # fmt: skip
_COMPVIS_FEED_FORWARD = {"net.0.0": "fc1", "net.2": "fc2"}


def _compvis_name(key: str) -> str | None:
    """Our name for a TransformerWrapper key: layer 2i is block i's pre-norm + attention,
    layer 2i + 1 its pre-norm + GELU MLP (x-transformers' ('a', 'f') blocks)."""
    fixed = {"token_emb.weight": "embed_tokens.weight", "pos_emb.emb.weight":
             "embed_positions.weight", "norm.weight": "layer_norm.weight",
             "norm.bias": "layer_norm.bias"}  # fmt: skip
    if key in fixed:
        return fixed[key]
    m = _COMPVIS_LAYER.fullmatch(key)
    if m is None:
        return None
    n, part, rest = int(m[1]), m[2], m[3]
    block, attention = f"layers.{n // 2}", n % 2 == 0
    if part == "0" and rest in ("weight", "bias"):
        norm = "self_attn_layer_norm" if attention else "final_layer_norm"
        return f"{block}.{norm}.{rest}"
    if attention:
        return (
            f"{block}.self_attn.{_COMPVIS_ATTENTION[rest]}" if rest in _COMPVIS_ATTENTION else None
        )
    module, _, param = rest.rpartition(".")
    return (
        f"{block}.{_COMPVIS_FEED_FORWARD[module]}.{param}"
        if module in _COMPVIS_FEED_FORWARD
        else None
    )


def ldmbert_from_compvis(
    sd: Mapping[str, Tensor], *, source: str
) -> tuple[LDMBertConfig, dict[str, Tensor]]:
    """CompVis BERTEmbedder weights (keys below `cond_stage_model.transformer.`; the LM head
    `to_logits.*` dropped by name) -> (our config from their shapes, our state dict). Heads
    are not in the shapes: x-transformers' 64 channels per head."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith(UNUSED_KEYS):
            continue
        name = _compvis_name(key)
        if name is None:
            raise CheckpointError(
                f"{source}: LDMBert weights have unexpected key '{COMPVIS_PREFIX}{key}'"
            )
        out[name] = value
    try:
        vocab, d_model = out["embed_tokens.weight"].shape
        inner = int(out["layers.0.self_attn.q_proj.weight"].shape[0])
        config = LDMBertConfig(
            vocab_size=int(vocab), max_positions=int(out["embed_positions.weight"].shape[0]),
            layers=len({k.split(".")[1] for k in out if k.startswith("layers.")}),
            ffn_dim=int(out["layers.0.fc1.weight"].shape[0]), heads=inner // COMPVIS_HEAD_DIM,
            head_dim=COMPVIS_HEAD_DIM, d_model=int(d_model),
        )  # fmt: skip
    except KeyError as exc:
        raise CheckpointError(
            f"{source}: LDMBert weights lack {exc.args[0]!r} (our name)"
        ) from None
    if inner % COMPVIS_HEAD_DIM:
        raise CheckpointError(
            f"{source}: '{COMPVIS_PREFIX}attn_layers.layers.0.1.to_q.weight' gives {inner} "
            f"channels, not heads of {COMPVIS_HEAD_DIM}"
        )
    return config, out


class BertTextEncoder:
    """LDMBert with its BERT tokenizer, shaped like model.text.TextEncoder.

    Sequences are ``[CLS] tokens [SEP]`` padded with ``[PAD]`` (id 0) to 77, as the LDM
    text-to-image pipeline tokenizes them.
    """

    def __init__(self, model: LDMBert, tokenizer: Any) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.pad_token_id: int = int(tokenizer.pad_token_id)
        self.max_length: int = model.config.max_positions

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def bos_id(self) -> int:
        return int(self.tokenizer.cls_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.sep_token_id)

    @property
    def layers(self) -> int:
        return self.model.config.layers

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without [CLS]/[SEP], never truncated."""
        if not texts:
            return []
        batch = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)
        return [list(ids) for ids in batch.input_ids]

    def encode_ids(self, ids: Tensor, *, clip_skip: int = 1) -> tuple[Tensor, Tensor | None]:
        """(N, 77) ids -> hidden states (N, 77, D); LDMBert has no pooled output."""
        if not 1 <= clip_skip <= self.layers:
            raise ValueError(f"clip_skip must be in 1..{self.layers} for this text encoder")
        with torch.inference_mode():
            return self.model(ids.to(self.device), skip=clip_skip), None

    def save_tokenizer(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder))
