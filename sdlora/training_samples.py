"""Sample images while training: which prompts (the prompts file, or sample_prompts), drawn with the models as
they train, at step 0, every sample_steps and at the end. A failure is logged and training goes on."""

import logging
from dataclasses import replace
from pathlib import Path

from diffusers import PNDMScheduler, StableDiffusionPipeline

from sdlora.loading import load_text_encoder, load_vae
from sdlora.run_files import SAMPLES_DIR
from sdlora.sampling import SamplePrompt, read_prompts_file, sample_images
from sdlora.settings import PRECISION_DTYPES

log = logging.getLogger(__name__)


def training_prompts(cfg) -> list[SamplePrompt]:
    """The prompts drawn during training: the prompts file if set, else sample_prompts (seed + index)."""
    defaults = SamplePrompt("", seed=cfg.seed, steps=cfg.sample_inference_steps,
                            guidance_scale=cfg.sample_guidance_scale, width=cfg.resolution, height=cfg.resolution)
    if cfg.sample_prompts_file:
        return read_prompts_file(Path(cfg.sample_prompts_file), defaults)
    texts = list(cfg.sample_prompts)
    if cfg.class_data_path and cfg.class_prompt not in texts:  # shows whether the class keeps its meaning
        texts.append(cfg.class_prompt)
    return [replace(defaults, prompt=prompt, seed=cfg.seed + index) for index, prompt in enumerate(texts)]


def save_samples(cfg, prompts: list[SamplePrompt], accelerator, models, network, tokenizer, step: int) -> None:
    """Images for `prompts` in output_dir/samples/ (see sample_images; a failure is logged, never fatal), drawn with
    the training step's models (a StepModels). A VAE or text encoder released after caching (None) is loaded for the
    occasion and released again."""
    if not prompts:
        return
    unet, vae, text_encoder = models.unet, models.vae, models.text_encoder
    try:
        dtype = PRECISION_DTYPES[cfg.mixed_precision]
        if vae is None:
            vae = load_vae(cfg.pretrained_model_name_or_path, dtype)
        if text_encoder is None:
            text_encoder = load_text_encoder(cfg.pretrained_model_name_or_path, dtype)
        pipeline = StableDiffusionPipeline(
            vae=vae.to(accelerator.device), text_encoder=accelerator.unwrap_model(text_encoder).to(accelerator.device),
            tokenizer=tokenizer, unet=accelerator.unwrap_model(unet),
            scheduler=PNDMScheduler.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="scheduler"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
    except Exception as error:  # noqa: BLE001 (sampling never ends a run)
        log.error(f"sampling at step {step} skipped: the pipeline could not be built ({error}); training goes on")
        return
    sample_images(pipeline, network, prompts, Path(cfg.output_dir) / SAMPLES_DIR, step, accelerator.autocast)
