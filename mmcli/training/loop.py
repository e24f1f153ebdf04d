"""The one training loop, used by ``pretrain`` and ``fuse``.

It trains a :class:`~mmcli.training.tasks.TrainingTask` (named losses and their weights, what
to do after a step) and knows nothing else of the model: AdamW (Loshchilov & Hutter) with
weight-decay groups, cosine schedule with warm-up, gradient clipping and accumulation, bf16
autocast, DDP, periodic validation, resumable atomic checkpoints, and a clean stop (with a
checkpoint) on SIGINT/SIGTERM. What it logs goes through :class:`~mmcli.training.run_log.RunLog`
(``metrics.jsonl``, ``curves.png``, TensorBoard); its samples/s is :class:`Throughput`'s, the one
figure of the progress bar, ``metrics.jsonl`` and the summary (docs/training.md).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcli.data.batches import to_device
from mmcli.distributed import World, all_reduce_mean, barrier
from mmcli.errors import MmcliError
from mmcli.spec import TrainSpec
from mmcli.training import checkpoint as ckpt
from mmcli.training.run_log import RunLog
from mmcli.training.tasks import TrainingTask

NO_DECAY_NAMES = ("positional_embedding", "class_embedding", "logit_scale", "logit_bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay weight matrices; never biases, norms, positions or the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine decay to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast on CUDA for ``auto``; on CPU only when ``bf16`` is asked for."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class Progress:
    """Where training stands; saved in ``train_state.pt``."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    skipped: int = 0
    """Training samples left out so far because they could not be read (see ``batch["skipped"]``)."""

    def as_dict(self) -> dict[str, int]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples": self.samples,
            "skipped": self.skipped,
        }


@dataclass
class TrainResult:
    """What a call to :func:`train` did."""

    steps: int
    interrupted: bool
    last_metrics: dict[str, Any] = field(default_factory=dict)
    last_validation: dict[str, Any] = field(default_factory=dict)
    samples_per_s: float = 0.0
    """:class:`Throughput`'s rate over this call's steps (the last figure of the progress bar)."""
    train_seconds: float = 0.0
    """Seconds this call spent in training steps (waiting for data included; validation and
    checkpoints not)."""
    skipped: int = 0
    loss_weights: dict[str, float] = field(default_factory=dict)
    """Weight of each named loss in ``loss`` (the task's :meth:`~TrainingTask.loss_weights`)."""


@dataclass
class Throughput:
    """samples/s, defined once: samples trained ÷ wall seconds of the training steps, from waiting
    for the step's batches to the end of its optimizer step, summed over the steps of this call of
    :func:`train` (a resumed run starts again). Validation, checkpoints, logging and drawing are
    left out; the first steps' warm-up is not (it is part of a run's wall time too). Under DDP the
    samples are those of every rank. The progress bar, each train line of ``metrics.jsonl`` and
    the summary all show this one figure (it replaced three: a step's rate on the bar, the logged
    step's in the file and a harmonic mean of steps in the summary, which disagreed)."""

    samples: int = 0
    seconds: float = 0.0

    def add(self, samples: int, seconds: float) -> None:
        """Count one step."""
        self.samples += samples
        self.seconds += seconds

    @property
    def rate(self) -> float:
        """Samples per second so far (0 before the first step)."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0


class StopWaiting(BaseException):
    """Raised by the first signal while the loop waits for data: no step has begun, so the run
    can be saved at once instead of after a batch that may never come. A ``BaseException``, like
    ``KeyboardInterrupt``, so that a decoder's ``except Exception`` cannot take it for a bad image."""


class StopFlag:
    """Turns the first SIGINT/SIGTERM into a request to save and stop after the current step.

    While the loop waits for data (``waiting``) the first signal stops the wait at once
    (:class:`StopWaiting`). A second signal stops at once (``KeyboardInterrupt``), except during
    a save (``saving``): the save finishes first, so a checkpoint is never left half-written.
    """

    def __init__(self, interrupt_waits: bool = True) -> None:
        self.requested = False
        self.waiting = False
        self.saving = False
        self.abort_after_save = False
        self.interrupt_waits = interrupt_waits
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.saving:
            self.abort_after_save = self.requested
            self.requested = True
            return
        if self.requested:  # a second signal stops at once
            raise KeyboardInterrupt
        self.requested = True
        if self.waiting and self.interrupt_waits:
            raise StopWaiting

    @contextmanager
    def save_in_progress(self) -> Iterator[None]:
        """Signals during the block wait for its end; a second one then stops at once."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
        if self.abort_after_save:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


LoaderFactory = Callable[[int, int], Iterable[dict]]
"""``(epoch, start_batch) -> iterable of batches`` with ``len()`` = batches left in the epoch."""


def train(
    task: TrainingTask,
    *,
    loaders: LoaderFactory,
    batches_per_epoch: int,
    spec: TrainSpec,
    world: World,
    run_dir: Path,
    meta: dict[str, Any],
    validate: Callable[[nn.Module], dict[str, Any]] | None = None,
    resume: dict[str, Any] | None = None,
    progress_label: str = "train",
) -> TrainResult:
    """Train ``task`` and checkpoint its model in ``run_dir``; ``validate(model)`` runs every
    ``spec.val_every`` steps and at the end."""
    total = total_steps(spec, batches_per_epoch)
    params = param_groups(task, spec.weight_decay)
    optimizer = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_lr(s, total=total, warmup=spec.warmup_steps, min_ratio=spec.min_lr_ratio)
    )
    state = Progress()
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        state = Progress(**resume["progress"])
        ckpt.set_rng_state(resume["rng"])
    loop = _Loop(
        runner=_DDP(task, world),
        task=task,
        optimizer=optimizer,
        scheduler=scheduler,
        spec=spec,
        world=world,
        run_dir=Path(run_dir),
        meta=meta,
        validate=validate,
        log=RunLog(
            Path(run_dir),
            enabled=world.is_main,
            tensorboard=spec.tensorboard,
            resumed_at=state.step if resume is not None else None,
        ),
    )
    try:
        return loop.run(state, loaders, total, batches_per_epoch, progress_label)
    finally:
        loop.log.close()


def total_steps(spec: TrainSpec, batches_per_epoch: int) -> int:
    """Optimizer steps of the whole run (``steps``, or ``epochs`` converted)."""
    if spec.steps is not None:
        return spec.steps
    return max(1, math.ceil(spec.epochs * batches_per_epoch / spec.accumulate))


def _DDP(task: TrainingTask, world: World) -> nn.Module:
    if not world.distributed:
        return task
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(task, device_ids=ids, find_unused_parameters=task.find_unused_parameters)


@dataclass
class _Loop:
    """The loop's moving parts, so each step of it reads as one short method."""

    runner: nn.Module
    task: TrainingTask
    optimizer: torch.optim.Optimizer
    scheduler: Any
    spec: TrainSpec
    world: World
    run_dir: Path
    meta: dict[str, Any]
    validate: Callable[[nn.Module], dict[str, Any]] | None
    log: RunLog
    last_val: dict[str, Any] = field(default_factory=dict)
    bar: Any = None
    val_row: Any = None

    def __post_init__(self) -> None:
        self.device = self.world.device
        self.model = self.task.model
        self.weights = self.task.loss_weights()

    # -- one optimizer step ---------------------------------------------------------------------
    def step(self, micro_batches: list[dict], number: int) -> dict[str, float]:
        self.runner.train()
        sums: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            batch = to_device(batch, self.device)
            sync = i == len(micro_batches) - 1 or not self.world.distributed
            with nullcontext() if sync else self.runner.no_sync():
                with autocast_context(self.spec.precision, self.device):
                    losses = self.runner(batch)
                total = sum(self.weights[k] * v for k, v in losses.items())
                (total / len(micro_batches)).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / len(micro_batches)
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach()) / len(micro_batches)
        if self.spec.grad_clip is not None:
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.task.parameters(), self.spec.grad_clip))
        self.stop_if_not_finite(sums, number)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.task.after_step()
        return sums

    def stop_if_not_finite(self, sums: dict[str, float], number: int) -> None:
        """Stop before the optimizer step when a loss or the gradient norm is NaN or infinite: the
        weights are still those of the last step, and no checkpoint of NaN weights is written."""
        bad = {k: v for k, v in sums.items() if not math.isfinite(v)}
        if all_reduce_mean(1.0 if bad else 0.0, self.world) > 0:  # every rank stops at this step
            parts = ", ".join(f"{k} {v}" for k, v in bad.items()) or "on another rank"
            raise MmcliError(
                f"step {number}: the loss is not finite ({parts}); stopped before updating the weights, "
                "nothing of this step saved (lower train.lr, raise train.warmup_steps, or check the data)"
            )

    # -- bookkeeping --------------------------------------------------------------------------------
    def save(self, state: Progress, flag: StopFlag) -> None:
        if self.world.is_main:
            train_state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "progress": state.as_dict(),
                "rng": ckpt.rng_state(),
            }
            with flag.save_in_progress():
                ckpt.save_checkpoint(self.run_dir, self.model, {**self.meta, **state.as_dict()}, train_state)
        barrier(self.world)

    def run_validation(self, state: Progress) -> None:
        """Validate (main rank), log the line and redraw ``curves.png``; a row of the progress
        bar shows that it runs and then what it scored."""
        if self.validate is None:
            return
        if self.world.is_main:
            self.runner.eval()
            row = self.validation_row(state.step)
            with torch.no_grad(), autocast_context(self.spec.precision, self.device):
                self.last_val = {"step": state.step, "kind": "val", **self.validate(self.model)}
            self.bar.update(row, total=1, completed=1, info=validation_info(self.last_val))
            self.log.write(self.last_val)
            self.log.draw()
        barrier(self.world)

    def validation_row(self, step: int) -> Any:
        """A new row of the progress bar (pulsing: validators do not count their batches) in
        place of the previous validation's."""
        if self.val_row is not None:
            self.bar.remove_task(self.val_row)
        self.val_row = self.bar.add_task("validate", total=None, info=f"step {step}")
        return self.val_row

    def write_train_line(self, state: Progress, sums: dict[str, float], clock: Throughput) -> dict[str, Any]:
        """Log a train line of ``metrics.jsonl`` (losses averaged over the ranks)."""
        record = {
            "step": state.step,
            "kind": "train",
            "epoch": state.epoch,
            **{k: round(all_reduce_mean(v, self.world), 6) for k, v in sums.items()},
            "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": round(clock.rate, 2),
            "train_seconds": round(clock.seconds, 6),
            "samples": state.samples,
            "skipped": state.skipped,
            **self.task.log_values(),
        }
        self.log.write(record)
        return record

    def stop_agreed(self, flag: StopFlag) -> bool:
        # Every rank must stop at the same step, or the next collective would hang.
        return all_reduce_mean(1.0 if flag.requested else 0.0, self.world) > 0

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, state: Progress, loaders: LoaderFactory, total: int, per_epoch: int, label: str) -> TrainResult:
        spec = self.spec
        bar = self.bar = _progress_bar(self.world.is_main)
        task_id = bar.add_task(label, total=total, completed=state.step, info="")
        last: dict[str, Any] = {}
        sums: dict[str, float] = {}
        interrupted = False
        clock = Throughput()
        # Under DDP every rank must stop at the same step, so there a signal waits for the step's end.
        with bar, StopFlag(interrupt_waits=not self.world.distributed) as flag:
            batches = _epoch_batches(loaders, state)
            while state.step < total:
                t0 = time.perf_counter()
                position = (state.epoch, state.batch_in_epoch)
                try:
                    micro = self.fetch(batches, flag)
                except StopWaiting:
                    state.epoch, state.batch_in_epoch = position  # the next run reads these batches again
                    if sums and last.get("step") != state.step:  # the summary shows the bar's last loss
                        last = self.write_train_line(state, sums, clock)
                    if state.step > 0:  # before the first step there is nothing to save
                        self.save(state, flag)
                    interrupted = True
                    break
                sums = self.step(micro, state.step + 1)
                n = sum(int(b["images"].shape[0]) for b in micro) * self.world.world_size
                state.step += 1
                state.samples += n
                state.skipped += int(all_reduce_mean(sum(int(b.get("skipped", 0)) for b in micro), self.world))
                clock.add(n, time.perf_counter() - t0)
                lr = self.optimizer.param_groups[0]["lr"]
                bar.update(task_id, advance=1, info=train_info(sums["loss"], lr, clock.rate))
                if state.step % spec.log_every == 0 or state.step == total:
                    last = self.write_train_line(state, sums, clock)
                if spec.val_every and state.step % spec.val_every == 0 and state.step < total:
                    self.run_validation(state)
                stop = self.stop_agreed(flag)
                if stop and last.get("step") != state.step:  # the summary shows the bar's last loss
                    last = self.write_train_line(state, sums, clock)
                if stop or (spec.save_every and state.step % spec.save_every == 0 and state.step < total):
                    self.save(state, flag)
                if stop:
                    interrupted = True
                    break
            if not interrupted:
                self.run_validation(state)
                self.save(state, flag)
            if interrupted or self.validate is None:  # else the last validation has just drawn it
                self.log.draw()
        return TrainResult(
            steps=state.step,
            interrupted=interrupted,
            last_metrics=last,
            last_validation=self.last_val,
            samples_per_s=clock.rate,
            train_seconds=clock.seconds,
            skipped=state.skipped,
            loss_weights=dict(self.weights),
        )

    def fetch(self, batches: Iterator[dict], flag: StopFlag) -> list[dict]:
        """The next step's micro-batches; a first signal meanwhile raises :class:`StopWaiting`."""
        flag.waiting = True
        try:
            if flag.requested and flag.interrupt_waits:
                raise StopWaiting
            return [next(batches) for _ in range(self.spec.accumulate)]
        finally:
            flag.waiting = False


def _epoch_batches(loaders: LoaderFactory, state: Progress):
    """Endless micro-batches across epochs, keeping ``state``'s data position current; a whole
    epoch without one usable batch is an error, not an endless loop."""
    while True:
        start, yielded = state.batch_in_epoch, 0
        loader = loaders(state.epoch, start)
        for batch in loader:
            # A batch stands for the planned batches the data layer dropped before it (no image decoded).
            state.batch_in_epoch += int(batch.get("batches", 1))
            yielded += 1
            yield batch
        if yielded == 0 and start == 0:
            skipped = getattr(loader, "skipped", 0)
            raise MmcliError(
                f"epoch {state.epoch}: the training data gave no usable batch ({skipped} samples unreadable, "
                "or no image–text pair in the source)"
            )
        state.epoch += 1
        state.batch_in_epoch = 0


def train_info(loss: float, lr: float, rate: float) -> str:
    """The training row's figures: the step's weighted loss, the learning rate, :class:`Throughput`."""
    return f"loss {loss:.4f}  lr {lr:.2e}  {rate:.1f} samples/s"


def validation_info(record: dict[str, Any]) -> str:
    """The validation row's figures once it has run: each score to four decimals."""
    return f"step {record['step']}  " + "  ".join(
        f"{k} {v:.4f}"
        for k, v in record.items()
        if k not in ("step", "kind") and isinstance(v, float) and not k.startswith("chance")
    )


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    return Bar(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(elapsed_when_finished=True),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )
