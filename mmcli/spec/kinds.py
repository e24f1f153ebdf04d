"""The spec kinds: :data:`SPEC_KINDS`, the kind of a file by its name or by its keys, and
:func:`load_spec_of_kind`, which names a file given to the wrong command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mmcli.errors import MmcliError
from mmcli.spec.base import apply_overrides, read_yaml, validate
from mmcli.spec.evaluate import EvalSpec
from mmcli.spec.fuse import FuseSpec
from mmcli.spec.pretrain import PretrainSpec

SPEC_KINDS: dict[str, type[BaseModel]] = {"pretrain": PretrainSpec, "fuse": FuseSpec, "eval": EvalSpec}
"""Spec type by kind, which is also the command that runs it (``mmcli pretrain``, ``mmcli fuse``,
``mmcli eval``) and the first word of a spec file's name (``pretrain.yaml``, ``pretrain-small.yaml``)."""


def spec_model_for(path: str | Path) -> type[BaseModel]:
    """The spec type of a file, judged by its name's first word (see :data:`SPEC_KINDS`)."""
    stem = Path(path).stem.split("-")[0].split("_")[0]
    if stem not in SPEC_KINDS:
        raise MmcliError(f"{path}: cannot tell the spec kind from the file name (expected one of {sorted(SPEC_KINDS)})")
    return SPEC_KINDS[stem]


def _fits(data: dict[str, Any], model: type[BaseModel], *, complete: bool) -> bool:
    """Whether every top-level key of ``data`` is a field of ``model`` (and, when ``complete``,
    every required field is there)."""
    fields = model.model_fields
    if not set(data) <= set(fields):
        return False
    return not complete or all(name in data for name, field in fields.items() if field.is_required())


def kind_of(data: dict[str, Any], expected: str) -> str | None:
    """The other kind that a spec mapping given as ``expected`` really is, or None.

    Judged by the top-level keys alone, so that a file of one kind is named as such even when
    its values would not validate: it is another kind when some of its keys are not fields of
    ``expected`` while exactly one other kind has all its keys and all its required fields. A
    file of the right kind with a misspelt key falls through to the usual "unknown key"."""
    if _fits(data, SPEC_KINDS[expected], complete=False):
        return None
    others = [kind for kind, model in SPEC_KINDS.items() if kind != expected and _fits(data, model, complete=True)]
    return others[0] if len(others) == 1 else None


def check_kind(path: str | Path, data: dict[str, Any], expected: str) -> None:
    """Refuse, in one line naming the right command, a spec file of another kind than ``expected``."""
    other = kind_of(data, expected)
    if other is not None:
        article = "an" if other[0] in "aeiou" else "a"
        raise MmcliError(f"{path} is {article} {other} spec: run it with mmcli {other}")


def load_spec_of_kind(path: str | Path, kind: str, overrides: list[str] | None = None) -> Any:
    """Load ``path`` as a spec of ``kind`` with ``--set`` overrides applied; a file of another kind
    is named as such (:func:`check_kind`) instead of listing every field it gets wrong."""
    data = read_yaml(path)
    check_kind(path, data, kind)
    return validate(SPEC_KINDS[kind], apply_overrides(data, list(overrides or [])), str(path))
