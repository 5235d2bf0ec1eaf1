"""Long and weighted prompts: parsing, chunking, padding and weighting against the independent
reference in tests/a1111_reference.py; unweighted prompts of <= 75 tokens unchanged; clip_skip;
the first chunk's pooled output; the prompt cache's key."""

from __future__ import annotations

import pytest
import torch

from model import load_pipeline
from model.prompt_encoding import (
    CHUNK_LENGTH,
    chunk_prompt,
    encode_prompt_pair,
    encode_prompts,
)
from model.prompt_syntax import Span, parse_prompt
from model.text import TextEncoder, random_text_encoder, tiny_text_config
from service.prompt_cache import PromptCache, prompt_key
from tests.a1111_reference import BREAK_MARK, ref_chunks, ref_encode, ref_pair, ref_parse
from tests.tiny import randomize_

LONG = ", ".join(f"word{i} tree" for i in range(40))  # well over 75 tokens
# A prompt of exactly 75 tokens, one of 76, and their weighted variants.
EXACT_75 = " ".join(["cat"] * 75)
EXACT_76 = " ".join(["cat"] * 76)

PARSE_CASES = [
    "normal text",
    "an (important) word",
    "(unbalanced",
    "\\(literal\\]",
    "(unnecessary)(parens)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "((a)) [[b]] ([c]) [(d)] (e:0.25) (f: 1.5 ) (g:-0.4)",
    "a ) b ] c :d (e:f) (h:1.2",
    "x \\\\ y \\q z \\",
    "[a:b:0.5] [c|d] (nested (deep:1.2) [mix]:0.8)",
    "emoji :) and (( broken",
    "a BREAK b BREAK BREAK c",
    "BREAK a",
    "a BREAK",
    "a,BREAK,b  BREAKING news, UNBREAK",
    "",
    "()",
]


def ours_flat(prompt: str) -> list[tuple[str, float | None]]:
    """Our parts as the reference's flat list (BREAK marks between parts)."""
    flat: list[tuple[str, float | None]] = []
    for i, part in enumerate(parse_prompt(prompt)):
        if i:
            flat.append(BREAK_MARK)
        flat += [(s.text, s.weight) for s in part]
    return flat


def ref_flat(prompt: str) -> list[tuple[str, float | None]]:
    """The reference without its empty runs (they give no tokens)."""
    return [(t, w) for t, w in ref_parse(prompt) if t or w is None]


@pytest.mark.parametrize("prompt", PARSE_CASES)
def test_parse_matches_the_reference(prompt: str) -> None:
    assert ours_flat(prompt) == ref_flat(prompt)


def test_parse_gives_a1111s_documented_weights() -> None:
    # The examples AUTOMATIC1111's parser documents, with its exact float results.
    assert ours_flat("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0),
        ("house", 1.5730000000000004),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641000000000006),
        (".", 1.1),
    ]
    assert ours_flat("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert ours_flat("\\(literal\\]") == [("(literal]", 1.0)]
    assert ours_flat("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert ours_flat("[x]") == [("x", 1 / 1.1)]


def test_parse_deviations_from_a1111_are_the_documented_ones() -> None:
    # A BREAK inside brackets still breaks (A1111 would emit the word with weight -1.1).
    assert parse_prompt("(a BREAK b)") == [[Span("a", 1.1)], [Span("b", 1.1)]]
    # An unparsable weight is text, not a crash.
    assert parse_prompt("(a:1.2.3)") == [[Span("a:1.2.3", 1.1)]]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def encoder(request: pytest.FixtureRequest) -> TextEncoder:
    act = "quick_gelu" if request.param == "sd1" else "gelu"
    enc = random_text_encoder(tiny_text_config(hidden=32, layers=3, hidden_act=act), seed=5)
    randomize_(enc.model, seed=6)
    return enc


CHUNK_CASES = [
    "a red fox",
    "",
    EXACT_75,
    EXACT_76,
    LONG,
    f"({LONG}:1.3), [sky]",
    f"[{EXACT_75}] (tail:1.5)",
    "a BREAK b",
    "BREAK a",
    "a BREAK",
    "a BREAK BREAK b",
    f"{EXACT_75} BREAK tail",
    f"{EXACT_76} BREAK",
    "a (weighted:1.4) [prompt] with \\(escapes\\)",
]


@pytest.mark.parametrize("prompt", CHUNK_CASES)
def test_chunks_match_the_reference(encoder: TextEncoder, prompt: str) -> None:
    ours = chunk_prompt(encoder, prompt)
    ref = ref_chunks(encoder.tokenizer, prompt, encoder.pad_token_id)
    assert ours.ids.tolist() == [ids for ids, _ in ref]
    torch.testing.assert_close(ours.weights, torch.tensor([w for _, w in ref]))
    assert ours.ids.shape[1] == CHUNK_LENGTH


def test_chunk_counts(encoder: TextEncoder) -> None:
    counts = {p: chunk_prompt(encoder, p).count for p in ("", EXACT_75, EXACT_76, "BREAK a")}
    assert counts == {"": 1, EXACT_75: 1, EXACT_76: 2, "BREAK a": 2}
    assert chunk_prompt(encoder, " ".join(["cat"] * 300)).count == 4  # nothing cut off


@pytest.mark.parametrize("prompt", ["a red fox", "", EXACT_75, "blurry, low quality!!"])
def test_unweighted_short_prompts_give_todays_embeddings_exactly(
    encoder: TextEncoder, prompt: str
) -> None:
    assert torch.equal(chunk_prompt(encoder, prompt).ids, encoder.tokenize([prompt]))
    (ours,) = encode_prompts(encoder, [prompt])
    assert torch.equal(ours.hidden, encoder.encode([prompt]))


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
@pytest.mark.parametrize("prompt", CHUNK_CASES)
def test_embeddings_match_the_reference(encoder: TextEncoder, prompt: str, clip_skip: int) -> None:
    (ours,) = encode_prompts(encoder, [prompt], clip_skip=clip_skip)
    ref = ref_encode(
        encoder.model, encoder.tokenizer, prompt, pad_id=encoder.pad_token_id, clip_skip=clip_skip
    )
    assert ours.hidden.shape == ref.shape
    torch.testing.assert_close(ours.hidden, ref, atol=2e-5, rtol=1e-5)


def test_one_call_for_many_prompts_equals_each_alone(encoder: TextEncoder) -> None:
    prompts = [LONG, "a (fox:1.2)", "", EXACT_76]
    together = encode_prompts(encoder, prompts)
    for prompt, emb in zip(prompts, together, strict=True):
        (alone,) = encode_prompts(encoder, [prompt])
        torch.testing.assert_close(emb.hidden, alone.hidden, atol=1e-6, rtol=1e-6)


def test_weights_change_only_weighted_chunks_and_restore_the_mean(encoder: TextEncoder) -> None:
    plain, weighted = encode_prompts(encoder, [f"{EXACT_75} tail", f"{EXACT_75} (tail:1.6)"])
    first, second = slice(0, CHUNK_LENGTH), slice(CHUNK_LENGTH, 2 * CHUNK_LENGTH)
    assert torch.equal(plain.hidden[:, first], weighted.hidden[:, first])
    assert not torch.allclose(plain.hidden[:, second], weighted.hidden[:, second])
    torch.testing.assert_close(
        weighted.hidden[:, second].mean(), plain.hidden[:, second].mean(), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("prompt", "negative"), [(LONG, "blurry"), ("a fox", LONG + " BREAK more"), (LONG, LONG)]
)
def test_pair_padding_matches_the_reference(
    encoder: TextEncoder, prompt: str, negative: str
) -> None:
    cond, uncond = encode_prompt_pair(encoder, prompt, negative, clip_skip=2)
    ref_c, ref_u = ref_pair(
        encoder.model, encoder.tokenizer, prompt, negative, pad_id=encoder.pad_token_id, clip_skip=2
    )
    assert cond.hidden.shape == uncond.hidden.shape == ref_c.shape == ref_u.shape
    torch.testing.assert_close(cond.hidden, ref_c, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(uncond.hidden, ref_u, atol=2e-5, rtol=1e-5)


def test_pooled_output_is_the_first_chunks_unweighted(encoder: TextEncoder) -> None:
    (emb,) = encode_prompts(encoder, [f"({LONG}:1.3)"])
    first_ids = torch.tensor([ref_chunks(encoder.tokenizer, LONG, encoder.pad_token_id)[0][0]])
    with torch.no_grad():
        expected = encoder.model(input_ids=first_ids).pooler_output
    assert emb.pooled is not None and emb.chunks == 3
    torch.testing.assert_close(emb.pooled, expected)


def test_clip_skip_is_bounded_by_the_encoder(encoder: TextEncoder) -> None:
    with pytest.raises(ValueError, match=r"clip_skip must be in 1\.\.3"):
        encode_prompts(encoder, ["x"], clip_skip=4)


def test_prompt_cache_keys_on_clip_skip_and_text() -> None:
    pipe = load_pipeline("demo", device="cpu")
    cache = PromptCache(pipe, capacity=8)
    keys = [
        prompt_key("a fox", 1),
        prompt_key("a fox", 2),
        prompt_key("a fox"),
        prompt_key("(a fox)"),
    ]
    a1, a2, a1_again, b = (c.crossattn for c in cache.get_many(keys))
    assert cache.misses == 3 and cache.hits == 1 and len(cache) == 3
    assert a1 is a1_again
    assert not torch.allclose(a1, a2) and not torch.allclose(a1, b)
    torch.testing.assert_close(a2, pipe.embed_prompts(["a fox"], 2)[0].crossattn)
    (long,) = cache.get_many([prompt_key(LONG)])
    assert long.crossattn.shape[1] == 3 * CHUNK_LENGTH


def test_weights_on_an_encoder_with_zero_mean_outputs_stay_finite() -> None:
    # The demo model's final layer norm is the identity (weight 1, bias 0): every token's
    # vector has mean 0, A1111's rescale divides by ~0; it is skipped there.
    pipe = load_pipeline("demo", device="cpu")
    plain, weighted = encode_prompts(pipe.text, ["a red fox", "a (red:1.5) fox"])
    assert torch.isfinite(weighted.hidden).all()
    assert plain.hidden.mean().abs() < 1e-6
    expected = plain.hidden.clone()
    red = chunk_prompt(pipe.text, "a (red:1.5) fox").weights[0] == 1.5  # positions of "red"
    expected[0, red] *= 1.5
    torch.testing.assert_close(weighted.hidden, expected, atol=1e-5, rtol=1e-5)
