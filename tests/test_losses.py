"""The loss types, the Huber threshold schedules, debiased weighting, masks and the timestep range, each against
hand-worked numbers."""

import argparse
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sdlora.losses import (LossSpec, check_loss_settings, debiased_weights, huber_threshold, masked_mean,
                           per_sample_loss)
from sdlora.settings import ConfigError
from sdlora.training_step import SampleRandomness, diffusion_loss

# alpha_bar at t = 0, 1, 2: SNR 4 (sigma 1/2), 1/4 (sigma 2), 9999 (above the debiased cap of 1000)
SCHEDULER = SimpleNamespace(alphas_cumprod=torch.tensor([0.8, 0.2, 0.9999]),
                            config=SimpleNamespace(num_train_timesteps=1000, prediction_type="epsilon"))


def spec(**changes) -> LossSpec:
    return LossSpec(**({"loss_type": "huber", "huber_schedule": "constant"} | changes))


def test_each_loss_type_per_element():
    """Difference 3, threshold 4: l2 9; huber 2*4*(sqrt(9+16)-4) = 8; smooth_l1 2*(5-4) = 2."""
    prediction, target = torch.full((1, 1, 2, 2), 3.0), torch.zeros(1, 1, 2, 2)
    timesteps = torch.tensor([0])
    assert per_sample_loss(prediction, target, LossSpec(), timesteps, SCHEDULER).item() == 9.0
    huber, smooth = spec(huber_c=4.0), spec(loss_type="smooth_l1", huber_c=4.0)
    assert per_sample_loss(prediction, target, huber, timesteps, SCHEDULER).item() == pytest.approx(8.0)
    assert per_sample_loss(prediction, target, smooth, timesteps, SCHEDULER).item() == pytest.approx(2.0)


def test_l2_is_the_mean_squared_error_bit_for_bit():
    """The default loss is exactly what the trainer computed before loss types existed: MSE, mean per sample."""
    prediction, target = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    expected = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    assert torch.equal(per_sample_loss(prediction, target, LossSpec(), torch.tensor([0, 1, 2]), SCHEDULER), expected)


def test_huber_thresholds_follow_kohyas_schedules():
    """constant: huber_c; exponential: exp(-t ln(1/c) / 1000), 1 at t=0 and sqrt(c) at t=500; snr: (1-c)/(1+sigma)^2
    + c, with sigma 1/2 -> 0.9/2.25 + 0.1 = 0.5 and sigma 2 -> 0.9/9 + 0.1 = 0.2."""
    assert torch.allclose(huber_threshold(spec(), torch.tensor([0, 2]), SCHEDULER), torch.tensor([0.1, 0.1]))
    exponential = huber_threshold(spec(huber_schedule="exponential"), torch.tensor([0, 500, 1000]), SCHEDULER)
    assert torch.allclose(exponential, torch.tensor([1.0, math.sqrt(0.1), 0.1]))
    snr = huber_threshold(spec(huber_schedule="snr"), torch.tensor([0, 1]), SCHEDULER)
    assert torch.allclose(snr, torch.tensor([0.5, 0.2]))


def test_debiased_weights_are_one_over_root_snr_capped():
    """SNR 4 -> 1/2, SNR 1/4 -> 2, SNR 9999 capped at 1000 -> 1/sqrt(1000); velocity targets 1/(SNR+1)."""
    weights = debiased_weights(SCHEDULER, torch.tensor([0, 1, 2]), v_prediction=False)
    assert torch.allclose(weights, torch.tensor([0.5, 2.0, 1 / math.sqrt(1000)]))
    assert torch.allclose(debiased_weights(SCHEDULER, torch.tensor([0, 1]), True), torch.tensor([0.2, 0.8]))


def test_masked_mean_counts_only_the_masked_elements_at_full_scale():
    """Loss 1 on the left column and 5 on the right; mask 1 on the left: 1; grey 0.5 on the right too: (1 + 2.5)
    / 1.5; all black: 0."""
    elements = torch.tensor([[[[1.0, 5.0], [1.0, 5.0]]]])
    left = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    grey_right = torch.tensor([[[[1.0, 0.5], [1.0, 0.5]]]])
    assert masked_mean(elements, left).item() == pytest.approx(1.0)
    assert masked_mean(elements, grey_right).item() == pytest.approx(3.5 / 1.5)
    assert masked_mean(elements, torch.zeros(1, 1, 2, 2)).item() == 0.0


def test_timesteps_are_drawn_from_the_range_and_as_before_by_default():
    """Every timestep lies in [min_timestep, max_timestep); the default range draws what torch.randint(0, 1000)
    draws from each sample's generator."""
    seen = []

    def spy_unet(noisy, timesteps, encoder_hidden_states):
        seen.append(timesteps)
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    items = torch.arange(64)
    latents, states = torch.zeros(64, 4, 2, 2), torch.zeros(64, 3, 8)
    diffusion_loss(latents, states, spy_unet, scheduler, SampleRandomness(0, 0, items, torch.device("cpu")),
                   loss=LossSpec(min_timestep=990, max_timestep=1000))
    assert seen[0].min() >= 990 and seen[0].max() <= 999 and len(set(seen[0].tolist())) > 1
    diffusion_loss(latents, states, spy_unet, scheduler, SampleRandomness(0, 0, items, torch.device("cpu")))
    generators = SampleRandomness(0, 0, items, torch.device("cpu")).generators
    for g in generators:
        torch.randn(4, 2, 2, generator=g)
    assert torch.equal(seen[1], torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in generators]))


def settings(**changes) -> argparse.Namespace:
    return argparse.Namespace(**({"loss_type": "l2", "huber_c": 0.1, "huber_schedule": "snr", "min_timestep": 0,
                                  "max_timestep": 1000} | changes))


@pytest.mark.parametrize("changes, words", [
    (dict(loss_type="l1"), "--loss_type 'l1'"),
    (dict(loss_type="huber", huber_c=0.0), "--huber_c 0.0"),
    (dict(loss_type="smooth_l1", huber_c=-0.5), "--huber_c -0.5"),
    (dict(loss_type="huber", huber_schedule="cosine"), "--huber_schedule 'cosine'"),
    (dict(huber_c=0.2), "set --loss_type huber"),
    (dict(min_timestep=-1), "non-empty range within"),
    (dict(max_timestep=1001), "non-empty range within"),
    (dict(min_timestep=500, max_timestep=500), "non-empty range within"),
    (dict(min_timestep=600, max_timestep=500), "non-empty range within"),
])
def test_a_loss_setting_that_cannot_work_is_refused(changes, words):
    """An unknown loss or schedule, a Huber threshold <= 0, Huber settings with l2, a timestep range outside
    [0, 1000) or empty: each refused, naming the option."""
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        check_loss_settings(settings(**changes))
    check_loss_settings(settings(loss_type="huber", huber_c=0.2, min_timestep=999))  # the edges are fine
