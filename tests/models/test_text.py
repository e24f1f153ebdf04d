"""text_token_states and add_mask_token on a tiny open_clip CLIP."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip.model import text_global_pool

from mmcli.models.constants import OPEN_CLIP_EOT_ID, OPEN_CLIP_VOCAB_SIZE
from mmcli.models.text import add_mask_token, text_token_states

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def model_name(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("configs") / "mmcli-test-text-tiny.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    return path.stem


def tiny_clip(model_name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model(model_name).eval()


@pytest.fixture(scope="module")
def model(model_name):
    return tiny_clip(model_name)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    captions = ["a red circle", "two small blue squares on grass"]
    return open_clip.tokenizer.SimpleTokenizer()(captions, context_length=16)


def test_constants_match_the_tokenizer():
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    assert (tokenizer.vocab_size, tokenizer.eot_token_id) == (OPEN_CLIP_VOCAB_SIZE, OPEN_CLIP_EOT_ID)


def test_causal_states_reproduce_encode_text(model, tokens):
    with torch.no_grad():
        states = text_token_states(model, tokens, causal=True)
        pooled = text_global_pool(states, tokens, model.text_pool_type) @ model.text_projection
        assert torch.allclose(pooled, model.encode_text(tokens), atol=1e-6)
    assert states.shape == (2, 16, 64)


def later_token_changed(tokens: torch.Tensor) -> torch.Tensor:
    """Replace the third word of the second caption (position 3)."""
    changed = tokens.clone()
    changed[1, 3] = 1000
    return changed


def test_only_bidirectional_states_see_later_tokens(model, tokens):
    changed = later_token_changed(tokens)
    with torch.no_grad():
        for causal, should_change in ((True, False), (False, True)):
            before = text_token_states(model, tokens, causal=causal)[1, :3]
            after = text_token_states(model, changed, causal=causal)[1, :3]
            assert (not torch.allclose(before, after, atol=1e-5)) == should_change


def test_padding_does_not_reach_real_tokens_when_bidirectional(model, tokens):
    real = tokens != 0
    # Without a padding mask, changing the padding ids would move the real states; with it, not at all.
    other_padding = tokens.masked_fill(~real, 500)
    with torch.no_grad():
        states = text_token_states(model, tokens, causal=False)
        moved_pads = text_token_states(model, other_padding, causal=False, pad_id=500)
        trimmed = text_token_states(model, tokens[:1, :5], causal=False)
    assert torch.allclose(states[real], moved_pads[real], atol=1e-6)
    assert torch.allclose(states[0, :5], trimmed[0], atol=1e-5)


def test_mask_token_grows_the_embedding_once(model_name):
    model = tiny_clip(model_name)
    old = model.token_embedding.weight.detach().clone()
    mask_id = add_mask_token(model, generator=torch.Generator().manual_seed(0))
    assert mask_id == OPEN_CLIP_VOCAB_SIZE
    weight = model.token_embedding.weight
    assert weight.shape == (OPEN_CLIP_VOCAB_SIZE + 1, 64) and model.vocab_size == OPEN_CLIP_VOCAB_SIZE + 1
    assert torch.equal(weight[:-1], old)
    # Drawn from the rows' per-feature Gaussian: the new row's norm is that of a typical row.
    assert weight[-1].norm().item() == pytest.approx(old.norm(dim=1).mean().item(), rel=0.3)
    assert add_mask_token(model) == mask_id and model.token_embedding.weight is weight


def test_mask_token_keeps_pooling_at_the_end_of_text(model_name, tokens):
    model = tiny_clip(model_name)
    with torch.no_grad():
        before = model.encode_text(tokens)
        mask_id = add_mask_token(model)
        assert torch.allclose(model.encode_text(tokens), before, atol=1e-6)
        masked = tokens.clone()
        masked[0, 2] = mask_id
        states = text_token_states(model, masked, causal=True)
        eot_states = states[torch.arange(2), (tokens == OPEN_CLIP_EOT_ID).int().argmax(dim=1)]
        assert torch.allclose(model.encode_text(masked), eot_states @ model.text_projection, atol=1e-6)


def test_an_unexpected_vocabulary_is_refused(model_name):
    with pytest.raises(ValueError, match="49408"):
        add_mask_token(tiny_clip(model_name), tokenizer_vocab_size=49000)
