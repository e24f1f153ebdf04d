"""Incremental embedding: ``mmcli embed --update`` after 10 % new images, against a full re-embed.

A folder of 640×480 JPEGs (those of ``embed_throughput.py``) is embedded once; then 10 % more
images are added (and ``--changed`` existing ones rewritten) and the index is brought up to date two
ways, in one run, with the same model, batch size and DataLoader workers:

    full re-embed   ``mmcli embed --overwrite`` of the whole folder (what a tool without
                    incremental updates does: the fair reference, same worker pool)
    update          ``mmcli embed --update`` (stat every file, embed new and changed ones, copy the rest)

It checks that the update's rows equal the full re-embed's (unchanged rows bit for bit with the old
index) and prints both times and their ratio. The model is a randomly initialised ``mmcli-tiny``
saved as a run folder: speed, not quality, matters. Example::

    .venv/bin/python benchmarks/embed_update.py --images 4000 --workdir bench-out/embed-update
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000, help="images in the first embed")
    parser.add_argument("--new", type=float, default=0.10, help="fraction of new images added")
    parser.add_argument("--changed", type=int, default=10, help="existing images rewritten before the update")
    parser.add_argument("--arch", default="mmcli-tiny", help="model preset (random weights)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default="bench-out/embed-update")
    return parser.parse_args(argv)


def timed_embed(folder: Path, out: Path, model: Path, args, **flags) -> tuple[float, dict]:
    from mmcli.commands.embed import run as embed

    start = time.perf_counter()
    result = embed(
        str(folder),
        str(out),
        model=str(model),
        batch_size=args.batch_size,
        workers=args.workers,
        progress=False,
        **flags,
    )
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> None:
    from embed_throughput import make_images, make_run  # the same JPEGs and model as the throughput benchmark

    args = parse_args(argv)
    work = Path(args.workdir)
    added = int(round(args.images * args.new))
    pool = make_images(work / "pool", args.images + added + args.changed)  # kept between runs
    photos = work / "photos"
    if photos.exists():
        shutil.rmtree(photos)
    photos.mkdir()
    for path in pool[: args.images]:
        shutil.copy2(path, photos / path.name)
    model = make_run(work / "model", args.arch)
    index, full = work / "emb.npy", work / "full.npy"
    seconds, _ = timed_embed(photos, index, model, args, overwrite=True)
    print(f"first embed: {args.images} images in {seconds:.1f} s ({args.images / seconds:.0f} images/s)")
    old = {item: row for row, item in enumerate(_items(index))}
    old_rows = np.load(index)

    for path in pool[args.images : args.images + added]:
        shutil.copy2(path, photos / path.name)
    changed = [photos / p.name for p in pool[: args.changed]]
    for src, dst in zip(pool[args.images + added :], changed):
        shutil.copy(src, dst)  # another image under an existing name: a changed file
    total = args.images + added

    full_s, _ = timed_embed(photos, full, model, args, overwrite=True)
    update_s, result = timed_embed(photos, index, model, args, update=True)
    print(f"after adding {added} images ({args.new:.0%}) and rewriting {len(changed)}: {total} images")
    print(f"  full re-embed (--overwrite): {full_s:7.1f} s")
    print(f"  update (--update):           {update_s:7.1f} s   {result['update']}, embedded {result['embedded']}")
    print(f"  update / full: {update_s / full_s:.3f}   ({full_s / update_s:.1f}× faster)")

    rows, items = np.load(index), _items(index)
    assert items == _items(full), "the update's rows are not in a full re-embed's order"
    np.testing.assert_allclose(rows, np.load(full), atol=1e-5)
    kept = [n for n, item in enumerate(items) if item in old and photos / item not in set(changed)]
    same = all(rows[n].tobytes() == old_rows[old[items[n]]].tobytes() for n in kept)
    print(f"  check: rows equal the full re-embed's; {len(kept)} unchanged rows bit-identical to the old index: {same}")


def _items(path: Path) -> list[str]:
    import json

    return json.loads(Path(str(path) + ".json").read_text())["items"]


if __name__ == "__main__":
    main()
