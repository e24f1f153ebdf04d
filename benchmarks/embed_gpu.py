"""GPU embedding: ``mmcli embed`` against a clip-retrieval-style DataLoader pipeline, in one run.

Both embed the same 640×480 JPEGs (``embed_throughput.py``'s) with the same ``ViT-B-32`` (random
weights: speed, not quality), batch size and number of DataLoader workers:

    reference    what clip-retrieval's inference does: a torch DataLoader whose workers open each
                 file with PIL and apply open_clip's preprocess (full-size decode), batches moved
                 to the GPU (pinned memory, non-blocking), ``encode_image`` under bf16 autocast,
                 normalised, copied back
    mmcli embed  ``mmcli.commands.embed.run`` (JPEG draft-mode decode, the same workers and
                 autocast, rows streamed into an index on disk)

Images/s exclude model loading in both; worker start-up is included in both. Target: mmcli ≥ 1.5×
the reference (clip-retrieval publishes ~2,500 images/s for ViT-B/32 on one A100). Run it on a GPU
machine, from the repository root::

    .venv/bin/python benchmarks/embed_gpu.py --images 20000 --batch-size 256 --workers 8

``--device cpu --images 200 --batch-size 32 --workers 2`` runs the same code on a CPU, to check it.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from embed_throughput import make_images, make_run, mmcli_embed  # the same JPEGs, model and embed run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", default="bench-out/embed-gpu")
    return parser.parse_args(argv)


class Files(torch.utils.data.Dataset):
    """The reference's dataset: PIL open, RGB, open_clip's preprocess."""

    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            return self.preprocess(image.convert("RGB"))


def reference(run_dir: Path, paths, args) -> float:
    from mmcli.models.loading import load_model

    device = torch.device(args.device)
    loaded = load_model(str(run_dir), device=device)
    loader = torch.utils.data.DataLoader(
        Files(paths, loaded.preprocess),
        batch_size=args.batch_size,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.workers else None,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    rows = []
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        for pixels in loader:
            emb = loaded.model.encode_image(pixels.to(device, non_blocking=True), normalize=True)
            rows.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy())
    _sync(device)
    seconds = time.perf_counter() - start
    assert sum(len(r) for r in rows) == len(paths)
    return len(paths) / seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.workdir)
    paths = make_images(work / "images", args.images)
    folder = work / f"images-{args.images}"
    if not folder.exists():  # exactly --images files (the pool may hold more from an earlier run)
        folder.mkdir(parents=True)
        for path in paths:
            shutil.copy2(path, folder / path.name)
    run_dir = make_run(work / f"model-{args.arch}", args.arch)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"{args.images} JPEGs 640×480, {args.arch} (random weights), batch {args.batch_size}, "
        f"{args.workers} workers, {name}"
    )
    ref = reference(run_dir, sorted(folder.iterdir()), args)
    ours = mmcli_embed(run_dir, folder, work / "emb.npy", args)
    print(f"  reference (DataLoader, full decode):  {ref:8.0f} images/s")
    print(f"  mmcli embed:                          {ours:8.0f} images/s")
    print(f"  ratio {ours / ref:.2f} (target ≥ 1.5){'' if ours / ref >= 1.5 else '  NOT MET'}")


if __name__ == "__main__":
    main()
