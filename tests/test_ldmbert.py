"""LDMBert (model/ldmbert.py) against diffusers' LDMBertModel with the same random weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
    LDMBertConfig as RefConfig,
)
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
from transformers import BertTokenizer

from model.ldmbert import (
    BertTextEncoder,
    LDMBert,
    ldmbert_config_from_diffusers,
    ldmbert_state_dict_from_diffusers,
)
from model.prompt_encoding import encode_prompts
from model.weights import build_module

# The shape of diffusers' own LDMTextToImagePipeline test text encoder (tiny, random).
TINY_LDMBERT = {"d_model": 32, "encoder_attention_heads": 4, "head_dim": 8,
                "encoder_ffn_dim": 37, "encoder_layers": 5, "vocab_size": 1000,
                "max_position_embeddings": 77}  # fmt: skip
WORDS = ["a", "red", "fox", "in", "snow", "painting", "of", "squirrel", "eating", "burger"]


def bert_tokenizer(folder: Path) -> BertTokenizer:
    """A BERT WordPiece tokenizer over a small vocabulary (ids below the tiny vocab size)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"), model_max_length=77)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[LDMBertModel, BertTextEncoder]:
    torch.manual_seed(0)
    ref = LDMBertModel(RefConfig(**TINY_LDMBERT)).eval()
    cfg = ldmbert_config_from_diffusers(ref.config.to_dict(), source="test")
    ours = build_module(lambda: LDMBert(cfg), ldmbert_state_dict_from_diffusers(ref.state_dict()),
                        what="LDMBert", source="test")  # fmt: skip
    tokenizer = bert_tokenizer(tmp_path_factory.mktemp("bert"))
    return ref, BertTextEncoder(ours, tokenizer)


def test_hidden_states_equal_diffusers(pair: tuple[LDMBertModel, BertTextEncoder]) -> None:
    ref, ours = pair
    prompts = ["a red fox in snow", "", "painting of a squirrel eating a burger"]
    ids = ours.tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids  # the LDM pipeline's tokenization
    with torch.inference_mode():
        expected = ref(ids)[0]
    got, pooled = ours.encode_ids(ids)
    assert pooled is None and got.shape == (3, 77, 32)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # Chunked encoding of a short unweighted prompt gives the pipeline's exact sequence.
    (emb,) = encode_prompts(ours, [prompts[0]])
    assert torch.allclose(emb.hidden, expected[:1], atol=1e-5)


def test_the_language_model_head_is_dropped_and_nothing_else() -> None:
    torch.manual_seed(1)
    ref = LDMBertModel(RefConfig(**TINY_LDMBERT))
    sd = ldmbert_state_dict_from_diffusers(ref.state_dict())
    assert not any(k.startswith("to_logits") for k in sd)
    assert set(sd) == set(LDMBert(ldmbert_config_from_diffusers(ref.config.to_dict(),
                                                                source="t")).state_dict())  # fmt: skip
    with pytest.raises(ValueError, match="lacks .max_position_embeddings"):
        ldmbert_config_from_diffusers({"vocab_size": 3}, source="bert/config.json")
