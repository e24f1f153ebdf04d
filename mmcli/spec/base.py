"""The base of every spec section, and reading, overriding and validating a spec YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mmcli.errors import MmcliError, describe_validation_error


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors, field docstrings are descriptions, and
    every number must be finite (``.inf`` or ``.nan`` would train a model of NaNs and exit 0)."""

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, protected_namespaces=(), allow_inf_nan=False
    )


# --------------------------------------------------------------------------------------------
# YAML with bounded aliases
# --------------------------------------------------------------------------------------------

MAX_SPEC_VALUES = 100_000
"""The most values (mappings, lists and scalars) a spec may hold once its YAML aliases are
expanded. Anchors and aliases (``&a`` … ``*a``) are allowed for reuse, but a few lines of nested
aliases can stand for billions of values ("billion laughs"), which every later copy of the spec
(the run folder's ``spec.yaml``, an inline ``model.config``) would write out in full."""


class SpecYamlError(Exception):
    """A YAML document that is well-formed but not acceptable as a spec."""


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses documents expanding past :data:`MAX_SPEC_VALUES` values."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _check_expansion(node)
        return node


def _check_expansion(root: yaml.Node) -> None:
    """Count the values of ``root`` with every alias expanded (each distinct node once, memoised:
    linear in the document's size) and refuse recursive aliases."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise SpecYamlError("a recursive alias (an anchor used inside itself)")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_SPEC_VALUES:
                raise SpecYamlError(
                    f"its aliases expand to more than {MAX_SPEC_VALUES:,} values; a spec is never this large"
                )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)


def load_yaml_text(text: str) -> Any:
    """Parse YAML like ``yaml.safe_load``, refusing alias expansions past :data:`MAX_SPEC_VALUES`
    (:class:`SpecYamlError`) as well as malformed YAML (``yaml.YAMLError``)."""
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise SpecYamlError("nested too deeply") from None


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
        value = load_yaml_text(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    except SpecYamlError as exc:
        raise MmcliError(f"--set {key.strip()}: {exc}") from None
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
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise MmcliError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except SpecYamlError as exc:
        raise MmcliError(f"{path}: not accepted as a spec: {exc}") from None
    except UnicodeDecodeError as exc:
        raise MmcliError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MmcliError(f"{path}: a spec must be a YAML mapping, not {type(data).__name__}")
    return data


def validate(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    """Validate ``data`` as ``model``; every mistake is named, on one line, separated by ``;``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise MmcliError(f"{source}: {describe_validation_error(exc)}") from None


def load_spec(path: str | Path, model: type[BaseModel], overrides: list[str] | None = None) -> Any:
    """Load ``path`` as a spec of type ``model`` with ``--set`` overrides applied."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    return validate(model, data, str(path))
