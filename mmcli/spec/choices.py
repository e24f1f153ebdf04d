"""Every list of choices a spec offers, written once (no torch: the spec and the CLI read it).

The spec's ``Literal`` fields are built from these tuples; the registries that implement the
choices (fusion strategies, objectives, eval tasks) check at import that they implement exactly
these names, so a choice cannot exist in one place only.
"""

from __future__ import annotations

from typing import Literal

FUSION_STRATEGIES = ("early", "late", "hybrid", "cross_attention", "graph")
"""Fusion encoders (:data:`mmcli.models.fusion.FUSION_STRATEGIES`)."""

TOKENLESS_STRATEGIES = ("late", "graph")
"""Strategies that keep no fused token sequence (so they cannot serve ``mmlm`` or ``mim``)."""

LATE_MODES = ("concat", "sum", "product", "gated")
"""How late fusion combines the two pooled embeddings."""

POOLS = ("mean", "first")
"""How cross-attention fusion pools its text sequence."""

GRAPH_LAYERS = ("gcn", "gat")
"""Message-passing layers of the region–concept graph (GCN, GAT)."""

REGION_SOURCES = ("given", "salient", "grid")
"""Where the graph's image regions come from."""

OBJECTIVES = ("clip", "mlm", "mmlm", "itm", "mim", "caption")
"""Pretraining objectives (:data:`mmcli.training.objectives.OBJECTIVES`), in the order they run."""

FUSION_OBJECTIVES = ("mmlm", "itm", "mim")
"""Objectives that need a fusion encoder."""

TOKEN_OBJECTIVES = ("mmlm", "mim")
"""Objectives that need the fusion's token sequence."""

CAPTION_PARTNERS = ("clip",)
"""Objectives ``caption`` combines with (a CoCa text tower feeds neither the MLM head nor a fusion
encoder)."""

DECODINGS = ("greedy", "beam", "top-p")
"""How ``mmcli caption`` picks each next token."""

FUSE_TASKS = ("vqa", "itm", "generate")
"""Downstream tasks of ``mmcli fuse``."""

GENERATOR_PRESETS = ("cpu", "gpu")
"""Sizes of the text-to-image generator (:data:`mmcli.models.generation.GENERATOR_PRESETS`)."""

SAMPLERS = ("ddim", "dpm", "ddpm")
"""Samplers of ``mmcli generate`` (:data:`mmcli.models.generation.SAMPLERS`)."""

PREDICTIONS = ("v_prediction", "epsilon")
"""What the generator's UNet predicts (diffusers' ``prediction_type`` names)."""

BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")
"""Noise schedules of the generator (diffusers' names: cosine, Ho et al.'s linear, Stable Diffusion's)."""

EVAL_TASKS = ("zero_shot", "retrieval", "linear_probe", "vqa", "itm", "mlm", "alignment", "captioning", "generation")
"""Sections of an eval spec, in the order they run (:data:`mmcli.evaluation.EVAL_TASKS`)."""

MIM_LOSSES = ("cosine", "mse")
"""Losses of masked image modelling."""

PRECISIONS = ("auto", "fp32", "bf16")
"""Training precisions."""

ENCODER_MODES = ("frozen", "finetune")
"""Whether ``mmcli fuse`` trains the dual encoder too."""

SOURCE_FORMATS = ("auto", "csv", "tsv", "jsonl", "folder", "webdataset")
"""Formats of a data source."""


def literal(choices: tuple[str, ...]):
    """``Literal[choices...]`` for a pydantic field."""
    return Literal[choices]  # a tuple subscript spreads into the Literal's arguments


def check_registry(what: str, implemented, choices: tuple[str, ...]) -> None:
    """Fail at import when a registry and the spec's choices disagree."""
    if tuple(implemented) != choices:
        raise RuntimeError(f"{what}: the registry has {tuple(implemented)}, the spec offers {choices}")
