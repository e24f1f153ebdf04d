"""Per-token text states from an open_clip ``CLIP`` text tower, and the [MASK] token MLM needs.

open_clip's ``encode_text`` returns one pooled vector per caption; masked language modelling and
cross-attention fusion need a state for every token, and MLM needs the text to be read in both
directions and a [MASK] id the tokenizer does not have.
"""

from __future__ import annotations

import torch
from torch import nn

from mmcli.models.constants import OPEN_CLIP_EOT_ID, OPEN_CLIP_PAD_ID, OPEN_CLIP_VOCAB_SIZE


def add_mask_token(
    model: nn.Module,
    *,
    tokenizer_vocab_size: int = OPEN_CLIP_VOCAB_SIZE,
    eot_id: int = OPEN_CLIP_EOT_ID,
    generator: torch.Generator | None = None,
) -> int:
    """Give ``model`` (an open_clip ``CLIP``) a [MASK] token and return its id.

    The id is ``tokenizer_vocab_size``, one past the tokenizer's last id, so no real token
    collides with it. ``model.token_embedding`` is replaced by one row longer; ``model.vocab_size``
    follows. Calling it again, or on a model rebuilt with the grown embedding, changes nothing
    and returns the same id. Call it before building optimizers or tying an MLM head to the
    embedding, since both keep a reference to the embedding's weight.

    Because the new id is the largest, open_clip's default ``argmax`` pooling (which finds the
    end-of-text token as the largest id) would pool at a [MASK]; the pooling switches to
    ``eos`` at ``eot_id``, which gives the same result on text without [MASK].
    """
    embedding = model.token_embedding
    rows = embedding.num_embeddings
    if rows == tokenizer_vocab_size:
        model.token_embedding = _grown_embedding(embedding, generator)
    elif rows != tokenizer_vocab_size + 1:
        raise ValueError(
            f"token_embedding has {rows} rows; expected the tokenizer's {tokenizer_vocab_size} "
            f"(no [MASK] yet) or {tokenizer_vocab_size + 1} (with [MASK])"
        )
    model.vocab_size = tokenizer_vocab_size + 1
    if model.text_pool_type == "argmax":
        model.text_pool_type = "eos"
        model.text_eos_id = eot_id
    return tokenizer_vocab_size


def _grown_embedding(embedding: nn.Embedding, generator: torch.Generator | None) -> nn.Embedding:
    """A copy of ``embedding`` with one extra row drawn from the existing rows' statistics."""
    old = embedding.weight.detach()
    grown = nn.Embedding(old.shape[0] + 1, old.shape[1], device=old.device, dtype=old.dtype)
    # A Gaussian fitted to the existing rows gives the new token the scale of a real one whether
    # the embedding is freshly initialised (open_clip: std 0.02) or pretrained (other scales).
    mean, std = old.float().mean(dim=0), old.float().std(dim=0)
    noise_device = generator.device if generator is not None else old.device
    noise = torch.randn(old.shape[1], generator=generator, device=noise_device)
    with torch.no_grad():
        grown.weight[:-1].copy_(old)
        grown.weight[-1].copy_(mean + std * noise.to(old.device))
    grown.weight.requires_grad_(embedding.weight.requires_grad)  # a frozen tower stays frozen
    return grown


def text_token_states(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    causal: bool,
    pad_id: int = OPEN_CLIP_PAD_ID,
) -> torch.Tensor:
    """Run the text tower of ``model`` (an open_clip ``CLIP``) and return every token's state.

    ``tokens`` [B, L] with L ≤ the model's context length; the result [B, L, width] is taken
    after ``ln_final``, before pooling and projection.

    ``causal=True`` uses the model's own causal mask: the states are exactly those inside
    ``model.encode_text`` (padding follows the end-of-text token, so no real token sees it).
    ``causal=False`` lets every token attend to every real token of its caption, before and
    after it, as masked language modelling needs; padding keys (``pad_id``) are masked out so
    real tokens' states do not depend on padding.
    """
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    mask = _causal_mask(model, length) if causal else _padding_mask(model, tokens, pad_id, cast_dtype)
    x = model.transformer(x, attn_mask=mask)
    return model.ln_final(x)


def _causal_mask(model: nn.Module, length: int) -> torch.Tensor | None:
    """The model's own additive causal mask cut to ``length`` (None if the tower is not causal)."""
    mask = model.attn_mask
    return None if mask is None else mask[:length, :length]


def _padding_mask(model: nn.Module, tokens: torch.Tensor, pad_id: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B·heads, L, L] mask: -inf on padding keys, 0 elsewhere.

    open_clip's blocks pass ``attn_mask`` straight to ``nn.MultiheadAttention`` (or reshape it to
    [B, heads, L, L] in its custom attention); both take a 3-D mask laid out batch-major, head-minor,
    and neither takes a key-padding mask, hence one mask row per (caption, head).
    """
    batch, length = tokens.shape
    heads = model.transformer.resblocks[0].attn.num_heads
    keys = torch.zeros(batch, length, dtype=dtype, device=tokens.device)
    keys = keys.masked_fill(tokens == pad_id, float("-inf"))
    # Padding queries still see the real keys, so no row is entirely -inf (which would give NaN).
    return keys[:, None, :].expand(batch, length, length).repeat_interleave(heads, dim=0)
