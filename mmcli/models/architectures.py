"""Checks of a model spec that need neither torch nor open_clip, so that a misspelt
``model.arch`` or ``model.pretrained`` path is reported before a run imports torch (seconds).

The names open_clip knows are the file names of its ``model_configs`` folder (what
``open_clip.list_models()`` lists), read without importing the package; the mmcli presets are
the ``configs/*.json`` beside this module.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from mmcli.errors import MmcliError
from mmcli.spec import ModelSpec, check_arch_name
from mmcli.spec.common import ARCH_REFERENCE_PREFIXES

PRESET_DIR = Path(__file__).parent / "configs"
PRESETS = tuple(sorted(p.stem for p in PRESET_DIR.glob("*.json")))
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@lru_cache(maxsize=1)
def open_clip_names() -> frozenset[str] | None:
    """The architecture names of open_clip's config folder, or None where it cannot be found
    (open_clip not installed, or laid out otherwise: then only the build checks the name)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model_configs"
    return frozenset(p.stem for p in folder.glob("*.json")) if folder.is_dir() else None


def unknown_architecture(arch: str) -> MmcliError:
    """The one message for an architecture name neither open_clip nor mmcli knows."""
    return MmcliError(
        f"model.arch: unknown architecture {arch!r}; use an open_clip.list_models() name, "
        f"an mmcli preset ({', '.join(PRESETS)}), or give model.config"
    )


def is_local_file(value: str) -> bool:
    """Whether ``value`` names an existing file (``~`` expanded)."""
    return Path(value).expanduser().is_file()


def check_model_spec(spec: ModelSpec) -> None:
    """Refuse an unknown ``model.arch`` (or one that is not a plain name, for an inline config)
    and a ``model.pretrained`` that looks like a path (a ``/`` or a weights suffix) but names no
    file, without importing torch or open_clip."""
    if spec.config is not None:
        try:
            check_arch_name(spec.arch)  # the inline config is registered under this name
        except ValueError as exc:
            raise MmcliError(f"model.arch: {exc}") from None
    elif not spec.arch.startswith(ARCH_REFERENCE_PREFIXES) and spec.arch not in PRESETS:
        names = open_clip_names()
        if names is not None and spec.arch not in names:
            raise unknown_architecture(spec.arch)
    pretrained = spec.pretrained
    if pretrained is not None and not pretrained.startswith(ARCH_REFERENCE_PREFIXES) and not is_local_file(pretrained):
        if "/" in pretrained or pretrained.endswith(WEIGHTS_SUFFIXES):
            raise MmcliError(f"model.pretrained: no such file {pretrained!r}")
