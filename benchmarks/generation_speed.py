"""Sampling speed against quality for a text-to-image run (a benchmark, not a test).

The same prompts (the first distinct captions of a shapes split), the same per-picture seeds and
the same guidance, drawn with each sampler setting in one run — DDIM and DPM-Solver++ at a few
steps against ancestral DDPM over all the training timesteps, the chain the model was trained
for (the reference every fast sampler approximates) — and each setting's pictures read by the
scene reader: images/s (model loading excluded, one warm-up batch not timed) beside exact-scene
accuracy on single-object prompts and on all prompts. Example::

    python benchmarks/generation_speed.py --model runs/shapes-generate --data data/shapes-32/val.jsonl \\
        --prompts 32 --settings ddim:25 ddim:50 dpm:25 ddpm:1000
"""

from __future__ import annotations

import argparse
import json
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a run folder trained with task: generate")
    parser.add_argument("--data", required=True, help="a shapes JSONL split whose captions are the prompts")
    parser.add_argument("--prompts", type=int, default=32, help="the first this many distinct captions")
    parser.add_argument("--samples", type=int, default=1, help="pictures per prompt")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["ddim:25", "ddim:50", "dpm:25", "ddpm:1000"],
        help="SAMPLER:STEPS[:GUIDANCE] each (guidance: --guidance when omitted)",
    )
    parser.add_argument("--json", help="also write the table here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from mmcli.data.examples import read_shapes_jsonl
    from mmcli.data.scenes import read_scene, scene_record
    from mmcli.data.shapes import parse_caption
    from mmcli.evaluation.generation import distinct_captions, picture_verdict, verdict_scores
    from mmcli.models.generation import SampleSettings, draw_all
    from mmcli.models.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    prompts = distinct_captions(read_shapes_jsonl(args.data))[0][: args.prompts]
    single = [len(parse_caption(p).objects) == 1 for p in prompts for _ in range(args.samples)]
    flat_prompts = [p for p in prompts for _ in range(args.samples)]
    warm = SampleSettings("ddim", 2, args.guidance, args.seed)
    draw_all(loaded, prompts[:4], 1, warm, device="cpu", batch_size=args.batch_size)  # allocations, kernels
    rows = []
    for setting in args.settings:
        parts = setting.split(":")
        sampler, steps = parts[0], int(parts[1]) if len(parts) > 1 else 25
        guidance = float(parts[2]) if len(parts) > 2 else args.guidance
        settings = SampleSettings(sampler, steps, guidance, args.seed)
        start = time.perf_counter()
        pictures = draw_all(loaded, prompts, args.samples, settings, device="cpu", batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        flat = [picture for group in pictures for picture in group]
        verdicts = [picture_verdict(p, scene_record(read_scene(x))) for p, x in zip(flat_prompts, flat, strict=True)]
        one = verdict_scores([v for v, s in zip(verdicts, single, strict=True) if s])
        every = verdict_scores(verdicts)
        rows.append(
            {
                "sampler": sampler,
                "steps": loaded.model.generator.cfg["timesteps"] if sampler == "ddpm" else steps,
                "guidance": settings.guidance,
                "pictures": len(flat),
                "seconds": round(seconds, 1),
                "images_per_s": round(len(flat) / seconds, 3),
                "single_object_exact": one["exact_scene"],
                "single_object_pictures": one["pictures"],
                "all_exact": every["exact_scene"],
                "object_f1": every["object_f1"],
                "relation_accuracy": every["relation_accuracy"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    reference = next((r for r in rows if r["sampler"] == "ddpm"), None)
    header = ("sampler", "steps", "w", "images/s", "× ddpm", "1-obj exact", "exact", "F1", "rel")
    print("\n" + " ".join(f"{h:>{w}}" for h, w in zip(header, (8, 6, 4, 9, 7, 12, 6, 6, 6), strict=True)))
    for r in rows:
        speedup = f"{r['images_per_s'] / reference['images_per_s']:.0f}×" if reference else "-"
        print(
            f"{r['sampler']:>8} {r['steps']:>6} {r['guidance']:>4g} {r['images_per_s']:>9.3f} {speedup:>7} "
            f"{_fmt(r['single_object_exact']):>12} {_fmt(r['all_exact']):>6} {_fmt(r['object_f1']):>6} "
            f"{_fmt(r['relation_accuracy']):>6}"
        )
    print(
        f"\n{len(prompts)} prompts × {args.samples} pictures, seed {args.seed}, torch threads {torch.get_num_threads()}"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "args": vars(args)}, f, indent=2)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
