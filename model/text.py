"""CLIP text encoder: `transformers.CLIPTextModel` plus a tokenizer from the bundled BPE vocab.

Stable Diffusion conditions the UNet on the last hidden state (after the final layer norm)
of a CLIP text tower. SD 1.x uses OpenAI's CLIP ViT-L/14 tower (quick_gelu, prompts padded
with `<|endoftext|>` = 49407); SD 2.x uses OpenCLIP ViT-H/14 (gelu, padded with `!` = 0)
and conditions on its *penultimate* block, which is the same as a CLIPTextModel with the
last block dropped — exactly how diffusers ships SD 2.x text encoders.

Single-file checkpoints carry no tokenizer, so the CLIP vocabulary ships in `model/assets/`
(derived by `scripts/make_clip_vocab.py`; MIT, see `model/assets/README.md`). Their key
layouts are read and written by model.text_ldm, diffusers folders by model.text_diffusers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from model.weights import build_module

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
SD1_PAD_ID = 49407  # <|endoftext|>
SD2_PAD_ID = 0  # "!"
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
