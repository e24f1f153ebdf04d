"""``mmcli generate``'s job: pictures for prompts from a ``task: generate`` run, into a folder.

The folder ``OUT`` holds one PNG per picture (``0003-01.png``: prompt 3, sample 1, both counted
from 0), ``sheet.png`` (every prompt's pictures in a row) and ``generated.jsonl`` (one row per
picture: prompt, its index, sample, file, sampler, steps, guidance, seed, the picture's own
``noise_seed`` drawn from them, model). The pictures are drawn into
``OUT.partial/`` and the folder is renamed to ``OUT`` only when every picture, the sheet and the
rows are written, so an ``OUT`` is always complete; an ``OUT`` that exists and is not empty is
refused (nothing is replaced), and a lock (``OUT.lock``) keeps two jobs from sharing a partial folder.
A partial folder carries a marker file, and only a marked one is ever replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmcli import io
from mmcli.errors import MmcliError
from mmcli.models.generation import SampleSettings, draw_all, picture_seed, prompt_tokens, require_generator

JSONL = "generated.jsonl"
SHEET = "sheet.png"
MARKER = ".mmcli-generate"
"""The file that marks a partial folder as this command's, so that only such a folder is replaced."""


def read_prompts(prompt: str | None, prompts_file: str | None) -> tuple[list[str], Callable[[int], str]]:
    """The prompts of the command line, and how to name prompt i in an error; a blank line of a
    prompts file is an error (a silently dropped line would shift every later prompt's files)."""
    if prompt is not None and prompts_file is not None:
        raise MmcliError("give a PROMPT or --prompts FILE, not both")
    if prompt is None and prompts_file is None:
        raise MmcliError("give a PROMPT or --prompts FILE (one prompt a line)")
    if prompt is not None:
        return [prompt], lambda i: "PROMPT"
    path = Path(prompts_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MmcliError(f"--prompts {path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise MmcliError(f"--prompts {path}: line {number} is blank (one prompt a line, no blank lines)")
    if not lines:
        raise MmcliError(f"--prompts {path}: no prompts")
    return [line.strip() for line in lines], lambda i: f"--prompts {path}: line {i + 1}"


def check_settings(settings: SampleSettings, n: int, batch_size: int) -> None:
    """One-line errors naming the flag of the first bad setting."""
    problem = settings.problem()
    if problem is not None:
        raise MmcliError(f"--{problem[0]}: {problem[1]}")
    if n < 1:
        raise MmcliError(f"--n: {n}: at least one picture per prompt")
    if batch_size < 1:
        raise MmcliError(f"--batch-size: {batch_size}: at least 1")


def check_out(out: Path) -> None:
    """Refuse an ``OUT`` that holds anything (it may be earlier work) before anything is loaded."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        kind = "a folder that is not empty" if out.is_dir() else "a file"
        raise MmcliError(f"--out {out}: {kind}; give a new folder (nothing was written)")


class GenerateJob:
    """One ``mmcli generate``: everything checked and the model loaded on construction (so that a
    mistake is reported before any progress is shown), the pictures drawn and written by :meth:`run`."""

    def __init__(
        self,
        prompts: list[str],
        where: Callable[[int], str],
        out: Path,
        *,
        model: str,
        settings: SampleSettings,
        n: int,
        batch_size: int,
        device: str,
    ):
        from mmcli.distributed import resolve_device
        from mmcli.models.loading import load_model

        check_settings(settings, n, batch_size)
        check_out(out)
        self.device = resolve_device(device)
        self.loaded = load_model(model, device=self.device)
        require_generator(self.loaded)
        self.tokens = prompt_tokens(self.loaded, prompts, where)
        self.prompts, self.out, self.settings, self.n, self.batch_size = prompts, out, settings, n, batch_size
        cfg = self.loaded.model.generator.cfg
        self.steps = cfg["timesteps"] if settings.sampler == "ddpm" else settings.steps

    @property
    def total(self) -> int:
        """Picture-steps the job denoises (the progress bar's total)."""
        return len(self.prompts) * self.n * self.steps

    def run(self, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Draw every picture into ``OUT.partial``, then rename it ``OUT``; return a summary."""
        from mmcli.viz.generation import SheetRow, prompt_sheet

        out, settings = self.out, self.settings
        partial = out.with_name(out.name + ".partial")
        with io.FileLock(out.with_name(out.name + ".lock"), what=f"mmcli generate into {out}"):
            check_out(out)  # again: another job may have finished while this one loaded
            _fresh_partial(partial)
            start = time.perf_counter()
            pictures = draw_all(
                self.loaded,
                self.prompts,
                self.n,
                settings,
                device=self.device,
                batch_size=self.batch_size,
                tokens=self.tokens,
                on_step=on_step,
            )
            seconds = time.perf_counter() - start
            rows = _write_pictures(partial, self.prompts, pictures, settings, self.loaded)
            labels = [f"#{j}" for j in range(self.n)]
            sheet_rows = [SheetRow(p, pics, labels, []) for p, pics in zip(self.prompts, pictures, strict=True)]
            title = (
                f"{self.loaded.ref}: {settings.sampler}, {self.steps} steps, "
                f"guidance {settings.guidance:g}, seed {settings.seed}"
            )
            prompt_sheet(sheet_rows, partial / SHEET, title=title)
            io.atomic_write_text(partial / JSONL, "".join(json.dumps(r) + "\n" for r in rows))
            (partial / MARKER).unlink()
            if out.exists():  # an empty folder (check_out refused anything else)
                out.rmdir()
            os.replace(partial, out)
        return {
            "out": str(out),
            "pictures": len(rows),
            "prompts": len(self.prompts),
            "first_rows": rows[: min(len(rows), 8)],
            "sheet": str(out / SHEET),
            "rows_file": str(out / JSONL),
            "settings": {**settings.as_dict(), "steps": self.steps},
            "model": {"ref": self.loaded.ref, "arch": self.loaded.arch, "checksum": self.loaded.checksum},
            "seconds": round(seconds, 2),
            "images_per_s": round(len(rows) / max(seconds, 1e-9), 2),
        }


def _fresh_partial(partial: Path) -> None:
    """An empty ``OUT.partial`` marked as ours; an interrupted job's is replaced (it never looked
    complete), anything else of that name is refused, never deleted."""
    if partial.exists():
        if not (partial / MARKER).is_file():
            raise MmcliError(
                f"{partial}: exists and was not left by mmcli generate; move it away (nothing was written)"
            )
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    (partial / MARKER).write_text("pictures of an unfinished mmcli generate; replaced by the next run\n")


def _write_pictures(folder: Path, prompts, pictures, settings: SampleSettings, loaded) -> list[dict[str, Any]]:
    rows = []
    for i, (prompt, images) in enumerate(zip(prompts, pictures, strict=True)):
        for j, image in enumerate(images):
            name = f"{i:04d}-{j:02d}.png"
            image.save(folder / name, format="PNG")
            rows.append(
                {
                    "prompt": prompt,
                    "prompt_index": i,
                    "sample": j,
                    "file": name,
                    **settings.as_dict(),
                    "noise_seed": picture_seed(settings.seed, prompt, j),
                    "model": loaded.ref,
                }
            )
    return rows
