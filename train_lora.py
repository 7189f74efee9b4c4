"""Train a LoRA for Stable Diffusion 1.x.

Edit the constants below and run `python train_lora.py`; any constant can be overridden by a flag of the
same name (`--learning_rate 5e-5`). The result is `<output_dir>/pytorch_lora_weights.safetensors`, which
generate.py, diffusers (`load_lora_weights`), AUTOMATIC1111 and ComfyUI load.
"""

# --- base model ---
pretrained_model_name_or_path = "CompVis/stable-diffusion-v1-4"  # hub id or local diffusers folder
# --- data ---
dataset_path = "examples/dataset"  # folder of images with same-stem .txt captions or a metadata.jsonl
caption_extension = ".txt"  # extension of the caption files beside the images
fallback_caption = ""  # caption for images without one, e.g. "a photo of sks dog"
resolution = 512  # px, square training crops; a multiple of 8
center_crop = True  # False: random crops
random_flip = False  # mirror half of the images (bad for subjects with text or asymmetry)
aspect_ratio_buckets = False  # keep each image's aspect ratio: batches from buckets of about resolution² px
bucket_upscale = False  # with buckets: let images smaller than resolution² be upscaled to it
trigger_phrase = ""  # put first in every caption, e.g. "sks dog"
shuffle_tags = False  # shuffle the comma-separated tags of each caption at each step
keep_tags = 1  # tags kept in place at the front when shuffling
caption_dropout = 0.0  # probability of training a step on the empty caption (keeps guidance working)
# --- prior preservation (class images) ---
class_data_path = ""  # folder of class images, e.g. of "a photo of a dog", trained beside the instances; "": off
class_prompt = ""  # the class's plain prompt: caption of class images without one, and what missing ones draw
num_class_images = 100  # the base model draws class images until the folder holds this many; 0: never
prior_loss_weight = 1.0  # weight of the class images' loss beside the instance loss (1.0 in DreamBooth)
# --- LoRA ---
rank = 4  # size of the low-rank update
alpha = 4.0  # update scale is alpha / rank
lora_dropout = 0.0  # dropout on the LoRA input
lora_targets = "attention"  # attention: q/k/v/out projections; all: also feed-forward and proj_in/proj_out
conv_rank = 0  # LoCon: also LoRA on the 3x3 convolutions of ResNet blocks and samplers (kohya's conv_dim); 0: off
conv_alpha = 1.0  # conv update scale is conv_alpha / conv_rank (kohya's conv_alpha)
train_text_encoder = False  # also put LoRA on the CLIP text encoder's attention projections
text_encoder_lr = 0.0  # learning rate of the text-encoder LoRA; 0: learning_rate
# --- optimisation ---
train_batch_size = 1  # images per step per device
gradient_accumulation_steps = 1  # micro-batches per optimizer step
optimizer = "adamw"  # adamw, adamw8bit, prodigy (learning_rate 1.0), adafactor, lion (see README: Optimizers)
learning_rate = 1e-4  # learning rate for the LoRA weights (Prodigy: a multiplier of its own estimate)
lr_scheduler = "constant"  # constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial
lr_warmup_steps = 0  # optimizer steps
max_train_steps = 1000  # optimizer steps; 0: run num_train_epochs instead
num_train_epochs = 0  # used when max_train_steps is 0
max_grad_norm = 1.0  # gradient clipping; 0 turns it off
adam_weight_decay = 1e-2  # decoupled weight decay of the optimizer (Lion: 3-10x larger)
snr_gamma = 0.0  # Min-SNR loss weighting (Hang et al. 2023, arXiv:2303.09556), 5.0 in the paper; 0: off
noise_offset = 0.0  # extra per-channel noise offset: fuller range of brightness; 0.05-0.1 typical; 0: off
ema_decay = 0.0  # keep an EMA of the LoRA weights, saved as its own file, e.g. 0.999; 0: off
mixed_precision = "auto"  # auto: bf16 on a GPU that has it, else fp16 on a GPU, no on a CPU; or no, fp16, bf16
seed = 42  # data order, crops, flips, noise and timesteps all derive from it
# --- checkpoints, samples, output ---
output_dir = "output"  # final LoRA file, checkpoints, samples, reports
checkpointing_steps = 500  # save a resumable checkpoint every N optimizer steps; 0: never
checkpoints_total_limit = 3  # keep only the newest N checkpoints; 0: keep all
resume_from_checkpoint = ""  # "latest" or a checkpoint folder
validation_prompts = ("a photo of an astronaut",)  # sampled at step 0, every validation_steps and at the end
sample_prompts_file = ""  # prompts with per-line --n --d --s --l --w --h --m settings; replaces validation_prompts
validation_steps = 500  # optimizer steps between sample sets; 0: only at step 0 and the end
validation_split = 0.0  # share of the images held out for a validation loss, e.g. 0.1; 0: none
validation_dataset_path = ""  # or a folder of held-out images (and captions) for the validation loss
validation_inference_steps = 25  # sampler steps for the validation images
validation_guidance_scale = 7.5  # classifier-free guidance for the validation images
dataloader_num_workers = 0  # background processes decoding images; 0: in the training process
# --- speed and memory ---
cache_latents = True  # VAE-encode each image once before training (off by itself with random crops)
cache_text_embeddings = True  # encode each caption once (off by itself when the text encoder trains)
cache_latents_to_disk = False  # also keep the latents in output_dir/latent_cache/ for the next run
gradient_checkpointing = False  # recompute UNet activations in the backward pass: much less memory, slower
# --- safety ---
strict_data = False  # True: any unusable image stops the run instead of being skipped
resume_despite_changes = False  # True: resume even when settings or data differ (the run is then not exact)
max_nonfinite_steps = 5  # consecutive non-finite losses/gradients (each skips its update) before the run stops
interop_check = True  # after saving, load the file as diffusers, A1111 and ComfyUI would and compare the deltas

# Everything above is configuration: collected here, before any import adds names of its own.
DEFAULTS = {name: value for name, value in list(globals().items())
            if not name.startswith("_") and isinstance(value, (bool, int, float, str, tuple))}
CONFIG_NAMES = list(DEFAULTS)
# Every setting above defines the run (a resume must share it to continue exactly) except these, which only say
# where files go, when to save, sample and validate, how fast, and how careful. The data is compared by fingerprint.
NOT_RUN_DEFINING = ("dataset_path", "class_data_path", "num_class_images", "output_dir", "checkpointing_steps",
                    "checkpoints_total_limit",
                    "resume_from_checkpoint", "validation_prompts", "sample_prompts_file", "validation_steps",
                    "validation_split", "validation_dataset_path", "validation_inference_steps",
                    "validation_guidance_scale", "dataloader_num_workers", "cache_latents", "cache_text_embeddings",
                    "cache_latents_to_disk", "gradient_checkpointing", "strict_data", "resume_despite_changes",
                    "max_nonfinite_steps", "interop_check")
RUN_DEFINING = tuple(name for name in CONFIG_NAMES if name not in NOT_RUN_DEFINING)

import argparse  # noqa: E402  (imports after the config block: the constants are the first thing to read)
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator, DataLoaderConfiguration  # noqa: E402
from accelerate.utils import broadcast_object_list, gather_object  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel,
)
from tqdm.auto import tqdm  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from sdlora.caching import EncodedDataset, encode_latent_cache, encode_text_cache, latent_distribution  # noqa: E402
from sdlora.checkpoints import (  # noqa: E402
    CheckpointError, check_resume_matches, latest_valid_checkpoint, list_checkpoints, load_checkpoint,
    prune_checkpoints, read_state, resolve_resume, run_identity, save_checkpoint,
)
from sdlora.cpu_kernels import check_cpu_precision, fp32_choices, use_fp32_choices  # noqa: E402
from sdlora.class_images import generate_missing  # noqa: E402
from dataset import (BucketBatchSampler, CustomDataset, DatasetError, WeightedItems,  # noqa: E402
                     caption_token_counts)
from sdlora.report import write_report  # noqa: E402
from sdlora.sampling import SamplePrompt, read_prompts_file, sample_images  # noqa: E402
from sdlora.interop import check_interop, write_interop_report  # noqa: E402
from lora_diffusion import CONV_TARGETS, UNET_TARGETS, inject_trainable_lora, matching_paths  # noqa: E402
from sdlora.lora_file import LORA_FILE_NAME, LoRAError  # noqa: E402
from sdlora.ema import Ema  # noqa: E402
from sdlora.files import read_safetensors_as  # noqa: E402
from sdlora.optimizers import build_optimizer, optimizer_problem  # noqa: E402
from sdlora.settings import (  # noqa: E402
    MIXED_PRECISIONS, PRECISION_DTYPES, ConfigError, allow_tf32, build_parser, check_model_source, resolve_precision,
)

EMA_FILE_NAME = "pytorch_lora_weights_ema.safetensors"
LORA_TARGETS = {"attention": UNET_TARGETS,
                "all": UNET_TARGETS + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")}
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


# ---------------------------------------------------------------------------------------------------------------
# Configuration: the constants above, overridden by same-named flags



def parse_config(argv: list[str] | None = None) -> argparse.Namespace:
    cfg = build_parser(dict(DEFAULTS), __doc__.splitlines()[0]).parse_args(argv)
    cfg.validation_prompts = tuple(cfg.validation_prompts)
    return cfg


def check_config(cfg: argparse.Namespace) -> None:
    """Refuse settings that cannot work, before anything is loaded."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(cfg.mixed_precision in MIXED_PRECISIONS,
         f"--mixed_precision {cfg.mixed_precision!r}: choose one of {', '.join(MIXED_PRECISIONS)}")
    need(cfg.mixed_precision != "fp16" or torch.cuda.is_available(),
         "--mixed_precision fp16 needs a CUDA GPU; on this machine use bf16 or no")
    need(cfg.lr_scheduler in LR_SCHEDULERS, f"--lr_scheduler {cfg.lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULERS)}")
    need(cfg.resolution >= 8 and cfg.resolution % 8 == 0,
         f"--resolution {cfg.resolution}: must be a positive multiple of 8 (the VAE downsamples by 8), e.g. 512")
    need(cfg.rank >= 1, f"--rank {cfg.rank}: must be at least 1 (4 to 32 is usual)")
    need(cfg.alpha > 0, f"--alpha {cfg.alpha}: must be positive (alpha = rank gives scale 1)")
    need(cfg.conv_rank >= 0, f"--conv_rank {cfg.conv_rank}: cannot be negative (0: no conv LoRA; 4 to 16 is usual)")
    need(cfg.conv_alpha > 0, f"--conv_alpha {cfg.conv_alpha}: must be positive (1 as in kohya's scripts)")
    need(cfg.train_batch_size >= 1, f"--train_batch_size {cfg.train_batch_size}: must be at least 1")
    need(cfg.gradient_accumulation_steps >= 1,
         f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps}: must be at least 1")
    need(cfg.learning_rate > 0, f"--learning_rate {cfg.learning_rate}: must be positive, e.g. 1e-4")
    need(cfg.max_train_steps > 0 or cfg.num_train_epochs > 0,
         "--max_train_steps and --num_train_epochs are both 0: set one of them")
    need(min(cfg.max_train_steps, cfg.num_train_epochs, cfg.lr_warmup_steps, cfg.checkpointing_steps,
             cfg.checkpoints_total_limit, cfg.validation_steps) >= 0,
         "step counts, epochs and limits cannot be negative")
    need(0 <= cfg.lora_dropout < 1, f"--lora_dropout {cfg.lora_dropout}: must be in [0, 1)")
    need(cfg.lora_targets in LORA_TARGETS, f"--lora_targets {cfg.lora_targets!r}: choose one of {', '.join(LORA_TARGETS)}")
    need(0 <= cfg.caption_dropout < 1, f"--caption_dropout {cfg.caption_dropout}: a probability in [0, 1)")
    need(0 <= cfg.ema_decay < 1, f"--ema_decay {cfg.ema_decay}: in [0, 1), e.g. 0.999 (0 turns EMA off)")
    need(min(cfg.keep_tags, cfg.snr_gamma, cfg.noise_offset, cfg.text_encoder_lr) >= 0,
         "--keep_tags, --snr_gamma, --noise_offset and --text_encoder_lr cannot be negative")
    problem = optimizer_problem(cfg.optimizer, cfg.learning_rate)
    need(problem is None, problem)
    check_prior_preservation(cfg)
    need(cfg.caption_extension.startswith("."),
         f"--caption_extension {cfg.caption_extension!r}: include the dot, e.g. .txt")


def check_prior_preservation(cfg: argparse.Namespace) -> None:
    """Class images: a prompt for them, a folder apart from the instance images, or no class settings at all."""
    class_settings = [f"--{name} {getattr(cfg, name)}" for name in ("class_prompt", "num_class_images",
                                                                    "prior_loss_weight")
                      if getattr(cfg, name) != DEFAULTS[name]]
    if not cfg.class_data_path:
        if class_settings:
            raise ConfigError(f"{', '.join(class_settings)} set but class_data_path is empty: point "
                              f"--class_data_path at a folder of class images (or an empty one to fill) to train "
                              f"with prior preservation, or drop those settings")
        return
    folder, instances = Path(cfg.class_data_path).resolve(), Path(cfg.dataset_path).resolve()
    if folder == instances or instances in folder.parents or folder in instances.parents:
        raise ConfigError(f"--class_data_path {cfg.class_data_path} and --dataset_path {cfg.dataset_path} overlap: "
                          f"class images are the base model's idea of the class and must not be the subject's "
                          f"images; use a folder outside the other")
    if not cfg.class_prompt.strip():
        raise ConfigError("--class_data_path needs --class_prompt, the class's plain prompt without the trigger "
                          "word (e.g. \"a photo of a dog\")")
    if cfg.prior_loss_weight <= 0:
        raise ConfigError(f"--prior_loss_weight {cfg.prior_loss_weight}: must be positive (1.0 in DreamBooth); "
                          f"to train without class images, set class_data_path to \"\"")
    if cfg.num_class_images < 0:
        raise ConfigError(f"--num_class_images {cfg.num_class_images}: cannot be negative (0: never generate)")
    if not folder.is_dir() and cfg.num_class_images == 0:
        raise ConfigError(f"--class_data_path {cfg.class_data_path} does not exist and num_class_images is 0: "
                          f"put class images there, or set --num_class_images (e.g. 100) to have the base model "
                          f"draw them")


def micro_batches_per_step(cfg) -> int:
    """Micro-batches in one optimizer step: with class images each instance batch comes with a class batch."""
    return cfg.gradient_accumulation_steps * (2 if cfg.class_data_path else 1)


# ---------------------------------------------------------------------------------------------------------------
# Loading

def load_encoders(name_or_path: str, weight_dtype):
    """Tokenizer, text encoder, VAE and the training noise scheduler; the models frozen in `weight_dtype`."""
    tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")
    text_encoder = load_text_encoder(name_or_path, weight_dtype)
    vae = load_vae(name_or_path, weight_dtype)
    noise_scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler")
    return tokenizer, text_encoder, vae, noise_scheduler


def load_text_encoder(name_or_path: str, weight_dtype) -> CLIPTextModel:
    text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", dtype=weight_dtype)
    return text_encoder.requires_grad_(False)


def load_vae(name_or_path: str, weight_dtype) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", dtype=weight_dtype).requires_grad_(False)


UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def load_unet(name_or_path: str, weight_dtype) -> UNet2DConditionModel:
    """The frozen UNet in `weight_dtype`. A single safetensors file (a local folder, or a hub model already in the
    cache) is read straight into `weight_dtype` into a UNet built on the meta device, so loading peaks at the model
    in that dtype, not at the fp32 file beside its converted copy; other layouts go through from_pretrained."""
    local = Path(name_or_path).expanduser() / UNET_WEIGHTS
    weights = local if local.is_file() else cached_hub_file(name_or_path, UNET_WEIGHTS)
    if weights is None:
        unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", dtype=weight_dtype)
        return unet.requires_grad_(False)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(weights.parent))
    unet.load_state_dict(read_safetensors_as(weights, weight_dtype), strict=True, assign=True)
    return unet.eval().requires_grad_(False)


def trainable_unet(cfg, weight_dtype, device, text_encoder, fp32_parts: dict[str, bool]):
    """(the frozen UNet as the loop trains it: in the training precision, with the parts `fp32_parts` names in fp32
    (see fp32_parts_here), gradient checkpointing if asked; the LoRANetwork injected into it and, with
    train_text_encoder, into `text_encoder`)."""
    unet = load_unet(cfg.pretrained_model_name_or_path, weight_dtype)
    use_fp32_choices(unet, fp32_parts)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet, inject_lora(cfg, unet, text_encoder)


NO_FP32_PARTS = {"fp32_attention": False, "fp32_kernels": False}


def fp32_parts_here(resume_folder: Path | None, device, weight_dtype) -> dict[str, bool]:
    """Which parts of the UNet step compute in fp32 (cpu_kernels.py): only on the CPU in bf16 or fp16, as the
    checkpoint's run did when resuming (so it computes alike), else where a timing says it is faster here."""
    if torch.device(device).type != "cpu" or weight_dtype == torch.float32:
        return dict(NO_FP32_PARTS)
    if resume_folder is not None:
        saved = read_state(resume_folder).get("run_identity", {})
        if "fp32_kernels" in saved:
            # A checkpoint from before the attention was timed took it in fp32 on every CPU in bf16 or fp16.
            parts = {"fp32_attention": saved.get("fp32_attention", True), "fp32_kernels": saved["fp32_kernels"]}
            precision = {True: "fp32", False: "the training precision"}
            print(f"CPU kernels: attention in {precision[parts['fp32_attention']]}, large convolutions and matmuls in "
                  f"{precision[parts['fp32_kernels']]}, as the run that wrote {resume_folder.name} took")
            return parts
    parts, reason = fp32_choices(weight_dtype)
    print(reason)
    return parts


def cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """The local path of a hub model's file when it is in the cache (no download), else None."""
    if Path(repo_id).expanduser().exists() or repo_id.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) else None


# ---------------------------------------------------------------------------------------------------------------
# One training step's pieces

log = logging.getLogger(__name__)


def make_collate(tokenizer):
    """Stack what the items carry: cached latent distributions or pixels, cached text embeddings or token ids."""
    def collate(items: list[dict]) -> dict:
        batch = {"index": torch.tensor([item["index"] for item in items]),
                 "loss_weight": torch.tensor([item["loss_weight"] for item in items], dtype=torch.float32)}
        for key in ("pixel_values", "latent_mean", "latent_std", "text_embedding"):
            if key in items[0]:
                batch[key] = torch.stack([item[key] for item in items])
        if "text_embedding" not in batch:
            batch["input_ids"] = tokenizer([item["caption"] for item in items], padding="max_length",
                                           truncation=True, max_length=tokenizer.model_max_length,
                                           return_tensors="pt").input_ids
        return batch
    return collate


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

    def randint(self, high: int) -> torch.Tensor:
        return torch.cat([torch.randint(0, high, (1,), generator=g, device=self.device) for g in self.generators])


def batch_latents(batch: dict, vae, scaling_factor: float, randomness: SampleRandomness) -> torch.Tensor:
    """Latents x scaling factor, sampled from the cached or freshly encoded posterior."""
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        mean, std = latent_distribution(vae, batch["pixel_values"])
    return (mean + std * randomness.randn(mean.shape[1:], mean.dtype)) * scaling_factor


def batch_text_embeddings(batch: dict, text_encoder) -> torch.Tensor:
    """Caption embeddings (B x 77 x D): cached, or from the text encoder (with gradients when it trains)."""
    if "text_embedding" in batch:
        return batch["text_embedding"]
    with torch.set_grad_enabled(text_encoder.training):
        return text_encoder(batch["input_ids"])[0]


def diffusion_loss(latents: torch.Tensor, encoder_hidden_states: torch.Tensor, unet, noise_scheduler,
                   randomness: SampleRandomness, snr_gamma: float = 0.0, noise_offset: float = 0.0,
                   sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the UNet's prediction and its target (the noise, or the velocity for v-prediction models),
    optionally Min-SNR weighted per sample; the mean over samples, or their sum weighted by `sample_weights`
    (the batch's Draw weights). Draws, in order: noise, offset noise (if any), timesteps."""
    noise = randomness.randn(latents.shape[1:], latents.dtype)
    if noise_offset:
        # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift overall brightness.
        noise = noise + noise_offset * randomness.randn((latents.shape[1], 1, 1), latents.dtype)
    timesteps = randomness.randint(noise_scheduler.config.num_train_timesteps)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    prediction = unet(noisy_latents, timesteps, encoder_hidden_states.to(noisy_latents.dtype)).sample
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma,
                                                  predicts_velocity(noise_scheduler))
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


# ---------------------------------------------------------------------------------------------------------------
# Files: LoRA metadata, checkpoints, samples

def lora_metadata(cfg, dataset, step: int, started_at: str) -> dict[str, str]:
    """Our keys plus the `ss_*` / `modelspec.*` keys AUTOMATIC1111 shows in its LoRA card."""
    tag_frequency = Counter(tag.strip() for e in dataset.examples for tag in e.caption.split(",") if tag.strip())
    name = Path(cfg.output_dir).name
    return {
        "base_model": cfg.pretrained_model_name_or_path, "resolution": str(cfg.resolution), "step": str(step),
        "ss_output_name": name, "ss_sd_model_name": cfg.pretrained_model_name_or_path,
        "ss_base_model_version": "sd_v1", "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_num_train_images": str(len(dataset.examples)), "ss_steps": str(step), "ss_learning_rate": str(cfg.learning_rate),
        "ss_training_started_at": started_at, "ss_network_dropout": str(cfg.lora_dropout),
        "ss_tag_frequency": json.dumps({Path(cfg.dataset_path).name: dict(tag_frequency.most_common(200))}),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.title": name,
    }


def make_optimizer(cfg, network) -> torch.optim.Optimizer:
    """The chosen optimizer over the LoRA weights: the UNet's at learning_rate, the text encoder's at
    text_encoder_lr."""
    groups = [{"params": [p for (name, _), layer in network.layers.items() if name == model_name
                          for p in (layer.down.weight, layer.up.weight)], "lr": lr}
              for model_name, lr in (("unet", cfg.learning_rate),
                                     ("text_encoder", cfg.text_encoder_lr or cfg.learning_rate))]
    return build_optimizer(cfg.optimizer, [group for group in groups if group["params"]], cfg.adam_weight_decay)


def encode_frozen_inputs(cfg, dataset, vae, tokenizer, text_encoder, weight_dtype, accelerator):
    """(latent cache or None, text-embedding cache or None), saying why a cache is off when the settings rule it out."""
    latents = embeddings = None
    say = accelerator.print
    if cfg.cache_latents and not cfg.center_crop:
        say("latent cache off: random crops make every step's crop new, so images are encoded at each step")
    elif cfg.cache_latents:
        disk_dir = Path(cfg.output_dir) / "latent_cache" if cfg.cache_latents_to_disk else None
        variants = len(dataset.examples) * (2 if cfg.random_flip else 1)
        shard = (accelerator.process_index, accelerator.num_processes)
        with tqdm(total=math.ceil(variants / shard[1]), desc="caching latents",
                  disable=not accelerator.is_main_process) as progress:
            latents = encode_latent_cache(dataset, vae, disk_dir, f"{cfg.pretrained_model_name_or_path}|{weight_dtype}",
                                          progress, shard)
        latents = gather_parts(latents, accelerator)
    captions = dataset.possible_captions()
    if cfg.cache_text_embeddings and cfg.train_text_encoder:
        say("text-embedding cache off: the text encoder is training, so captions are encoded at each step")
    elif cfg.cache_text_embeddings and captions is None:
        say("text-embedding cache off: tag shuffling makes new captions at each step")
    elif cfg.cache_text_embeddings:
        embeddings = encode_text_cache(sorted(captions), tokenizer, text_encoder,
                                       (accelerator.process_index, accelerator.num_processes))
        embeddings = gather_parts(embeddings, accelerator)
    return latents, embeddings


def gather_parts(part: dict, accelerator: Accelerator) -> dict:
    """Each process encoded a share of a cache; every process gets the whole of it."""
    if accelerator.num_processes == 1:
        return part
    whole = {}
    for piece in gather_object([part]):
        whole.update(piece)
    return whole


def resume_command(cfg) -> str:
    """The command line that continues this run: every setting that differs from the constants, plus resume."""
    defaults = dict(DEFAULTS)
    args = []
    for name, value in vars(cfg).items():
        if name == "resume_from_checkpoint" or value == defaults.get(name):
            continue
        if isinstance(value, tuple):
            args += [f"--{name}", *value]
        else:
            args += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return shlex.join(["python", "train_lora.py", *args, "--resume_from_checkpoint", "latest"])


def checkpoint_run(cfg, step: int, network, optimizer, lr_scheduler, dataset, identity: dict,
                   nonfinite_total: int, started_at: str, ema: Ema | None, grad_scaler) -> None:
    """Write checkpoint-<step> (with what a resume checks against), then drop the oldest beyond the limit."""
    output_dir = Path(cfg.output_dir)
    state = {"step": step, "run_identity": identity, "dataset_fingerprint": dataset.fingerprint(),
             "nonfinite_total": nonfinite_total}
    extra = None
    if ema:
        extra = {f"ema.{i}": shadow for i, shadow in enumerate(ema.shadow)}
        state["ema_updates"] = ema.updates
    save_checkpoint(output_dir / f"checkpoint-{step}", network, lora_metadata(cfg, dataset, step, started_at),
                    optimizer, lr_scheduler, state, extra, grad_scaler)
    prune_checkpoints(output_dir, cfg.checkpoints_total_limit)


def report_long_captions(dataset: CustomDataset, tokenizer: CLIPTokenizer) -> None:
    """CLIP reads 77 tokens: say once how many captions lose their end, rather than silently dropping it."""
    lengths, long = caption_token_counts([e.caption for e in dataset.examples], tokenizer)
    if long:
        print(f"{long} caption(s) longer than the {tokenizer.model_max_length}-token CLIP limit are truncated "
              f"(longest: {max(lengths)} tokens)")


def check_output_dir(output_dir: Path) -> None:
    """Test-write the output folder now rather than failing at the first checkpoint."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"--output_dir {output_dir} is not writable ({error.strerror}); "
                          f"choose a folder you can write to") from None


def check_free_disk(output_dir: Path, network, cfg) -> None:
    """Refuse at minute 0 when the disk cannot hold the checkpoints this run will keep."""
    lora_bytes = 4 * sum(p.numel() for p in network.parameters())
    kept = cfg.checkpoints_total_limit or max(1, cfg.max_train_steps // max(cfg.checkpointing_steps, 1))
    needed = lora_bytes + (3 * lora_bytes + (1 << 20)) * (kept + 1) if cfg.checkpointing_steps else 2 * lora_bytes
    free = shutil.disk_usage(output_dir).free
    if free < 2 * needed:
        raise ConfigError(f"only {free / 2**20:.0f} MiB free in {output_dir}; this run needs about "
                          f"{needed / 2**20:.0f} MiB for its checkpoints; free space or lower checkpoints_total_limit")


def updates_are_finite(loss: torch.Tensor, parameters: list, accelerator: Accelerator) -> bool:
    """Same answer on every process: the loss is finite and (unless fp16's GradScaler judges them) so are grads."""
    checks = [torch.isfinite(loss.detach()).all()]
    if accelerator.scaler is None:
        checks += [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
    ok = torch.stack(checks).all().float().reshape(1).to(accelerator.device)
    return bool(accelerator.gather(ok).min() > 0)


class StopRequest:
    """SIGTERM / SIGINT handler: remembers the signal so the loop can save at the next step boundary."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name} received: saving at the end of this step, then stopping", flush=True)


def stop_requested(stop: StopRequest, accelerator: Accelerator) -> bool:
    """True on every process when any process was asked to stop, so they all save and leave together."""
    flag = torch.tensor([1.0 if stop.signal is not None else 0.0], device=accelerator.device)
    return bool(accelerator.gather(flag).max() > 0)


@dataclass
class StepModels:
    """What a training step uses besides the LoRA weights and the optimizer."""

    unet: torch.nn.Module
    vae: torch.nn.Module | None  # None once the latents are cached
    text_encoder: torch.nn.Module | None  # None once the caption embeddings are cached
    noise_scheduler: DDPMScheduler
    scaling_factor: float
    trained: list  # the prepared modules holding LoRA layers, for gradient accumulation


def train_micro_batch(batch: dict, step: int, cfg, accelerator: Accelerator, models: StepModels, network,
                      optimizer) -> tuple[float, bool]:
    """Forward and backward of one micro-batch; at the end of an accumulation window, the update, which is
    skipped when the loss or a gradient is not finite. Returns (the loss averaged over processes, finite)."""
    with accelerator.accumulate(*models.trained):
        randomness = SampleRandomness(cfg.seed, step, batch["index"], accelerator.device)
        latents = batch_latents(batch, models.vae, models.scaling_factor, randomness)
        states = batch_text_embeddings(batch, models.text_encoder)
        loss = diffusion_loss(latents, states, models.unet, models.noise_scheduler, randomness, cfg.snr_gamma,
                              cfg.noise_offset, batch["loss_weight"])
        accelerator.backward(loss)
        finite = not accelerator.sync_gradients or updates_are_finite(loss, network.parameters(), accelerator)
        if finite:
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(network.parameters(), cfg.max_grad_norm)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return accelerator.gather(loss.detach()).mean().item(), finite


class LossLog:
    """One JSON line per optimizer step, flushed at once: what each attempt of a run saw, step by step."""

    def __init__(self, path: Path, run: str):
        self.path, self.run = path, f"{run}/{os.getpid()}"

    def write(self, step: int, loss: float, lr: float, skipped: bool) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            row = {"run": self.run, "step": step, "loss": loss, "lr": lr, "skipped": skipped, "time": time.time()}
            f.write(json.dumps(row) + "\n")


class TrainingStopped(Exception):
    """The run stopped early on purpose or to stay safe; the message holds the resume command."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)  # fixed, so the validation loss compares across steps and runs


def make_dataset(cfg, path: str, strict: bool = False, cache_path: Path | None = None,
                 with_classes: bool = False) -> CustomDataset:
    """The images and captions at `path` (and the class images, `with_classes`) with the run's data settings:
    the one place config names map to CustomDataset's parameters."""
    return CustomDataset(
        path, resolution=cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
        caption_extension=cfg.caption_extension, fallback_caption=cfg.fallback_caption, seed=cfg.seed,
        strict=strict, cache_path=cache_path, buckets=cfg.aspect_ratio_buckets, bucket_upscale=cfg.bucket_upscale,
        trigger_phrase=cfg.trigger_phrase, shuffle_tags=cfg.shuffle_tags, keep_tags=cfg.keep_tags,
        caption_dropout=cfg.caption_dropout, class_data_path=cfg.class_data_path if with_classes else None,
        class_prompt=cfg.class_prompt)


def held_out_dataset(cfg, dataset: CustomDataset) -> CustomDataset | None:
    """The validation images: a folder, or a seeded share split off the training images."""
    if cfg.validation_dataset_path:
        return make_dataset(cfg, cfg.validation_dataset_path).fixed_copy()
    return dataset.split_off(cfg.validation_split) if cfg.validation_split else None


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
            ids = self.tokenizer(self.captions, padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
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
    """val_loss_log.jsonl rows {"step", "val_loss"}, TensorBoard's val/loss, and the best checkpoint so far."""

    def __init__(self, path: Path):
        self.path, self.best, self.last_step = path, None, None

    def record(self, step: int, validation: ValidationSet | None, accelerator, models: "StepModels", seed: int) -> None:
        if validation is None or step == self.last_step:  # the end of a run can fall on a scheduled validation
            return
        self.last_step = step
        text_encoder = accelerator.unwrap_model(models.text_encoder) if validation.cached is None else None
        value = validation_loss(validation.latents, validation.embeddings(text_encoder),
                                accelerator.unwrap_model(models.unet), models.noise_scheduler, seed,
                                accelerator.autocast)
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


def interop_self_test(final_path: Path, unet, text_encoder) -> None:
    """Reload the final file through diffusers and the A1111 / ComfyUI key rules; write `<file>.interop.json` and
    say in one line whether every consumer gets the trained LoRA. Never fatal: the file is already saved."""
    try:
        result = check_interop(final_path, unet, text_encoder)
        written = write_interop_report(final_path, result)
    except Exception as error:  # noqa: BLE001
        log.error(f"interop self-test could not run ({error}); the LoRA file is saved")
        return
    verdict = "ok" if result["ok"] else "PROBLEMS"
    print(f"interop self-test: {verdict} (diffusers: {result['diffusers']}; unmatched keys: A1111 "
          f"{len(result['a1111_unmatched'])}, ComfyUI {len(result['comfyui_unmatched'])}; max delta error "
          f"{result['max_delta_error']:.1e}) -> {written}")


def write_run_report(output_dir: Path) -> Path | str:
    """report.html and loss.png for the run; a failure here is reported, never fatal (the LoRA is already saved)."""
    try:
        return write_report(output_dir)
    except Exception as error:  # noqa: BLE001
        log.error(f"the HTML report could not be written ({error}); run `python evaluate.py report {output_dir}` to retry")
        return "not written (see the error above)"


def sample_prompts(cfg) -> list[SamplePrompt]:
    """The prompts drawn during training: the prompts file if set, else validation_prompts (seed + index)."""
    defaults = SamplePrompt("", seed=cfg.seed, steps=cfg.validation_inference_steps,
                            guidance_scale=cfg.validation_guidance_scale, width=cfg.resolution, height=cfg.resolution)
    if cfg.sample_prompts_file:
        return read_prompts_file(Path(cfg.sample_prompts_file), defaults)
    texts = list(cfg.validation_prompts)
    if cfg.class_data_path and cfg.class_prompt not in texts:  # shows whether the class keeps its meaning
        texts.append(cfg.class_prompt)
    return [replace(defaults, prompt=prompt, seed=cfg.seed + index) for index, prompt in enumerate(texts)]


def save_samples(cfg, prompts: list[SamplePrompt], accelerator, unet, network, vae, text_encoder, tokenizer,
                 step: int) -> None:
    """Images for `prompts` in output_dir/samples/ (see sampling.sample_images; a failure is logged, never fatal).
    A VAE or text encoder released after caching (None) is loaded for the occasion and released again."""
    if not prompts:
        return
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
    sample_images(pipeline, network, prompts, Path(cfg.output_dir) / "samples", step, accelerator.autocast)


def load_data(cfg, accelerator: Accelerator, output_dir: Path,
              resume_folder: Path | None) -> tuple[CustomDataset, CustomDataset | None, dict]:
    """(training images, held-out images or None, run identity). The main process checks the images first and fills
    the check cache the rest read; a resume is refused here when its settings or data differ from the checkpoint's."""
    with accelerator.main_process_first():
        dataset = make_dataset(cfg, cfg.dataset_path, cfg.strict_data, output_dir / ".image_check_cache.json",
                               with_classes=True)
    validation_data = held_out_dataset(cfg, dataset)
    identity = run_identity(cfg, RUN_DEFINING, accelerator.num_processes)
    if resume_folder:
        check_resume_matches(resume_folder, identity, dataset.fingerprint(), cfg.resume_despite_changes)
    if accelerator.is_main_process:
        write_run_start(cfg, output_dir, dataset, validation_data)
    return dataset, validation_data, identity


def inject_lora(cfg, unet, text_encoder):
    """LoRA on the UNet (and the text encoder when it trains), initialised from the seed so every run starts alike."""
    torch.manual_seed(cfg.seed)
    if cfg.conv_rank and not matching_paths(unet, CONV_TARGETS):
        raise ConfigError(f"--conv_rank {cfg.conv_rank}: the UNet of {cfg.pretrained_model_name_or_path} has no "
                          f"ResNet or sampler convolutions ({', '.join(CONV_TARGETS)}) to put LoRA on; set "
                          f"--conv_rank 0")
    network = inject_trainable_lora(unet, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout,
                                    targets=LORA_TARGETS[cfg.lora_targets],
                                    text_encoder=text_encoder if cfg.train_text_encoder else None,
                                    conv_rank=cfg.conv_rank, conv_alpha=cfg.conv_alpha)
    if cfg.train_text_encoder:
        text_encoder.train()
    return network


def make_dataloader(cfg, dataset: CustomDataset, train_data, tokenizer, processes: int):
    """(the bucket batch sampler, the dataloader over `train_data` it drives)."""
    sampler = BucketBatchSampler([dataset.sizes[example] for example in dataset.order], cfg.train_batch_size,
                                 cfg.seed, processes, [dataset.examples[example].prior for example in dataset.order],
                                 cfg.prior_loss_weight)
    dataloader = torch.utils.data.DataLoader(WeightedItems(train_data), batch_sampler=sampler,
                                             collate_fn=make_collate(tokenizer),
                                             num_workers=cfg.dataloader_num_workers)
    return sampler, dataloader


def make_schedule(cfg, optimizer, micro_batches_per_epoch: int):
    """(optimizer steps per epoch, optimizer steps in the run, the learning-rate scheduler)."""
    steps_per_epoch = math.ceil(micro_batches_per_epoch / micro_batches_per_step(cfg))
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    # Stepped once per optimizer step by us (not by accelerate), so warm-up counts optimizer steps.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps)
    return steps_per_epoch, max_steps, lr_scheduler


def stopped_on_request(cfg, step: int, stop: "StopRequest") -> "TrainingStopped":
    return TrainingStopped(f"stopped on request at step {step}, checkpoint saved. Resume with:\n"
                           f"  {resume_command(cfg)}", 128 + stop.signal if stop.signal else 130)


def save_lora_files(cfg, network, ema: Ema | None, final_path: Path, metadata: dict[str, str]) -> None:
    """The final LoRA file, and the EMA weights' beside it when an EMA is kept."""
    network.save(final_path, metadata)
    if ema:
        with ema.swapped_in():
            network.save(Path(cfg.output_dir) / EMA_FILE_NAME, dict(metadata, ema_decay=str(ema.decay)))


def make_accelerator(cfg, output_dir: Path) -> Accelerator:
    return Accelerator(
        gradient_accumulation_steps=micro_batches_per_step(cfg), mixed_precision=cfg.mixed_precision,
        # The sampler yields global batches, each split into one slice per process (see BucketBatchSampler).
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with="tensorboard" if importlib.util.find_spec("tensorboard") else None,
        project_dir=str(output_dir / "logs"),
    )


def write_run_start(cfg, output_dir: Path, dataset: CustomDataset, validation_data: CustomDataset | None) -> None:
    """data_report.json, the resolved config.json, and the dataset summary on screen."""
    held_out = len(validation_data.examples) if validation_data and not cfg.validation_dataset_path else 0
    dataset.write_report(output_dir / "data_report.json", held_out)
    (output_dir / "config.json").write_text(json.dumps(vars(cfg), indent=2), encoding="utf-8")
    print(dataset.summary())


def prepare_for_training(cfg, accelerator: Accelerator, unet, text_encoder, optimizer, dataloader):
    """accelerate's prepare on the modules holding LoRA layers, the optimizer and the data; returns the prepared
    (trained modules, optimizer, dataloader, text encoder), the text encoder prepared only when it trains."""
    trained = [unet, text_encoder] if cfg.train_text_encoder else [unet]
    *trained, optimizer, dataloader = accelerator.prepare(*trained, optimizer, dataloader)
    return trained, optimizer, dataloader, trained[1] if cfg.train_text_encoder else text_encoder


def resume_training(folder: Path | None, cfg, network, optimizer, lr_scheduler,
                    accelerator: Accelerator) -> tuple[int, int, Ema | None]:
    """(step, non-finite steps so far, the EMA or None): (0, 0, a fresh EMA) for a new run; else the checkpoint's,
    with the LoRA weights, optimizer, schedule, RNGs and GradScaler restored, and the EMA taken from the checkpoint
    or, when it has none, started from the resumed weights."""
    if folder is None:
        return 0, 0, Ema(network.parameters(), cfg.ema_decay) if cfg.ema_decay else None
    state = load_checkpoint(folder, network, optimizer, lr_scheduler, accelerator.scaler)
    ema = None
    if cfg.ema_decay:
        saved = state["extra_tensors"]
        ema = Ema(network.parameters(), cfg.ema_decay, updates=state.get("ema_updates", state["step"]))
        if "ema.0" in saved:
            ema.shadow = [saved[f"ema.{i}"].to(p.device) for i, p in enumerate(ema.parameters)]
        else:
            log.warning("warning: the checkpoint has no EMA weights; the EMA starts from the resumed weights")
    accelerator.print(f"resumed from {folder} at step {state['step']}")
    return state["step"], state.get("nonfinite_total", 0), ema


def epoch_batches(epoch: int, step: int, steps_per_epoch: int, cfg, accelerator: Accelerator, sampler, train_data,
                  dataloader):
    """The micro-batches of `epoch` still to run: its order and augmentations set, and on resume the micro-batches
    the checkpoint already trained on skipped."""
    sampler.begin_epoch(epoch)
    train_data.begin_epoch(epoch)
    skip = (step % steps_per_epoch) * micro_batches_per_step(cfg)
    return accelerator.skip_first_batches(dataloader, skip) if skip else dataloader


def log_step(progress, accelerator: Accelerator, loss_log: "LossLog | None", step: int, loss: float, lr: float,
             finite: bool) -> None:
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    accelerator.log({"train/loss": loss, "train/lr": lr}, step=step)
    if loss_log:
        loss_log.write(step, loss, lr, skipped=not finite)


def report_nonfinite(cfg, progress, step: int, in_row: int, total: int) -> None:
    """Say that the update was skipped; stop the run when too many come in a row."""
    progress.write(f"step {step}: non-finite loss or gradient, update skipped ({in_row} in a row, {total} in all)")
    if in_row >= cfg.max_nonfinite_steps:
        raise TrainingStopped(
            f"stopped at step {step}: {in_row} non-finite steps in a row (lower learning_rate, or check the data). "
            f"Newest valid checkpoint: {latest_valid_checkpoint(Path(cfg.output_dir))}. Resume with:\n"
            f"  {resume_command(cfg)}", 3)


def report_epoch(progress, accelerator: Accelerator, epoch: int, losses: list[float], step: int) -> None:
    if losses:
        average = sum(losses) / len(losses)
        progress.write(f"epoch {epoch}: average loss {average:.4f} over {len(losses)} micro-batches")
        accelerator.log({"train/epoch_loss": average}, step=step)


def summary_text(output_dir: Path, final_path: Path, step: int, start_step: int, elapsed: float, loss: float,
                 nonfinite_total: int, report_path, dataset: CustomDataset, held_out: int,
                 val_log: "ValidationLog") -> str:
    """The one-screen summary printed at the end of a run."""
    steps_done = step - start_step
    return (f"\ndone: {step} steps ({steps_done} this run) in {elapsed:.0f} s "
            f"({steps_done / max(elapsed, 1e-9):.2f} steps/s), final loss {loss:.4f}, "
            f"{nonfinite_total} non-finite step(s) skipped\n"
            f"  LoRA file:   {final_path}\n"
            f"  checkpoints: {len(list_checkpoints(output_dir))} in {output_dir}\n"
            f"  samples:     {output_dir / 'samples'}\n"
            f"  loss log:    {output_dir / 'loss_log.jsonl'}\n"
            f"  report:      {report_path}\n"
            f"  data report: {output_dir / 'data_report.json'} ({len(dataset.examples)} training images, "
            f"{held_out} held out, {len(dataset.skipped)} skipped)" + val_log.summary(output_dir))


def resolve_machine_settings(cfg: argparse.Namespace) -> argparse.Namespace:
    """A copy of `cfg` with `mixed_precision auto` made concrete for this machine (said once, and saved so in
    config.json and the checkpoints), and TF32 allowed where the GPU has it."""
    allow_tf32()
    precision = resolve_precision(cfg.mixed_precision)
    if precision != cfg.mixed_precision:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        print(f"mixed precision: {cfg.mixed_precision} -> {precision} ({device})")
    return argparse.Namespace(**dict(vars(cfg), mixed_precision=precision))


def main(cfg: argparse.Namespace) -> Path:
    """Train and return the path of the final LoRA file."""
    # Preflight: settings, base model files, output folder, every image and caption, before any model loads.
    check_config(cfg)
    cfg = resolve_machine_settings(cfg)
    prompts = sample_prompts(cfg)
    check_model_source(cfg.pretrained_model_name_or_path)
    output_dir = Path(cfg.output_dir)
    resume_folder = resolve_resume(output_dir, cfg.resume_from_checkpoint)
    accelerator = make_accelerator(cfg, output_dir)
    check_cpu_precision(cfg.mixed_precision, accelerator.device)
    if accelerator.is_main_process:
        check_output_dir(output_dir)
    if cfg.class_data_path and resume_folder is None and accelerator.is_main_process:
        generate_missing(Path(cfg.class_data_path), cfg.num_class_images, cfg.class_prompt,
                         cfg.pretrained_model_name_or_path, cfg.resolution, cfg.seed, cfg.validation_inference_steps,
                         cfg.validation_guidance_scale, accelerator.device, PRECISION_DTYPES[cfg.mixed_precision])
    accelerator.wait_for_everyone()
    dataset, validation_data, identity = load_data(cfg, accelerator, output_dir, resume_folder)

    # Which parts compute in fp32 on this CPU goes into the checkpoints with the run's identity, for a resume to take
    # it again; the main process decides for all, so that every process computes alike, and for every frozen model.
    weight_dtype = PRECISION_DTYPES[cfg.mixed_precision]
    fp32_parts = broadcast_object_list([fp32_parts_here(resume_folder, accelerator.device, weight_dtype)
                                        if accelerator.is_main_process else None])[0]
    identity.update(fp32_parts)

    # Cache: encode what is frozen once, then release the VAE and text encoder (until sampling needs them)
    # before the UNet loads, so the two phases never hold each other's memory.
    tokenizer, text_encoder, vae, noise_scheduler = load_encoders(cfg.pretrained_model_name_or_path, weight_dtype)
    use_fp32_choices(vae, fp32_parts)
    use_fp32_choices(text_encoder, fp32_parts)
    if accelerator.is_main_process:
        report_long_captions(dataset, tokenizer)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    scaling_factor = vae.config.scaling_factor
    latents, embeddings = encode_frozen_inputs(cfg, dataset, vae, tokenizer, text_encoder, weight_dtype, accelerator)
    validation = None if validation_data is None else ValidationSet(validation_data, vae, tokenizer, text_encoder,
                                                                     scaling_factor, cfg.train_text_encoder)
    vae = None if latents is not None else vae
    text_encoder = None if embeddings is not None else text_encoder
    train_data = EncodedDataset(dataset, latents, embeddings) if latents or embeddings else dataset

    # Load the UNet in the training precision and inject LoRA (weights fp32, seeded so every run starts alike).
    unet, network = trainable_unet(cfg, weight_dtype, accelerator.device, text_encoder, fp32_parts)
    if accelerator.is_main_process:
        check_free_disk(output_dir, network, cfg)

    # Data, optimizer, schedule; prepared by accelerate; resumed from the checkpoint, if any.
    sampler, dataloader = make_dataloader(cfg, dataset, train_data, tokenizer, accelerator.num_processes)
    optimizer = make_optimizer(cfg, network)
    trained, optimizer, dataloader, text_encoder = prepare_for_training(cfg, accelerator, unet, text_encoder,
                                                                        optimizer, dataloader)
    unet = trained[0]
    models = StepModels(unet, vae, text_encoder, noise_scheduler, scaling_factor, trained)
    steps_per_epoch, max_steps, lr_scheduler = make_schedule(cfg, optimizer, len(dataloader))
    step, nonfinite_total, ema = resume_training(resume_folder, cfg, network, optimizer, lr_scheduler, accelerator)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")

    # The loop: one optimizer step per `gradient_accumulation_steps` micro-batches.
    accelerator.init_trackers("lora", config={k: str(v) for k, v in vars(cfg).items()})
    loss_log = LossLog(output_dir / "loss_log.jsonl", started_at) if accelerator.is_main_process else None
    val_log = ValidationLog(output_dir / "val_loss_log.jsonl") if accelerator.is_main_process else None
    stop = StopRequest()
    previous_handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    progress = tqdm(total=max_steps, initial=step, desc="training", disable=not accelerator.is_main_process)
    start_time, start_step, loss_value, nonfinite_in_row, sampled_at = time.time(), step, float("nan"), 0, None
    if step == 0 and accelerator.is_main_process:  # the base model, for comparison
        save_samples(cfg, prompts, accelerator, unet, network, vae, text_encoder, tokenizer, 0)
        val_log.record(0, validation, accelerator, models, cfg.seed)
    unet.train()
    try:
        while step < max_steps:
            epoch, epoch_losses, window_losses = step // steps_per_epoch, [], []
            for batch in epoch_batches(epoch, step, steps_per_epoch, cfg, accelerator, sampler, train_data,
                                       dataloader):
                # Forward and backward; the update at the end of an accumulation window.
                micro_loss, finite = train_micro_batch(batch, step, cfg, accelerator, models, network, optimizer)
                epoch_losses.append(micro_loss)
                window_losses.append(micro_loss)
                if not accelerator.sync_gradients:
                    continue
                # One optimizer step done (or skipped, when not finite): schedule, EMA, counters and logs.
                loss_value, window_losses = sum(window_losses) / len(window_losses), []
                lr_scheduler.step()
                if ema and finite:
                    ema.update()
                step += 1
                nonfinite_in_row = 0 if finite else nonfinite_in_row + 1
                nonfinite_total += 0 if finite else 1
                log_step(progress, accelerator, loss_log, step, loss_value, lr_scheduler.get_last_lr()[0], finite)
                if not finite:  # stops the run when too many come in a row
                    report_nonfinite(cfg, progress, step, nonfinite_in_row, nonfinite_total)
                # Checkpoint and validation loss on schedule, or on a stop request (then stop). A skipped update
                # left the weights as they were, so its step is saved, sampled and counted like any other.
                stop_now = stop_requested(stop, accelerator)
                if accelerator.is_main_process and (stop_now or (
                        cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0)):
                    checkpoint_run(cfg, step, network, optimizer, lr_scheduler, dataset, identity,
                                   nonfinite_total, started_at, ema, accelerator.scaler)
                    val_log.record(step, validation, accelerator, models, cfg.seed)
                if stop_now:
                    raise stopped_on_request(cfg, step, stop)
                # Samples on schedule.
                if accelerator.is_main_process and cfg.validation_steps and step % cfg.validation_steps == 0:
                    save_samples(cfg, prompts, accelerator, unet, network, vae, text_encoder, tokenizer, step)
                    sampled_at = step
                if step >= max_steps:
                    break
            report_epoch(progress, accelerator, epoch, epoch_losses, step)
    finally:
        progress.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    # Save: the final LoRA file (and its EMA twin), samples from it, the interop self-test and a summary.
    accelerator.wait_for_everyone()
    final_path = output_dir / LORA_FILE_NAME
    if accelerator.is_main_process:
        save_lora_files(cfg, network, ema, final_path, lora_metadata(cfg, dataset, step, started_at))
        if sampled_at != step:  # the last step's samples, unless the schedule just drew them
            save_samples(cfg, prompts, accelerator, unet, network, vae, text_encoder, tokenizer, step)
        val_log.record(step, validation, accelerator, models, cfg.seed)
        if cfg.interop_check:
            interop_self_test(final_path, accelerator.unwrap_model(unet),
                              accelerator.unwrap_model(text_encoder) if cfg.train_text_encoder else None)
        report_path = write_run_report(output_dir)
        print(summary_text(output_dir, final_path, step, start_step, time.time() - start_time, loss_value,
                           nonfinite_total, report_path, dataset, len(validation or ()), val_log))
    accelerator.end_training()
    return final_path


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s")
    try:
        main(parse_config())
    except (ConfigError, DatasetError, LoRAError, CheckpointError) as error:  # prompt-file errors are ConfigErrors
        sys.exit(f"error: {error}")
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
