"""Captioning with open_clip's CoCa (Yu et al. 2022): the caption loss, and fast batched decoding.

A CoCa model is a dual encoder whose image tower also returns a sequence of attention-pooled
image tokens, plus a text decoder (open_clip's ``MultimodalTransformer``): causal self-attention
over the text tower's token states, cross-attention to the image tokens, and a projection to the
vocabulary. One training step gives the contrastive loss (pooled embeddings) and the caption
loss (next-token cross-entropy of the caption given the image).

Decoding here produces exactly what open_clip's ``CoCa.generate`` produces for the same settings
(greedy decoding is tested against it), but faster:

- **key/value cache**: each step feeds only the newest token through the text tower and the
  decoder; the keys and values of earlier positions are kept, and the image tokens' keys and
  values for every cross-attention layer are computed once per image. ``generate`` recomputes
  the whole prefix through both towers at every step.
- **shrinking batch**: a caption that has ended leaves the batch (its cache rows are dropped).

Only open_clip's standard ``ResidualAttentionBlock`` (``nn.MultiheadAttention``) is read this
way; a model built with other attention blocks is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcli.errors import MmcliError
from mmcli.models.constants import OPEN_CLIP_EOT_ID, OPEN_CLIP_PAD_ID, OPEN_CLIP_SOT_ID
from mmcli.spec.choices import DECODINGS

END_IDS = (OPEN_CLIP_EOT_ID, OPEN_CLIP_PAD_ID)
"""Tokens that end a caption: end-of-text, and the padding id (as open_clip's ``generate``, which
stops a row at either; padding is never a training label, so it only ends)."""


def require_captioner(loaded, what: str) -> None:
    """Refuse a loaded model (:class:`~mmcli.models.loading.LoadedModel`) that cannot caption: no
    decoder, or a run folder whose CoCa decoder was never trained (no caption objective)."""
    if not getattr(loaded.model, "captioner", False):
        raise MmcliError(
            f"{what} has no caption decoder; give a run trained with the caption objective "
            "(a CoCa architecture such as mmcli-tiny-coca)"
        )
    if loaded.meta and "caption" not in loaded.meta.get("modules", {}):
        raise MmcliError(
            f"{what} is a CoCa run trained without the caption objective: its decoder never learned to caption"
        )


def is_captioner(clip: nn.Module) -> bool:
    """Whether an open_clip model has a caption decoder (a CoCa model)."""
    return isinstance(getattr(clip, "text_decoder", None), nn.Module)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def decoder_states(decoder: nn.Module, image_tokens: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states [B, L, W] (before ``ln_final`` and the vocabulary
    projection): open_clip's ``MultimodalTransformer.forward`` without its last two steps, so that
    the projection can be applied to the positions that have a label only."""
    if not getattr(decoder, "batch_first", True):
        raise ValueError("the caption decoder must be batch-first")
    length = text_states.shape[1]
    mask = decoder.attn_mask[:length, :length]
    x = text_states
    for block, cross in zip(decoder.resblocks, decoder.cross_attn):
        x = block(x, attn_mask=mask)
        x = cross(x, k_x=image_tokens, v_x=image_tokens)
    return x


def vocabulary_logits(decoder: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """Next-token logits of decoder states: ``ln_final`` then the projection to the vocabulary."""
    return decoder.ln_final(states) @ decoder.text_projection


def caption_loss(
    decoder: nn.Module,
    image_tokens: torch.Tensor,
    text_states: torch.Tensor,
    texts: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    pad_id: int = OPEN_CLIP_PAD_ID,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``texts`` [B, L] given the image tokens (teacher forcing).

    ``text_states`` [B, L, W] are the text tower's causal token states of ``texts``. Position t
    predicts token t+1; padding is never a label. Because attention is causal, the states of a
    position do not depend on later ones, so the batch is cut after its longest caption and the
    vocabulary projection (the costly part: tens of thousands of classes) runs on labelled
    positions only — the same loss as open_clip's full-length computation, at a fraction of it."""
    labels = texts[:, 1:]
    keep = labels != pad_id
    length = int(keep.any(dim=0).nonzero().max()) + 1 if keep.any() else 1
    states = decoder_states(decoder, image_tokens, text_states[:, :length])
    logits = vocabulary_logits(decoder, states[keep[:, :length]])
    return F.cross_entropy(logits.float(), labels[:, :length][keep[:, :length]], label_smoothing=label_smoothing)


def blind_image_tokens(image_tokens: torch.Tensor) -> torch.Tensor:
    """What a language-model baseline's decoder reads instead of the image: zeros (a constant)."""
    return torch.zeros_like(image_tokens)


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeSettings:
    """How captions are decoded (the options of ``mmcli caption``)."""

    decoding: str = "greedy"
    """``greedy`` (the most likely token), ``beam`` (beam search), ``top-p`` (nucleus sampling)."""
    beams: int = 3
    """Hypotheses kept per image by beam search."""
    top_p: float = 0.9
    """Nucleus sampling draws from the smallest set of tokens whose probabilities sum to ≥ this."""
    temperature: float = 1.0
    """Logits are divided by this before sampling (top-p only)."""
    max_tokens: int = 30
    """At most this many caption tokens (the end-of-text token not counted)."""
    min_tokens: int = 0
    """The end-of-text token is forbidden before this many caption tokens."""

    def __post_init__(self) -> None:
        if self.decoding not in DECODINGS:
            raise SettingError("decoding", self.decoding, f"choose one of {', '.join(DECODINGS)}")
        if self.beams < 1:
            raise SettingError("beams", self.beams, "must be at least 1")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise SettingError("top_p", self.top_p, "must be more than 0 and at most 1")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise SettingError("temperature", self.temperature, "must be a number more than 0")
        if self.max_tokens < 1:
            raise SettingError("max_tokens", self.max_tokens, "must be at least 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise SettingError("min_tokens", self.min_tokens, f"must be between 0 and max_tokens ({self.max_tokens})")


class SettingError(ValueError):
    """A decoding setting out of range: ``field`` names it (``max_tokens``), ``why`` says what it
    must be; callers name the field their own way (``--max-tokens``, ``captioning.max_tokens``)."""

    def __init__(self, field: str, value, why: str):
        super().__init__(f"{field} {value}: {why}")
        self.field, self.value, self.why = field, value, why


def item_seed(seed: int, key: str) -> int:
    """The top-p sampling seed of one item: from the run's ``seed`` and the item's key (SHA-256, so
    the same in every process; Python's ``hash`` of a string is salted per process). An item is
    drawn for the same way whatever batch, resume point or rank it is captioned in."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class Caption:
    """One decoded caption: its token ids (without start and end markers) and its score, the
    mean log-probability of its tokens, the end-of-text token included."""

    tokens: tuple[int, ...]
    score: float


class _Attention:
    """Keys and values of one ``nn.MultiheadAttention``, read from its packed projection."""

    def __init__(self, attn: nn.MultiheadAttention):
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or attn.in_proj_bias is None:
            raise ValueError("cached decoding needs open_clip's standard attention blocks (nn.MultiheadAttention)")
        self.attn = attn
        self.heads = attn.num_heads

    def split(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, W] -> [B, H, T, W/H]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        # sliced at each call, not once: moving or casting the model replaces the parameters' data
        width = self.attn.embed_dim
        rows = slice(which * width, (which + 1) * width)
        return self.split(F.linear(x, self.attn.in_proj_weight[rows], self.attn.in_proj_bias[rows]))

    def output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v)  # no mask: the cache holds the past only
        return self.attn.out_proj(out.transpose(1, 2).flatten(2))


class _Block:
    """One open_clip ``ResidualAttentionBlock`` run one position at a time with a cache."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.attn = _Attention(block.attn)

    def self_attention(self, x: torch.Tensor, cache: list[torch.Tensor], step: int) -> torch.Tensor:
        """``x`` [B, 1, W] at position ``step``; ``cache`` = [keys, values] [B, H, T, d], filled to ``step``."""
        h = self.block.ln_1(x)
        q, k, v = (self.attn.project(h, i) for i in range(3))
        cache[0][:, :, step : step + 1] = k
        cache[1][:, :, step : step + 1] = v
        out = self.attn.output(q, cache[0][:, :, : step + 1], cache[1][:, :, : step + 1])
        return self.mlp(x + self.block.ls_1(out))

    def cross_attention(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        q = self.attn.project(self.block.ln_1(x), 0)
        return self.mlp(x + self.block.ls_1(self.attn.output(q, keys, values)))

    def image_keys(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.block.ln_1_kv(image_tokens)
        return self.attn.project(kv, 1), self.attn.project(kv, 2)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block.ls_2(self.block.mlp(self.block.ln_2(x)))


class _DecoderState:
    """The caches of one batch of captions in progress: per layer of the text tower and of the
    decoder, keys and values of the positions so far; per cross-attention layer, the image's."""

    def __init__(self, caches: list[list[torch.Tensor]], image_kv: list[tuple[torch.Tensor, torch.Tensor]]):
        self.caches = caches
        self.image_kv = image_kv

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder to) the batch rows ``rows``."""
        self.caches = [[t.index_select(0, rows) for t in pair] for pair in self.caches]
        self.image_kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.image_kv]


class CaptionDecoder:
    """Cached, batched decoding of an open_clip CoCa model (see the module docstring).

    ``blind`` decodes as a language-model baseline was trained: the decoder reads zeros instead
    of the image tokens."""

    def __init__(self, clip: nn.Module, *, blind: bool = False):
        if not is_captioner(clip):
            raise ValueError("not a captioning model (no text decoder)")
        text = clip.text
        if getattr(text, "cls_emb", None) is None or not getattr(text.transformer, "batch_first", True):
            raise ValueError("cached decoding expects a CoCa text tower (a class token appended, batch-first)")
        self.clip, self.blind = clip, blind
        self.text_blocks = [_Block(b) for b in text.transformer.resblocks]
        self.decoder_blocks = [_Block(b) for b in clip.text_decoder.resblocks]
        self.cross_blocks = [_Block(b) for b in clip.text_decoder.cross_attn]
        self.context_length = min(text.context_length, clip.text_decoder.context_length)

    @classmethod
    def of(cls, model: nn.Module) -> CaptionDecoder:
        """The decoder of a :class:`~mmcli.models.multimodal.MultimodalModel` (a language-model
        baseline decodes blind, as it was trained)."""
        return cls(model.clip, blind=getattr(model, "caption_blind", False))

    @property
    def max_tokens(self) -> int:
        """The longest caption the model can write: its text context, less the start token."""
        return self.context_length - 1

    def check(self, settings: DecodeSettings) -> None:
        """Refuse (:class:`SettingError`) settings this model cannot decode: captions longer than
        its text context."""
        if settings.max_tokens > self.max_tokens:
            why = f"more than the model's text context allows; use at most {self.max_tokens}"
            raise SettingError("max_tokens", settings.max_tokens, why)

    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The attention-pooled image tokens the decoder reads [B, N, W]."""
        _, tokens = self.clip.visual(images)
        return blind_image_tokens(tokens) if self.blind else tokens

    def _start(self, image_tokens: torch.Tensor, length: int) -> _DecoderState:
        b = image_tokens.shape[0]
        caches = []
        for block in self.text_blocks + self.decoder_blocks:
            heads, width = block.attn.heads, block.block.attn.embed_dim
            shape = (b, heads, length, width // heads)
            caches.append([image_tokens.new_zeros(shape), image_tokens.new_zeros(shape)])
        image_kv = [block.image_keys(image_tokens) for block in self.cross_blocks]
        return _DecoderState(caches, image_kv)

    def _step(self, state: _DecoderState, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Log-probabilities [B, V] of the next token after ``tokens`` [B] at position ``step``."""
        text = self.clip.text
        x = (text.token_embedding(tokens) + text.positional_embedding[step]).unsqueeze(1)
        n_text = len(self.text_blocks)
        for i, block in enumerate(self.text_blocks):
            x = block.self_attention(x, state.caches[i], step)
        for i, (block, cross) in enumerate(zip(self.decoder_blocks, self.cross_blocks)):
            x = block.self_attention(x, state.caches[n_text + i], step)
            x = cross.cross_attention(x, *state.image_kv[i])
        logits = vocabulary_logits(self.clip.text_decoder, x[:, 0])
        return logits.float().log_softmax(dim=-1)

    @torch.no_grad()
    def decode(self, images: torch.Tensor, settings: DecodeSettings, seeds: list[int] | None = None) -> list[Caption]:
        """Captions of ``images`` [B, 3, H, W] (already preprocessed), in order.

        ``seeds`` (one per image) make top-p sampling reproducible per image, whatever the batch
        it is decoded in; the other decodings use no randomness."""
        self.check(settings)
        if images.shape[0] == 0:
            return []
        tokens = self.image_tokens(images)
        if settings.decoding == "beam":
            return self._beam(tokens, settings)
        return self._sample(tokens, settings, seeds)

    def _sample(self, image_tokens: torch.Tensor, settings: DecodeSettings, seeds: list[int] | None) -> list[Caption]:
        b, device = image_tokens.shape[0], image_tokens.device
        state = self._start(image_tokens, settings.max_tokens + 1)
        generators = None
        if settings.decoding == "top-p":
            generators = [torch.Generator().manual_seed(s) for s in (seeds or range(b))]
        rows = torch.arange(b, device=device)  # which image each live batch row belongs to
        tokens = torch.full((b,), OPEN_CLIP_SOT_ID, dtype=torch.long, device=device)
        written: list[list[int]] = [[] for _ in range(b)]
        logprob = [0.0] * b
        done: dict[int, Caption] = {}
        for step in range(settings.max_tokens + 1):
            scores = self._step(state, tokens, step)
            if step < settings.min_tokens:
                scores[:, list(END_IDS)] = -math.inf
            if step == settings.max_tokens:  # out of room: the caption ends here
                chosen = torch.full_like(tokens, OPEN_CLIP_EOT_ID)
            elif generators is None:
                chosen = scores.argmax(dim=-1)
            else:
                chosen = _nucleus(scores, settings, [generators[int(r)] for r in rows])
            picked = scores.gather(1, chosen[:, None])[:, 0].tolist()
            ended = []
            for j, (image, token) in enumerate(zip(rows.tolist(), chosen.tolist())):
                logprob[image] += picked[j]
                if token in END_IDS:
                    n = len(written[image]) + 1
                    done[image] = Caption(tuple(written[image]), logprob[image] / n)
                    ended.append(j)
                else:
                    written[image].append(token)
            if len(done) == b:
                break
            if ended:
                gone = set(ended)
                live = torch.tensor([j for j in range(len(rows)) if j not in gone], device=device)
                state.select(live)
                rows, chosen = rows[live], chosen[live]
            tokens = chosen
        return [done[i] for i in range(b)]

    def _beam(self, image_tokens: torch.Tensor, settings: DecodeSettings) -> list[Caption]:
        """Beam search: ``beams`` live hypotheses per image, ranked by total log-probability while
        they grow; an image is finished once ``beams`` hypotheses have ended (or at ``max_tokens``),
        and its caption is the ended one with the best mean token log-probability."""
        k, device = settings.beams, image_tokens.device
        b = image_tokens.shape[0]
        state = self._start(image_tokens.repeat_interleave(k, dim=0), settings.max_tokens + 1)
        images = list(range(b))  # the images still searched; image i owns rows i*k … i*k+k-1
        prefixes: list[list[int]] = [[] for _ in range(b * k)]
        totals = torch.full((b, k), -math.inf, device=device)
        totals[:, 0] = 0.0  # the k start hypotheses are identical: only one may expand
        finished: list[list[Caption]] = [[] for _ in range(b)]
        tokens = torch.full((b * k,), OPEN_CLIP_SOT_ID, dtype=torch.long, device=device)
        for step in range(settings.max_tokens + 1):
            scores = self._step(state, tokens, step)
            if step < settings.min_tokens:
                scores[:, list(END_IDS)] = -math.inf
            if step == settings.max_tokens:  # out of room: every hypothesis ends here
                scores = torch.where(_is_end(scores), scores, torch.full_like(scores, -math.inf))
            vocab = scores.shape[1]
            top, index = (totals.reshape(-1, 1) + scores).view(len(images), k * vocab).topk(2 * k, dim=1)
            rows, words, kept_totals, kept_prefixes, searched = [], [], [], [], []
            for i, image in enumerate(images):
                kept = []
                for total, flat in zip(top[i].tolist(), index[i].tolist()):
                    if not math.isfinite(total) or len(kept) == k:
                        break
                    row, word = i * k + flat // vocab, flat % vocab
                    if word in END_IDS:
                        finished[image].append(Caption(tuple(prefixes[row]), total / (len(prefixes[row]) + 1)))
                    else:
                        kept.append((total, row, word))
                if len(finished[image]) >= k or not kept:
                    continue
                searched.append(image)
                kept += [(-math.inf, kept[0][1], kept[0][2])] * (k - len(kept))  # dead fillers
                for total, row, word in kept:
                    rows.append(row)
                    words.append(word)
                    kept_totals.append(total)
                    kept_prefixes.append(prefixes[row] + [word])
            if not searched:
                break
            state.select(torch.tensor(rows, device=device))
            images, prefixes = searched, kept_prefixes
            totals = torch.tensor(kept_totals, device=device).view(len(images), k)
            tokens = torch.tensor(words, device=device)
        return [max(found, key=lambda c: c.score) for found in finished]


def _is_end(scores: torch.Tensor) -> torch.Tensor:
    """A mask of the end-of-text column of ``scores`` [B, V]."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[:, OPEN_CLIP_EOT_ID] = True
    return mask


def _nucleus(scores: torch.Tensor, settings: DecodeSettings, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row from the smallest set of most likely tokens whose probabilities reach
    ``top_p`` (after ``temperature``), each row drawing from its own generator."""
    probs = (scores / settings.temperature).softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    outside = (cumulative - sorted_probs) >= settings.top_p  # tokens after the nucleus is full
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    draws = torch.stack([torch.rand((), generator=g) for g in generators]).to(scores.device)
    # the renormalised sum can end a hair below 1: a draw above it takes the nucleus's last token
    size = (~outside).sum(dim=-1)
    index = torch.minimum((sorted_probs.cumsum(dim=-1) < draws[:, None]).sum(dim=-1), size - 1)
    return order.gather(1, index[:, None])[:, 0]
