"""``mmcli fuse SPEC``: train (or, with ``--eval-only``, apply) a fusion head on a pretrained run.

The run folder is a full run folder (the base's dual encoder, possibly fine-tuned, plus the
fusion encoder and the task head), and after training or with ``--eval-only`` it also holds
``predictions.jsonl`` (id, question, type, answer, predicted, score) and ``fused.npy`` (pooled
fused features, L2-normalised, one row per prediction) with its sidecar ``fused.npy.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mmcli import __version__, io
from mmcli.errors import MmcliError
from mmcli.spec import FuseSpec, load_spec_of_kind

PREDICTIONS = "predictions.jsonl"
FEATURES = "fused.npy"


def run(
    spec_path: Path,
    overrides: list[str],
    *,
    resume: bool = False,
    eval_only: bool = False,
    device: str = "auto",
    explain: Path | None = None,
) -> dict[str, Any]:
    """Run a fuse spec: train then apply, or only apply (``eval_only``); return the summary.

    ``explain``: a folder for PNGs of a few validation images with each region's box labelled
    by its best-aligned caption concepts (graph fusion only)."""
    spec: FuseSpec = load_spec_of_kind(spec_path, "fuse", overrides)
    from mmcli.distributed import close_world, init_world

    if spec.task == "generate" and (eval_only or explain is not None):
        flag = "--eval-only" if eval_only else "--explain"
        raise MmcliError(f"{flag}: not for task generate (score a generator with mmcli eval's generation task)")
    world = init_world(device)
    try:
        train_run = _train_generator if spec.task == "generate" else _train
        result = {} if eval_only else train_run(spec, world, resume)
        applies = spec.task != "generate" and spec.data.val is not None
        if world.is_main and applies and not result.get("interrupted"):
            result.update(apply(spec.run_dir(), spec, world.device, explain))
        return {
            "run_dir": str(spec.run_dir()),
            "task": spec.task,
            "base": spec.base,
            "eval_only": eval_only,
            "is_main": world.is_main,
            "device": str(world.device),
            **result,
        }
    finally:
        close_world(world)


def _examples(spec: FuseSpec, path: str):
    from mmcli.data.examples import apply_box_file, matching_examples, question_examples, read_shapes_jsonl

    records = read_shapes_jsonl(path)
    if spec.data.boxes is not None:
        records = apply_box_file(records, spec.data.boxes)
    return question_examples(records) if spec.task == "vqa" else matching_examples(records, spec.train.seed)


def _train(spec: FuseSpec, world, resume: bool) -> dict[str, Any]:
    from mmcli.data.examples import ExampleDataset, answer_prior, answer_vocabulary
    from mmcli.data.tokenize import Tokenize
    from mmcli.models.downstream import ITM_LABELS, build_fuse_model, fuse_modules, reused_modules
    from mmcli.models.encoders import count_parameters
    from mmcli.models.loading import load_model
    from mmcli.training.checkpoint import resume_into, save_spec
    from mmcli.training.loop import train
    from mmcli.training.runs import check_run_dir, run_folder, seed_everything
    from mmcli.training.tasks import FuseTask

    run_dir = _check_output(spec, world)
    if world.is_main:  # early, before the base run is loaded; run_folder checks again
        check_run_dir(run_dir, resume=resume, overwrite=spec.output.overwrite)
    seed_everything(spec.train.seed)
    base = load_model(spec.base, device=world.device)
    if base.model.captioner:
        raise MmcliError(
            f"base: {spec.base} is a CoCa captioning run; fusion reads a CLIP text tower (train the base "
            "with a plain architecture such as mmcli-tiny)"
        )
    examples = _examples(spec, spec.data.train)
    labels = answer_vocabulary(examples) if spec.task == "vqa" else ITM_LABELS
    modules = fuse_modules(base.model, spec.base, spec, labels)
    model = build_fuse_model(base.model, modules, reused_modules(base.model, spec)).to(world.device)

    # The deterministic transform: a random crop could cut a shape off and change the answer.
    tokenize = Tokenize(base.tokenizer)
    concepts = modules["fusion"]["strategy"] == "graph"
    dataset = ExampleDataset(examples, labels, base.preprocess, tokenize, concepts=concepts)
    per_rank = spec.data.batch_size // world.world_size
    loaders, per_epoch = _training_loaders(spec, dataset, world)
    validate = _validator(spec, labels, tokenize, base.preprocess, world.device, per_rank, concepts)
    meta = {
        "mmcli_version": __version__,
        "arch": base.arch,
        "kind": "fuse",
        "task": spec.task,
        "base": spec.base,
        "modules": modules,
    }
    if spec.task == "vqa":
        meta["answer_prior"] = answer_prior(examples)
    # Everything above checked the spec, the base run and the data; only now is the folder touched.
    with run_folder(run_dir, resume=resume, overwrite=spec.output.overwrite, is_main=world.is_main):
        resume_state = resume_into(run_dir, model, resume)
        if world.is_main:
            save_spec(run_dir, spec)
            shutil.copyfile(Path(spec.base) / io.OPEN_CLIP_CONFIG, run_dir / io.OPEN_CLIP_CONFIG)
        task = FuseTask(model, spec.task, frozen=spec.encoders == "frozen")
        result = train(
            task,
            loaders=loaders,
            batches_per_epoch=per_epoch,
            spec=spec.train,
            world=world,
            run_dir=run_dir,
            meta=meta,
            validate=validate,
            resume=resume_state,
            progress_label=f"fuse {spec.task}",
        )
    return {
        "parameters": count_parameters(model),
        "trained_parameters": count_parameters(task),
        **_training_summary(result, world),
    }


def _training_loaders(spec: FuseSpec, dataset, world):
    """``(loaders(epoch, start_batch), batches per epoch)`` of this rank's share of ``dataset``."""
    from mmcli.data.examples import example_loader

    def loaders(epoch: int, start_batch: int):
        return example_loader(
            dataset,
            batch_size=spec.data.batch_size // world.world_size,
            train=True,
            seed=spec.train.seed,
            epoch=epoch,
            start_batch=start_batch,
            rank=world.rank,
            world_size=world.world_size,
            workers=spec.data.workers,
        )

    per_epoch = len(loaders(0, 0))
    if per_epoch == 0:
        raise MmcliError(f"{spec.data.train}: fewer examples than one batch ({spec.data.batch_size})")
    return loaders, per_epoch


def _check_output(spec: FuseSpec, world) -> Path:
    """The run folder, refused before anything loads if it is the base or cannot be written."""
    if spec.data.batch_size % world.world_size:
        raise MmcliError(f"data.batch_size: {spec.data.batch_size} is not divisible by {world.world_size} ranks")
    run_dir = spec.run_dir()
    if run_dir.resolve() == Path(spec.base).resolve():
        raise MmcliError(f"output: the run folder {run_dir} is the base run; give the fuse run another output.name")
    return run_dir


def _caption_examples(path: str):
    from mmcli.data.examples import Example, read_shapes_jsonl

    return [Example(r["id"], r["image"], r["caption"], "", "caption") for r in read_shapes_jsonl(path)]


def _train_generator(spec: FuseSpec, world, resume: bool) -> dict[str, Any]:
    """``task: generate``: a text-to-image generator trained on the base run's frozen text tower."""
    from mmcli.data.examples import ExampleDataset, example_loader
    from mmcli.data.images import signed_pixels
    from mmcli.data.tokenize import Tokenize
    from mmcli.evaluation.generation import denoising_validator
    from mmcli.models.encoders import count_parameters
    from mmcli.models.generation import generator_config
    from mmcli.models.loading import load_model
    from mmcli.models.multimodal import MultimodalModel
    from mmcli.training.checkpoint import resume_into, save_spec
    from mmcli.training.loop import train
    from mmcli.training.runs import check_run_dir, run_folder, seed_everything
    from mmcli.training.tasks import GenerationTask

    run_dir = _check_output(spec, world)
    if world.is_main:
        check_run_dir(run_dir, resume=resume, overwrite=spec.output.overwrite)
    seed_everything(spec.train.seed)
    base = load_model(spec.base, device="cpu")
    if base.model.captioner:
        raise MmcliError(f"base: {spec.base} is a CoCa captioning run; the generator reads a CLIP text tower")
    modules = {k: v for k, v in base.model.modules_config.items() if k == "mask_token"}
    clip = base.model.clip
    modules["generator"] = generator_config(spec.generator, clip.transformer.width, clip.text_projection.shape[1])
    seed_everything(spec.train.seed)  # the generator's initial weights depend on the seed alone
    model = MultimodalModel(base.model.clip, modules).to(world.device)
    tokenize = Tokenize(base.tokenizer)
    pixels = signed_pixels(modules["generator"]["image_size"])
    dataset = ExampleDataset(_caption_examples(spec.data.train), [], pixels, tokenize)
    per_rank = spec.data.batch_size // world.world_size
    loaders, per_epoch = _training_loaders(spec, dataset, world)
    validate = None
    if spec.data.val is not None:
        val = ExampleDataset(_caption_examples(spec.data.val)[: spec.data.val_max], [], pixels, tokenize)
        val_loader = example_loader(val, batch_size=per_rank, train=False, seed=spec.train.seed)
        validate = denoising_validator(val_loader, world.device, seed=spec.train.seed)
    meta = {"mmcli_version": __version__, "arch": base.arch, "kind": "fuse", "task": spec.task, "base": spec.base}
    meta["modules"] = modules
    with run_folder(run_dir, resume=resume, overwrite=spec.output.overwrite, is_main=world.is_main):
        resume_state = resume_into(run_dir, model, resume)
        if world.is_main:
            save_spec(run_dir, spec)
            shutil.copyfile(Path(spec.base) / io.OPEN_CLIP_CONFIG, run_dir / io.OPEN_CLIP_CONFIG)
        start_step = resume_state["progress"]["step"] if resume_state else 0
        task = GenerationTask(
            model, tokenize("").to(world.device), seed=spec.train.seed, rank=world.rank, start_step=start_step
        )
        result = train(
            task,
            loaders=loaders,
            batches_per_epoch=per_epoch,
            spec=spec.train,
            world=world,
            run_dir=run_dir,
            meta=meta,
            validate=validate,
            resume=resume_state,
            progress_label="fuse generate",
        )
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_parameters": count_parameters(task),
        **_training_summary(result, world),
    }


def _training_summary(result, world) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "interrupted": result.interrupted,
        "samples_per_s": round(result.samples_per_s, 1),
        "train_seconds": round(result.train_seconds, 1),
        "loss_weights": result.loss_weights,
        "skipped": result.skipped,
        "world_size": world.world_size,
        "train": result.last_metrics,
        "val": result.last_validation,
    }


def _validator(spec: FuseSpec, labels, tokenize, preprocess, device, batch_size, concepts: bool):
    from mmcli.data.examples import ExampleDataset, example_loader
    from mmcli.evaluation.fusion import fuse_validator

    if spec.data.val is None:
        return None
    examples = _examples(spec, spec.data.val)[: spec.data.val_max]
    dataset = ExampleDataset(examples, labels, preprocess, tokenize, concepts=concepts)
    loader = example_loader(dataset, batch_size=batch_size, train=False, seed=spec.train.seed)
    return fuse_validator(loader, examples, labels, spec.task, device)


def apply(run_dir: Path, spec: FuseSpec, device, explain: Path | None = None) -> dict[str, Any]:
    """Predict on ``spec.data.val`` with the run folder's model, write the predictions and fused
    features, and score them (plus the base run's MLM accuracy when it has an MLM head); with
    ``explain``, also write alignment pictures there."""
    from mmcli.data.examples import ExampleDataset, example_loader
    from mmcli.data.tokenize import Tokenize
    from mmcli.evaluation.fusion import evaluate_mlm, predict
    from mmcli.evaluation.metrics import answer_accuracy
    from mmcli.models.downstream import task_labels, uses_graph
    from mmcli.models.loading import load_model

    if not io.is_run_dir(run_dir):
        raise MmcliError(f"{run_dir}: no fuse run to evaluate; run mmcli fuse without --eval-only first")
    loaded = load_model(str(run_dir), device=device)
    graph = uses_graph(loaded.model)
    if explain is not None and not graph:
        raise MmcliError(
            "--explain: the run's fusion has no region–concept graph (use fusion.strategy: graph "
            "or a fusion.graph section)"
        )
    labels = task_labels(loaded.model, spec.task)
    examples = _examples(spec, spec.data.val)[: spec.data.val_max]
    dataset = ExampleDataset(examples, labels, loaded.preprocess, Tokenize(loaded.tokenizer), concepts=graph)
    loader = example_loader(dataset, batch_size=spec.data.batch_size, train=False, seed=spec.train.seed)
    rows, features = predict(loaded.model, loader, examples, labels, spec.task, device)
    _write_jsonl(Path(run_dir) / PREDICTIONS, rows)
    write_features(Path(run_dir) / FEATURES, features, [r["id"] for r in rows], loaded, spec.task)
    out = {
        "report": answer_accuracy(rows, loaded.meta.get("answer_prior")),
        "predictions": str(Path(run_dir) / PREDICTIONS),
        "features": str(Path(run_dir) / FEATURES),
    }
    if explain is not None:
        from mmcli.viz.explain import write_explanations

        out["explain"] = write_explanations(loaded.model, dataset, Path(explain), device=device)
    base_modules = io.read_meta(Path(spec.base)).get("modules", {})
    if "mlm_head" in base_modules:
        image_ok = base_modules.get("fusion", {}).get("strategy", "late") != "late"
        kinds = [False] + ([True] if image_ok else [])
        out["base_mlm"] = {
            ("image_conditioned" if c else "text_only"): evaluate_mlm(
                spec.base, spec.data.val, image_conditioned=c, device=device, batch_size=spec.data.batch_size
            )
            for c in kinds
        }
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    io.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_features(path: Path, features: np.ndarray, ids: list[str], loaded, task: str) -> None:
    """``features`` L2-normalised as ``path`` (.npy) with a sidecar ``path.json`` naming the model
    and the row → example mapping; both written atomically, the array first."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    rows = (features / np.maximum(norms, 1e-12)).astype(np.float32)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add .npy to a path
            np.save(f, rows)

    io.atomic_write(path, save)
    sidecar = {
        "format": "mmcli-fused-features",
        "version": 1,
        "modality": "fused",
        "task": task,
        "model": {"ref": loaded.ref, "arch": loaded.arch, "checksum": loaded.checksum},
        "dim": int(rows.shape[1]),
        "dtype": "float32",
        "count": len(ids),
        "items": ids,
    }
    io.atomic_write_text(Path(str(path) + ".json"), json.dumps(sidecar, indent=2))
