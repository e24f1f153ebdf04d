"""The multimodal model: an open_clip dual encoder (CLIP, Radford et al. 2021) plus the optional
modules later stages add (a fusion encoder as in ALBEF, Li et al. 2021; MLM, ITM, MIM and task heads).

Extra modules are described by a plain dict (saved as ``"modules"`` in a run's ``mmcli.json``),
one entry per module with the constructor's arguments, so a run folder rebuilds its own model::

    {"mask_token": {"id": 49408},
     "fusion": {"strategy": "cross_attention", "dim": 128, "depth": 2, ...},
     "mlm_head": {"width": 128, "vocab_size": 49409}, "itm_head": {"dim": 128}, ...}

A CoCa model (:mod:`mmcli.models.captioning`) carries its caption decoder inside the open_clip
model; its ``"caption"`` entry says only whether the decoder reads the image (``{"image": true}``)
or is a language-model baseline (``false``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcli.models.captioning import blind_image_tokens, is_captioner
from mmcli.models.constants import MAX_LOGIT_SCALE, OPEN_CLIP_PAD_ID, OPEN_CLIP_VOCAB_SIZE
from mmcli.models.fusion import build_fusion
from mmcli.models.heads import ClassifierHead, ITMHead, MaskedLogits, MIMHead, MLMHead
from mmcli.models.text import add_mask_token, text_token_states
from mmcli.spec.choices import FUSION_OBJECTIVES

MODULE_ORDER = (
    "mask_token",
    "fusion",
    "mlm_head",
    "mmlm_proj",
    "itm_head",
    "mim_head",
    "vqa_head",
    "caption",
    "generator",
)
"""Every module a config may hold, in build order ([MASK] first: heads tie to the grown embedding)."""


class MultimodalModel(nn.Module):
    """An open_clip ``CLIP`` (``self.clip``) whose forward returns a dict of outputs, plus the
    extra modules ``modules`` describes (see the module docstring).

    Like open_clip's own models the output is a dict, so objectives take what they need by name;
    ``image_tokens`` is added only when a fusion module reads patch tokens.
    """

    def __init__(self, clip: nn.Module, modules: dict[str, Any] | None = None):
        super().__init__()
        self.clip = clip
        self.modules_config = dict(modules or {})
        unknown = set(self.modules_config) - set(MODULE_ORDER)
        if unknown:
            raise ValueError(f"unknown extra modules {sorted(unknown)}")
        self.mask_token_id: int | None = None
        self.captioner = is_captioner(clip)
        self.caption_blind = False
        for name in MODULE_ORDER:
            if name in self.modules_config:
                _BUILDERS[name](self, self.modules_config[name])
        fusion = self.modules_config.get("fusion")
        self.needs_image_tokens = fusion is not None and fusion["strategy"] != "late"
        self.needs_local_features = bool(fusion and fusion.get("graph", {}).get("local_features", False))

    @classmethod
    def from_modules(cls, clip: nn.Module, modules: dict) -> MultimodalModel:
        """Rebuild a model with the extra modules a run folder's ``mmcli.json`` lists."""
        return cls(clip, modules)

    # -- the dual encoder -----------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pooled image embeddings [B, D]."""
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, texts: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pooled text embeddings [B, D]."""
        return self.clip.encode_text(texts, normalize=normalize)

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled, patch_tokens)``: the projected pooled embedding [B, D] and the patch tokens
        [B, N, width] (after ``ln_post``, without the class token, not projected), in one pass."""
        visual = self.clip.visual
        previous = visual.output_tokens
        # Set only for this call: open_clip's encode_image expects a bare tensor from visual().
        visual.output_tokens = True
        try:
            return visual(images)
        finally:
            visual.output_tokens = previous

    def encode_image_levels(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`encode_image_tokens` plus the patch embeddings [B, N, width] of the same pass:
        the output of the ViT's patchify convolution, each a function of its own patch only."""
        captured = []
        hook = self.clip.visual.conv1.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            pooled, tokens = self.encode_image_tokens(images)
        finally:
            hook.remove()
        return pooled, tokens, captured[0].flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        """``image_features`` and ``text_features`` (L2-normalised), ``logit_scale`` (1/τ, ≤ 100),
        ``image_tokens`` [B, N, width] when the fusion module reads them, and for a CoCa model
        what its decoder reads: ``caption_image_tokens`` (zeros for a language-model baseline) and
        ``caption_text_states`` (the text tower's causal token states)."""
        out = {}
        if self.captioner:  # CoCa's towers return their token sequences beside the pooled vectors
            pooled, image_tokens = self.clip.visual(images)
            text_pooled, out["caption_text_states"] = self.clip.text(texts)
            out["caption_image_tokens"] = blind_image_tokens(image_tokens) if self.caption_blind else image_tokens
        else:
            if self.needs_image_tokens:
                pooled, out["image_tokens"] = self.encode_image_tokens(images)
            else:
                pooled = self.clip.encode_image(images)
            text_pooled = self.clip.encode_text(texts)
        out["image_features"] = F.normalize(pooled, dim=-1)
        out["text_features"] = F.normalize(text_pooled, dim=-1)
        out["logit_scale"] = self.clip.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        return out

    def clamp_logit_scale(self) -> None:
        """Keep the learnable logit scale (log 1/τ) in [0, log 100], as CLIP does after each step."""
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def logit_scale_value(self) -> float:
        """The contrastive multiplier 1/τ."""
        return float(self.clip.logit_scale.detach().exp())

    # -- text states and fusion -----------------------------------------------------------------
    def text_states(self, texts: torch.Tensor) -> torch.Tensor:
        """Bidirectional per-token text states [B, L, width] (what MLM and the fusion read)."""
        return text_token_states(self.clip, texts, causal=False)

    def fusion_inputs(self, texts: torch.Tensor, text_states: torch.Tensor, **features) -> dict[str, torch.Tensor]:
        """The fusion contract's dict: ``text_tokens``, ``text_mask`` and whichever of
        ``image_tokens``, ``image_patches``, ``text_embeddings``, ``text_pooled``, ``image_pooled``,
        ``boxes``, ``box_mask``, ``concept_spans``, ``concept_mask``, ``concept_grounded`` are given."""
        inputs = {"text_tokens": text_states, "text_mask": texts != OPEN_CLIP_PAD_ID}
        inputs.update({k: v for k, v in features.items() if v is not None})
        return inputs

    def encode_pair(self, images: torch.Tensor, texts: torch.Tensor, **regions) -> dict:
        """Everything a fusion strategy may read for image–text pairs (see :meth:`fusion_inputs`);
        ``regions`` are the optional ``boxes``, ``box_mask``, ``concept_spans``, ``concept_mask``,
        ``concept_grounded``; with ``local_features`` the towers' input embeddings come too."""
        patches = words = None
        if self.needs_local_features:
            pooled, tokens, patches = self.encode_image_levels(images)
            words = self.token_embeddings(texts)
        else:
            pooled, tokens = self.encode_image_tokens(images)
        return self.fusion_inputs(
            texts,
            self.text_states(texts),
            image_tokens=tokens,
            image_patches=patches,
            text_embeddings=words,
            image_pooled=F.normalize(pooled, dim=-1),
            text_pooled=F.normalize(self.clip.encode_text(texts), dim=-1),
            **regions,
        )

    def token_embeddings(self, texts: torch.Tensor) -> torch.Tensor:
        """The text tower's input embeddings [B, L, width] of ``texts``: each token on its own,
        before any attention mixes in its context."""
        return self.clip.token_embedding(texts)

    def prompt_states(self, texts: torch.Tensor) -> torch.Tensor:
        """The causal per-token states [B, L, width] of the text tower, exactly those inside
        ``encode_text`` (padding included): what the generator's cross-attention reads."""
        return text_token_states(self.clip, texts, causal=True)

    def mlm_logits(
        self, masked: torch.Tensor, labels: torch.Tensor, image_tokens: torch.Tensor | None = None
    ) -> MaskedLogits:
        """MLM logits at the labelled positions of ``masked`` texts: from the text tower alone,
        or, given ``image_tokens``, after the fusion encoder let the text read the image."""
        states = self.text_states(masked)
        if image_tokens is not None:
            states = self.fusion.forward_tokens(self.fusion_inputs(masked, states, image_tokens=image_tokens))
            if hasattr(self, "mmlm_proj"):
                states = self.mmlm_proj(states)
        return self.mlm_head(states, labels)

    def extra_modules(self) -> dict[str, nn.Module]:
        """Modules beyond the dual encoder (saved to ``mmcli_model.safetensors``)."""
        return {name: m for name, m in self.named_children() if name != "clip"}


# -- builders: one per entry of a modules config -----------------------------------------------------
def _mask_token(model: MultimodalModel, cfg: dict) -> None:
    model.mask_token_id = add_mask_token(model.clip, tokenizer_vocab_size=cfg["id"])


def _fusion(model: MultimodalModel, cfg: dict) -> None:
    options = {k: v for k, v in cfg.items() if k != "strategy"}
    model.fusion = build_fusion(cfg["strategy"], **options)


def _mlm_head(model: MultimodalModel, cfg: dict) -> None:
    model.mlm_head = MLMHead(cfg["width"], cfg["vocab_size"], tied_embedding=model.clip.token_embedding)


def _mmlm_proj(model: MultimodalModel, cfg: dict) -> None:
    model.mmlm_proj = nn.Linear(cfg["in_dim"], cfg["out_dim"])


def _itm_head(model: MultimodalModel, cfg: dict) -> None:
    model.itm_head = ITMHead(cfg["dim"])


def _mim_head(model: MultimodalModel, cfg: dict) -> None:
    model.mim_head = MIMHead(cfg["image_dim"], cfg["dim"], cfg["heads"])


def _vqa_head(model: MultimodalModel, cfg: dict) -> None:
    model.vqa_head = ClassifierHead(cfg["dim"], len(cfg["answers"]), cfg["hidden"], cfg["dropout"])


def _caption(model: MultimodalModel, cfg: dict) -> None:
    if not model.captioner:
        raise ValueError("a caption entry needs a CoCa model (an open_clip model with a text decoder)")
    model.caption_blind = not cfg["image"]


def _generator(model: MultimodalModel, cfg: dict) -> None:
    from mmcli.models.generation import TextToImage

    model.generator = TextToImage(cfg)


_BUILDERS = {
    "mask_token": _mask_token,
    "fusion": _fusion,
    "mlm_head": _mlm_head,
    "mmlm_proj": _mmlm_proj,
    "itm_head": _itm_head,
    "mim_head": _mim_head,
    "vqa_head": _vqa_head,
    "caption": _caption,
    "generator": _generator,
}


# -- from specs -----------------------------------------------------------------------------------------
def tower_dims(clip: nn.Module) -> dict[str, int]:
    """Widths of an open_clip ``CLIP``'s token states and pooled embeddings."""
    return {
        "text_dim": clip.transformer.width,
        "image_dim": clip.visual.transformer.width,
        "text_pooled_dim": clip.text_projection.shape[1],
        "image_pooled_dim": clip.visual.output_dim,
    }


def fusion_config(spec, clip: nn.Module) -> dict[str, Any]:
    """The ``fusion`` entry of a modules config for a :class:`~mmcli.spec.FusionSpec`."""
    from mmcli.errors import MmcliError

    graph = spec.graph_spec()
    if graph is not None:
        return graph_fusion_config(spec, graph, clip)
    dims = tower_dims(clip)
    dim = spec.dim or dims["text_dim"]
    if spec.strategy == "late":
        return {
            "strategy": "late",
            "dim": dim,
            "text_pooled_dim": dims["text_pooled_dim"],
            "image_pooled_dim": dims["image_pooled_dim"],
            "mode": spec.late_mode,
        }
    if dim % spec.heads:
        raise MmcliError(f"fusion.heads: the fusion width {dim} is not divisible by {spec.heads} heads")
    cfg = {
        "strategy": spec.strategy,
        "dim": dim,
        "depth": spec.depth,
        "heads": spec.heads,
        "image_dim": dims["image_dim"],
        "text_dim": dims["text_dim"],
        "mlp_ratio": spec.mlp_ratio,
        "dropout": spec.dropout,
    }
    if spec.strategy == "cross_attention":
        cfg["pool"] = spec.pool
    if spec.strategy == "hybrid":
        cfg.update(
            text_pooled_dim=dims["text_pooled_dim"], image_pooled_dim=dims["image_pooled_dim"], late_mode=spec.late_mode
        )
    return cfg


def graph_fusion_config(spec, graph, clip: nn.Module) -> dict[str, Any]:
    """The ``fusion`` entry of a graph fusion: the graph settings, and for a strategy other than
    ``graph`` that strategy's own entry as ``inner`` (its features join the alignment features)."""
    from mmcli.errors import MmcliError

    dims = tower_dims(clip)
    dim = spec.dim or dims["text_dim"]
    if graph.layer == "gat" and dim % graph.heads:
        raise MmcliError(f"fusion.graph.heads: the graph width {dim} is not divisible by {graph.heads} heads")
    inner = None
    if spec.strategy != "graph":
        inner = fusion_config(spec.model_copy(update={"graph": None}), clip)
    if graph.local_features and not hasattr(clip.visual, "conv1"):
        raise MmcliError(
            "fusion.graph.local_features: the image tower is not a ViT with patch embeddings; set it to false"
        )
    size = clip.visual.image_size
    return {
        "strategy": "graph",
        "dim": dim,
        "image_dim": dims["image_dim"],
        "text_dim": dims["text_dim"],
        "text_pooled_dim": dims["text_pooled_dim"],
        "image_pooled_dim": dims["image_pooled_dim"],
        "image_size": size if isinstance(size, int) else list(size),
        "graph": graph.model_dump(),
        "inner": inner,
    }


def mask_token_config(clip: nn.Module) -> dict[str, Any]:
    """The ``mask_token`` and ``mlm_head`` entries: [MASK] is one past the tokenizer's last id."""
    return {
        "mask_token": {"id": OPEN_CLIP_VOCAB_SIZE},
        "mlm_head": {"width": tower_dims(clip)["text_dim"], "vocab_size": OPEN_CLIP_VOCAB_SIZE + 1},
    }


def pretrain_modules(clip: nn.Module, objectives: dict[str, Any], fusion) -> dict[str, Any]:
    """The modules config for a pretraining run's enabled ``objectives`` and ``fusion`` spec.

    Only modules some objective uses are created, so no parameter sits idle in a step."""
    modules: dict[str, Any] = {}
    if "caption" in objectives:
        if not is_captioner(clip):
            from mmcli.errors import MmcliError

            raise MmcliError(
                "objectives.caption: model.arch has no caption decoder; use a CoCa architecture "
                "(mmcli-nano-coca, mmcli-tiny-coca, mmcli-small-coca, or an open_clip coca_* model)"
            )
        modules["caption"] = {"image": objectives["caption"].image}
    if "mlm" in objectives or "mmlm" in objectives:
        modules.update(mask_token_config(clip))
    if not set(FUSION_OBJECTIVES) & set(objectives):
        return modules
    modules["fusion"] = fusion_config(fusion, clip)
    dim, text_dim = modules["fusion"]["dim"], tower_dims(clip)["text_dim"]
    if "mmlm" in objectives and dim != text_dim:  # the tied decoder reads text-width states
        modules["mmlm_proj"] = {"in_dim": dim, "out_dim": text_dim}
    if "itm" in objectives:
        modules["itm_head"] = {"dim": dim}
    if "mim" in objectives:
        modules["mim_head"] = {"image_dim": tower_dims(clip)["image_dim"], "dim": dim, "heads": fusion.heads}
    return modules


def build_multimodal(clip: nn.Module, objectives: dict[str, Any], fusion=None) -> MultimodalModel:
    """The model a pretraining run trains: ``clip`` plus the modules its objectives need."""
    return MultimodalModel(clip, pretrain_modules(clip, objectives, fusion))


def open_clip_text_cfg(model: MultimodalModel) -> dict[str, Any]:
    """``text_cfg`` fields a run's ``open_clip_config.json`` must carry for open_clip to rebuild
    this model's text tower: the grown vocabulary and the pooling that ignores [MASK]."""
    if model.mask_token_id is None:
        return {}
    clip = model.clip
    return {"vocab_size": clip.vocab_size, "pool_type": clip.text_pool_type, "eos_id": clip.text_eos_id}
