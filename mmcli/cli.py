"""The ``mmcli`` command line: parse, call one ``run`` per command, format errors.

Nothing heavy is imported at module level (no torch, no open_clip), so ``mmcli --help`` is
instant; each command imports its implementation when it runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mmcli import __version__
from mmcli.commands.help_format import App
from mmcli.errors import MmcliError, reported_errors
from mmcli.io import DEFAULT_IMAGE_KEY, DEFAULT_TEXT_KEY

app = App(
    name="mmcli",
    help="Multimodal (image + text) models from the command line: pretrain, embed, retrieve, serve, caption, "
    "generate, fuse, eval.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
)
data_app = App(help="Built-in datasets (generated locally, nothing is downloaded).", no_args_is_help=True)
app.add_typer(data_app, name="data")
index_app = App(help="FAISS indexes of embedding indexes, built ahead of time.", no_args_is_help=True)
app.add_typer(index_app, name="index")

# Reusable option types ----------------------------------------------------------------------------
SpecArg = Annotated[Path, typer.Argument(help="Run spec (YAML).", show_default=False)]


def set_option(example: str) -> Any:
    """The ``--set`` option, with an ``example`` override that this command's spec accepts."""
    return Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help=f"Override a spec field, e.g. --set {example} (repeatable).",
            show_default=False,
        ),
    ]


SET_EXAMPLES = {"pretrain": "train.lr=3e-4", "fuse": "fusion.strategy=late", "eval": "batch_size=32"}
"""Per command, a ``--set`` example its spec accepts (tests/test_cli.py applies each one)."""
PretrainSetOpt = set_option(SET_EXAMPLES["pretrain"])
FuseSetOpt = set_option(SET_EXAMPLES["fuse"])
EvalSetOpt = set_option(SET_EXAMPLES["eval"])
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        metavar="DEVICE",
        help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps (default: mmcli --device, else auto).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
NoDraftOpt = Annotated[
    bool,
    typer.Option("--no-draft", help="Decode JPEGs at full size (slower, resampling closer to the full-size pipeline)."),
]
ImageKeyOpt = Annotated[str, typer.Option("--image-key", help="Image column/key of a dataset file.")]


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
        str,
        typer.Option("--device", metavar="DEVICE", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."),
    ] = "auto",
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Options that apply to every command."""
    State.device = device


def chosen_device(device: str | None) -> str:
    """A command's ``--device``, else the one given before the command (``mmcli --device cpu embed …``)."""
    return device or State.device


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
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace files of the dataset's names in OUT that mmcli data shapes did not write."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate the synthetic shapes dataset: images, captions, boxes and questions."""
    with reported_errors():
        from mmcli.commands.data import run_shapes
        from mmcli.commands.render import render_data_summary

        emit(run_shapes(out, n=n, size=size, seed=seed, overwrite=overwrite), as_json, render_data_summary)


@index_app.command("build")
def index_build(
    index: Annotated[str, typer.Argument(help="The index (.npy, or the base name of its shards).", show_default=False)],
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            metavar="SIZE",
            help="Memory the FAISS index may use, e.g. 2GB (default: half this machine's): "
            "IVF-Flat while the vectors fit, IVF-PQ with exact re-ranking when they do not.",
            show_default=False,
        ),
    ] = None,
    kind: Annotated[str, typer.Option("--kind", help="auto, flat, ivf, ivfpq or hnsw.")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Build the FAISS file retrieve --faiss and serve --faiss use (emb.npy.faiss), under a memory budget."""
    with reported_errors():
        from mmcli.commands.index import build
        from mmcli.commands.render import render_index_build

        emit(build(index, max_memory=max_memory, kind=kind), as_json, render_index_build)


@app.command()
def pretrain(
    spec: SpecArg,
    overrides: PretrainSetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the spec's run folder.")] = False,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a CLIP-style dual encoder (plus MLM, ITM, MIM or CoCa caption objectives) from a run spec."""
    with reported_errors():
        from mmcli.commands.pretrain import run
        from mmcli.commands.render import render_pretrain_summary

        result = run(spec, overrides or [], resume=resume, device=chosen_device(device))
        if result.get("is_main", True):
            emit(result, as_json, render_pretrain_summary)
        if result.get("interrupted"):
            raise typer.Exit(130)


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        metavar="MODEL",
        help="A run folder (runs/NAME) or ARCH:PRETRAINED (a weights file or an open_clip tag); default: "
        "$MMCLI_MODEL, else model in ~/.config/mmcli/config.toml, else ViT-B-32:laion2b_s34b_b79k (docs/models.md).",
        show_default=False,
    ),
]


@app.command()
def embed(
    path: Annotated[
        str,
        typer.Argument(
            help="A folder of images, a CSV/TSV/JSONL dataset file, webdataset shards "
            "(dir, .tar or {00000..00009}.tar) or a text file (one text a line).",
            show_default=False,
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out", metavar="PATH", help="The index file (.npy); its sidecar is OUT.json.", show_default=False
        ),
    ],
    model: ModelOpt = None,
    modality: Annotated[
        str, typer.Option("--modality", help="auto (images, texts for a .txt file), image or text.")
    ] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or float16 rows.")] = "float32",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Items per forward pass.")] = 64,
    workers: Annotated[int, typer.Option("--workers", min=0, help="DataLoader processes decoding images.")] = 2,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start over (and replace a complete index) instead of resuming.")
    ] = False,
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="Bring a complete OUT up to date: embed new and changed files (size + mtime), drop deleted ones, "
            "copy the rest.",
        ),
    ] = False,
    no_draft: NoDraftOpt = False,
    image_key: ImageKeyOpt = DEFAULT_IMAGE_KEY,
    text_key: Annotated[str, typer.Option("--text-key", help="Text column/key of a dataset file.")] = DEFAULT_TEXT_KEY,
    keep_columns: Annotated[
        str | None,
        typer.Option(
            "--keep-columns",
            help="Columns of a CSV/TSV/JSONL input to keep in the index's metadata, comma-separated: url,license.",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Embed images or texts into an index: OUT (.npy), OUT.json (its sidecar), OUT.parquet (metadata).

    OUT holds L2-normalised rows; OUT.parquet the rows' captions, file signatures and kept columns.
    Re-running into the same OUT resumes an interrupted run; bad images are
    skipped and listed in the sidecar. Under torchrun every rank writes its own
    shard, read by retrieve as one index.
    """
    with reported_errors():
        if modality not in ("auto", "image", "text"):
            raise MmcliError(f"--modality {modality}: choose auto, image or text")
        if dtype not in ("float32", "float16"):
            raise MmcliError(f"--dtype {dtype}: choose float32 or float16")
        from mmcli.commands.embed import run
        from mmcli.commands.render import render_embed_summary, report_notes

        result = run(
            path,
            out,
            model=model,
            modality=modality,
            dtype=dtype,
            batch_size=batch_size,
            workers=workers,
            overwrite=overwrite,
            update=update,
            draft=not no_draft,
            image_key=image_key,
            text_key=text_key,
            keep_columns=tuple(c.strip() for c in (keep_columns or "").split(",") if c.strip()),
            device=chosen_device(device),
        )
        if result["is_main"]:
            report_notes(result)
            emit(result, as_json, render_embed_summary)


@app.command()
def caption(
    path: Annotated[
        str,
        typer.Argument(
            help="An image, a folder of images (searched recursively), a CSV/TSV/JSONL dataset file "
            "or webdataset shards (dir, .tar or {00000..00009}.tar).",
            show_default=False,
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            metavar="PATH",
            help='The captions file (.jsonl): one {"item", "caption", "score"} a line; its sidecar is OUT.meta.json.',
            show_default=False,
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            metavar="PATH",
            help="A run folder trained with the caption objective (a CoCa architecture); "
            "when resuming, the run the job started with.",
            show_default=False,
        ),
    ] = None,
    decoding: Annotated[
        str,
        typer.Option(
            "--decoding",
            help="greedy: the most likely token; beam: beam search (--beams); "
            "top-p: nucleus sampling (--top-p, --temperature, --seed).",
        ),
    ] = "greedy",
    beams: Annotated[int, typer.Option("--beams", help="Hypotheses kept per image by beam search.")] = 3,
    top_p: Annotated[
        float,
        typer.Option("--top-p", help="Top-p samples from the most likely tokens whose probabilities sum to this."),
    ] = 0.9,
    temperature: Annotated[
        float, typer.Option("--temperature", help="Top-p divides the logits by this before sampling.")
    ] = 1.0,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="At most this many tokens a caption (at most the model's context).")
    ] = 30,
    min_tokens: Annotated[int, typer.Option("--min-tokens", help="At least this many tokens a caption.")] = 0,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", help="Top-p seed; each image draws from its own generator, seeded from (seed, its key)."
        ),
    ] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader processes decoding images.")] = 2,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start over (and replace a complete OUT) instead of resuming.")
    ] = False,
    no_draft: NoDraftOpt = False,
    image_key: ImageKeyOpt = DEFAULT_IMAGE_KEY,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Caption images with a CoCa run: OUT (.jsonl, one {item, caption, score} a line) and OUT.meta.json.

    Rows are written to OUT.partial as batches finish; OUT appears only when
    every image is done. Re-running the same command resumes an interrupted run;
    bad images are skipped and listed in the sidecar. Under torchrun every rank
    writes its own shard (OUT with .rank00000-of-00008 before .jsonl, its sidecar
    beside it): cat them in rank order to combine them.
    """
    with reported_errors():
        from mmcli.commands.caption import run
        from mmcli.commands.render import render_caption_summary

        result = run(
            path,
            out,
            model=model,
            decoding=decoding,
            beams=beams,
            top_p=top_p,
            temperature=temperature,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            seed=seed,
            batch_size=batch_size,
            workers=workers,
            overwrite=overwrite,
            draft=not no_draft,
            image_key=image_key,
            device=chosen_device(device),
        )
        if result["is_main"]:
            emit(result, as_json, render_caption_summary)


@app.command()
def generate(
    prompt: Annotated[
        str | None, typer.Argument(help="The prompt (or give --prompts FILE).", show_default=False)
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            metavar="PATH",
            help="A run folder trained by mmcli fuse with task: generate.",
            show_default=False,
        ),
    ] = ...,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            metavar="PATH",
            help="A new folder: one PNG per picture, sheet.png and generated.jsonl (prompt, seed, file, settings).",
            show_default=False,
        ),
    ] = ...,
    prompts_file: Annotated[
        str | None,
        typer.Option("--prompts", metavar="PATH", help="A text file of prompts, one a line.", show_default=False),
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Pictures per prompt.")] = 4,
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps (ddpm: every training timestep).")] = 25,
    guidance: Annotated[
        float,
        typer.Option("--guidance", help="Classifier-free guidance scale: 0 ignores the prompt, 1 plain conditional."),
    ] = 3.0,
    sampler: Annotated[
        str, typer.Option("--sampler", help="ddim (deterministic), dpm (DPM-Solver++, deterministic) or ddpm.")
    ] = "ddim",
    seed: Annotated[
        int, typer.Option("--seed", help="Each picture's noise comes from (seed, prompt, sample number).")
    ] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pictures denoised together.")] = 64,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Draw pictures of prompts with a text-to-image run (mmcli fuse, task: generate).

    The same seed gives the same pictures. OUT must be new (or empty): the
    pictures go to OUT.partial and are renamed to OUT only when all are written.
    """
    with reported_errors():
        from mmcli.commands.generate import run
        from mmcli.commands.render import render_generate_summary

        result = run(
            prompt,
            out,
            model=model,
            prompts_file=prompts_file,
            n=n,
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            seed=seed,
            batch_size=batch_size,
            device=chosen_device(device),
        )
        emit(result, as_json, render_generate_summary)


@app.command()
def retrieve(
    query: Annotated[
        str | None, typer.Argument(help="A text, or an image file (detected by its suffix).", show_default=False)
    ] = None,
    index: Annotated[
        str | None,
        typer.Option("--index", metavar="PATH", help="The index (.npy) written by embed.", show_default=False),
    ] = None,
    folder: Annotated[
        str | None,
        typer.Option(
            "--in",
            metavar="FOLDER",
            help="Search this folder's images instead of --index: embedded into a cache on first use, "
            "updated (new, changed, deleted files) on each search (docs/serving.md).",
            show_default=False,
        ),
    ] = None,
    paths: Annotated[
        bool, typer.Option("--paths", help="Print only the hits' absolute paths, one a line (for piping).")
    ] = False,
    k: Annotated[int, typer.Option("--k", min=1, help="Results per query.")] = 10,
    queries: Annotated[
        str | None, typer.Option("--queries", metavar="PATH", help="A file of queries, one a line.", show_default=False)
    ] = None,
    image: Annotated[bool, typer.Option("--image", help="Treat every query as an image file.")] = False,
    use_faiss: Annotated[
        bool,
        typer.Option(
            "--faiss", help="Search with a FAISS index (built next to the .npy on first use); automatic above 2M rows."
        ),
    ] = False,
    grid: Annotated[
        str | None,
        typer.Option(
            "--grid", metavar="PATH", help="Write a contact sheet (PNG) of the top-k images.", show_default=False
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Let --grid replace an existing file mmcli did not write (never an index or run-folder file).",
        ),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            metavar="PATH",
            help="The run folder that made the index, if it has moved (default: the sidecar's; checksums must match); "
            "with --in, the model to embed the folder with (default as embed's).",
            show_default=False,
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            min=-1.0,
            max=1.0,
            help="Keep hits whose cosine is at least this; with --duplicates the linking cosine (default 0.95).",
            show_default=False,
        ),
    ] = None,
    duplicates: Annotated[
        bool,
        typer.Option("--duplicates", help="Find groups of near-duplicate rows of the index instead of searching."),
    ] = False,
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            metavar="SIZE",
            help="Memory a FAISS index built for --faiss may use, e.g. 4GB (default: half this machine's).",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search an index, or a folder's images (--in), with a text or an image; or list near duplicates.

    Queries are encoded by the model recorded in the index's sidecar. With --in FOLDER the
    folder is embedded into mmcli's cache on first use and brought up to date on every search.
    """
    with reported_errors():
        from mmcli.commands.render import (
            render_duplicates,
            render_paths,
            render_retrieve,
            report_faiss_build,
            report_notes,
        )
        from mmcli.commands.retrieve import run, run_duplicates

        if paths and as_json:
            raise MmcliError("--paths and --json: choose one")
        if duplicates:
            if query or queries or grid or use_faiss or folder or paths:
                raise MmcliError(
                    "--duplicates compares the index with itself: give --index and no QUERY, --queries, --in, --paths, "
                    "--grid or --faiss"
                )
            if index is None:
                raise MmcliError("--duplicates: give --index INDEX")
            result = run_duplicates(index, threshold=0.95 if threshold is None else threshold)
            emit(result, as_json, render_duplicates)
            return

        result = run(
            query,
            index_path=index,
            folder=folder,
            k=k,
            queries_file=queries,
            image=image,
            use_faiss=use_faiss,
            grid=grid,
            overwrite=overwrite,
            model=model,
            threshold=threshold,
            max_memory=max_memory,
            paths_only=paths,
            device=chosen_device(device),
        )
        report_notes(result)
        report_faiss_build(result)
        if paths:
            render_paths(result)
        else:
            emit(result, as_json, render_retrieve)


@app.command()
def serve(
    index: Annotated[
        list[str],
        typer.Option(
            "--index",
            metavar="[NAME=]PATH",
            help="An index (.npy) to serve, as PATH or NAME=PATH (repeatable).",
            show_default=False,
        ),
    ],
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; another than 127.0.0.1 is reachable by others.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
    use_faiss: Annotated[bool, typer.Option("--faiss", help="Search with FAISS (as retrieve --faiss).")] = False,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="Require 'Authorization: Bearer TOKEN' (default: $MMCLI_SERVE_TOKEN, else none).",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = None,
) -> None:
    """Serve indexes over HTTP: a search page at /, a REST API (/docs), clip-retrieval's /knn-service."""
    with reported_errors():
        from mmcli.commands.serve import run

        run(index, host=host, port=port, use_faiss=use_faiss, token=token, device=chosen_device(device))


@app.command()
def fuse(
    spec: SpecArg,
    overrides: FuseSetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the spec's run folder.")] = False,
    eval_only: Annotated[
        bool, typer.Option("--eval-only", help="Do not train: apply the spec's run folder to data.val and score it.")
    ] = False,
    explain: Annotated[
        Path | None,
        typer.Option(
            "--explain",
            help="Write PNGs of a few validation images, each region's box labelled with its "
            "best-aligned caption concepts (graph fusion).",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train on a pretrained run: a fusion head (VQA, ITM) or a text-to-image generator (task: generate)."""
    with reported_errors():
        from mmcli.commands.fuse import run
        from mmcli.commands.render import render_fuse_summary

        result = run(
            spec, overrides or [], resume=resume, eval_only=eval_only, device=chosen_device(device), explain=explain
        )
        if result.get("is_main", True):
            emit(result, as_json, render_fuse_summary)
        if result.get("interrupted"):
            raise typer.Exit(130)


@app.command("eval")
def evaluate(
    spec: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Eval spec (YAML); optional when flags name the tasks. With --compare: run folders.",
            show_default=False,
        ),
    ] = None,
    overrides: EvalSetOpt = None,
    model: ModelOpt = None,
    compare: Annotated[
        bool,
        typer.Option("--compare", help="Draw the training curves of the run folders given as arguments side by side."),
    ] = False,
    zero_shot: Annotated[
        str | None,
        typer.Option(
            "--zero-shot",
            metavar="PATH",
            help="Zero-shot data: a class-folder tree or a labelled CSV/TSV/JSONL.",
            show_default=False,
        ),
    ] = None,
    templates: Annotated[
        str | None,
        typer.Option("--templates", help="shapes, imagenet, simple, or 'a {}|a photo of a {}.'", show_default=False),
    ] = None,
    retrieval: Annotated[
        str | None,
        typer.Option("--retrieval", metavar="PATH", help="Image–caption pairs for recall@K.", show_default=False),
    ] = None,
    linear_probe: Annotated[
        str | None,
        typer.Option(
            "--linear-probe",
            metavar="PATH",
            help="Labelled images for a linear probe (half of each class held out).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--out",
            metavar="PATH",
            help="Results JSON (default eval.json); a folder with --format clip_benchmark; the PNG with --compare.",
            show_default=False,
        ),
    ] = None,
    result_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="json (one list) or clip_benchmark (a file per task, read by 'clip_benchmark build').",
        ),
    ] = "json",
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Zero-shot classification, image↔text retrieval recall@K, linear probe, VQA/ITM/MLM accuracy, captioning."""
    with reported_errors():
        from mmcli.commands.evaluate import compare_curves, run
        from mmcli.commands.render import render_compare, render_eval

        if compare:
            given = {"--set": overrides, "--model": model, "--zero-shot": zero_shot, "--templates": templates}
            unused = [k for k, v in {**given, "--retrieval": retrieval, "--linear-probe": linear_probe}.items() if v]
            emit(compare_curves(spec or [], output, unused=unused), as_json, render_compare)
            return
        if spec and len(spec) > 1:
            raise MmcliError(f"eval: one SPEC, not {len(spec)} (several paths only with --compare)")
        flags = {
            "model": model,
            "zero_shot": zero_shot,
            "templates": templates,
            "retrieval": retrieval,
            "linear_probe": linear_probe,
            "output": output,
        }
        spec_path = spec[0] if spec else None
        result = run(spec_path, overrides or [], flags=flags, device=chosen_device(device), result_format=result_format)
        emit(result, as_json, render_eval)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="mmcli")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
