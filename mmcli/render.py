"""Human-readable output: rich tables for each command's result (stdout)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

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
    train, val = result.get("train", {}), result.get("val", {})
    rows = [
        ("run folder", result["run_dir"]),
        ("model", f"{result['arch']} ({result['parameters'] / 1e6:.1f} M parameters)"),
        ("device", f"{result['device']} × {result['world_size']}"),
        ("steps", result["steps"] if not result.get("interrupted") else f"{result['steps']} (interrupted; --resume continues)"),
        ("samples/s", result["samples_per_s"]),
        ("train loss", train.get("loss", "-")),
    ]
    if val:
        rows += [
            ("val loss", val.get("val_loss")),
            ("val image→text R@1", val.get("image_to_text_R@1")),
            ("val text→image R@1", val.get("text_to_image_R@1")),
            ("chance R@1", val.get("chance_R@1")),
            ("val pairs", val.get("val_pairs")),
        ]
    console.print(key_value_table("pretrain", rows))
