"""Dual encoders from open_clip: mmcli presets, inline configs, local or hub weights.

The presets are ordinary open_clip model configs (``configs/*.json``) registered with
``open_clip.add_model_config``, so every mmcli model is also an open_clip model.
"""

from __future__ import annotations

import json
import logging
import pickle
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import SafetensorError
from torch import nn

from mmcli.errors import MmcliError
from mmcli.models.architectures import PRESET_DIR, check_model_spec, is_local_file, unknown_architecture
from mmcli.models.hub import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, local_weights
from mmcli.spec import ModelSpec, check_arch_name

_registered = False


def register_presets() -> None:
    """Make the mmcli presets (``mmcli-tiny``, …) known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(PRESET_DIR)
        _registered = True


def register_config(name: str, config: dict[str, Any]) -> None:
    """Register an inline open_clip model config under ``name`` (a plain model name, never a path).

    open_clip registers a config file under its file stem and reads it at once, so the file is
    written to a private temporary folder that is removed again before this returns."""
    try:
        check_arch_name(name)
    except ValueError as exc:
        raise MmcliError(f"model.arch: {exc}") from None
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        # open_clip would skip such a file silently and build whatever else has the name.
        raise MmcliError(f"model.config: not an open_clip model config (missing {', '.join(missing)})")
    with tempfile.TemporaryDirectory(prefix="mmcli-config-") as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(config, allow_nan=False), encoding="utf-8")
        open_clip.add_model_config(path)


@dataclass
class DualEncoder:
    """An open_clip model with everything needed to feed it."""

    model: nn.Module
    """The open_clip ``CLIP`` module."""
    preprocess_train: Callable
    """PIL image → tensor, with open_clip's training augmentation."""
    preprocess_val: Callable
    """PIL image → tensor, deterministic."""
    tokenizer: Callable
    """list[str] → LongTensor[B, context_length]."""
    model_config: dict[str, Any]
    """The open_clip model config the model was built from."""
    preprocess_config: dict[str, Any]
    """The open_clip preprocess config (image size, mean, std, interpolation, resize mode)."""


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    # open_clip logs "model initialized randomly" as a warning; that is the normal case here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def build_dual_encoder(spec: ModelSpec, *, device: str | torch.device = "cpu") -> DualEncoder:
    """Build the dual encoder named by ``spec`` (random init, a local file, or a hub tag)."""
    check_model_spec(spec)  # what is known without open_clip (commands check it before importing torch)
    register_presets()
    if spec.config is not None:
        register_config(spec.arch, spec.config)
    if spec.arch not in open_clip.list_models() and not spec.arch.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        raise unknown_architecture(spec.arch)
    pretrained = spec.pretrained
    if pretrained is not None and pretrained.startswith("hf-hub:"):
        arch, pretrained = pretrained, None
    else:
        arch = spec.arch
    hub_weights = pretrained is not None or arch.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX))
    arch, pretrained = local_weights(arch, pretrained)  # cached, or fetched with one try
    try:
        with _quiet_open_clip():
            model, pre_train, pre_val = open_clip.create_model_and_transforms(
                arch,
                pretrained=str(Path(pretrained).expanduser())
                if pretrained and is_local_file(pretrained)
                else pretrained,
                device=device,
                weights_only=True,
            )
    except pickle.UnpicklingError as exc:
        # torch.load(weights_only=True) met a pickled object that is not a tensor: loading it
        # would run code from the file.
        raise MmcliError(
            f"model.pretrained: {pretrained}: refused, the file holds pickled Python objects that "
            f"torch.load(weights_only=True) will not load ({_first_line(exc)}); use a .safetensors "
            "file, or convert this one where you trust it"
        ) from None
    except (RuntimeError, OSError, ValueError, SafetensorError) as exc:
        raise _weights_error(spec, exc) from None
    if not hub_weights:  # a CoCa decoder loaded from hub weights keeps its projection
        init_caption_decoder(model)
    tokenizer = open_clip.get_tokenizer(arch)
    return DualEncoder(
        model=model,
        preprocess_train=pre_train,
        preprocess_val=pre_val,
        tokenizer=tokenizer,
        model_config=open_clip.get_model_config(arch) or {},
        preprocess_config=dict(model.visual.preprocess_cfg),
    )


def init_caption_decoder(model: nn.Module) -> None:
    """Initialise a fresh CoCa decoder's vocabulary projection, which open_clip leaves as
    ``torch.empty`` (whatever the memory held): normal with std width^-0.5, as CLIP's text
    projection. Other models are left alone."""
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None and getattr(decoder, "text_projection", None) is not None:
        with torch.no_grad():
            nn.init.normal_(decoder.text_projection, std=decoder.width**-0.5)


def _weights_error(spec: ModelSpec, exc: Exception) -> MmcliError:
    """An actionable message when weights cannot be had (usually: offline)."""
    what = spec.pretrained or spec.arch
    if spec.pretrained and not is_local_file(spec.pretrained):
        return MmcliError(
            f"model.pretrained: could not get weights {what!r} for {spec.arch!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160]}). Offline? Download them on a connected machine, e.g. "
            f"`python -c \"import open_clip; open_clip.create_model('{spec.arch}', pretrained='{what}')\"` "
            f"(cached under ~/.cache/huggingface), or fetch the .safetensors file and set "
            f"model.pretrained to its local path"
        )
    return MmcliError(f"model: could not build {spec.arch!r} from {what!r}: {str(exc).splitlines()[0][:200]}")


def _first_line(exc: Exception) -> str:
    """What torch's long refusal message says was refused ("Unsupported global: GLOBAL …")."""
    text = " ".join(str(exc).split())
    start = text.find("Unsupported global")
    detail = text[start:].split(". ")[0] if start >= 0 else text.split(". ")[0]
    return detail[:160]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
