"""The fusion evidence table on the shapes dataset's val split.

1. pretrain ``examples/shapes/pretrain-mm.yaml`` (clip + mlm + mmlm + itm);
2. MLM top-1 on masked colour and shape words, text-only vs image-conditioned, and ITM accuracy;
3. VQA accuracy per fusion strategy (fresh fusion encoder, same budget) from
   ``examples/shapes/fuse-vqa.yaml``, against the majority-answer baselines.

    python tests/bench/fusion_table.py --data data/shapes --runs runs/evidence --device auto

Prints a Markdown table and writes every number to ``<runs>/evidence.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "shapes"
STRATEGIES = ("late", "early", "hybrid", "cross_attention")


def pretrain(args) -> str:
    """Train the base run; return its folder."""
    from mmcli.commands.pretrain import run

    sets = [
        f"data.train.path={args.data}/train.tsv",
        f"data.val.path={args.data}/val.tsv",
        f"output.dir={args.runs}",
        f"train.epochs={args.pretrain_epochs}",
        f"data.workers={args.workers}",
        f"data.batch_size={args.batch_size}",
    ]
    return run(EXAMPLES / "pretrain-mm.yaml", sets, device=args.device)["run_dir"]


def fuse_vqa(args, base: str, strategy: str | None) -> dict:
    """One VQA fuse run; ``strategy`` None reuses the base run's pretrained fusion encoder."""
    from mmcli.commands.fuse import run

    name = strategy or "pretrained_fusion"
    sets = [
        f"base={base}",
        f"data.train={args.data}/train.jsonl",
        f"data.val={args.data}/val.jsonl",
        f"output.dir={args.runs}",
        f"output.name=vqa-{name}",
        f"train.epochs={args.fuse_epochs}",
        f"data.workers={args.workers}",
        f"data.batch_size={args.batch_size}",
    ]
    sets.append(f"fusion.strategy={strategy}" if strategy else "fusion=null")
    return run(EXAMPLES / "fuse-vqa.yaml", sets, device=args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--runs", default="runs/evidence")
    parser.add_argument("--pretrain-epochs", type=float, default=30)
    parser.add_argument("--fuse-epochs", type=float, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES) + ",pretrained",
        help="comma-separated; 'pretrained' reuses the base run's fusion encoder",
    )
    parser.add_argument("--json-out", default=None, help="where to write the numbers (default <runs>/evidence.json)")
    args = parser.parse_args()
    from mmcli.evaluation.fusion import evaluate_itm, evaluate_mlm

    out: dict = {"args": vars(args)}
    t0 = time.time()
    base = pretrain(args)
    out["pretrain_s"] = round(time.time() - t0, 1)
    val = f"{args.data}/val.jsonl"
    device = "cuda" if args.device in ("auto", "cuda") and __import__("torch").cuda.is_available() else "cpu"
    out["mlm_text_only"] = evaluate_mlm(base, val, image_conditioned=False, device=device)
    out["mlm_image_conditioned"] = evaluate_mlm(base, val, image_conditioned=True, device=device)
    out["itm"] = evaluate_itm(base, val, device=device)
    _save(args, out)
    out["vqa"] = {}
    for strategy in args.strategies.split(","):
        t0 = time.time()
        result = fuse_vqa(args, base, None if strategy == "pretrained" else strategy)
        out["vqa"][strategy] = {
            **result["report"],
            "seconds": round(time.time() - t0, 1),
            "samples_per_s": result.get("samples_per_s"),
        }
        _save(args, out)
    print(table(out))


def _save(args, out: dict) -> None:
    path = Path(args.json_out or Path(args.runs) / "evidence.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


def table(out: dict) -> str:
    """The Markdown tables of the evidence."""
    lines = ["| MLM top-1 (val) | colour words | shape words | overall | random 15% |", "|---|---|---|---|---|"]
    for key, label in (("mlm_text_only", "text-only (mlm)"), ("mlm_image_conditioned", "image-conditioned (mmlm)")):
        m = out[key]
        lines.append(
            f"| {label} | {m['groups']['color']['accuracy']:.3f} | {m['groups']['shape']['accuracy']:.3f} "
            f"| {m['overall']['accuracy']:.3f} | {m['random']['accuracy']:.3f} |"
        )
    lines += ["", f"ITM accuracy (val, 1:1 matched/mismatched): {out['itm']['accuracy']:.3f}", ""]
    vqa = out.get("vqa", {})
    if vqa:
        types = sorted(next(iter(vqa.values()))["per_type"])
        lines += ["| VQA (val) | overall | " + " | ".join(types) + " |", "|---" * (len(types) + 2) + "|"]
        first = next(iter(vqa.values()))
        lines.append(
            f"| majority answer ({first['majority_answer']}) | {first['majority_baseline']:.3f} |" + " |" * len(types)
        )
        lines.append(f"| majority answer per type | {first['type_majority_baseline']:.3f} |" + " |" * len(types))
        for name, r in vqa.items():
            cells = " | ".join(f"{r['per_type'][t]['accuracy']:.3f}" for t in types)
            lines.append(f"| {name} | {r['accuracy']:.3f} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
