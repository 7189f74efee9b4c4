"""One training step: each sample's noise and timestep from (seed, step, index), the diffusion loss (losses.py's
loss type, Min-SNR or debiased weighting, offset noise), backward, and the update unless something is not
finite."""

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from sdlora.caching import latent_distribution
from sdlora.losses import LossSpec, debiased_weights, latent_mask, per_sample_loss
from sdlora.stopping import updates_are_finite


class SampleRandomness:
    """One generator per sample, seeded from (seed, step, item index): the noise and timestep a sample gets do not
    depend on which process or micro-batch it lands in, so a resume, or a run on more processes with smaller
    per-device batches, draws the same ones."""

    def __init__(self, seed: int, step: int, items: torch.Tensor, device: torch.device):
        self.generators = []
        for item in items.tolist():
            generator = torch.Generator(device=device)
            generator.manual_seed(hash((seed, step, item)) & 0x7FFF_FFFF_FFFF_FFFF)
            self.generators.append(generator)
        self.device = device

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """B x shape, sample i drawn from generator i."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device, dtype=dtype) for g in self.generators])

    def randint(self, low: int, high: int) -> torch.Tensor:
        """B integers in [low, high), sample i drawn from generator i."""
        return torch.cat([torch.randint(low, high, (1,), generator=g, device=self.device) for g in self.generators])


def batch_latents(batch: dict, vae, scaling_factor: float, randomness: SampleRandomness) -> torch.Tensor:
    """Latents x scaling factor, sampled from the cached or freshly encoded posterior."""
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        mean, std = latent_distribution(vae, batch["pixel_values"])
    return (mean + std * randomness.randn(mean.shape[1:], mean.dtype)) * scaling_factor


def batch_text_embeddings(batch: dict, text_encoder) -> torch.Tensor:
    """Caption embeddings (B x 77 x D): cached, or from the text encoder (with gradients when it trains: LoRA on it,
    or a trained token's embedding in it)."""
    if "text_embedding" in batch:
        return batch["text_embedding"]
    with torch.set_grad_enabled(text_encoder.training or any(p.requires_grad for p in text_encoder.parameters())):
        return text_encoder(batch["input_ids"])[0]


def diffusion_loss(latents: torch.Tensor, encoder_hidden_states: torch.Tensor, unet, noise_scheduler,
                   randomness: SampleRandomness, snr_gamma: float = 0.0, noise_offset: float = 0.0,
                   sample_weights: torch.Tensor | None = None, loss: LossSpec = LossSpec(),
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss (losses.per_sample_loss: L2 by default; over the `mask`, B x 1 x h x w on the latent grid, when
    given) between the UNet's prediction and its target (the noise, or the velocity for v-prediction models),
    optionally Min-SNR and/or debiased-estimation weighted per sample; the mean over samples, or their sum weighted
    by `sample_weights` (the batch's Draw weights). Draws, in order: noise, offset noise (if any), timesteps (in
    [loss.min_timestep, loss.max_timestep))."""
    noise = randomness.randn(latents.shape[1:], latents.dtype)
    if noise_offset:
        # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift overall brightness.
        noise = noise + noise_offset * randomness.randn((latents.shape[1], 1, 1), latents.dtype)
    timesteps = randomness.randint(loss.min_timestep, loss.max_timestep)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    prediction = unet(noisy_latents, timesteps, encoder_hidden_states.to(noisy_latents.dtype)).sample
    per_sample = per_sample_loss(prediction, target, loss, timesteps, noise_scheduler, mask)
    if snr_gamma:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma,
                                                  predicts_velocity(noise_scheduler))
    if loss.debiased_estimation:
        per_sample = per_sample * debiased_weights(noise_scheduler, timesteps, predicts_velocity(noise_scheduler))
    if sample_weights is None:
        return per_sample.mean()
    return (per_sample * sample_weights.to(per_sample.device)).sum()


def predicts_velocity(noise_scheduler) -> bool:
    return noise_scheduler.config.prediction_type == "v_prediction"


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet learns to predict: the noise, or the velocity for v-prediction models (Salimans & Ho 2022,
    arXiv:2202.00512)."""
    return noise_scheduler.get_velocity(latents, noise, timesteps) if predicts_velocity(noise_scheduler) else noise


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for noise targets, min(SNR, gamma) / (SNR + 1)
    for velocity targets, with SNR(t) = alpha_bar_t / (1 - alpha_bar_t)."""
    alpha_bar = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr


@dataclass
class StepModels:
    """What a training step uses besides the LoRA weights and the optimizer."""

    unet: torch.nn.Module
    vae: torch.nn.Module | None  # None once the latents are cached
    text_encoder: torch.nn.Module | None  # None once the caption embeddings are cached
    noise_scheduler: DDPMScheduler
    scaling_factor: float
    trained: list  # the prepared modules holding LoRA layers, for gradient accumulation


def train_micro_batch(batch: dict, step: int, cfg, accelerator, models: StepModels, network,
                      optimizer) -> tuple[float, bool]:
    """Forward and backward of one micro-batch; at the end of an accumulation window, the update, which is
    skipped when the loss or a gradient is not finite. Returns (the loss averaged over processes, finite)."""
    with accelerator.accumulate(*models.trained):
        randomness = SampleRandomness(cfg.seed, step, batch["index"], accelerator.device)
        latents = batch_latents(batch, models.vae, models.scaling_factor, randomness)
        states = batch_text_embeddings(batch, models.text_encoder)
        mask = latent_mask(batch["mask"].to(latents.device), latents.shape[-2:]) if "mask" in batch else None
        loss = diffusion_loss(latents, states, models.unet, models.noise_scheduler, randomness, cfg.snr_gamma,
                              cfg.noise_offset, batch["loss_weight"], LossSpec.of(cfg), mask)
        accelerator.backward(loss)
        finite = not accelerator.sync_gradients or updates_are_finite(loss, network.parameters(), accelerator)
        if finite:
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(network.parameters(), cfg.max_grad_norm)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return accelerator.gather(loss.detach()).mean().item(), finite
