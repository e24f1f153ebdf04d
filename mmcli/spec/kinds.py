"""The spec kinds by file name: :data:`SPEC_KINDS` and :func:`spec_model_for`."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from mmcli.errors import MmcliError
from mmcli.spec.evaluate import EvalSpec
from mmcli.spec.fuse import FuseSpec
from mmcli.spec.pretrain import PretrainSpec

SPEC_KINDS: dict[str, type[BaseModel]] = {"pretrain": PretrainSpec, "fuse": FuseSpec, "eval": EvalSpec}
"""Spec type by the first word of a spec file's name (``pretrain.yaml``, ``pretrain-small.yaml``)."""


def spec_model_for(path: str | Path) -> type[BaseModel]:
    """The spec type of a file, judged by its name's first word (see :data:`SPEC_KINDS`)."""
    stem = Path(path).stem.split("-")[0].split("_")[0]
    if stem not in SPEC_KINDS:
        raise MmcliError(f"{path}: cannot tell the spec kind from the file name (expected one of {sorted(SPEC_KINDS)})")
    return SPEC_KINDS[stem]
