"""What the training loop trains: one contract, implemented by pretraining and by fusion.

A task is a module whose ``forward(batch)`` returns named losses. It also says how to weigh them
(:meth:`TrainingTask.loss_weights`), whether DDP must look for parameters a step leaves unused,
what to do after each optimizer step (CLIP's clamp of the logit scale) and what to log beside
the losses. The loop knows nothing else about the model: it checkpoints ``task.model`` and
sums ``weights[name] * loss``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcli.data.batches import mix_seed
from mmcli.distributed import World
from mmcli.models.downstream import caption_inputs, pair_inputs, uses_graph
from mmcli.models.multimodal import MultimodalModel
from mmcli.training.losses import alignment_loss
from mmcli.training.objectives import OBJECTIVES


class TrainingTask(nn.Module, ABC):
    """The training loop's view of a run (wrapping this one module in DDP keeps every loss's
    computation inside DDP's forward)."""

    model: MultimodalModel
    """The model the run folder saves."""

    find_unused_parameters: bool = False
    """Whether some parameters get no gradient in a step (DDP must then look for them)."""

    @abstractmethod
    def loss_weights(self) -> dict[str, float]:
        """Weights of the named losses ``forward`` returns."""

    @abstractmethod
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """The named losses of one micro-batch."""

    def after_step(self) -> None:
        """Called after each optimizer step: keeps the learnable temperature in CLIP's range."""
        self.model.clamp_logit_scale()

    def log_values(self) -> dict[str, float]:
        """Numbers logged beside the losses: the contrastive logit scale 1/τ."""
        return {"logit_scale": round(self.model.logit_scale_value(), 4)}


class Pretrainer(TrainingTask):
    """The model plus its enabled pretraining objectives (:data:`~mmcli.training.objectives.OBJECTIVES`)."""

    def __init__(self, model: MultimodalModel, objectives: dict[str, Any], world: World):
        super().__init__()
        unknown = set(objectives) - set(OBJECTIVES)
        if unknown:
            raise ValueError(f"no implementation for objectives {sorted(unknown)}")
        self.model = model
        self.specs = dict(objectives)
        self.world = world
        # Without the contrastive loss a text-only objective leaves the image tower idle; a CoCa
        # model trained without its caption loss leaves its decoder idle.
        self.find_unused_parameters = "clip" not in self.specs or (model.captioner and "caption" not in self.specs)

    def loss_weights(self) -> dict[str, float]:
        """Each objective's ``weight`` from the spec."""
        return {name: spec.weight for name, spec in self.specs.items()}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Each enabled objective's loss on the batch, by name."""
        outputs = self.model(batch["images"], batch["texts"])
        return {
            name: OBJECTIVES[name](self.model, outputs, batch, spec, self.world) for name, spec in self.specs.items()
        }


class FuseTask(TrainingTask):
    """A fuse run: ``forward(batch)`` returns ``{task: loss}`` (cross-entropy of the task head),
    plus ``align`` (the weakly supervised region–concept alignment loss on the images' own
    captions) when the fusion is a graph fusion with a non-zero ``align_weight``.

    ``frozen`` stops gradients into the dual encoder; the fusion encoder and head always train.
    """

    def __init__(self, model: MultimodalModel, task: str, frozen: bool):
        super().__init__()
        self.model, self.task = model, task
        if frozen:
            model.clip.requires_grad_(False)
        self.align_weight = getattr(model.fusion, "align_weight", 0.0) if uses_graph(model) else 0.0

    def loss_weights(self) -> dict[str, float]:
        """The task's loss at 1, the alignment loss at the graph's ``align_weight``."""
        return {self.task: 1.0, **({"align": self.align_weight} if self.align_weight > 0 else {})}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Cross-entropy of the task head on the batch's labels (and the alignment loss)."""
        inputs = pair_inputs(self.model, batch)
        head = self.model.vqa_head if self.task == "vqa" else self.model.itm_head
        losses = {self.task: F.cross_entropy(head(self.model.fusion(inputs)).float(), batch["labels"])}
        if self.align_weight > 0:
            captions = caption_inputs(self.model, inputs, batch)
            regions, region_mask, concepts, concept_mask = self.model.fusion.nodes(captions)
            same_caption = (batch["captions"].unsqueeze(1) == batch["captions"].unsqueeze(0)).all(dim=-1)
            grounded = concept_mask & captions["concept_grounded"]  # relations take no part
            losses["align"] = alignment_loss(
                regions,
                region_mask,
                concepts,
                grounded,
                temperature=self.model.fusion.align_temperature,
                positives=same_caption,
            )
        return losses


class GenerationTask(TrainingTask):
    """A ``task: generate`` run: the denoising loss of the model's generator (DDPM's simple loss:
    the mean squared error of the predicted noise, or velocity, at a uniform timestep), the prompt
    read by the frozen text tower; ``text_dropout`` of the samples get the empty prompt
    (classifier-free guidance).

    The noise, the timesteps and the dropped captions of each micro-batch come from a generator
    seeded by (``seed``, optimizer step, micro-batch, ``rank``), not from torch's global one, which
    other code draws from (every new DataLoader iterator does): a run resumed at ``start_step`` draws
    what a run trained straight through would, and each rank draws its own noise."""

    def __init__(
        self, model: MultimodalModel, empty_prompt: torch.Tensor, *, seed: int, rank: int = 0, start_step: int = 0
    ):
        super().__init__()
        from mmcli.models.generation import noise_schedule

        self.model = model
        model.clip.requires_grad_(False)
        self.schedule = noise_schedule(model.generator.cfg, "ddpm")
        self.register_buffer("empty_prompt", empty_prompt.reshape(1, -1).long(), persistent=False)
        self.seed, self.rank = seed, rank
        self.step, self.micro_batch = start_step, 0

    @property
    def generator(self):
        return self.model.generator

    def loss_weights(self) -> dict[str, float]:
        """The denoising loss alone."""
        return {"denoise": 1.0}

    def draws(self) -> torch.Generator:
        """The random generator of the current micro-batch."""
        return torch.Generator().manual_seed(mix_seed(self.seed, self.step, self.micro_batch, self.rank))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """The prediction error on the batch's images and captions."""
        images = batch["images"]
        draws = self.draws()
        self.micro_batch += 1
        noise = torch.randn(images.shape, generator=draws).to(images.device)
        timesteps = self.schedule.config.num_train_timesteps
        steps = torch.randint(0, timesteps, (images.shape[0],), generator=draws).to(images.device)
        dropped = torch.rand(images.shape[0], generator=draws).to(images.device) < self.generator.text_dropout
        prompt = self.condition(batch["texts"], dropped)
        noisy = self.schedule.add_noise(images, noise, steps)
        target = self.generator.target(self.schedule, images, noise, steps)
        return {"denoise": F.mse_loss(self.generator(noisy, steps, prompt).float(), target.float())}

    @torch.no_grad()
    def condition(self, texts: torch.Tensor, dropped: torch.Tensor):
        """The frozen text tower's reading of ``texts``, the ``dropped`` rows replaced by the empty
        prompt (a :class:`~mmcli.models.generation.Prompt`)."""
        from mmcli.models.generation import encode_prompts

        texts = torch.where(dropped[:, None], self.empty_prompt[:, : texts.shape[1]], texts)
        return encode_prompts(self.model, texts)

    def after_step(self) -> None:
        """Updates the moving average of the generator's weights; the next step draws anew."""
        self.generator.update_ema()
        self.step, self.micro_batch = self.step + 1, 0

    def log_values(self) -> dict[str, float]:
        """Nothing beside the loss (the dual encoder is frozen)."""
        return {}
