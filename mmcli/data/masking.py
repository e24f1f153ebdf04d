"""Masked language modelling inputs: choose tokens to predict and corrupt them (BERT's 80/10/10).

Selection rule: every sequence gets an exact number of selected tokens, ``prob × n`` where ``n``
is its count of maskable tokens (everything but start, end and padding). The fractional part is
rounded stochastically, so the expected share is exactly ``prob`` whatever the sequence length,
and a sequence with at least one maskable token always gets at least one. A per-token Bernoulli
draw would leave many short captions with nothing to predict, and topping those up would push
the share above ``prob``. The 80/10/10 split of the selected tokens is an independent draw per
token.

Masked image modelling's inputs are here too: a share of each image's patches is blanked in
pixel space (set to 0, the mean of the normalised input) and the masked image goes through the
image tower again, so no token the fusion encoder reads has seen the hidden pixels.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

IGNORE_INDEX = -100
"""Label of the positions that are not predicted; ``torch.nn.functional.cross_entropy``'s default."""

# Shares of the selected tokens (BERT, Devlin et al., 2019); the rest stay unchanged.
MASK_SHARE = 0.8
RANDOM_SHARE = 0.1


def mask_tokens(
    tokens: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int] | torch.Tensor,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt ``tokens`` [B, L] for masked language modelling.

    ``prob`` of each sequence's maskable tokens are selected (see the module docstring for the
    exact rule); ``special_ids`` (padding, start, end) are never selected. Of the selected tokens
    80% become ``mask_id``, 10% a token drawn uniformly from the vocabulary ``[0, vocab_size)``
    without the special ids and ``mask_id``, and 10% stay unchanged.

    Returns ``(inputs, labels)``: the corrupted tokens, and the original ids at the selected
    positions with :data:`IGNORE_INDEX` everywhere else. ``tokens`` is not modified. Pass a seeded
    ``generator`` for a reproducible corruption; random numbers are drawn on the generator's
    device (CPU by default) and the results moved to ``tokens.device``.
    """
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"prob must be in (0, 1], got {prob}")
    device = generator.device if generator is not None else tokens.device
    work = tokens.to(device)
    specials = _id_tensor(special_ids, like=work)
    maskable = ~torch.isin(work, specials)
    selected = _select_exact_share(maskable, prob, generator)
    inputs = _corrupt(work, selected, mask_id, _replacement_ids(vocab_size, specials, mask_id), generator)
    labels = torch.where(selected, work, torch.full_like(work, IGNORE_INDEX))
    return inputs.to(tokens.device), labels.to(tokens.device)


def _id_tensor(ids: Iterable[int] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``ids`` as a 1-D tensor with the dtype and device of ``like``."""
    if torch.is_tensor(ids):
        return ids.reshape(-1).to(dtype=like.dtype, device=like.device)
    return torch.tensor(sorted(ids), dtype=like.dtype, device=like.device)


def _select_exact_share(maskable: torch.Tensor, prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """Boolean [B, L]: a uniformly random subset of each row's maskable positions, of size k_i."""
    counts = _selection_counts(maskable.sum(dim=1), prob, generator)
    # Ranking random scores picks a uniform random subset of a given size in one vectorised step;
    # non-maskable positions get scores above every maskable one so they rank last.
    scores = torch.rand(maskable.shape, generator=generator, device=maskable.device)
    scores = scores.masked_fill(~maskable, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < counts.unsqueeze(1)) & maskable


def _selection_counts(n_maskable: torch.Tensor, prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """k_i = floor(prob·n_i) or that plus one (stochastic rounding), at least 1 when n_i > 0."""
    expected = prob * n_maskable.float()
    base = expected.floor()
    round_up = torch.rand(base.shape, generator=generator, device=base.device) < expected - base
    counts = base.long() + round_up.long()
    counts = torch.where(n_maskable > 0, counts.clamp(min=1), counts)
    return torch.minimum(counts, n_maskable)


def _replacement_ids(vocab_size: int, specials: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The ids a "random token" may take: the vocabulary without special ids and [MASK]."""
    candidates = torch.arange(vocab_size, dtype=specials.dtype, device=specials.device)
    excluded = torch.cat([specials, specials.new_tensor([mask_id])])
    candidates = candidates[~torch.isin(candidates, excluded)]
    if candidates.numel() == 0:
        raise ValueError("the vocabulary has no ordinary token to use as a random replacement")
    return candidates


def _corrupt(
    tokens: torch.Tensor,
    selected: torch.Tensor,
    mask_id: int,
    candidates: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Apply the 80% [MASK] / 10% random / 10% unchanged split to the selected positions."""
    draw = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    to_mask = selected & (draw < MASK_SHARE)
    to_random = selected & (draw >= MASK_SHARE) & (draw < MASK_SHARE + RANDOM_SHARE)
    picks = torch.randint(len(candidates), tokens.shape, generator=generator, device=tokens.device)
    inputs = tokens.masked_fill(to_mask, mask_id)
    return torch.where(to_random, candidates[picks], inputs)


def random_patch_mask(
    batch: int, patches: int, ratio: float, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean [B, N]: exactly ``round(ratio · N)`` (at least 1) random patches per image are True."""
    count = min(patches, max(1, round(ratio * patches)))
    scores = torch.rand(batch, patches, generator=generator, device=generator.device if generator else device)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < count).to(device)


def blank_patches(images: torch.Tensor, mask: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """``images`` [B, C, H, W] with the pixels of the masked patches (``mask`` [B, N], row-major
    over the patch grid) set to 0."""
    batch, _, height, width = images.shape
    rows, cols = height // patch_size[0], width // patch_size[1]
    grid = mask.reshape(batch, 1, rows, cols).to(images.dtype)
    pixels = grid.repeat_interleave(patch_size[0], dim=2).repeat_interleave(patch_size[1], dim=3)
    return images * (1 - pixels)
