"""Run integrity: a failed start keeps the old run, run names stay inside output.dir, a checkpoint
is one consistent set (double signals, kill -9 at each point of a save), weights are what their
checksum says, unusable data and non-finite losses stop cleanly."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mmcli.errors import MmcliError
from tests.training.test_loop import write_spec


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _pretrain(spec: Path, overrides=(), **kw):
    from mmcli.commands.pretrain import run

    return run(spec, list(overrides), device="cpu", **kw)


@pytest.fixture
def old_run(tmp_path, shapes_dir):
    """A finished 2-step run in runs/keep, and its spec (overwrite on, as in every example)."""
    spec = write_spec(tmp_path, shapes_dir, steps=2, name="keep")
    spec.write_text(spec.read_text().replace("name: keep", "name: keep\n  overwrite: true"))
    result = _pretrain(spec)
    return spec, Path(result["run_dir"])


# -- 1. a failed start never touches the previous run ---------------------------------------------
def test_a_mistyped_data_path_leaves_the_old_run_as_it_was(old_run):
    spec, run_dir = old_run
    before = _digests(run_dir)
    with pytest.raises(MmcliError, match="no such file"):
        _pretrain(spec, ["data.train.path=/nowhere/train.tsv"])
    assert _digests(run_dir) == before
    assert [p.name for p in run_dir.parent.iterdir()] == ["keep"]


def test_a_run_that_fails_before_its_first_checkpoint_puts_the_old_run_back(old_run, monkeypatch):
    from mmcli.training.loop import _Loop

    spec, run_dir = old_run
    before = _digests(run_dir)

    def broken(self, micro, number):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(_Loop, "step", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        _pretrain(spec)
    assert _digests(run_dir) == before
    assert [p.name for p in run_dir.parent.iterdir()] == ["keep"]  # nothing left aside


def test_overwrite_replaces_the_old_run_once_the_new_one_is_saved(old_run):
    spec, run_dir = old_run
    old_metrics = (run_dir / "metrics.jsonl").read_text()
    result = _pretrain(spec, ["train.steps=3"])
    assert result["steps"] == 3 and json.loads((run_dir / "mmcli.json").read_text())["step"] == 3
    assert (run_dir / "metrics.jsonl").read_text() != old_metrics
    assert [p.name for p in run_dir.parent.iterdir()] == ["keep"]


# -- 2. the run folder is never the output parent or the working directory ------------------------
@pytest.mark.parametrize("name", ["", " ", "run ", ".", "..", "a/b", "../x", ".hidden"])
def test_run_names_are_one_plain_folder_name(tmp_path, shapes_dir, name):
    from mmcli.spec import PretrainSpec, load_spec

    spec = write_spec(tmp_path, shapes_dir, steps=1, name="ok")
    with pytest.raises(MmcliError, match="output.name"):
        load_spec(spec, PretrainSpec, [f"output.name={json.dumps(name)}"])


def test_overwrite_never_replaces_a_folder_that_is_not_a_run(tmp_path, shapes_dir):
    spec = write_spec(tmp_path, shapes_dir, steps=1, name="photos")
    folder = tmp_path / "runs" / "photos"
    folder.mkdir(parents=True)
    (folder / "holiday.jpg").write_bytes(b"not really a jpeg")
    with pytest.raises(MmcliError, match="not an mmcli run"):
        _pretrain(spec, ["output.overwrite=true"])
    assert [p.name for p in folder.iterdir()] == ["holiday.jpg"]


# -- 3. a checkpoint is one consistent set ---------------------------------------------------------
@pytest.mark.slow
def test_a_second_signal_during_a_save_stops_after_the_save(tmp_path, shapes_dir, monkeypatch):
    from mmcli.training import checkpoint
    from mmcli.training.loop import _Loop

    full = _pretrain(write_spec(tmp_path, shapes_dir, steps=4, name="full"))
    original_step, original_state = _Loop.step, checkpoint.save_train_state
    calls = {"steps": 0}

    def step_then_signal(self, micro, number):
        out = original_step(self, micro, number)
        calls["steps"] += 1
        if calls["steps"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the first: save at the end of this step
        return out

    def state_then_second_signal(run_dir, state):
        digest = original_state(run_dir, state)
        os.kill(os.getpid(), signal.SIGINT)  # the second arrives in the middle of the save
        return digest

    monkeypatch.setattr(_Loop, "step", step_then_signal)
    monkeypatch.setattr(checkpoint, "save_train_state", state_then_second_signal)
    spec = write_spec(tmp_path, shapes_dir, steps=4, name="split")
    with pytest.raises(KeyboardInterrupt):
        _pretrain(spec)
    run_dir = tmp_path / "runs" / "split"
    meta = json.loads((run_dir / "mmcli.json").read_text())
    assert meta["step"] == 2 and set(meta["files"]) == {"open_clip_model.safetensors", "train_state.pt"}
    monkeypatch.setattr(_Loop, "step", original_step)
    monkeypatch.setattr(checkpoint, "save_train_state", original_state)
    assert _pretrain(spec, resume=True)["steps"] == 4
    _assert_same_weights(Path(full["run_dir"]), run_dir)


def _assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "open_clip_model.safetensors")), load_file(str(b / "open_clip_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from mmcli.io import atomic_write as real
    from mmcli.models import weights
    from mmcli.training import checkpoint

    mode, target = sys.argv[1], int(sys.argv[2])
    count = [0]

    def atomic_write(path, write):
        count[0] += 1
        if count[0] == target and mode == "inside":  # killed while the file is half written
            def half(tmp):
                write(tmp)
                with open(tmp, "r+b") as f:
                    f.truncate(max(1, os.path.getsize(tmp) // 2))
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, half)
        real(path, write)
        if count[0] == target and mode == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    def atomic_write_text(path, text):
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    checkpoint.atomic_write = weights.atomic_write = atomic_write
    weights.atomic_write_text = atomic_write_text
    sys.argv = ["mmcli", "--device", "cpu", "pretrain", sys.argv[3]]
    from mmcli.cli import main
    main()
    """
)


@pytest.mark.slow
def test_kill_9_at_each_point_of_a_save_gives_the_same_weights_or_a_clear_refusal(tmp_path, shapes_dir):
    """Writes: the open_clip config (1), then saves at steps 2 (2-4) and 4 (5-7), three writes
    each (train state, weights, mmcli.json); the process is killed at every point of the second
    save. A resume then ends with the weights of the
    uninterrupted run, or refuses in one line: never a silent difference."""
    full = _pretrain(write_spec(tmp_path, shapes_dir, steps=4, name="full"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outcomes = {}
    for mode, target in [("inside", 5), ("after", 5), ("inside", 6), ("after", 6), ("inside", 7), ("after", 7)]:
        name = f"kill-{mode}-{target}"
        spec = write_spec(tmp_path, shapes_dir, steps=4, name=name)
        spec.write_text(spec.read_text().replace("seed: 0", "seed: 0\n  save_every: 2"))
        killed = subprocess.run(
            [sys.executable, "-c", KILLER, mode, str(target), str(spec)], env=env, capture_output=True
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-800:]
        resumed = subprocess.run(
            [sys.executable, "-m", "mmcli", "--device", "cpu", "pretrain", str(spec), "--resume"],
            env=env,
            capture_output=True,
            text=True,
        )
        run_dir = tmp_path / "runs" / name
        if resumed.returncode == 0:
            assert not list(run_dir.glob(".*.tmp"))  # half-written temporaries are cleaned up
            _assert_same_weights(Path(full["run_dir"]), run_dir)
            steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            steps = [
                s for s, line in zip(steps, (run_dir / "metrics.jsonl").read_text().splitlines()) if '"train"' in line
            ]
            assert steps == [1, 2, 3, 4]  # each step once
            outcomes[name] = "same weights"
        else:
            assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
            assert len(resumed.stderr.strip().splitlines()) == 1 and "checksum differs" in resumed.stderr
            outcomes[name] = "refused"
    assert outcomes == {
        "kill-inside-5": "same weights",  # the state's temporary file only: step 2 intact
        "kill-after-5": "refused",  # step 4's state beside step 2's weights
        "kill-inside-6": "refused",
        "kill-after-6": "refused",  # step 4's state and weights, step 2's mmcli.json
        "kill-inside-7": "refused",
        "kill-after-7": "same weights",  # the whole set of step 4
    }


# -- 4. weights are what their checksum says ---------------------------------------------------------
def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mmcli", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def _assert_one_line_exit_2(result, *needles):
    assert result.returncode == 2, result.stderr[-1500:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr


def test_a_swapped_weights_file_is_refused_on_load(tmp_path):
    from mmcli.models.loading import load_model
    from tests.conftest import save_random_run

    a = save_random_run(tmp_path / "a", seed=0)
    b = save_random_run(tmp_path / "b", seed=1)
    load_model(str(a))
    (a / "open_clip_model.safetensors").write_bytes((b / "open_clip_model.safetensors").read_bytes())
    with pytest.raises(MmcliError, match="checksum differs"):
        load_model(str(a))
    (tmp_path / "q.txt").write_text("a red circle\n")
    _assert_one_line_exit_2(_cli("embed", str(tmp_path / "q.txt"), "--model", str(a), "--out", str(tmp_path / "e.npy")))


def test_a_truncated_weights_file_is_one_line_and_exit_2(tmp_path):
    from tests.conftest import save_random_run

    run = save_random_run(tmp_path / "run")
    weights = run / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (tmp_path / "q.txt").write_text("a red circle\n")
    out = tmp_path / "e.npy"
    _assert_one_line_exit_2(
        _cli("embed", str(tmp_path / "q.txt"), "--model", str(run), "--out", str(out)), str(weights)
    )
    # Without a recorded checksum (a run of an older version) safetensors' own error is reported.
    meta = json.loads((run / "mmcli.json").read_text())
    (run / "mmcli.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in ("checksum", "files")}))
    _assert_one_line_exit_2(
        _cli("embed", str(tmp_path / "q.txt"), "--model", str(run), "--out", str(out)), str(weights)
    )


def test_the_text_fast_path_verifies_the_weights_too(tmp_path):
    from mmcli.models.fast_text import text_encoder_for
    from tests.conftest import save_random_run

    a = save_random_run(tmp_path / "a", seed=0)
    b = save_random_run(tmp_path / "b", seed=1)
    assert text_encoder_for(a) is not None
    (a / "open_clip_model.safetensors").write_bytes((b / "open_clip_model.safetensors").read_bytes())
    with pytest.raises(MmcliError, match="checksum differs"):
        text_encoder_for(a)


def test_checksums_are_hashed_once_until_the_file_changes(tmp_path, monkeypatch):
    from mmcli import io

    monkeypatch.setenv("MMCLI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(io, "_CHECKSUMS", {})
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 1000)
    hashed = []
    real = io.file_checksum
    monkeypatch.setattr(io, "file_checksum", lambda p: hashed.append(p) or real(p))
    first = io.cached_checksum(path)
    assert io.cached_checksum(path) == first and len(hashed) == 1
    io._CHECKSUMS.clear()  # a new process: the cache file answers
    assert io.cached_checksum(path) == first and len(hashed) == 1
    path.write_bytes(b"y" * 1000)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert io.cached_checksum(path) == real(path) != first and len(hashed) == 2


def test_a_truncated_pretrained_file_is_one_line_and_exit_2(tmp_path):
    from tests.conftest import save_random_run

    run = save_random_run(tmp_path / "run")
    weights = tmp_path / "trunc.safetensors"
    weights.write_bytes((run / "open_clip_model.safetensors").read_bytes()[:3000])
    (tmp_path / "q.txt").write_text("a red circle\n")
    result = _cli(
        "embed", str(tmp_path / "q.txt"), "--model", f"mmcli-nano:{weights}", "--out", str(tmp_path / "e.npy")
    )
    _assert_one_line_exit_2(result, str(weights), "deserializing")


def test_a_malformed_file_list_in_mmcli_json_is_one_line(tmp_path):
    from tests.conftest import save_random_run

    run = save_random_run(tmp_path / "run")
    meta = json.loads((run / "mmcli.json").read_text())
    (run / "mmcli.json").write_text(json.dumps({**meta, "files": [1, 2]}))
    (tmp_path / "q.txt").write_text("a red circle\n")
    result = _cli("embed", str(tmp_path / "q.txt"), "--model", str(run), "--out", str(tmp_path / "e.npy"))
    _assert_one_line_exit_2(result, "'files'")


def test_invalid_mmcli_json_and_a_missing_run_folder_are_one_line(tmp_path):
    from tests.conftest import save_random_run

    (tmp_path / "q.txt").write_text("a red circle\n")
    out = str(tmp_path / "e.npy")
    run = save_random_run(tmp_path / "run")
    (run / "mmcli.json").write_text("{not json")
    _assert_one_line_exit_2(_cli("embed", str(tmp_path / "q.txt"), "--model", str(run), "--out", out), "mmcli.json")
    missing = tmp_path / "runs" / "nope"
    _assert_one_line_exit_2(
        _cli("embed", str(tmp_path / "q.txt"), "--model", str(missing), "--out", out), "no such run folder"
    )


# -- 7 and 9. unusable data and non-finite losses ----------------------------------------------------
class _Batches:
    """A loader over ``batches`` whose ``len`` is what the loop plans with."""

    def __init__(self, batches, on_batch=None):
        self.batches, self.on_batch = batches, on_batch

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for n, batch in enumerate(self.batches):
            if self.on_batch:
                self.on_batch(n)
            yield batch


def _real_batches(shapes_dir, tmp_path, count=4):
    from mmcli.data.batches import make_loader
    from mmcli.data.tokenize import Tokenize
    from mmcli.models.encoders import build_dual_encoder
    from mmcli.spec import ModelSpec, PretrainSpec, load_spec

    spec = load_spec(write_spec(tmp_path, shapes_dir, steps=1, name="x"), PretrainSpec, [])
    encoder = build_dual_encoder(ModelSpec(arch="mmcli-nano"))
    loader = make_loader(
        spec.data.train,
        spec.data,
        encoder.preprocess_val,
        Tokenize(encoder.tokenizer),
        batch_size=16,
        train=False,
        seed=0,
    )
    return [b for _, b in zip(range(count), loader)]


def test_an_epoch_without_a_usable_batch_is_an_error_not_a_hang(tmp_path, shapes_dir, monkeypatch):
    from mmcli.data import batches

    monkeypatch.setattr(batches, "make_loader", lambda *a, **k: _Batches([]) if k.get("train") else _Batches([]))
    spec = write_spec(tmp_path, shapes_dir, steps=2, name="empty")
    with pytest.raises(MmcliError, match="fewer samples than one batch"):
        _pretrain(spec)  # an empty source is refused before the run folder is made
    from mmcli.training.loop import Progress, _epoch_batches

    with pytest.raises(MmcliError, match="no usable batch"):
        next(_epoch_batches(lambda epoch, start: _Batches([]), Progress()))


def test_the_first_sigterm_stops_a_run_waiting_for_data(tmp_path, shapes_dir, monkeypatch):
    from mmcli.data import batches

    real = _real_batches(shapes_dir, tmp_path)

    def stall(n):
        if n == 2:  # the third batch never comes: a decoder that hangs
            os.kill(os.getpid(), signal.SIGTERM)
            try:
                time.sleep(60)
            except Exception:  # a decoder's broad except (a bad image) must not swallow the stop
                pass

    monkeypatch.setattr(batches, "make_loader", lambda *a, **k: _Batches(real, stall) if k["train"] else _Batches(real))
    t0 = time.perf_counter()
    result = _pretrain(write_spec(tmp_path, shapes_dir, steps=4, name="stalled"))
    assert time.perf_counter() - t0 < 50 and result["interrupted"] and result["steps"] == 2
    state = torch.load(Path(result["run_dir"]) / "train_state.pt", weights_only=True)
    assert state["progress"]["step"] == 2 and state["progress"]["batch_in_epoch"] == 2  # resumes at batch 3


def test_a_signal_before_the_first_step_keeps_the_old_run(old_run, shapes_dir, tmp_path, monkeypatch):
    from mmcli.data import batches

    spec, run_dir = old_run
    before = _digests(run_dir)
    real = _real_batches(shapes_dir, tmp_path)

    def stall(n):
        if n == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)

    monkeypatch.setattr(batches, "make_loader", lambda *a, **k: _Batches(real, stall) if k["train"] else _Batches(real))
    result = _pretrain(spec)
    assert result["interrupted"] and result["steps"] == 0
    assert _digests(run_dir) == before and [p.name for p in run_dir.parent.iterdir()] == ["keep"]


def test_a_replacement_cut_short_by_a_kill_is_finished_by_the_next_command(old_run):
    from mmcli.training.runs import check_run_dir

    spec, run_dir = old_run
    before = _digests(run_dir)
    dead = 2**22 + 12345  # above the kernel's default pid_max: no such process
    aside = run_dir.with_name(f".keep.replaced-{dead}")
    # killed before the new run's first checkpoint: a partial new run, the old one set aside
    run_dir.rename(aside)
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text("model: {}\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n')
    check_run_dir(run_dir, resume=False, overwrite=True)
    assert _digests(run_dir) == before and not aside.exists()
    # killed after it: the new run is kept and the old one removed
    aside.mkdir()
    (aside / "mmcli.json").write_text("{}")
    check_run_dir(run_dir, resume=True, overwrite=False)
    assert not aside.exists() and _digests(run_dir) == before


def test_skipped_samples_are_counted_in_metrics_and_summary(tmp_path, shapes_dir, monkeypatch):
    from mmcli.data import batches

    real = [{**b, "skipped": n % 2} for n, b in enumerate(_real_batches(shapes_dir, tmp_path))]
    monkeypatch.setattr(batches, "make_loader", lambda *a, **k: _Batches(real))
    result = _pretrain(write_spec(tmp_path, shapes_dir, steps=4, name="skips"))
    assert result["skipped"] == 2
    train = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped"] for m in train if m["kind"] == "train"] == [0, 1, 1, 2]


def test_a_non_finite_loss_stops_without_saving_nan_weights(tmp_path, shapes_dir, monkeypatch):
    from mmcli.training.tasks import Pretrainer

    original = Pretrainer.forward
    calls = {"n": 0}

    def nan_at_step_3(self, batch):
        calls["n"] += 1
        losses = original(self, batch)
        return {k: v * float("nan") for k, v in losses.items()} if calls["n"] == 3 else losses

    monkeypatch.setattr(Pretrainer, "forward", nan_at_step_3)
    spec = write_spec(tmp_path, shapes_dir, steps=5, name="nan")
    spec.write_text(spec.read_text().replace("seed: 0", "seed: 0\n  save_every: 1"))
    with pytest.raises(MmcliError, match="step 3: the loss is not finite"):
        _pretrain(spec)
    run_dir = tmp_path / "runs" / "nan"
    assert json.loads((run_dir / "mmcli.json").read_text())["step"] == 2
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(run_dir / "open_clip_model.safetensors")).values())
