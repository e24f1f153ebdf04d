"""A start-up-light text encoder for queries: open_clip's text tower in plain torch.

``import open_clip`` pulls in torchvision and timm and costs about twice ``import torch``. A text
query needs none of that: the standard CLIP text tower is token embedding + positions, pre-LN
residual blocks with causal attention, a final LayerNorm, pooling at the end-of-text token and a
projection. This module runs exactly that from the run's safetensors (reading only the text
weights) and open_clip's own tokenizer module, loaded from its file without importing the
package. ``text_encoder_for`` returns ``None`` for any config outside that standard shape, and
the caller then uses open_clip itself; a test checks both give the same embeddings.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED_TEXT_KEYS = {
    "context_length",
    "vocab_size",
    "width",
    "heads",
    "layers",
    "mlp_ratio",
    "pool_type",
    "eos_id",
    "proj_bias",
    "no_causal_mask",
    "pad_id",
}


def _open_clip_tokenizer_module():
    """open_clip's ``tokenizer.py`` loaded on its own (it imports no other open_clip module)."""
    name = "_mmcli_open_clip_tokenizer"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("open_clip")
    if package is None or not package.submodule_search_locations:
        raise ImportError("open_clip is not installed")
    path = Path(list(package.submodule_search_locations)[0]) / "tokenizer.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def is_standard_text_tower(model_cfg: dict[str, Any]) -> bool:
    """True when the config's text tower is the plain CLIP one this module implements."""
    text = model_cfg.get("text_cfg", {})
    if set(text) - SUPPORTED_TEXT_KEYS or text.get("no_causal_mask"):
        return False
    return text.get("pool_type", "argmax") in ("argmax", "eos") and not model_cfg.get("custom_text")


class FastTextEncoder:
    """Tokenize and encode texts with a CLIP text tower's weights; output L2-normalised [B, D]."""

    def __init__(self, model_cfg: dict[str, Any], weights: dict[str, torch.Tensor]):
        text = model_cfg["text_cfg"]
        self.context_length = text.get("context_length", 77)
        self.heads = text.get("heads", 8)
        self.layers = text.get("layers", 12)
        self.pool_type = text.get("pool_type", "argmax")
        self.eos_id = text.get("eos_id", 49407)
        self.quick_gelu = bool(model_cfg.get("quick_gelu", False))
        self.w = weights
        self.tokenizer = _open_clip_tokenizer_module().SimpleTokenizer(context_length=self.context_length)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """LongTensor [B, context_length], as open_clip's tokenizer gives it."""
        return self.tokenizer(texts)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x) if self.quick_gelu else F.gelu(x)

    def _block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        p = f"transformer.resblocks.{i}."
        w = self.w
        h = F.layer_norm(x, x.shape[-1:], w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        q, k, v = F.linear(h, w[p + "attn.in_proj_weight"], w[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        b, n, d = q.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        a = a.transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(a, w[p + "attn.out_proj.weight"], w[p + "attn.out_proj.bias"])
        h = F.layer_norm(x, x.shape[-1:], w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        h = F.linear(
            self._act(F.linear(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])),
            w[p + "mlp.c_proj.weight"],
            w[p + "mlp.c_proj.bias"],
        )
        return x + h

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] → normalised text embeddings [B, D]."""
        w = self.w
        x = F.embedding(tokens, w["token_embedding.weight"]) + w["positional_embedding"][: tokens.shape[1]]
        for i in range(self.layers):
            x = self._block(x, i)
        x = F.layer_norm(x, x.shape[-1:], w["ln_final.weight"], w["ln_final.bias"])
        if self.pool_type == "argmax":
            idx = tokens.argmax(dim=-1)
        else:
            idx = (tokens == self.eos_id).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0]), idx]
        proj = w["text_projection"] if "text_projection" in w else w["text_projection.weight"].T
        pooled = pooled @ proj
        if "text_projection.bias" in w:
            pooled = pooled + w["text_projection.bias"]
        return F.normalize(pooled, dim=-1)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(texts))


TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def text_encoder_for(run_dir: Path) -> FastTextEncoder | None:
    """The fast encoder for a run folder's text tower, or ``None`` when its config is not standard."""
    from safetensors import safe_open

    from mmcli import io
    from mmcli.models.weights import verify_files

    run_dir = Path(run_dir)
    verify_files(run_dir, io.read_meta(run_dir), (io.OPEN_CLIP_WEIGHTS,))
    config = json.loads((run_dir / io.OPEN_CLIP_CONFIG).read_text(encoding="utf-8"))
    model_cfg = config.get("model_cfg", config)
    if not is_standard_text_tower(model_cfg):
        return None
    weights = {}
    with safe_open(str(run_dir / io.OPEN_CLIP_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            if key.startswith(TEXT_PREFIXES):
                weights[key] = f.get_tensor(key).float()
    return FastTextEncoder(model_cfg, weights)
