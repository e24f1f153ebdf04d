"""Text-to-image generation: a denoising diffusion model in pixel space (Ho et al. 2020) whose
UNet reads the frozen text tower's token states through cross-attention, as the large
text-to-image systems read a frozen text encoder (Imagen, Saharia et al. 2022), with
classifier-free guidance (Ho & Salimans 2022).

diffusers provides the network (``UNet2DConditionModel``) and the noise schedules (DDPM for
training; DDIM, DPM-Solver++ and DDPM for sampling); mmcli owns the conditioning, the training
task and the run folder. A run's ``"generator"`` module entry holds everything needed to rebuild
the network and its schedule::

    {"image_size": 32, "channels": [64, 128, 128], "attention": [false, true, true],
     "layers_per_block": 1, "heads": 4, "text_dim": 128, "pooled_dim": 128, "text_dropout": 0.1,
     "ema_decay": 0.999, "timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
     "prediction": "v_prediction"}

Pixels are RGB scaled to [-1, 1]; the network predicts the velocity ``√ᾱ·ε − √(1−ᾱ)·x₀``
(Salimans & Ho 2022) or the noise ε. The velocity stays informative where ᾱ → 0: from a noise
prediction there, ``x₀ = (x_t − √(1−ᾱ)·ε̂)/√ᾱ`` multiplies every error by 1/√ᾱ (≈ 2·10⁴ at the
cosine schedule's last timestep), which a few-step sampler carries into the colours of the picture.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmcli.errors import MmcliError
from mmcli.models.captioning import item_seed
from mmcli.spec import choices

GENERATOR_PRESETS: dict[str, dict[str, Any]] = {
    # ~7 M parameters: 32 px on a laptop CPU in half an hour.
    "cpu": {"image_size": 32, "channels": [64, 128, 128], "attention": [False, True, True], "layers_per_block": 1},
    # ~56 M parameters: 64 px on one GPU.
    "gpu": {
        "image_size": 64,
        "channels": [128, 256, 256, 256],
        "attention": [False, True, True, True],
        "layers_per_block": 2,
    },
}
"""Network sizes by name (``generator.preset`` in a fuse spec); fields given in the spec win."""

choices.check_registry("generator presets", GENERATOR_PRESETS, choices.GENERATOR_PRESETS)


def build_unet(cfg: dict[str, Any]) -> nn.Module:
    """The diffusers ``UNet2DConditionModel`` a ``"generator"`` entry describes."""
    from diffusers import UNet2DConditionModel

    levels = list(cfg["attention"])
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)]
    return UNet2DConditionModel(
        sample_size=cfg["image_size"],
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(cfg["channels"]),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        layers_per_block=cfg["layers_per_block"],
        cross_attention_dim=cfg["text_dim"],
        # The pooled prompt embedding, projected and added to the timestep embedding (as Imagen does):
        # a global signal to every residual block, beside the token states the attention reads.
        class_embed_type="projection" if cfg.get("pooled_dim") else None,
        projection_class_embeddings_input_dim=cfg.get("pooled_dim"),
        # diffusers' historical name: for these blocks it is the number of heads, not their width.
        attention_head_dim=cfg["heads"],
        norm_num_groups=min(32, min(cfg["channels"])),
    )


def _ddim(common: dict[str, Any]):
    from diffusers import DDIMScheduler

    # "trailing" spacing ends at the last training timestep, which matters with few steps.
    return DDIMScheduler(**common, clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")


def _dpm(common: dict[str, Any]):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        **common, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
    )


def _ddpm(common: dict[str, Any]):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**common, clip_sample=True, variance_type="fixed_small")


SAMPLERS = {"ddim": _ddim, "dpm": _dpm, "ddpm": _ddpm}
"""Samplers by name: DDIM (Song et al. 2021; deterministic), DPM-Solver++ (Lu et al. 2022; second
order, multistep, deterministic), ancestral DDPM (Ho et al. 2020; the training chain, stochastic)."""

choices.check_registry("samplers", SAMPLERS, choices.SAMPLERS)


def noise_schedule(cfg: dict[str, Any], sampler: str = "ddpm"):
    """A fresh diffusers scheduler for ``sampler`` on the training noise schedule of ``cfg``
    (``ddpm`` is also the one training adds noise with)."""
    common = {
        "num_train_timesteps": cfg["timesteps"],
        "beta_schedule": cfg["beta_schedule"],
        "prediction_type": cfg.get("prediction", "epsilon"),
    }
    return SAMPLERS[sampler](common)


class TextToImage(nn.Module):
    """The generator of a run: ``unet`` (trained) and, with ``ema_decay``, ``ema`` — an exponential
    moving average of its weights, updated after each optimizer step and used for sampling."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.cfg = dict(cfg)
        self.unet = build_unet(self.cfg)
        self.ema_decay = self.cfg.get("ema_decay")
        if self.ema_decay is not None:
            self.ema = copy.deepcopy(self.unet).requires_grad_(False)
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    @property
    def image_size(self) -> int:
        return int(self.cfg["image_size"])

    @property
    def text_dropout(self) -> float:
        return float(self.cfg["text_dropout"])

    def sampling_unet(self) -> nn.Module:
        """The network sampling uses: the moving average when the run keeps one."""
        return self.ema if self.ema_decay is not None else self.unet

    @torch.no_grad()
    def update_ema(self) -> None:
        """One step of the moving average, its decay warmed up as ``(1 + n) / (10 + n)`` so that
        the first updates do not keep the random initialisation (diffusers' ``EMAModel`` rule)."""
        if self.ema_decay is None:
            return
        n = int(self.ema_updates)
        decay = min(float(self.ema_decay), (1 + n) / (10 + n))
        for average, param in zip(self.ema.parameters(), self.unet.parameters(), strict=True):
            average.lerp_(param.detach(), 1 - decay)
        for average, buffer in zip(self.ema.buffers(), self.unet.buffers(), strict=True):
            average.copy_(buffer)
        self.ema_updates += 1

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompt: Prompt) -> torch.Tensor:
        """The trained network's prediction (noise or velocity, ``cfg["prediction"]``) for ``noisy``
        images at ``timesteps``."""
        return predict(self.unet, noisy, timesteps, prompt)

    def target(self, schedule, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network learns to predict: the noise, or the velocity ``√ᾱ·ε − √(1−ᾱ)·x₀``."""
        if self.cfg.get("prediction", "epsilon") == "v_prediction":
            return schedule.get_velocity(images, noise, timesteps)
        return noise


@dataclass
class Prompt:
    """What the UNet reads of a batch of prompts: the text tower's token states [B, L, width] and,
    when the generator takes it, the pooled, normalised prompt embedding [B, D]."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None

    def expand(self, n: int) -> Prompt:
        """One prompt repeated ``n`` times."""
        pooled = None if self.pooled is None else self.pooled.expand(n, -1)
        return Prompt(self.states.expand(n, -1, -1), pooled)

    @staticmethod
    def cat(prompts: Sequence[Prompt]) -> Prompt:
        """The prompts' rows one after another."""
        pooled = None if prompts[0].pooled is None else torch.cat([p.pooled for p in prompts])
        return Prompt(torch.cat([p.states for p in prompts]), pooled)


def predict(unet: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, prompt: Prompt) -> torch.Tensor:
    """``unet``'s output for ``noisy`` at ``timesteps`` given ``prompt``."""
    return unet(noisy, timesteps, encoder_hidden_states=prompt.states, class_labels=prompt.pooled).sample


def encode_prompts(model, texts: torch.Tensor) -> Prompt:
    """The frozen text tower's reading of ``texts`` (token ids [B, L]) for ``model``'s generator."""
    pooled = model.encode_text(texts, normalize=True) if model.generator.cfg.get("pooled_dim") else None
    return Prompt(model.prompt_states(texts), pooled)


def generator_config(spec, text_dim: int, pooled_dim: int) -> dict[str, Any]:
    """The ``"generator"`` entry of a modules config for a :class:`~mmcli.spec.fuse.GeneratorSpec`."""
    cfg = dict(GENERATOR_PRESETS[spec.preset])
    for key in ("image_size", "channels", "attention", "layers_per_block"):
        value = getattr(spec, key)
        if value is not None:
            cfg[key] = list(value) if isinstance(value, list | tuple) else value
    if len(cfg["attention"]) != len(cfg["channels"]):
        raise MmcliError(
            f"generator.attention: {len(cfg['attention'])} entries for {len(cfg['channels'])} levels of "
            "generator.channels (one true/false per level)"
        )
    cfg.update(
        heads=spec.heads,
        text_dim=text_dim,
        text_dropout=spec.text_dropout,
        ema_decay=spec.ema_decay,
        timesteps=spec.timesteps,
        beta_schedule=spec.beta_schedule,
        prediction=spec.prediction,
        pooled_dim=pooled_dim if spec.pooled else None,
    )
    return cfg


def is_generator(model: nn.Module) -> bool:
    """Whether a :class:`~mmcli.models.multimodal.MultimodalModel` carries a generator."""
    return "generator" in getattr(model, "modules_config", {})


def pixels_to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model pixels → [0, 1]."""
    return (images.clamp(-1, 1) + 1) / 2


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
# Each picture starts from noise drawn from its own seed -- from the caller's seed, the prompt's
# text and the sample's number -- so a prompt gets the same pictures whatever else is drawn with
# it. Classifier-free guidance mixes the conditional and unconditional noise predictions,
# eps = eps(empty) + w * (eps(prompt) - eps(empty)): w = 0 ignores the prompt, w = 1 is the plain
# conditional model, a larger w follows the prompt more closely.


@dataclass(frozen=True)
class SampleSettings:
    """How pictures are drawn."""

    sampler: str = "ddim"
    steps: int = 25
    """Denoising steps (``ddpm`` always takes every training timestep)."""
    guidance: float = 3.0
    seed: int = 0

    def problem(self) -> tuple[str, str] | None:
        """``(field, message)`` for the first setting that is out of range, else ``None``; each
        caller names the field its own way (a flag, a spec key)."""
        if self.sampler not in SAMPLERS:
            return "sampler", f"{self.sampler!r} is not one of {', '.join(SAMPLERS)}"
        if self.steps < 1:
            return "steps", f"{self.steps}: at least 1"
        if not np.isfinite(self.guidance) or self.guidance < 0:
            return "guidance", f"{self.guidance}: a finite number ≥ 0"
        return None

    def as_dict(self) -> dict:
        return asdict(self)


def require_generator(loaded, what: str = "--model") -> None:
    """A one-line error unless ``loaded`` (a :class:`~mmcli.models.loading.LoadedModel`) can draw."""
    if not is_generator(loaded.model):
        raise MmcliError(
            f"{what} {loaded.ref}: not a text-to-image run (train one with mmcli fuse, task: generate; "
            "see examples/shapes/fuse-generate.yaml)"
        )


def picture_seed(seed: int, prompt: str, sample: int) -> int:
    """The seed of sample ``sample`` of ``prompt``."""
    return item_seed(seed, f"{prompt}\0{sample}")


def prompt_tokens(loaded, prompts: Sequence[str], where: Callable[[int], str]) -> torch.Tensor:
    """The prompts tokenized [P, L]; a prompt the text tower cannot read whole is an error naming
    it (``where(i)``: "prompt 3", "prompts.txt: line 3") instead of a silently cut prompt."""
    tokenizer = loaded.tokenizer
    context = int(getattr(tokenizer, "context_length", loaded.model.clip.context_length))
    encode = getattr(tokenizer, "encode", None)
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise MmcliError(f"{where(i)}: empty prompt")
        if encode is not None:
            length = len(encode(prompt)) + 2  # with the start and end markers
            if length > context:
                raise MmcliError(
                    f"{where(i)}: {length} tokens; the model's text tower reads at most {context} (shorten the prompt)"
                )
    return tokenizer(list(prompts))


@torch.no_grad()
def draw(
    model,
    tokens: torch.Tensor,
    empty: torch.Tensor,
    seeds: Sequence[int],
    settings: SampleSettings,
    *,
    device,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Pictures [N, 3, S, S] in [0, 1] for the prompts ``tokens`` [N, L] (one row per picture),
    each from the noise of its seed; ``empty`` [L] is the empty prompt (the unconditional input).
    ``on_step`` is called after each denoising step."""
    generator = model.generator
    unet = generator.sampling_unet()
    schedule = noise_schedule(generator.cfg, settings.sampler)
    steps = generator.cfg["timesteps"] if settings.sampler == "ddpm" else settings.steps
    schedule.set_timesteps(steps, device=device)
    draws = [torch.Generator().manual_seed(int(s)) for s in seeds]
    size = generator.image_size
    x = torch.stack([torch.randn(3, size, size, generator=g) for g in draws]).to(device) * schedule.init_noise_sigma
    w = float(settings.guidance)
    conditional = encode_prompts(model, tokens.to(device)) if w != 0 else None
    unconditional = encode_prompts(model, empty.reshape(1, -1).to(device)).expand(len(seeds)) if w != 1 else None
    for t in schedule.timesteps:
        eps = guided_noise(unet, schedule.scale_model_input(x, t), t, conditional, unconditional, w)
        x = schedule.step(eps, t, x, generator=draws if settings.sampler == "ddpm" else None).prev_sample
        if on_step is not None:
            on_step()
    return pixels_to_unit(x.float())


def guided_noise(
    unet: nn.Module,
    noisy: torch.Tensor,
    t: torch.Tensor,
    conditional: Prompt | None,
    unconditional: Prompt | None,
    w: float,
) -> torch.Tensor:
    """Classifier-free guidance: ``ε(∅) + w·(ε(prompt) − ε(∅))`` (the same mix of velocities for a
    v-prediction model: both are linear in the prediction), with the two predictions in one forward
    pass of the doubled batch; at ``w = 0`` or ``w = 1`` only the one needed is computed (the other
    prompt may then be ``None``)."""
    if w == 0:
        return predict(unet, noisy, t, unconditional)
    if w == 1:
        return predict(unet, noisy, t, conditional)
    both = predict(unet, torch.cat([noisy, noisy]), t, Prompt.cat([unconditional, conditional]))
    eps_empty, eps_prompt = both.chunk(2)
    return eps_empty + w * (eps_prompt - eps_empty)


def to_images(pictures: torch.Tensor) -> list[Image.Image]:
    """[N, 3, S, S] in [0, 1] → 8-bit RGB PIL images."""
    array = (pictures.permute(0, 2, 3, 1).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return [Image.fromarray(a, mode="RGB") for a in array]


def draw_all(
    loaded,
    prompts: Sequence[str],
    samples: int,
    settings: SampleSettings,
    *,
    device,
    batch_size: int,
    tokens: torch.Tensor | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[list[Image.Image]]:
    """``samples`` pictures for each prompt, ``batch_size`` pictures per pass; ``on_step(n)`` after
    each denoising step of a batch of ``n`` pictures."""
    tokens = prompt_tokens(loaded, prompts, lambda i: f"prompt {i + 1}") if tokens is None else tokens
    empty = loaded.tokenizer([""])[0]
    jobs = [(i, j) for i in range(len(prompts)) for j in range(samples)]
    pictures: list[list[Image.Image]] = [[] for _ in prompts]
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        seeds = [picture_seed(settings.seed, prompts[i], j) for i, j in batch]
        step = None if on_step is None else functools.partial(on_step, len(batch))
        drawn = draw(loaded.model, tokens[[i for i, _ in batch]], empty, seeds, settings, device=device, on_step=step)
        for (i, _), image in zip(batch, to_images(drawn), strict=True):
            pictures[i].append(image)
    return pictures
