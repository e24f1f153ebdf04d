"""Human-readable output: rich tables for each command's result (stdout)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def key_value_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    """A two-column table of labelled values."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, _fmt(value))
    return table


def render_data_summary(result: dict[str, Any]) -> None:
    """Summary of ``mmcli data shapes``."""
    rows = [("folder", result.get("out"))]
    rows += [(f"{split} images", n) for split, n in result.get("counts", {}).items()]
    if "seconds" in result:
        rows.append(("seconds", result["seconds"]))
    console.print(key_value_table("shapes dataset", rows))


def render_pretrain_summary(result: dict[str, Any]) -> None:
    """What a pretraining run learned: final losses, validation recall against chance."""
    val = result.get("val", {})
    rows = [
        ("run folder", result["run_dir"]),
        ("model", f"{result['arch']} ({result['parameters'] / 1e6:.1f} M parameters)"),
        ("device", f"{result['device']} × {result['world_size']}"),
        (
            "steps",
            result["steps"]
            if not result.get("interrupted")
            else f"{result['steps']} (interrupted; --resume continues)",
        ),
        *training_rows(result),
    ]
    if result.get("skipped"):
        rows.append(("unreadable samples skipped", result["skipped"]))
    if val:
        rows += [
            (f"val loss (contrastive only, step {val.get('step')})", _loss(val.get("val_loss"))),
            ("val image→text R@1", _fraction(val.get("image_to_text_R@1"))),
            ("val text→image R@1", _fraction(val.get("text_to_image_R@1"))),
            ("chance R@1", _fraction(val.get("chance_R@1"))),
            ("val pairs", val.get("val_pairs")),
        ]
    console.print(key_value_table("pretrain", rows))


def _loss(value: float | None) -> str:
    """A loss to four decimals (every loss of every table), or - when none was logged."""
    return "-" if value is None else f"{value:.4f}"


def training_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Throughput and the last train line of a run: the loss the optimizer minimised (the weighted
    sum of the objectives') and, when there are several or one is weighted, each objective's own
    loss beside its weight. The line is that of the last step, also after a Ctrl-C."""
    rows = [("samples/s (training steps)", f"{result.get('samples_per_s', 0.0):.1f}")]
    train, weights = result.get("train") or {}, result.get("loss_weights") or {}
    if "loss" not in train:
        return [*rows, ("train loss", "-")]
    parts = [name for name in weights if name in train]
    if len(parts) == 1 and weights[parts[0]] == 1:
        return [*rows, (f"train loss ({parts[0]}, step {train['step']})", _loss(train["loss"]))]
    rows.append((f"train loss (Σ weight × loss, step {train['step']})", _loss(train["loss"])))
    return rows + [(f"  {name} (weight {weights[name]:g})", _loss(train[name])) for name in parts]


def render_fuse_summary(result: dict[str, Any]) -> None:
    """What a fuse run did and scored: accuracy overall and per type against majority baselines,
    and the base run's MLM accuracy on masked colour/shape words when it has an MLM head."""
    rows = [("run folder", result["run_dir"]), ("task", result["task"]), ("base run", result["base"])]
    if not result.get("eval_only"):
        rows += [
            ("steps", result.get("steps")),
            *training_rows(result),
        ]
        if result.get("skipped"):
            rows.append(("unreadable samples skipped", result["skipped"]))
    report = result.get("report", {})
    if report:
        rows.append((f"val accuracy (n={report['n']})", _fraction(report["accuracy"])))
        if "majority_baseline" in report:
            rows.append((f"majority answer ({report['majority_answer']})", _fraction(report["majority_baseline"])))
            rows.append(("majority answer per type", _fraction(report["type_majority_baseline"])))
        rows += [(f"  {kind} (n={v['n']})", _fraction(v["accuracy"])) for kind, v in report["per_type"].items()]
    for mode, mlm in result.get("base_mlm", {}).items():
        groups = ", ".join(f"{g} {_fraction(v['accuracy'])}" for g, v in mlm["groups"].items())
        rows.append(
            (f"base MLM {mode.replace('_', '-')}", f"{groups}; random-15% {_fraction(mlm['random']['accuracy'])}")
        )
    if "predictions" in result:
        rows += [("predictions", result["predictions"]), ("fused features", result["features"])]
    if "explain" in result:
        rows.append(("alignment pictures", f"{len(result['explain']['pictures'])} in {result['explain']['dir']}"))
    console.print(key_value_table(f"fuse {result['task']}", rows))


# --------------------------------------------------------------------------------------------
# embed, caption, retrieve, eval
# --------------------------------------------------------------------------------------------


def embed_progress(unit: str, *, show: bool = True):
    """A rich progress bar on stderr with items/s (``unit``: image or text) and time left."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn

    class RateColumn(ProgressColumn):
        """rich's running speed of the task, as "123 images/s"."""

        def render(self, task) -> Text:
            return Text(f"{task.speed:,.0f} {unit}s/s" if task.speed else "", style="progress.data.speed")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not show,
    )


def render_embed_summary(result: dict[str, Any]) -> None:
    """What ``mmcli embed`` wrote: the index, its model, rows, skipped files and speed."""
    rows = [
        ("index", result["out"]),
        ("model", f"{result['model']['ref']} ({result['model']['arch']})"),
        ("modality", result["modality"]),
        ("rows", f"{result['count']} × {result['dim']} {result['dtype']}"),
        ("skipped", len(result["skipped"])),
    ]
    if result.get("resumed_from"):
        rows.append(("resumed after", f"{result['resumed_from']} items"))
    if result.get("update"):
        u = result["update"]
        rows.append(
            ("update", f"{u['new']} new, {u['changed']} changed, {u['deleted']} deleted, {u['unchanged']} kept")
        )
    rows += [
        ("embedded", result["embedded"]),
        ("seconds", result["seconds"]),
        (f"{result['modality']}s/s", result["items_per_s"]),
    ]
    console.print(key_value_table("embed", rows))
    _print_skipped(result["skipped"])


def _print_skipped(skipped: list[dict[str, str]], shown: int = 20) -> None:
    """The first ``shown`` skipped items and why, when there are any."""
    if not skipped:
        return
    table = Table(title="skipped (also listed in the sidecar)", title_justify="left")
    table.add_column("item")
    table.add_column("reason")
    for entry in skipped[:shown]:
        table.add_row(Text(entry["item"]), Text(entry["reason"]))
    if len(skipped) > shown:
        table.add_row(f"… {len(skipped) - shown} more", "")
    console.print(table)


def render_caption_summary(result: dict[str, Any]) -> None:
    """What ``mmcli caption`` wrote: its first rows (item, caption, score), the file, its model and
    decoding, counts, skipped images and speed."""
    if result["first_rows"]:
        table = Table(title=f"first captions of {result['out']}", title_justify="left")
        table.add_column("item", overflow="fold")
        table.add_column("caption", overflow="fold")
        table.add_column("score", justify="right")
        for row in result["first_rows"]:
            # Text, not markup: a caption or a file name may hold "[…]".
            table.add_row(Text(row["item"]), Text(row["caption"]), f"{row['score']:.3f}")
        console.print(table)
    settings = ", ".join(f"{k} {v}" for k, v in result["decoding"].items() if k != "decoding")
    rows = [
        ("captions", result["out"]),
        ("sidecar", result["sidecar"]),
        ("model", f"{result['model']['ref']} ({result['model']['arch']})"),
        ("decoding", f"{result['decoding']['decoding']} ({settings})"),
        ("rows", result["count"]),
        ("skipped", len(result["skipped"])),
    ]
    if result.get("resumed_from"):
        rows.append(("resumed after", f"{result['resumed_from']} items"))
    rows += [("seconds", result["seconds"]), ("images/s", result["items_per_s"])]
    console.print(key_value_table("caption", rows))
    _print_skipped(result["skipped"])


def render_generate_summary(result: dict[str, Any]) -> None:
    """What ``mmcli generate`` wrote: its first pictures, the folder, model, settings and speed."""
    table = Table(title=f"first pictures in {result['out']}", title_justify="left")
    for column in ("file", "prompt", "noise seed"):
        table.add_column(column, overflow="fold")
    for row in result["first_rows"]:
        table.add_row(Text(row["file"]), Text(row["prompt"]), str(row["noise_seed"]))
    console.print(table)
    settings = result["settings"]
    rows = [
        ("folder", result["out"]),
        ("sheet", result["sheet"]),
        ("model", f"{result['model']['ref']} ({result['model']['arch']})"),
        ("sampler", f"{settings['sampler']}, {settings['steps']} steps, guidance {settings['guidance']:g}"),
        ("seed", settings["seed"]),
        ("pictures", f"{result['pictures']} ({result['prompts']} prompt{'s' * (result['prompts'] != 1)})"),
        ("seconds", result["seconds"]),
        ("images/s", result["images_per_s"]),
    ]
    console.print(key_value_table("generate", rows))


def render_retrieve(result: dict[str, Any]) -> None:
    """One table per query: rank, score and item of the top-k."""
    for query in result["queries"]:
        kind = "image" if query["is_image"] else "text"
        table = Table(title=f"{kind} query: {query['query']}", title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        table.add_column("item", overflow="fold")
        captions = any(hit.get("caption") for hit in query["results"])
        if captions:
            table.add_column("caption", overflow="fold")
        for hit in query["results"]:
            cells = [str(hit["rank"]), f"{hit['score']:.4f}", hit["item"]]
            table.add_row(*cells, *([hit.get("caption") or ""] if captions else []))
        console.print(table)
        if query.get("grid"):
            console.print(f"contact sheet: {query['grid']}")
    search = result["search"]
    note = f"{search['method']} search over {result['count']:,} rows"
    if search.get("recall_at_10") is not None:
        note += f" ({_build_check(search['recall_at_10'])})"
    console.print(note, style="dim")


def render_paths(result: dict[str, Any]) -> None:
    """``retrieve --paths``: the absolute path of each hit, one a line, query after query, nothing
    else on stdout (for ``xargs``, ``feh``, …)."""
    for query in result["queries"]:
        for hit in query["results"]:
            print(hit["path"])


def report_notes(result: dict[str, Any]) -> None:
    """On stderr (also under ``--json`` and ``--paths``): the result's notes, one a line (blank lines
    skipped in an input, what a folder's index update did)."""
    for note in result.get("notes") or []:
        print(note, file=sys.stderr)


def _build_check(recall: float | None) -> str:
    # FAISS files are checked once, at build, at k=10, whatever --k a search asks for: say so.
    if recall is None:
        return "no recall check at build"
    return f"the index's build check: recall@10 against exact search {recall:.3f}"


def render_duplicates(result: dict[str, Any]) -> None:
    """Groups of near-duplicate rows: one table, a blank line between groups."""
    table = Table(title=f"near duplicates (cosine ≥ {result['threshold']}) in {result['index']}", title_justify="left")
    table.add_column("group", justify="right")
    table.add_column("row", justify="right")
    table.add_column("cosine to first", justify="right")
    table.add_column("item", overflow="fold")
    for n, group in enumerate(result["groups"], start=1):
        for m, hit in enumerate(group["members"]):
            table.add_row(str(n) if m == 0 else "", str(hit["row"]), f"{hit['score']:.4f}", hit["item"])
        table.add_section()
    console.print(table)
    console.print(
        f"{len(result['groups'])} groups, {result['rows_in_groups']} of {result['count']:,} rows, "
        f"in {result['seconds']:.1f} s",
        style="dim",
    )


def render_index_build(result: dict[str, Any]) -> None:
    """What ``mmcli index build`` made: kind, parameters, recall, time, sizes."""
    params = result["params"]
    shown = ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("max_memory",)) or "-"
    gib = 1 << 30
    rows = [
        ("FAISS file", result["faiss"]),
        ("rows", f"{result['rows']:,} × {result['dim']} {result['dtype']}"),
        ("kind", result["kind"]),
        ("parameters", shown),
        ("recall@10 vs exact", _fraction(result["recall_at_10"])),
        ("build seconds", result["build_seconds"]),
        ("file size", f"{result['file_bytes'] / gib:.3f} GiB"),
        ("peak memory", f"{result['peak_rss_bytes'] / gib:.2f} GiB of {result['max_memory'] / gib:.2f} GiB allowed"),
    ]
    if result.get("lists_file"):
        rows.insert(-1, ("lists on disk", f"{result['lists_file']} ({result['lists_file_bytes'] / gib:.3f} GiB)"))
    console.print(key_value_table("index build", rows))


def report_faiss_build(result: dict[str, Any]) -> None:
    """On stderr (also under ``--json``): a FAISS index built for this search, and its recall check."""
    search = result["search"]
    if search.get("built"):
        params = ", ".join(f"{k}={v}" for k, v in (search.get("params") or {}).items())
        print(
            f"built a {search['method']} index {search['path']} in {search['build_seconds']:.1f} s"
            f"{f' ({params})' if params else ''}; {_build_check(search['recall_at_10'])}",
            file=sys.stderr,
        )


def _fraction(value: float | None) -> str:
    """A rate to three decimals, or n/a when nothing was scored."""
    return "n/a" if value is None else f"{value:.3f}"


GENERATION_COLUMNS = (
    ("single_object.exact_scene", "1-object exact"),
    ("single_object.object_f1", "1-object F1"),
    ("all.exact_scene", "exact"),
    ("all.object_f1", "object F1"),
    ("all.relation_accuracy", "relation acc"),
    ("all.clip_score", "CLIP score"),
    ("all.prompt_r1", "prompt R@1"),
    ("images_per_s", "images/s"),
)
"""The generation task's table: (metric key under the row, column title)."""


def render_generation_table(metrics: dict[str, Any], dataset: str) -> None:
    """The generation task as one table: the real, conditional and unconditional rows."""
    settings = {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith("settings.")}
    title = (
        f"text_to_image · {dataset} · {settings.get('prompts')} prompts × {settings.get('samples')} samples, "
        f"{settings.get('sampler')} {settings.get('steps')} steps, guidance {settings.get('guidance')}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("row")
    for _, header in GENERATION_COLUMNS:
        table.add_column(header, justify="right")
    for row in ("real", "conditional", "unconditional"):
        if f"{row}.all.pictures" not in metrics:
            continue
        values = [metrics.get(f"{row}.{key}") for key, _ in GENERATION_COLUMNS]
        table.add_row(row, *("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in values))
    console.print(table)
    for key in ("sheet", "pictures_file"):
        if key in metrics:
            console.print(f"{key.replace('_', ' ')}: {metrics[key]}", style="dim")


def render_eval(result: dict[str, Any]) -> None:
    """A table per task of ``mmcli eval``: each metric (None shown as "n/a" with the reason)."""
    for entry in result["results"]:
        if entry["task"] == "text_to_image":
            render_generation_table(entry["metrics"], entry["dataset"])
            continue
        rows = []
        for name, value in entry["metrics"].items():
            rows.append((name, "n/a" if value is None else value))
        console.print(key_value_table(f"{entry['task']} · {entry['dataset']}", rows))
    for note in result.get("notes", []):
        console.print(note, style="dim")
    console.print(f"results: {result['json']}", style="dim")


def render_compare(result: dict[str, Any]) -> None:
    """``mmcli eval --compare``: a column per run, a row per quantity with its last logged value
    (losses to four decimals, scores to three), and where the picture is."""
    runs = result["runs"]
    labels = list(dict.fromkeys(label for run in runs for label in run["last"]))
    table = Table(title="training curves compared (last values)", title_justify="left")
    table.add_column("")
    for run in runs:
        table.add_column(run["name"], justify="right")
    table.add_row("steps", *(str(run["steps"]) for run in runs))
    for label in labels:
        show = _loss if "loss" in label else _fraction
        table.add_row(label, *("-" if label not in run["last"] else show(run["last"][label]) for run in runs))
    console.print(table)
    console.print(f"picture: {result['out']}", style="dim")
