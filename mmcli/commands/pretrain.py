"""``mmcli pretrain SPEC``: train a dual encoder (and its objectives) from a run spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmcli import __version__
from mmcli.errors import MmcliError
from mmcli.spec import PretrainSpec, load_spec_of_kind


def with_text_cfg(model_config: dict[str, Any], text_cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of an open_clip model config with ``text_cfg`` fields replaced."""
    if not text_cfg:
        return model_config
    return {**model_config, "text_cfg": {**model_config.get("text_cfg", {}), **text_cfg}}


def check_before_torch(spec: PretrainSpec) -> None:
    """Report a misspelt architecture, weights path or data path before torch is imported (which
    takes seconds): the checks that need no model."""
    from mmcli.data.sources import source_format
    from mmcli.models.architectures import check_model_spec

    check_model_spec(spec.model)
    for source in (spec.data.train, spec.data.val):
        if source is not None:
            source_format(source)  # a local path that does not exist, or a suffix of no known format


def run(spec_path: Path, overrides: list[str], *, resume: bool = False, device: str = "auto") -> dict[str, Any]:
    """Run a pretraining spec end to end; return the summary (also printed by the CLI)."""
    spec: PretrainSpec = load_spec_of_kind(spec_path, "pretrain", overrides)
    check_before_torch(spec)
    from mmcli.data.batches import make_loader
    from mmcli.data.tokenize import Tokenize
    from mmcli.distributed import close_world, init_world
    from mmcli.models.encoders import build_dual_encoder, count_parameters
    from mmcli.models.multimodal import build_multimodal, open_clip_text_cfg
    from mmcli.models.weights import save_open_clip_config
    from mmcli.training.checkpoint import resume_into, save_spec
    from mmcli.training.loop import train
    from mmcli.training.runs import check_run_dir, run_folder, seed_everything
    from mmcli.training.tasks import Pretrainer
    from mmcli.training.validation import contrastive_validator

    world = init_world(device)
    try:
        if spec.data.batch_size % world.world_size:
            raise MmcliError(f"data.batch_size: {spec.data.batch_size} is not divisible by {world.world_size} ranks")
        if world.is_main:  # early, before the model is built; run_folder checks again
            check_run_dir(spec.run_dir(), resume=resume, overwrite=spec.output.overwrite)
        seed_everything(spec.train.seed)
        encoder = build_dual_encoder(spec.model, device=world.device)
        objectives = spec.objectives.enabled()
        model = build_multimodal(encoder.model, objectives, spec.fusion).to(world.device)

        per_rank = spec.data.batch_size // world.world_size
        tokenize = Tokenize(encoder.tokenizer)

        def loaders(epoch: int, start_batch: int):
            return make_loader(
                spec.data.train,
                spec.data,
                encoder.preprocess_train,
                tokenize,
                batch_size=per_rank,
                train=True,
                seed=spec.train.seed,
                rank=world.rank,
                world_size=world.world_size,
                epoch=epoch,
                start_batch=start_batch,
            )

        per_epoch = len(loaders(0, 0))
        if per_epoch == 0:
            raise MmcliError(f"{spec.data.train.path}: fewer samples than one batch ({spec.data.batch_size})")
        validate = None
        if spec.data.val is not None:
            val_loader = make_loader(
                spec.data.val,
                spec.data,
                encoder.preprocess_val,
                tokenize,
                batch_size=per_rank,
                train=False,
                seed=spec.train.seed,
                limit=spec.data.val_max,
            )
            validate = contrastive_validator(val_loader, world.device)
        meta = {
            "mmcli_version": __version__,
            "arch": spec.model.arch,
            "kind": "pretrain",
            "modules": model.modules_config,
        }
        # Everything above checked the spec, the model and the data; only now is the folder touched.
        with run_folder(
            spec.run_dir(), resume=resume, overwrite=spec.output.overwrite, is_main=world.is_main
        ) as run_dir:
            resume_state = resume_into(run_dir, model, resume)
            if world.is_main:
                save_spec(run_dir, spec)
                text_cfg = open_clip_text_cfg(model)
                save_open_clip_config(run_dir, with_text_cfg(encoder.model_config, text_cfg), encoder.preprocess_config)
            result = train(
                Pretrainer(model, objectives, world),
                loaders=loaders,
                batches_per_epoch=per_epoch,
                spec=spec.train,
                world=world,
                run_dir=run_dir,
                meta=meta,
                validate=validate,
                resume=resume_state,
                progress_label="pretrain",
            )
        return {
            "run_dir": str(run_dir),
            "arch": spec.model.arch,
            "parameters": count_parameters(model),
            "steps": result.steps,
            "interrupted": result.interrupted,
            "samples_per_s": round(result.samples_per_s, 1),
            "train_seconds": round(result.train_seconds, 1),
            "loss_weights": result.loss_weights,
            "skipped": result.skipped,
            "world_size": world.world_size,
            "is_main": world.is_main,
            "device": str(world.device),
            "train": result.last_metrics,
            "val": result.last_validation,
        }
    finally:
        close_world(world)
