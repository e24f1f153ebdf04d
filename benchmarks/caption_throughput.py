"""Captioning throughput: ``mmcli caption`` against open_clip's own ``CoCa.generate`` (a benchmark,
not a test).

All caption the same image files with the same model and the same greedy decoding, in one run,
and must produce the same captions (checked; the run fails otherwise):

    open_clip      a plain loop: PIL open → open_clip preprocess → ``model.generate(batch,
                   generation_type="top_k", top_k=1, …)``, batch by batch — open_clip's decoding,
                   which feeds the whole prefix through the text tower and the decoder again at
                   every step (batched: the strongest fair reference)
    mmcli decoder  the same loop with :class:`mmcli.models.captioning.CaptionDecoder` (key/value
                   cache, finished captions leave the batch): the decoding alone
    mmcli caption  the command (DataLoader workers decoding the files, rows streamed to JSONL),
                   timed by its own summary, which starts after the model is loaded

Images/s exclude model loading everywhere. Target: mmcli caption ≥ 2× open_clip on CPU. Use a
trained caption run (``--model``): a random model writes every caption to the length limit,
which is not what captioning looks like; without ``--model`` a random ``mmcli-tiny-coca`` is used
and said so. Example::

    python benchmarks/caption_throughput.py --model runs/shapes-coca --data data/shapes-20k/test.jsonl --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a caption run folder (default: a random mmcli-tiny-coca)")
    parser.add_argument("--data", help="a shapes JSONL/TSV whose images are captioned (default: generated)")
    parser.add_argument("--images", type=int, default=200, help="at most this many images")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1, help="mmcli caption --workers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of each (the best is kept)")
    return parser.parse_args(argv)


def image_paths(args, workdir: Path) -> list[str]:
    """The images to caption: those of ``--data``, or a freshly generated shapes test split."""
    from mmcli.data.sources import read_records
    from mmcli.spec import SourceSpec

    data = args.data
    if data is None:
        from mmcli.data.shapes import generate

        generate(workdir / "shapes", n=max(args.images, 200), size=64, seed=0)
        data = str(workdir / "shapes" / "test.jsonl")
    paths = list(dict.fromkeys(r.image for r in read_records(SourceSpec(path=data))))
    return paths[: args.images]


def load(args, workdir: Path):
    from mmcli.models.loading import load_model

    if args.model:
        return load_model(args.model), args.model
    import torch

    from mmcli.models import weights
    from mmcli.models.encoders import build_dual_encoder
    from mmcli.models.multimodal import MultimodalModel
    from mmcli.spec import ModelSpec

    torch.manual_seed(0)
    run = workdir / "random-coca"
    encoder = build_dual_encoder(ModelSpec(arch="mmcli-tiny-coca"))
    weights.save_open_clip_config(run, encoder.model_config, encoder.preprocess_config)
    model = MultimodalModel(encoder.model, {"caption": {"image": True}})
    weights.save_weights(run, model, {"arch": "mmcli-tiny-coca", "modules": model.modules_config})
    return load_model(str(run)), str(run)


def best_time(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from PIL import Image

    from mmcli.models.captioning import CaptionDecoder, DecodeSettings
    from mmcli.models.constants import OPEN_CLIP_EOT_ID

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="mmcli-caption-bench-"))
    loaded, ref = load(args, workdir)
    clip = loaded.model.clip
    paths = image_paths(args, workdir)
    batches = [paths[i : i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    n = len(paths)

    def pixels(batch: list[str]) -> torch.Tensor:
        return torch.stack([loaded.preprocess(Image.open(p).convert("RGB")) for p in batch])

    def open_clip_generate():
        out = []
        with torch.no_grad():
            for batch in batches:
                rows = clip.generate(
                    pixels(batch), generation_type="top_k", top_k=1, seq_len=args.max_tokens + 2, min_seq_len=1
                ).tolist()
                for row in rows:
                    row = row[1:]
                    out.append(tuple(row[: row.index(OPEN_CLIP_EOT_ID)] if OPEN_CLIP_EOT_ID in row else row))
        return out

    decoder = CaptionDecoder.of(loaded.model)
    settings = DecodeSettings(max_tokens=args.max_tokens)

    def mmcli_decoder():
        with torch.inference_mode():
            return [c.tokens for batch in batches for c in decoder.decode(pixels(batch), settings)]

    reference_s, reference = best_time(open_clip_generate, args.repeats)
    ours_s, ours = best_time(mmcli_decoder, args.repeats)
    same = sum(a == b for a, b in zip(reference, ours))
    lengths = [len(t) for t in ours]

    from mmcli.commands.caption import run as caption_run

    folder = workdir / "images"
    folder.mkdir()
    for i, p in enumerate(paths):
        os.symlink(os.path.abspath(p), folder / f"{i:05d}{Path(p).suffix}")
    out = workdir / "captions.jsonl"
    command_s = float("inf")
    for _ in range(args.repeats):
        summary = caption_run(
            str(folder),
            str(out),
            model=ref,
            batch_size=args.batch_size,
            workers=args.workers,
            max_tokens=args.max_tokens,
            overwrite=True,
            device="cpu",
            progress=False,
        )
        command_s = min(command_s, summary["seconds"])
    written = [json.loads(line)["caption"] for line in out.read_text().splitlines()]
    decode = loaded.tokenizer.decode
    same_command = sum(a == decode(list(b)).strip() for a, b in zip(written, reference))
    figures = {
        "model": ref if args.model else f"{ref} (random weights: every caption runs to the limit)",
        "images": n,
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(),
        "mean_caption_tokens": round(sum(lengths) / n, 2),
        "same_captions_decoder": f"{same}/{n}",
        "same_captions_command": f"{same_command}/{n}",
        "open_clip_generate_images_per_s": round(n / reference_s, 1),
        "mmcli_decoder_images_per_s": round(n / ours_s, 1),
        "mmcli_caption_command_images_per_s": round(n / command_s, 1),
        "ratio_decoder": round(reference_s / ours_s, 2),
        "ratio_command": round(reference_s / command_s, 2),
        "target_ratio": TARGET_RATIO,
    }
    print(json.dumps(figures, indent=2))
    if same != n or same_command != n:
        print(f"FAIL: {n - same} (decoder) and {n - same_command} (command) captions differ from open_clip's")
        return 1
    met = figures["ratio_command"] >= TARGET_RATIO
    print(f"{'met' if met else 'NOT met'}: mmcli caption {figures['ratio_command']}× open_clip generate")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
