"""Two gloo ranks under torchrun match one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.training.test_loop import write_spec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path, shapes_dir):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = write_spec(tmp_path, shapes_dir, steps=4, name="one")
    two = write_spec(tmp_path, shapes_dir, steps=4, name="two")
    subprocess.run(
        [sys.executable, "-m", "mmcli", "--device", "cpu", "pretrain", str(one), "--json"],
        check=True,
        env=env,
        capture_output=True,
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "mmcli",
            "--device",
            "cpu",
            "pretrain",
            str(two),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count('"run_dir"') == 1  # one summary, from rank 0

    runs = tmp_path / "runs"
    losses = {}
    for name in ("one", "two"):
        rows = [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [row["loss"] for row in rows if row["kind"] == "train"]
    assert len(losses["one"]) == len(losses["two"]) == 4
    for a, b in zip(losses["one"], losses["two"]):
        assert abs(a - b) < 1e-4, (losses["one"], losses["two"])

    a = load_file(str(runs / "one" / "open_clip_model.safetensors"))
    b = load_file(str(runs / "two" / "open_clip_model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst
    # Only rank 0 wrote: one metrics line per step, not two.
    assert (runs / "two" / "metrics.jsonl").read_text().count('"kind": "train"') == 4
