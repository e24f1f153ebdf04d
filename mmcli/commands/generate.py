"""``mmcli generate PROMPT --model RUN --out DIR``: pictures from a text-to-image run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run(
    prompt: str | None,
    out: str,
    *,
    model: str,
    prompts_file: str | None = None,
    n: int = 4,
    steps: int = 25,
    guidance: float = 3.0,
    sampler: str = "ddim",
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Draw ``n`` pictures of each prompt into ``out``; see :mod:`mmcli.inference.generation`."""
    from mmcli.commands.render import embed_progress
    from mmcli.inference.generation import GenerateJob, read_prompts
    from mmcli.models.generation import SampleSettings

    prompts, where = read_prompts(prompt, prompts_file)
    settings = SampleSettings(sampler=sampler, steps=steps, guidance=guidance, seed=seed)
    job = GenerateJob(
        prompts, where, Path(out), model=model, settings=settings, n=n, batch_size=batch_size, device=device
    )
    with embed_progress("picture-step", show=progress) as bar:
        task = bar.add_task("denoising", total=job.total)
        return job.run(on_step=lambda pictures: bar.update(task, advance=pictures))
