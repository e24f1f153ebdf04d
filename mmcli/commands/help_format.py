"""How ``mmcli --help`` names values: flags take none, every other parameter a metavar.

Typer 0.29 labels every parameter with its Python type (``--resume <bool>``, ``--set
<list[str]>``) and a required argument as ``{spec}``, so a flag reads as if it took a value. The
command and group classes here give each parameter a click-style metavar instead, once, when the
command lists its parameters: an option's own ``metavar`` wins; otherwise PATH, N, NUMBER or TEXT
by its type, nothing for a flag, and an argument its name in capitals (``SPEC``, ``[QUERY]``).
Imports neither torch nor open_clip: the CLI's import path stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

_TYPE_METAVARS: dict[type, str] = {Path: "PATH", int: "N", float: "NUMBER", str: "TEXT"}


class _Argument(TyperArgument):
    """An argument shown as ``SPEC`` (required) or ``[SPEC]``: its metavar, without Typer's type
    column or the braces Typer puts around a required one in the usage line."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name if self.nargs == 1 else f"{name}..."


def _value_type(param: TyperOption | TyperArgument) -> Any:
    """The type of one value of ``param`` (the element type of a repeatable option)."""
    annotation = param.type_descriptor.annotation
    return get_args(annotation)[0] if get_origin(annotation) in (list, tuple) else annotation


def label(param: Any) -> None:
    """Give ``param`` a click-style metavar (idempotent; an explicit one is kept)."""
    if isinstance(param, TyperArgument):
        if param.metavar is None:
            param.metavar = param.name.upper()
        if type(param) is TyperArgument:
            # Typer builds its own argument class; the subclass only changes how it is displayed.
            param.__class__ = _Argument
    elif isinstance(param, TyperOption) and param.metavar is None:
        param.metavar = "" if param.is_flag else _TYPE_METAVARS.get(_value_type(param), "VALUE")


class _Labelled:
    """Labels every parameter as the command lists them (for its help or its usage line)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            label(param)
        return params


class HelpCommand(_Labelled, TyperCommand):
    """A Typer command whose help shows metavars (see the module docstring)."""


class HelpGroup(_Labelled, TyperGroup):
    """A Typer group whose own options (``--device``, ``--help``) show metavars."""


class App(typer.Typer):
    """``typer.Typer`` whose commands are :class:`HelpCommand` and that show their help when run
    without arguments (``mmcli eval`` alone prints what eval needs, not "model: Field required")."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", HelpGroup)
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", HelpCommand)
        kwargs.setdefault("no_args_is_help", True)
        return super().command(*args, **kwargs)
