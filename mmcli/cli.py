"""The ``mmcli`` command line: parse, call one ``run`` per command, format errors.

Nothing heavy is imported at module level (no torch, no open_clip), so ``mmcli --help`` is
instant; each command imports its implementation when it runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mmcli import __version__
from mmcli.errors import MmcliError, reported_errors

app = typer.Typer(
    name="mmcli",
    help="Multimodal (image + text) models from the command line: pretrain, embed, retrieve, fuse, eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Built-in datasets (generated locally, nothing is downloaded).", no_args_is_help=True)
app.add_typer(data_app, name="data")

# Reusable option types ----------------------------------------------------------------------------
SpecArg = Annotated[Path, typer.Argument(help="Run spec (YAML).", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a spec field, e.g. --set train.lr=3e-4 (repeatable).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


class State:
    """Options of the top-level callback, shared by every command."""

    device: str = "auto"


def _version(value: bool) -> None:
    if value:
        print(f"mmcli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    device: Annotated[
        str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")
    ] = "auto",
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Options that apply to every command."""
    State.device = device


def emit(result: dict[str, Any], as_json: bool, render) -> None:
    """Print ``result`` as JSON on stdout or through ``render`` (a rich table)."""
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        render(result)


# Commands ------------------------------------------------------------------------------------------------
@data_app.command("shapes")
def data_shapes(
    out: Annotated[Path, typer.Option("--out", help="Output folder.", show_default=False)],
    n: Annotated[int, typer.Option("--n", min=1, help="Training images (val/test/classify are sized from it).")] = 2000,
    size: Annotated[int, typer.Option("--size", min=32, help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same bytes).")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Generate the synthetic shapes dataset: images, captions, boxes and questions."""
    with reported_errors():
        from mmcli.commands.data import run_shapes
        from mmcli.render import render_data_summary

        emit(run_shapes(out, n=n, size=size, seed=seed), as_json, render_data_summary)


@app.command()
def pretrain(
    spec: SpecArg,
    overrides: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the spec's run folder.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a CLIP-style dual encoder (plus MLM/ITM objectives) from a run spec."""
    with reported_errors():
        from mmcli.commands.pretrain import run
        from mmcli.render import render_pretrain_summary

        result = run(spec, overrides or [], resume=resume, device=State.device)
        if result.get("is_main", True):
            emit(result, as_json, render_pretrain_summary)
        if result.get("interrupted"):
            raise typer.Exit(130)


def _not_yet(name: str) -> None:
    with reported_errors():
        raise MmcliError(f"`mmcli {name}` is not yet available in this version")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def embed() -> None:
    """Embed a folder of images, a dataset file or a text file into an index (not yet available)."""
    _not_yet("embed")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def retrieve() -> None:
    """Search an embedding index with a text or an image (not yet available)."""
    _not_yet("retrieve")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def fuse() -> None:
    """Train or apply a fusion head for VQA / image–text matching (not yet available)."""
    _not_yet("fuse")


@app.command("eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def evaluate() -> None:
    """Zero-shot classification, retrieval recall, linear probe, VQA/ITM/MLM accuracy (not yet available)."""
    _not_yet("eval")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="mmcli")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
