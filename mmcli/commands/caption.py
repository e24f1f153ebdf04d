"""``mmcli caption PATH --model RUN --out captions.jsonl``: caption images with a CoCa run."""

from __future__ import annotations

from typing import Any

from mmcli.io import DEFAULT_IMAGE_KEY


def run(
    path: str,
    out: str,
    *,
    model: str | None = None,
    decoding: str = "greedy",
    beams: int = 3,
    top_p: float = 0.9,
    temperature: float = 1.0,
    max_tokens: int = 30,
    min_tokens: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 2,
    overwrite: bool = False,
    draft: bool = True,
    image_key: str = DEFAULT_IMAGE_KEY,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Caption the images of ``path`` into ``out`` (this rank's shard under torchrun); return a summary.

    See :mod:`mmcli.inference.captions` for the files written, resuming and what is refused.
    """
    from mmcli.commands.render import embed_progress
    from mmcli.inference.captions import Captioning, caption_settings

    settings = caption_settings(
        decoding, beams=beams, top_p=top_p, temperature=temperature, max_tokens=max_tokens, min_tokens=min_tokens
    )
    with Captioning(
        path,
        out,
        model=model,
        settings=settings,
        seed=seed,
        batch_size=batch_size,
        workers=workers,
        overwrite=overwrite,
        draft=draft,
        image_key=image_key,
        device=device,
    ) as captioning:
        with embed_progress("image", show=progress) as bar:
            task = bar.add_task("captioning", total=captioning.total, completed=captioning.resumed)
            for handled in captioning.batches():
                bar.update(task, advance=handled)
        return captioning.finish()
