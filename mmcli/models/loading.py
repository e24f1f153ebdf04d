"""Load a model for inference from a run folder or an ``ARCH[:PRETRAINED]`` reference."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmcli import io
from mmcli.errors import MmcliError
from mmcli.models.multimodal import MultimodalModel
from mmcli.models.weights import load_weights_into, verify_files


@dataclass
class LoadedModel:
    """A model ready to embed, with what is needed to feed it and to name it in an index."""

    model: MultimodalModel
    preprocess: Callable
    """PIL image → tensor (deterministic, open_clip's validation transform)."""
    tokenizer: Callable
    """list[str] → LongTensor[B, L]."""
    ref: str
    """The reference the model was loaded from (a run folder or ``ARCH[:PRETRAINED]``)."""
    arch: str
    checksum: str
    """``sha256:…`` of the dual encoder's weights file, or of the architecture name for a random init."""
    meta: dict[str, Any]
    """The run folder's ``mmcli.json`` (empty for a bare architecture)."""

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.clip.visual.preprocess_cfg["size"]
        return (size, size) if isinstance(size, int) else tuple(size)


def load_model(ref: str, *, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a run folder (with its extra modules) or build ``ARCH[:PRETRAINED]``; eval mode."""
    if io.is_run_dir(ref):
        loaded = _load_run(Path(ref), device)
    elif Path(ref).exists():
        raise MmcliError(f"{ref}: not an mmcli run folder (no {io.MMCLI_META})")
    else:
        loaded = _load_arch(ref, device)
    loaded.model.eval()
    return loaded


def _load_run(run_dir: Path, device) -> LoadedModel:
    import open_clip

    from mmcli.models.encoders import _quiet_open_clip

    meta = io.read_meta(run_dir)
    verify_files(run_dir, meta, (io.OPEN_CLIP_WEIGHTS, io.EXTRA_WEIGHTS))
    from safetensors import SafetensorError

    try:
        with _quiet_open_clip():
            clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run_dir}", device="cpu")
    except SafetensorError as exc:
        raise MmcliError(f"{run_dir / io.OPEN_CLIP_WEIGHTS}: not a readable safetensors file ({exc})") from None
    tokenizer = open_clip.get_tokenizer(f"local-dir:{run_dir}")
    model = MultimodalModel.from_modules(clip, meta.get("modules", {}))
    load_weights_into(run_dir, model)
    return LoadedModel(
        model=model.to(device),
        preprocess=preprocess,
        tokenizer=tokenizer,
        ref=str(run_dir.resolve()),
        arch=meta.get("arch", "?"),
        checksum=meta.get("checksum") or io.cached_checksum(run_dir / io.OPEN_CLIP_WEIGHTS),
        meta=meta,
    )


def _is_architecture(name: str) -> bool:
    import open_clip

    from mmcli.models.architectures import PRESETS

    return name in PRESETS or name in open_clip.list_models()


def _load_arch(ref: str, device) -> LoadedModel:
    from pydantic import ValidationError

    from mmcli.errors import describe_validation_error
    from mmcli.models.encoders import build_dual_encoder
    from mmcli.spec import ModelSpec

    arch, _, pretrained = ref.partition(":") if not ref.startswith("hf-hub:") else (ref, "", "")
    if not pretrained and not arch.startswith("hf-hub:"):
        if not _is_architecture(arch):
            raise MmcliError(f"--model {ref}: no such run folder (and not an open_clip architecture name)")
        raise MmcliError(
            f"--model {ref}: an architecture without weights embeds nothing useful; give a run folder "
            f"(runs/NAME) or ARCH:PRETRAINED (a weights file or an open_clip tag)"
        )
    try:
        model_spec = ModelSpec(arch=arch, pretrained=pretrained or None)
    except ValidationError as exc:
        raise MmcliError(f"--model {ref}: {describe_validation_error(exc)}") from None
    encoder = build_dual_encoder(model_spec, device="cpu")
    if pretrained and Path(pretrained).is_file():
        checksum = io.file_checksum(Path(pretrained))
    else:  # a hub tag names fixed published weights
        checksum = "sha256:" + hashlib.sha256(f"{arch}:{pretrained}".encode()).hexdigest()
    return LoadedModel(
        model=MultimodalModel(encoder.model).to(device),
        preprocess=encoder.preprocess_val,
        tokenizer=encoder.tokenizer,
        ref=ref,
        arch=arch,
        checksum=checksum,
        meta={},
    )
