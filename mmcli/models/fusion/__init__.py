"""Fusion encoders: one registry of every strategy, the region–concept graph included.

Every strategy follows one contract, ``forward(inputs: dict[str, Tensor]) -> Tensor[B, out_dim]``
(see :mod:`mmcli.models.fusion.strategies` for the keys). A strategy that wraps another one (the
graph fusion's ``inner``) is given it built: :func:`build_fusion` builds the inner module first
and passes it in, as torchmultimodal's ALBEF takes a built multimodal encoder.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mmcli.models.fusion.graph import GraphFusion
from mmcli.models.fusion.strategies import CrossAttentionFusion, EarlyFusion, HybridFusion, LateFusion
from mmcli.spec import choices

FUSION_STRATEGIES: dict[str, Callable[..., nn.Module]] = {
    "early": EarlyFusion,
    "late": LateFusion,
    "hybrid": HybridFusion,
    "cross_attention": CrossAttentionFusion,
    "graph": GraphFusion,
}
"""Fusion constructors by strategy name; the keyword arguments are each constructor's own."""

choices.check_registry("fusion strategies", FUSION_STRATEGIES, choices.FUSION_STRATEGIES)


def build_fusion(strategy: str, **options) -> nn.Module:
    """Build the fusion module named ``strategy`` from its modules-config entry: the constructor's
    keyword ``options``, where an ``inner`` entry (another strategy's config) is built first."""
    if strategy not in FUSION_STRATEGIES:
        raise ValueError(f"unknown fusion strategy {strategy!r}; choose one of {', '.join(FUSION_STRATEGIES)}")
    if options.get("inner") is not None:
        options["inner"] = build_fusion(**options["inner"])
    return FUSION_STRATEGIES[strategy](**options)
