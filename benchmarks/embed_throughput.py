"""Embedding throughput: ``mmcli embed`` against a plain open_clip loop (a benchmark, not a test).

Both embed the same generated 640×480 JPEGs with the same model and batch size, in one run:

    plain loop   PIL open → convert RGB → open_clip preprocess → encode_image, batch by batch,
                 in the main process, under ``torch.no_grad``
    mmcli embed  ``mmcli.commands.embed.run`` (draft-mode JPEG decode, DataLoader workers,
                 ``torch.inference_mode``, rows streamed to the index)

Images/s exclude model loading in both. The model is a randomly initialised ``mmcli-tiny``
(64 px) saved as a run folder: the encoder's speed, not its quality, matters here. Target:
mmcli ≥ 1.5× the plain loop. Example::

    nice python tests/bench/embed_throughput.py --workdir /tmp/mmcli-embed-bench
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_RATIO = 1.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="number of JPEGs")
    parser.add_argument("--arch", default="mmcli-tiny", help="model preset (random weights)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="mmcli embed --workers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", help="folder that keeps the images and the model between runs")
    return parser.parse_args(argv)


def make_images(folder: Path, count: int) -> list[Path]:
    """``count`` 640×480 photo-like JPEGs (smooth colour fields, shapes and noise), made once."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img-{i:05d}.jpg" for i in range(count)]
    for i, path in enumerate(paths):
        if path.exists():
            continue
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:480, 0:640] / 640.0
        base = np.stack([np.sin(x * rng.uniform(2, 9) + c) * 0.5 + 0.5 for c in rng.uniform(0, 6, 3)], -1)
        pixels = (255 * base + rng.normal(0, 12, (480, 640, 3))).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.integers(0, 560), rng.integers(0, 400)
            draw.ellipse(
                (x0, y0, x0 + rng.integers(20, 80), y0 + rng.integers(20, 80)),
                fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
            )
        image.save(path, format="JPEG", quality=90)
    return paths


def make_run(folder: Path, arch: str) -> Path:
    """A run folder holding a randomly initialised ``arch`` (seed 0), made once."""
    if (folder / "mmcli.json").is_file():
        return folder
    import torch

    from mmcli.models import weights as ckpt
    from mmcli.models.encoders import build_dual_encoder
    from mmcli.models.multimodal import MultimodalModel
    from mmcli.spec import ModelSpec

    torch.manual_seed(0)
    encoder = build_dual_encoder(ModelSpec(arch=arch))
    ckpt.save_open_clip_config(folder, encoder.model_config, encoder.preprocess_config)
    ckpt.save_weights(folder, MultimodalModel(encoder.model), {"arch": arch, "modules": {}})
    return folder


def plain_loop(run_dir: Path, paths: list[Path], batch_size: int, device: str) -> float:
    """Images/s of the straightforward open_clip loop (model loading excluded)."""
    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run_dir}", device=device)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(paths), batch_size):
            batch = [preprocess(Image.open(p).convert("RGB")) for p in paths[first : first + batch_size]]
            model.encode_image(torch.stack(batch).to(device), normalize=True)
    return len(paths) / (time.perf_counter() - start)


def mmcli_embed(run_dir: Path, folder: Path, out: Path, args: argparse.Namespace) -> float:
    """Images/s of ``mmcli embed`` (its own figure: from the first batch request to the index written)."""
    from mmcli.commands.embed import run

    result = run(
        str(folder),
        str(out),
        model=str(run_dir),
        batch_size=args.batch_size,
        workers=args.workers,
        overwrite=True,
        device=args.device,
        progress=False,
    )
    assert result["count"] == args.images and not result["skipped"]
    return result["count"] / result["seconds"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mmcli-embed-bench-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        paths = make_images(work / "images", args.images)
        run_dir = make_run(work / f"run-{args.arch}", args.arch)
        for path in paths:  # both contenders read from the page cache
            path.read_bytes()
        plain = plain_loop(run_dir, paths, args.batch_size, args.device)
        ours = mmcli_embed(run_dir, work / "images", work / "emb.npy", args)
    ratio = ours / plain
    print(
        f"\n{args.images} JPEGs 640×480, {args.arch} (random weights, run folder), batch {args.batch_size}, "
        f"{args.device}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    )
    print(f"plain open_clip loop   {plain:8.1f} images/s")
    print(f"mmcli embed            {ours:8.1f} images/s   (--workers {args.workers}, draft decode)")
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    print(f"ratio                  {ratio:8.2f}×   {verdict} (target ≥ {TARGET_RATIO}×)")


if __name__ == "__main__":
    main()
