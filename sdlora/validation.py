"""The held-out (validation) loss: images kept out of training (chosen by preflight.held_out_dataset), scored at
fixed timesteps and noise so the number compares across steps and runs, logged to val_loss_log.jsonl, and the best
step so far."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dataset import CustomDataset
from sdlora.caching import encode_latent_cache, encode_text_cache
from sdlora.pivotal import spell_out
from sdlora.training_step import StepModels, diffusion_target

VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)  # fixed, so the validation loss compares across steps and runs


class ValidationSet:
    """The held-out images for the validation loss: each one's latent (the posterior mean x scaling factor) and its
    caption's embedding. The embeddings are made once by the frozen text encoder, or, when the text encoder trains,
    by its current weights at each validation, so the loss (and the best checkpoint) sees the text-encoder LoRA."""

    def __init__(self, data: CustomDataset, vae, tokenizer, text_encoder, scaling_factor: float,
                 text_encoder_trains: bool):
        latents = encode_latent_cache(data, vae, None, "validation")
        self.latents = [latents[(index, False)][0] * scaling_factor for index in range(len(data.examples))]
        self.captions = [data.caption(index) for index in range(len(data.examples))]
        self.tokenizer = tokenizer
        self.cached = None if text_encoder_trains else encode_text_cache(self.captions, tokenizer, text_encoder)

    def __len__(self) -> int:
        return len(self.latents)

    @torch.no_grad()
    def embeddings(self, text_encoder) -> list[torch.Tensor]:
        if self.cached is not None:
            return [self.cached[caption] for caption in self.captions]
        was_training = text_encoder.training
        text_encoder.eval()
        try:
            ids = self.tokenizer([spell_out(c, self.tokenizer) for c in self.captions], padding="max_length",
                                 truncation=True, max_length=self.tokenizer.model_max_length,
                                 return_tensors="pt").input_ids
            return list(text_encoder(ids.to(text_encoder.device))[0])
        finally:
            text_encoder.train(was_training)


@torch.no_grad()
def validation_loss(latents: list, embeddings: list, unet, noise_scheduler, seed: int, autocast) -> float:
    """Mean diffusion loss over the held-out images at VALIDATION_TIMESTEPS with noise fixed by (seed, image):
    the same weights always give the same number."""
    was_training = unet.training
    unet.eval()
    timesteps = torch.tensor(VALIDATION_TIMESTEPS, device=unet.device)
    total, count = 0.0, 0
    try:
        for index, (latent, embedding) in enumerate(zip(latents, embeddings)):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            noise = torch.randn((len(timesteps),) + tuple(latent.shape), generator=generator)
            latents_in = latent.expand_as(noise).to(unet.device, unet.dtype)
            noise = noise.to(unet.device, unet.dtype)
            noisy = noise_scheduler.add_noise(latents_in, noise, timesteps)
            target = diffusion_target(noise_scheduler, latents_in, noise, timesteps)
            states = embedding.expand(len(timesteps), *embedding.shape).to(unet.device, unet.dtype)
            with autocast():
                prediction = unet(noisy, timesteps, states).sample
            total += F.mse_loss(prediction.float(), target.float(), reduction="sum").item()
            count += target.numel()
    finally:
        unet.train(was_training)
    return total / count


class ValidationLog:
    """val_loss_log.jsonl rows {"step", "val_loss"}, TensorBoard's val/loss, and the best step so far."""

    def __init__(self, path: Path):
        self.path, self.best, self.last_step, self.last_value = path, None, None, None

    def record(self, step: int, validation: ValidationSet | None, accelerator, models: StepModels, seed: int) -> None:
        if validation is None or step == self.last_step:  # the end of a run can fall on a scheduled validation
            return
        self.last_step = step
        text_encoder = accelerator.unwrap_model(models.text_encoder) if validation.cached is None else None
        value = validation_loss(validation.latents, validation.embeddings(text_encoder),
                                accelerator.unwrap_model(models.unet), models.noise_scheduler, seed,
                                accelerator.autocast)
        self.last_value = value
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "val_loss": value}) + "\n")
        accelerator.log({"val/loss": value}, step=step)
        if step > 0 and (self.best is None or value < self.best[1]):
            self.best = (step, value)

    def summary(self, output_dir: Path) -> str:
        if self.best is None:
            return ""
        step, value = self.best
        folder = output_dir / f"checkpoint-{step}"
        where = folder if folder.is_dir() else f"step {step} (final file or pruned checkpoint)"
        return f"\n  best by validation loss: {where} ({value:.4f})"
