"""The text-to-image generator: its network and schedules (diffusers), the moving average,
classifier-free guidance, seeds, and the prompt checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmcli.errors import MmcliError
from mmcli.models.generation import (
    Prompt,
    SampleSettings,
    TextToImage,
    build_unet,
    draw,
    draw_all,
    encode_prompts,
    guided_noise,
    noise_schedule,
    picture_seed,
    predict,
    prompt_tokens,
)

TINY = {
    "image_size": 16,
    "channels": [16, 32],
    "attention": [False, True],
    "layers_per_block": 1,
    "heads": 2,
    "text_dim": 64,
    "pooled_dim": 32,
    "text_dropout": 0.1,
    "ema_decay": 0.9,
    "timesteps": 20,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction": "v_prediction",
}
"""A generator for the random ``mmcli-nano`` run (text width 64, embeddings 32), small enough for a test."""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from mmcli.models.loading import load_model
    from tests.conftest import save_random_run

    folder = save_random_run(tmp_path_factory.mktemp("tiny-generator"), modules={"generator": TINY})
    return load_model(str(folder))


def test_the_unet_is_the_configured_diffusers_network():
    unet = build_unet(TINY)
    assert type(unet).__name__ == "UNet2DConditionModel"
    assert tuple(unet.config.block_out_channels) == (16, 32)
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert unet.config.up_block_types == ("CrossAttnUpBlock2D", "UpBlock2D")
    assert unet.config.cross_attention_dim == 64
    assert unet.config.class_embed_type == "projection" and unet.config.projection_class_embeddings_input_dim == 32
    prompt = Prompt(torch.zeros(2, 5, 64), torch.zeros(2, 32))
    assert predict(unet, torch.zeros(2, 3, 16, 16), torch.tensor([0, 5]), prompt).shape == (2, 3, 16, 16)
    assert build_unet({**TINY, "pooled_dim": None}).config.class_embed_type is None


def test_the_cosine_schedule_is_nichol_and_dhariwal():
    """ᾱ_t from the formula (f(t) = cos²((t/T + s)/(1 + s) · π/2), β clipped at 0.999), by hand."""
    schedule = noise_schedule(TINY, "ddpm")
    T, s = TINY["timesteps"], 0.008

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
    expected = np.cumprod([1 - b for b in betas])
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), expected, rtol=1e-4)  # float32 cumprod
    x, noise, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([0, 7, 19])
    a = torch.tensor(expected, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(schedule.add_noise(x, noise, t), a.sqrt() * x + (1 - a).sqrt() * noise)


@pytest.mark.parametrize(
    ("name", "kind"), [("ddim", "DDIMScheduler"), ("dpm", "DPMSolverMultistepScheduler"), ("ddpm", "DDPMScheduler")]
)
def test_each_sampler_is_a_diffusers_scheduler_on_the_training_schedule(name, kind):
    schedule = noise_schedule(TINY, name)
    assert type(schedule).__name__ == kind and schedule.config.prediction_type == "v_prediction"
    torch.testing.assert_close(schedule.alphas_cumprod, noise_schedule(TINY, "ddpm").alphas_cumprod)


def test_the_velocity_target_by_hand():
    """v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho 2022); an epsilon model learns the noise itself."""
    schedule = noise_schedule(TINY, "ddpm")
    x, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([3, 17])
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = TextToImage(TINY).target(schedule, x, noise, t)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x)
    assert torch.equal(TextToImage({**TINY, "prediction": "epsilon"}).target(schedule, x, noise, t), noise)


def test_the_moving_average_follows_the_warmed_up_decay():
    torch.manual_seed(0)
    generator = TextToImage(TINY)
    before = [p.detach().clone() for p in generator.ema.parameters()]
    with torch.no_grad():
        for p in generator.unet.parameters():
            p.add_(1.0)
    generator.update_ema()  # first update: decay min(0.9, 1/10) = 0.1
    for average, old, new in zip(generator.ema.parameters(), before, generator.unet.parameters(), strict=True):
        torch.testing.assert_close(average, 0.1 * old + 0.9 * new)
    generator.update_ema()  # second: min(0.9, 2/11)
    assert int(generator.ema_updates) == 2
    assert generator.sampling_unet() is generator.ema
    assert not any(p.requires_grad for p in generator.ema.parameters())


def test_without_a_moving_average_sampling_uses_the_trained_network():
    generator = TextToImage({**TINY, "ema_decay": None})
    assert generator.sampling_unet() is generator.unet and not hasattr(generator, "ema")
    generator.update_ema()  # nothing to do


def test_guidance_mixes_the_two_predictions_as_written():
    torch.manual_seed(0)
    unet = build_unet(TINY).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor(7)
    cond = Prompt(torch.randn(2, 5, 64), torch.randn(2, 32))
    uncond = Prompt(torch.randn(2, 5, 64), torch.randn(2, 32))
    with torch.no_grad():
        eps_c = unet(x, t, encoder_hidden_states=cond.states, class_labels=cond.pooled).sample
        eps_u = unet(x, t, encoder_hidden_states=uncond.states, class_labels=uncond.pooled).sample
        for w in (0.0, 1.0, 3.5):
            got = guided_noise(unet, x, t, cond if w else None, uncond if w != 1 else None, w)
            torch.testing.assert_close(got, eps_u + w * (eps_c - eps_u), atol=1e-5, rtol=1e-4)


def test_settings_report_the_first_bad_field():
    assert SampleSettings().problem() is None
    assert SampleSettings(sampler="euler").problem()[0] == "sampler"
    assert SampleSettings(steps=0).problem()[0] == "steps"
    assert SampleSettings(guidance=-1).problem()[0] == "guidance"
    assert SampleSettings(guidance=float("nan")).problem()[0] == "guidance"


@pytest.mark.parametrize("sampler", ["ddim", "dpm", "ddpm"])
def test_a_prompts_pictures_do_not_depend_on_what_is_drawn_beside_them(tiny_run, sampler):
    settings = SampleSettings(sampler=sampler, steps=4, guidance=2.0, seed=5)
    alone = draw_all(tiny_run, ["a red circle"], 2, settings, device="cpu", batch_size=8)
    mixed = draw_all(tiny_run, ["a blue square", "a red circle"], 2, settings, device="cpu", batch_size=3)
    again = draw_all(tiny_run, ["a red circle"], 2, settings, device="cpu", batch_size=8)
    for a, b, c in zip(alone[0], mixed[1], again[0], strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(c))  # the same run: identical
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1  # another batch: float rounding
    assert not np.array_equal(np.asarray(alone[0][0]), np.asarray(alone[0][1]))  # two samples differ


def test_another_seed_gives_other_pictures(tiny_run):
    first = draw_all(tiny_run, ["a red circle"], 1, SampleSettings(steps=3, seed=0), device="cpu", batch_size=4)
    other = draw_all(tiny_run, ["a red circle"], 1, SampleSettings(steps=3, seed=1), device="cpu", batch_size=4)
    assert not np.array_equal(np.asarray(first[0][0]), np.asarray(other[0][0]))
    assert picture_seed(0, "a red circle", 0) != picture_seed(0, "a red circle", 1)
    assert picture_seed(0, "a red circle", 0) == picture_seed(0, "a red circle", 0)


def test_draw_starts_from_each_seeds_noise_and_calls_back_each_step(tiny_run):
    calls = []
    tokens = tiny_run.tokenizer(["a red circle"])
    empty = tiny_run.tokenizer([""])[0]
    out = draw(
        tiny_run.model, tokens, empty, [3], SampleSettings(steps=5), device="cpu", on_step=lambda: calls.append(1)
    )
    assert out.shape == (1, 3, 16, 16) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert len(calls) == 5
    ddpm_calls = []
    draw(
        tiny_run.model,
        tokens,
        empty,
        [3],
        SampleSettings(sampler="ddpm"),
        device="cpu",
        on_step=lambda: ddpm_calls.append(1),
    )
    assert len(ddpm_calls) == TINY["timesteps"]  # every training timestep, whatever --steps says


def test_a_prompt_the_text_tower_cannot_read_whole_is_an_error(tiny_run):
    long = " ".join(["red"] * 30)  # mmcli-nano reads 24 tokens
    with pytest.raises(MmcliError, match=r"prompt 2: 32 tokens; the model's text tower reads at most 24"):
        prompt_tokens(tiny_run, ["a red circle", long], lambda i: f"prompt {i + 1}")
    with pytest.raises(MmcliError, match="prompt 1: empty prompt"):
        prompt_tokens(tiny_run, ["  "], lambda i: f"prompt {i + 1}")
    assert prompt_tokens(tiny_run, [" ".join(["red"] * 22)], str).shape == (1, 24)  # 22 + 2 markers fit


def test_prompts_are_read_by_the_frozen_text_tower(tiny_run):
    texts = tiny_run.tokenizer(["a red circle", "a blue square"])
    with torch.no_grad():
        prompt = encode_prompts(tiny_run.model, texts)
        torch.testing.assert_close(prompt.states, tiny_run.model.prompt_states(texts))
        torch.testing.assert_close(prompt.pooled, tiny_run.model.encode_text(texts, normalize=True))
        # the causal states are those inside encode_text: the pooled embedding is their EOT state, projected
        eot = texts.argmax(dim=-1)
        pooled = prompt.states[torch.arange(2), eot] @ tiny_run.model.clip.text_projection
        torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), prompt.pooled, atol=1e-5, rtol=1e-4)
