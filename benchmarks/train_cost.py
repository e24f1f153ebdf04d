"""Training cost of the multimodal objectives: samples/s of ``clip`` alone vs ``clip + mmlm + itm``.

Both runs use the same model, data, batch size, steps and seed; the figure is the training
loop's steady-state throughput (the first fifth of the steps is left out as warm-up).

    python tests/bench/train_cost.py --data data/shapes --arch mmcli-tiny --steps 60 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

OBJECTIVE_SETS = {
    "clip": {"clip": {"weight": 1.0}},
    "clip + mmlm + itm": {"clip": {"weight": 1.0}, "mmlm": {"weight": 1.0}, "itm": {"weight": 1.0}},
}


def spec_for(objectives: dict, args: argparse.Namespace, out: Path, name: str) -> dict:
    """A pretraining spec: identical but for the objectives (fusion given to both, used by one)."""
    return {
        "model": {"arch": args.arch},
        "data": {
            "train": {"path": str(Path(args.data) / "train.tsv")},
            "batch_size": args.batch_size,
            "workers": args.workers,
        },
        "objectives": objectives,
        "fusion": {"strategy": "cross_attention", "depth": 2, "heads": 4},
        "train": {"steps": args.steps, "lr": 1e-3, "log_every": args.steps, "seed": 0},
        "output": {"dir": str(out), "name": name, "overwrite": True},
    }


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Samples/s per objective set."""
    from mmcli.commands.pretrain import run

    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, objectives) in enumerate(OBJECTIVE_SETS.items()):
            path = Path(tmp) / f"pretrain-{i}.yaml"
            path.write_text(yaml.safe_dump(spec_for(objectives, args, Path(tmp) / "runs", f"cost{i}")))
            rates[label] = run(path, [], device=args.device)["samples_per_s"]
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a shapes dataset folder (mmcli data shapes --out ...)")
    parser.add_argument("--arch", default="mmcli-tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    rates = measure(args)
    base = rates["clip"]
    print(f"{'objectives':<20} {'samples/s':>10} {'relative':>9}")
    for label, rate in rates.items():
        print(f"{label:<20} {rate:>10.1f} {rate / base:>9.2f}")
    print(
        json.dumps(
            {
                "arch": args.arch,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "device": args.device,
                "samples_per_s": rates,
                "ratio": round(rates["clip + mmlm + itm"] / base, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
