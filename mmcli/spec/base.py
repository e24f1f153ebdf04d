"""The base of every spec section, and reading, overriding and validating a spec YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mmcli.errors import MmcliError


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``train.lr=3e-4`` into ``(["train", "lr"], 3e-4)``; the value is parsed as YAML."""
    if "=" not in text:
        raise MmcliError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    key, _, raw = text.partition("=")
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise MmcliError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw spec mapping, creating sections as needed."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise MmcliError(f"--set {text!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MmcliError(f"{path}: no such spec file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise MmcliError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MmcliError(f"{path}: a spec must be a YAML mapping, not {type(data).__name__}")
    return data


def validate(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    """Validate ``data`` as ``model``, turning the first error into one clear line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise MmcliError(f"{source}: {loc}: {msg}{more}") from None


def load_spec(path: str | Path, model: type[BaseModel], overrides: list[str] | None = None) -> Any:
    """Load ``path`` as a spec of type ``model`` with ``--set`` overrides applied."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    return validate(model, data, str(path))
