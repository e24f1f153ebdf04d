"""The CoCa caption loss and the cached decoder, checked against open_clip's own CoCa."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmcli.models.captioning import (
    END_IDS,
    CaptionDecoder,
    DecodeSettings,
    caption_loss,
    decoder_states,
    is_captioner,
    vocabulary_logits,
)
from mmcli.models.constants import OPEN_CLIP_EOT_ID
from mmcli.models.encoders import build_dual_encoder
from mmcli.spec import ModelSpec

CAPTIONS = ["a red circle left of a blue square", "a green triangle", "a purple diamond above a yellow circle"]


@pytest.fixture(scope="module")
def coca():
    """A random mmcli-nano-coca whose logits are far from uniform (so greedy choices are clear)."""
    torch.manual_seed(0)
    encoder = build_dual_encoder(ModelSpec(arch="mmcli-nano-coca"))
    with torch.no_grad():
        encoder.model.text_decoder.text_projection.normal_(0, 0.5)
    encoder.model.eval()
    return encoder


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_presets_are_coca_models(coca):
    assert type(coca.model).__name__ == "CoCa" and is_captioner(coca.model)
    assert not is_captioner(build_dual_encoder(ModelSpec(arch="mmcli-nano")).model)


def test_fresh_decoder_projection_is_initialised():
    torch.manual_seed(0)
    projection = build_dual_encoder(ModelSpec(arch="mmcli-nano-coca")).model.text_decoder.text_projection.detach()
    width = projection.shape[0]
    assert projection.abs().max() > 0  # open_clip leaves it as torch.empty
    assert abs(float(projection.std()) - width**-0.5) < 0.1 * width**-0.5


def test_decoder_states_match_open_clip_decoder(coca):
    model = coca.model
    texts = coca.tokenizer(CAPTIONS)
    with torch.no_grad():
        _, image_tokens = model.visual(_images(3))
        _, text_states = model.text(texts)
        reference = model.text_decoder(image_tokens, text_states)
        ours = vocabulary_logits(model.text_decoder, decoder_states(model.text_decoder, image_tokens, text_states))
    torch.testing.assert_close(ours, reference)


def test_caption_loss_equals_open_clip_full_length_loss(coca):
    """The cut at the longest caption and the labelled-positions-only projection change nothing."""
    model = coca.model
    texts = coca.tokenizer(CAPTIONS)
    images = _images(3)
    with torch.no_grad():
        out = model(images, texts)  # open_clip's CoCa forward: logits [B, L-1, V], labels [B, L-1]
        reference = F.cross_entropy(out["logits"].permute(0, 2, 1), out["labels"], ignore_index=0)
        _, image_tokens = model.visual(images)
        _, text_states = model.text(texts)
        ours = caption_loss(model.text_decoder, image_tokens, text_states, texts)
        smoothed = caption_loss(model.text_decoder, image_tokens, text_states, texts, label_smoothing=0.1)
        reference_smoothed = F.cross_entropy(
            out["logits"].permute(0, 2, 1), out["labels"], ignore_index=0, label_smoothing=0.1
        )
    # the same sums in another order: equal to float32 rounding
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(smoothed, reference_smoothed, rtol=1e-5, atol=0)
    labelled = int((texts[:, 1:] != 0).sum())
    assert labelled == sum(len(coca.tokenizer.encode(c)) + 1 for c in CAPTIONS)  # words and the end token


def _open_clip_greedy(model, images, max_tokens: int, min_tokens: int = 0) -> list[tuple[int, ...]]:
    """open_clip's own CoCa.generate, greedy: top-k with k = 1 (needs transformers)."""
    pytest.importorskip("transformers")
    out = model.generate(
        images, generation_type="top_k", top_k=1, seq_len=max_tokens + 2, min_seq_len=min_tokens + 1
    ).tolist()
    captions = []
    for row in out:
        row = row[1:]  # the start token
        ends = [i for i, token in enumerate(row) if token in END_IDS]  # generate stops at either
        captions.append(tuple(row[: ends[0]] if ends else row))
    return captions


@pytest.mark.parametrize("min_tokens", [0, 3])
def test_cached_greedy_equals_open_clip_generate(coca, min_tokens):
    images = _images(5)
    ours = CaptionDecoder(coca.model).decode(images, DecodeSettings(max_tokens=8, min_tokens=min_tokens))
    reference = _open_clip_greedy(coca.model, images, 8, min_tokens)
    assert [c.tokens for c in ours] == reference
    assert all(len(c.tokens) >= min_tokens for c in ours)


def test_the_padding_token_ends_a_caption_as_in_open_clip_generate(coca):
    """open_clip's generate ends a row at the padding id (0) as at the end token; so do we."""
    model = coca.model
    with torch.no_grad():
        model.text_decoder.text_projection[:, 0] *= 12  # make "!" (id 0) likely
    try:
        images = _images(8, seed=11)
        ours = CaptionDecoder(model).decode(images, DecodeSettings(max_tokens=8))
        assert [c.tokens for c in ours] == _open_clip_greedy(model, images, 8)
        assert any(len(c.tokens) < 8 for c in ours) and all(0 not in c.tokens for c in ours)
        forced = CaptionDecoder(model).decode(images, DecodeSettings(max_tokens=8, min_tokens=8))
        assert all(len(c.tokens) == 8 and 0 not in c.tokens for c in forced)
    finally:
        with torch.no_grad():
            model.text_decoder.text_projection[:, 0] /= 12


def test_decoder_follows_the_model_when_moved_or_cast(coca):
    decoder = CaptionDecoder(coca.model)
    images = _images(2, seed=12)
    before = decoder.decode(images, DecodeSettings(max_tokens=5))
    coca.model.double()
    try:
        after = decoder.decode(images.double(), DecodeSettings(max_tokens=5))
    finally:
        coca.model.float()
    assert [c.tokens for c in after] == [c.tokens for c in before]
    assert decoder.decode(images[:0], DecodeSettings(max_tokens=5)) == []


def test_greedy_score_is_mean_log_probability_of_the_tokens(coca):
    """Re-score the decoded caption by teacher forcing through open_clip's full forward."""
    images = _images(2)
    captions = CaptionDecoder(coca.model).decode(images, DecodeSettings(max_tokens=6))
    for image, caption in zip(images, captions):
        sequence = torch.tensor([[49406, *caption.tokens, OPEN_CLIP_EOT_ID]])
        with torch.no_grad():
            logits = coca.model(image[None], sequence)["logits"][0].float().log_softmax(-1)
        picked = logits.gather(1, sequence[0, 1:, None])[:, 0]
        assert caption.score == pytest.approx(float(picked.mean()), abs=1e-4)


def test_a_caption_ended_early_leaves_the_batch_without_changing_the_others(coca):
    images = _images(6, seed=3)
    settings = DecodeSettings(max_tokens=7)
    decoder = CaptionDecoder(coca.model)
    together = decoder.decode(images, settings)
    alone = [decoder.decode(images[i : i + 1], settings)[0] for i in range(6)]
    assert [c.tokens for c in together] == [c.tokens for c in alone]


def test_beam_of_one_is_greedy_and_wider_beams_score_no_worse_on_average(coca):
    images = _images(6, seed=4)
    decoder = CaptionDecoder(coca.model)
    greedy = decoder.decode(images, DecodeSettings(max_tokens=6))
    one = decoder.decode(images, DecodeSettings(decoding="beam", beams=1, max_tokens=6))
    assert [c.tokens for c in one] == [c.tokens for c in greedy]
    for c, g in zip(one, greedy):
        assert c.score == pytest.approx(g.score, abs=1e-6)
    wide = decoder.decode(images, DecodeSettings(decoding="beam", beams=4, max_tokens=6))
    assert sum(c.score for c in wide) >= sum(c.score for c in greedy) - 1e-6


def test_beam_search_finds_the_best_caption_of_a_tiny_search_space(coca):
    """With 2 tokens at most, an exhaustive search over the top tokens gives the best mean
    log-probability; a beam as wide as that search must find it."""
    image = _images(1, seed=5)
    decoder = CaptionDecoder(coca.model)
    found = decoder.decode(image, DecodeSettings(decoding="beam", beams=6, max_tokens=1))[0]

    def score(tokens):
        sequence = torch.tensor([[49406, *tokens, OPEN_CLIP_EOT_ID]])
        with torch.no_grad():
            logits = coca.model(image, sequence)["logits"][0].float().log_softmax(-1)
        return float(logits.gather(1, sequence[0, 1:, None]).mean())

    with torch.no_grad():
        first = coca.model(image, torch.tensor([[49406]]), output_labels=False)["logits"][0, -1]
    # the beam keeps the 6 most likely first tokens other than the end; each then has to end
    candidates = [()] + [(int(t),) for t in first.topk(7).indices if int(t) != OPEN_CLIP_EOT_ID][:6]
    best = max(candidates, key=score)
    assert found.tokens == best
    assert found.score == pytest.approx(score(best), abs=1e-4)


def test_top_p_is_reproducible_per_image_whatever_the_batch(coca):
    images = _images(4, seed=6)
    decoder = CaptionDecoder(coca.model)
    settings = DecodeSettings(decoding="top-p", top_p=0.95, temperature=1.5, max_tokens=6)
    together = decoder.decode(images, settings, seeds=[10, 11, 12, 13])
    alone = [decoder.decode(images[i : i + 1], settings, seeds=[10 + i])[0] for i in range(4)]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    other = decoder.decode(images, settings, seeds=[20, 21, 22, 23])
    assert [c.tokens for c in other] != [c.tokens for c in together]


def test_top_p_small_nucleus_is_greedy(coca):
    """A nucleus smaller than the top token's probability holds that token only."""
    images = _images(3, seed=7)
    decoder = CaptionDecoder(coca.model)
    greedy = decoder.decode(images, DecodeSettings(max_tokens=5))
    tiny = decoder.decode(images, DecodeSettings(decoding="top-p", top_p=1e-6, max_tokens=5), seeds=[1, 2, 3])
    assert [c.tokens for c in tiny] == [c.tokens for c in greedy]


def test_blind_decoder_ignores_the_image(coca):
    decoder = CaptionDecoder(coca.model, blind=True)
    a = decoder.decode(_images(2, seed=8), DecodeSettings(max_tokens=5))
    b = decoder.decode(_images(2, seed=9), DecodeSettings(max_tokens=5))
    assert a[0] == a[1] == b[0] == b[1]


def test_settings_and_limits_are_checked(coca):
    decoder = CaptionDecoder(coca.model)
    assert decoder.max_tokens == 23  # 24 text positions, less the start token
    with pytest.raises(ValueError, match="max_tokens 24"):
        decoder.decode(_images(1), DecodeSettings(max_tokens=24))
    for bad in (dict(decoding="sample"), dict(beams=0), dict(min_tokens=5, max_tokens=4), dict(top_p=0.0)):
        with pytest.raises(ValueError):
            DecodeSettings(**bad)
    with pytest.raises(ValueError, match="not a captioning model"):
        CaptionDecoder(build_dual_encoder(ModelSpec(arch="mmcli-nano")).model)
    assert math.isfinite(decoder.decode(_images(1), DecodeSettings(max_tokens=1))[0].score)


def test_coca_text_queries_are_not_sent_down_the_fast_clip_text_path():
    """retrieve's plain-torch text tower reproduces CLIP's; CoCa's appends a class token, so its
    queries must go through open_clip."""
    import json

    from mmcli.models.encoders import PRESET_DIR
    from mmcli.models.fast_text import is_standard_text_tower

    for name in ("mmcli-nano-coca", "mmcli-tiny-coca", "mmcli-small-coca"):
        assert not is_standard_text_tower(json.loads((PRESET_DIR / f"{name}.json").read_text()))
    assert is_standard_text_tower(json.loads((PRESET_DIR / "mmcli-tiny.json").read_text()))
