"""Training throughput: ``mmcli pretrain`` against open_clip's own trainer, in one run.

Same preset (registered with open_clip for both), same shapes data, batch size, precision,
optimizer settings, workers and number of steps. Each trainer's per-step rate includes waiting
for data; the figure is the steady-state rate (harmonic mean of the per-step rates, first 20% of
steps dropped as warm-up), computed the same way for both.

    python tests/bench/train_throughput.py [--steps 45] [--batch-size 128] [--arch mmcli-tiny]

open_clip's trainer ships inside open_clip_torch (``open_clip_train``) and needs pandas.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

RATE = re.compile(r"Batch \(t\): [\d.]+, ([\d.]+)/s,")


def steady_rate(rates: list[float]) -> float:
    """Harmonic mean of per-step samples/s after dropping the first 20% (warm-up)."""
    steady = rates[len(rates) // 5 :] or rates
    return len(steady) / sum(1 / r for r in steady)


def window_rate(lines: list[dict]) -> float:
    """mmcli's steady rate: samples ÷ training seconds between the line at 20% (warm-up dropped)
    and the last (each line holds the run's ``samples`` and ``train_seconds`` so far). For steps of
    equal size this is the harmonic mean of their rates, as :func:`steady_rate` takes for open_clip."""
    first, last = lines[len(lines) // 5], lines[-1]
    if last["train_seconds"] <= first["train_seconds"]:
        return last["samples_per_s"]
    return (last["samples"] - first["samples"]) / (last["train_seconds"] - first["train_seconds"])


def ensure_data(workdir: Path, n: int, size: int) -> Path:
    data = workdir / f"shapes-{n}-{size}"
    if not (data / "meta.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mmcli",
                "data",
                "shapes",
                "--out",
                str(data),
                "--n",
                str(n),
                "--size",
                str(size),
                "--json",
            ],
            check=True,
            capture_output=True,
        )
    return data


def run_mmcli(args, data: Path, workdir: Path, steps: int) -> float:
    spec = workdir / "pretrain-bench.yaml"
    spec.write_text(
        f"model: {{arch: {args.arch}}}\n"
        f"data: {{train: {{path: {data / 'train.tsv'}}}, batch_size: {args.batch_size}, workers: {args.workers}}}\n"
        f"train: {{steps: {steps}, lr: 5.0e-4, weight_decay: 0.1, warmup_steps: 10, grad_clip: 1.0, "
        f"precision: fp32, log_every: 1, seed: 0}}\n"
        f"output: {{dir: {workdir / 'runs'}, name: mmcli, overwrite: true}}\n"
    )
    subprocess.run(
        [sys.executable, "-m", "mmcli", "--device", args.device, "pretrain", str(spec), "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    rows = [json.loads(x) for x in (workdir / "runs" / "mmcli" / "metrics.jsonl").read_text().splitlines()]
    return window_rate([r for r in rows if r["kind"] == "train"])


def run_open_clip(args, data: Path, workdir: Path, epochs: int) -> tuple[float, int]:
    from mmcli.models.encoders import PRESET_DIR

    launcher = (
        "import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
        "from open_clip_train.main import main; main(sys.argv[1:])"
    )
    cmd = [
        sys.executable,
        "-c",
        launcher,
        str(PRESET_DIR),
        "--train-data",
        str(data / "train.tsv"),
        "--dataset-type",
        "csv",
        "--csv-separator",
        "\t",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--model",
        args.arch,
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(epochs),
        "--lr",
        "5e-4",
        "--wd",
        "0.1",
        "--warmup",
        "10",
        "--grad-clip-norm",
        "1.0",
        "--precision",
        "fp32",
        "--workers",
        str(args.workers),
        "--seed",
        "0",
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "0",
        "--zeroshot-frequency",
        "0",
        "--val-frequency",
        "0",
        "--report-to",
        "",
        "--logs",
        str(workdir / "open_clip_logs"),
        "--name",
        f"bench-{os.getpid()}",
    ]
    if args.device == "cpu":
        cmd += ["--device", "cpu"]
    # open_clip's CSV reader takes image paths as written: relative to the data folder here.
    out = subprocess.run(cmd, cwd=data, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"open_clip_train failed:\n{out.stderr[-3000:]}")
    rates = [float(m.group(1)) for m in RATE.finditer(out.stdout + out.stderr)]
    return steady_rate(rates), len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mmcli-tiny")
    parser.add_argument("--n", type=int, default=1920, help="training images (a multiple of the batch size)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mmcli-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = ensure_data(workdir, args.n, args.size)
    steps = args.epochs * (args.n // args.batch_size)
    oc_rate, oc_steps = run_open_clip(args, data, workdir, args.epochs)
    mm_rate = run_mmcli(args, data, workdir, steps)
    print(
        f"model {args.arch}, batch {args.batch_size}, {steps} steps, fp32, {args.workers} workers, device {args.device}"
    )
    print(f"{'trainer':<22}{'steps':>8}{'samples/s':>12}")
    print(f"{'open_clip_train':<22}{oc_steps:>8}{oc_rate:>12.1f}")
    print(f"{'mmcli pretrain':<22}{steps:>8}{mm_rate:>12.1f}")
    ratio = mm_rate / oc_rate
    print(f"ratio mmcli / open_clip = {ratio:.2f}  (target >= 1.0: {'PASS' if ratio >= 1.0 else 'FAIL'})")


if __name__ == "__main__":
    main()
