"""Train a LoRA for Stable Diffusion 1.x.

Edit the constants below and run `python train_lora.py`; any constant can be overridden by a flag of the
same name (`--learning_rate 5e-5`), or by a TOML file of them (`--config run.toml`; flags still win). The
result is `<output_dir>/pytorch_lora_weights.safetensors`, which generate.py, diffusers (`load_lora_weights`),
AUTOMATIC1111 and ComfyUI load.
"""

# --- base model ---
pretrained_model_name_or_path = "CompVis/stable-diffusion-v1-4"  # hub id or local diffusers folder
# --- data ---
dataset_path = "examples/dataset"  # folder of images with same-stem .txt captions or a metadata.jsonl
dataset_config = ""  # or kohya's dataset TOML: several folders, each with its repeats and caption rules; "": off
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
masked_loss = False  # weight the loss by each picture's mask (white = learn, black = ignore): mask_path or alpha
mask_path = ""  # folder of same-stem mask images (sub-folders as under dataset_path); "": the alpha channels
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
network_type = "lora"  # lora; dora: LoRA + a magnitude per input column; loha: Hadamard; lokr: Kronecker (LyCORIS)
lora_init = "kaiming"  # LoRA's A: kaiming (LoRA paper, kohya) or gaussian (N(0, 1/rank): PEFT, the diffusers example)
lokr_factor = -1  # LoKr: split each dimension as factor x rest (it must divide them); -1: the most balanced split
network_dropout = 0.0  # kohya's: dropout on the down projection's output (lora only); 0: off
rank_dropout = 0.0  # leave out each rank (lora, dora) or update row (loha, lokr) with this probability; 0: off
module_dropout = 0.0  # leave out a module's whole update with this probability at each pass; 0: off
network_weights = ""  # start from this LoRA file (ours, kohya's, diffusers/PEFT): type, ranks, alphas, targets from it
train_text_encoder = False  # also put LoRA on the CLIP text encoder's attention projections
text_encoder_lr = 0.0  # learning rate of the text-encoder LoRA; 0: learning_rate
# --- pivotal tuning: a token's text embedding trained beside the LoRA, saved in the LoRA file ---
train_token = ""  # caption word whose embedding trains, e.g. "sks"; "": off
train_token_new = False  # add train_token to the tokenizer as a new token (needed when the tokenizer splits it)
train_token_init = ""  # one-token word the embedding starts from, e.g. "dog"; "": the token's own embedding
train_token_vectors = 1  # embedding vectors the token stands for (diffusers spells them tok, tok_1, ...)
train_token_lr = 5e-4  # learning rate of the token's embedding (no weight decay)
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
loss_type = "l2"  # l2; huber, smooth_l1: pseudo-Huber losses, robust to odd pixels (Khrapov et al. 2024)
huber_c = 0.1  # huber / smooth_l1 threshold (kohya's huber_c); scheduled: its value at high noise
huber_schedule = "snr"  # constant, exponential or snr: the threshold over the timesteps, as kohya schedules it
debiased_estimation = False  # weight each sample by 1 / sqrt(SNR_t) (kohya's debiased_estimation_loss)
min_timestep = 0  # timesteps are drawn from [min_timestep, max_timestep), within [0, 1000)
max_timestep = 1000  # e.g. 200 and 1000 leave out the least noisy steps (fine detail)
ema_decay = 0.0  # keep an EMA of the LoRA weights, saved as its own file, e.g. 0.999; 0: off
mixed_precision = "auto"  # auto: bf16 on a GPU that has it, else fp16 on a GPU, no on a CPU; or no, fp16, bf16
seed = 42  # data order, crops, flips, noise and timesteps all derive from it
# --- checkpoints, samples, held-out loss, output ---
output_dir = "output"  # final LoRA file, checkpoints, samples, reports
checkpointing_steps = 500  # save a resumable checkpoint every N optimizer steps; 0: never
checkpoints_total_limit = 3  # keep only the newest N checkpoints; 0: keep all
resume_from_checkpoint = ""  # "latest" or a checkpoint folder
sample_prompts = ("a photo of an astronaut",)  # sampled at step 0, every sample_steps and at the end
sample_prompts_file = ""  # prompts with per-line --n --d --s --l --w --h --m settings; replaces sample_prompts
sample_steps = 500  # optimizer steps between sample sets; 0: only at step 0 and the end
sample_inference_steps = 25  # sampler steps for the sample images
sample_guidance_scale = 7.5  # classifier-free guidance for the sample images
validation_split = 0.0  # share of the images held out for a validation loss, e.g. 0.1; 0: none
validation_dataset_path = ""  # or a folder of held-out images (and captions) for the validation loss
validation_loss_steps = 500  # optimizer steps between validation losses; 0: only at step 0 and the end
dataloader_num_workers = 0  # background processes decoding images; 0: in the training process
# --- which checkpoint to use ---
judge_checkpoints = False  # at the end: score every kept checkpoint x multiplier, recommend one (docs/judge.md)
judge_multipliers = (0.6, 0.8, 1.0)  # LoRA strengths the judge tries on each checkpoint
judge_prompts = ()  # the subject in new contexts, each with the trigger phrase; empty: derived from trigger_phrase
judge_prior_prompts = ()  # prompts the LoRA must leave alone; empty: judge_prompts with the trigger's class word
judge_samples_per_prompt = 2  # images the judge draws per prompt (seeds seed + index)
judge_dino_model = ""  # local folder of facebook/dino-vits16: DINO subject fidelity; "": skipped
judge_clip_model = ""  # local folder of a CLIP model: CLIP-I subject and CLIP-T prompt fidelity; "": skipped
early_stopping_patience = 0  # stop when N checkpoints in a row scored no better (judge, else held-out loss); 0: off
# --- speed and memory ---
cache_latents = True  # VAE-encode each image once before training (off by itself with random crops)
cache_text_embeddings = True  # encode each caption once (off by itself when the text encoder trains)
cache_latents_to_disk = False  # also keep the latents in output_dir/latent_cache/ for the next run
gradient_checkpointing = False  # recompute UNet activations in the backward pass: much less memory, slower
# --- safety ---
strict_data = False  # True: any unusable image stops the run instead of being skipped
resume_despite_changes = False  # True: resume even when settings or data differ (the run is then not exact)
max_nonfinite_steps = 5  # consecutive non-finite losses/gradients (each skips its update) before the run heals or stops
nonfinite_retries = 2  # then roll back to the newest valid checkpoint from before them, at most N times; 0: stop
nonfinite_lr_factor = 0.5  # each rollback multiplies the learning rate by this, in (0, 1)
interop_check = True  # after saving, load the file as diffusers, A1111 and ComfyUI would and compare the deltas

# Everything above is configuration: collected here, before any import adds names of its own.
DEFAULTS = {name: value for name, value in list(globals().items())
            if not name.startswith("_") and isinstance(value, (bool, int, float, str, tuple))}
CONFIG_NAMES = list(DEFAULTS)
# Every setting above defines the run (a resume must share it to continue exactly) except these, which only say
# where files go, when to save, sample and validate, how fast, and how careful. The data is compared by fingerprint.
NOT_RUN_DEFINING = ("dataset_path", "dataset_config", "mask_path", "class_data_path", "num_class_images",
                    "output_dir", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
                    "sample_prompts", "sample_prompts_file", "sample_steps", "sample_inference_steps",
                    "sample_guidance_scale", "validation_split",
                    "validation_dataset_path", "validation_loss_steps", "dataloader_num_workers", "cache_latents",
                    "cache_text_embeddings", "cache_latents_to_disk", "gradient_checkpointing", "strict_data",
                    "resume_despite_changes", "max_nonfinite_steps", "nonfinite_retries", "nonfinite_lr_factor",
                    "interop_check", "judge_checkpoints", "judge_multipliers", "judge_prompts",
                    "judge_prior_prompts", "judge_samples_per_prompt", "judge_dino_model", "judge_clip_model",
                    "early_stopping_patience")
RUN_DEFINING = tuple(name for name in CONFIG_NAMES if name not in NOT_RUN_DEFINING)

# The imports follow the configuration on purpose: the constants are the first thing to read.
# ruff: noqa: E402
import argparse
import importlib.util
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from diffusers.optimization import get_scheduler

from dataset import DatasetError
from sdlora.checkpoints import CheckpointError, resolve_resume
from sdlora.class_images import check_prior_preservation
from sdlora.cpu_kernels import check_cpu_precision
from sdlora.early_stopping import CheckpointScorer, early_stopping_problem
from sdlora.judge import judge_problem
from lora_diffusion import LORA_INITS, NETWORK_TYPES
from sdlora.kohya_dataset import check_dataset_config
from sdlora.losses import check_loss_settings, check_mask_settings
from sdlora.loading import LORA_TARGETS, agreed_fp32_parts, inject_lora, load_encoders, trainable_unet
from sdlora.network_weights import check_network_weights
from sdlora.lora_file import LORA_FILE_NAME, LoRAError
from sdlora.optimizers import make_optimizer, optimizer_problem
from sdlora.preflight import check_data, check_free_disk
from sdlora.resuming import checkpoint_run, resume_command, resume_training
from sdlora.run_config import read_run_config
from sdlora.run_files import LOGS_DIR, VAL_LOSS_LOG_NAME, lora_metadata, save_lora_files
from sdlora.settings import (MIXED_PRECISIONS, PRECISION_DTYPES, ConfigError, build_parser, check_model_source,
                             resolve_machine_settings)
from sdlora.stopping import Stopping, TrainingStopped
from sdlora.summary import interop_self_test, summary_text, write_run_report
from sdlora.training_data import encode_frozen_inputs, epoch_batches, make_dataloader, micro_batches_per_step
from sdlora.training_log import TrainingLog
from sdlora.training_samples import save_samples, training_prompts
from sdlora.training_step import StepModels, train_micro_batch
from sdlora.validation import ValidationLog

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


# ---------------------------------------------------------------------------------------------------------------
# Configuration: the constants above, overridden by same-named flags

def parse_config(argv: list[str] | None = None) -> argparse.Namespace:
    """The constants, then a `--config` TOML's settings over them, then the flags over both."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default="")
    config_file = first.parse_known_args(argv)[0].config
    defaults = dict(DEFAULTS) | (read_run_config(config_file, DEFAULTS) if config_file else {})
    parser = build_parser(defaults, __doc__.splitlines()[0])
    parser.add_argument("--config", default="", metavar="RUN.TOML", help="settings from a TOML file; flags win")
    cfg = parser.parse_args(argv)
    for name in (name for name, value in DEFAULTS.items() if isinstance(value, tuple)):  # lists from the flags
        setattr(cfg, name, tuple(getattr(cfg, name)))
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
    negative = [f"--{name} {getattr(cfg, name)}" for name in ("max_train_steps", "num_train_epochs", "lr_warmup_steps",
                "checkpointing_steps", "checkpoints_total_limit", "sample_steps", "validation_loss_steps")
                if getattr(cfg, name) < 0]
    need(not negative, f"{', '.join(negative)}: step counts, epochs and limits cannot be negative; use 0 or more")
    for name in ("lora_dropout", "network_dropout", "rank_dropout", "module_dropout"):
        need(0 <= getattr(cfg, name) < 1, f"--{name} {getattr(cfg, name)}: a probability in [0, 1); 0 turns it off")
    need(cfg.network_type in NETWORK_TYPES,
         f"--network_type {cfg.network_type!r}: choose one of {', '.join(NETWORK_TYPES)}")
    need(cfg.network_dropout == 0 or cfg.network_type == "lora",
         f"--network_dropout {cfg.network_dropout} with --network_type {cfg.network_type}: only LoRA has a down "
         f"projection to drop out; use --rank_dropout or --module_dropout, or --network_type lora")
    need(cfg.lora_init in LORA_INITS, f"--lora_init {cfg.lora_init!r}: choose one of {', '.join(LORA_INITS)}")
    need(cfg.lora_init == "kaiming" or cfg.network_type in ("lora", "dora"),
         f"--lora_init {cfg.lora_init} with --network_type {cfg.network_type}: only LoRA and DoRA have a down "
         f"projection to start otherwise; drop --lora_init or use --network_type lora")
    need(cfg.lokr_factor == -1 or cfg.lokr_factor >= 1,
         f"--lokr_factor {cfg.lokr_factor}: a positive divisor of the layers' dimensions (e.g. 4 or 8), or -1")
    check_network_weights(cfg, DEFAULTS)
    need(cfg.lora_targets in LORA_TARGETS, f"--lora_targets {cfg.lora_targets!r}: choose one of {', '.join(LORA_TARGETS)}")
    need(0 <= cfg.caption_dropout < 1, f"--caption_dropout {cfg.caption_dropout}: a probability in [0, 1)")
    need(0 <= cfg.ema_decay < 1, f"--ema_decay {cfg.ema_decay}: in [0, 1), e.g. 0.999 (0 turns EMA off)")
    need(min(cfg.keep_tags, cfg.snr_gamma, cfg.noise_offset, cfg.text_encoder_lr) >= 0,
         "--keep_tags, --snr_gamma, --noise_offset and --text_encoder_lr cannot be negative")
    for problem in (optimizer_problem(cfg.optimizer, cfg.learning_rate), early_stopping_problem(cfg),
                    judge_problem(cfg) if cfg.judge_checkpoints else None):
        need(problem is None, problem)
    check_prior_preservation(cfg, DEFAULTS)
    check_loss_settings(cfg)
    check_mask_settings(cfg)
    check_dataset_config(cfg, DEFAULTS)
    need(cfg.max_nonfinite_steps >= 1 and cfg.nonfinite_retries >= 0,
         f"--max_nonfinite_steps {cfg.max_nonfinite_steps} / --nonfinite_retries {cfg.nonfinite_retries}: at least 1 "
         f"non-finite step before healing, and 0 or more retries (0: stop as soon as the limit is reached)")
    need(0 < cfg.nonfinite_lr_factor < 1, f"--nonfinite_lr_factor {cfg.nonfinite_lr_factor}: in (0, 1), e.g. 0.5; "
         f"the same learning rate would diverge again the same way (set --nonfinite_retries 0 to never roll back)")
    need(cfg.caption_extension.startswith("."),
         f"--caption_extension {cfg.caption_extension!r}: include the dot, e.g. .txt")


# ---------------------------------------------------------------------------------------------------------------
# The run, phase by phase; what each phase calls lives in sdlora/ (preflight, loading, training_data, ...)

def main(cfg: argparse.Namespace) -> Path:
    """Train and return the path of the final LoRA file."""
    # Seed: every draw derives from cfg.seed where it is made (LoRA init: below; batches, noise: epoch, step, index).
    # Check, before any model loads: settings, base model, output folder, class images, data, resume's match.
    check_config(cfg)
    cfg = resolve_machine_settings(cfg)
    prompts = training_prompts(cfg)
    check_model_source(cfg.pretrained_model_name_or_path)
    output_dir = Path(cfg.output_dir)
    resume_folder = resolve_resume(output_dir, cfg.resume_from_checkpoint)
    accelerator = make_accelerator(cfg, output_dir)
    check_cpu_precision(cfg.mixed_precision, accelerator.device)  # a CPU where bf16 would crawl is refused now
    dataset, validation_data, identity = check_data(cfg, accelerator, output_dir, resume_folder, RUN_DEFINING)

    # Load: which parts compute in fp32 on a CPU (timed, or the checkpoint's); the encoders encode, then the UNet.
    weight_dtype = PRECISION_DTYPES[cfg.mixed_precision]
    fp32_parts = agreed_fp32_parts(resume_folder, accelerator, weight_dtype)
    tokenizer, text_encoder, vae, noise_scheduler = load_encoders(cfg.pretrained_model_name_or_path, weight_dtype,
                                                                  fp32_parts)
    scaling_factor = vae.config.scaling_factor
    train_data, validation, vae, text_encoder = encode_frozen_inputs(cfg, dataset, validation_data, tokenizer,
                                                                     text_encoder, vae, weight_dtype, accelerator)
    unet = trainable_unet(cfg, weight_dtype, fp32_parts)

    # Inject: LoRA (fp32 weights) on the UNet, and on the text encoder when it trains, drawn from the seed.
    torch.manual_seed(cfg.seed)
    network = inject_lora(cfg, unet, text_encoder)
    if accelerator.is_main_process:
        check_free_disk(output_dir, network, cfg)

    # Data: the cached or raw items, in batches of the seeded bucket order. Optimizer: over the LoRA weights, the
    # UNet's and the text encoder's each at their learning rate.
    sampler, dataloader = make_dataloader(cfg, dataset, train_data, tokenizer, accelerator.num_processes)
    optimizer = make_optimizer(cfg, network)

    # Prepare: accelerate wraps what trains, the optimizer and the data.
    models = StepModels(unet, vae, text_encoder, noise_scheduler, scaling_factor, trained=[])
    models, optimizer, dataloader = prepare_for_training(cfg, accelerator, models, optimizer, dataloader)
    # The schedule over the prepared data. Resume: the checkpoint's weights, optimizer, schedule, RNG and EMA.
    steps_per_epoch, max_steps, lr_scheduler = make_schedule(cfg, optimizer, len(dataloader))
    step, ema = resume_training(resume_folder, cfg, network, optimizer, lr_scheduler, accelerator)

    # Loop: one optimizer step per `gradient_accumulation_steps` micro-batches.
    val_log = ValidationLog(output_dir / VAL_LOSS_LOG_NAME) if accelerator.is_main_process else None
    scorer = CheckpointScorer(cfg, validation, val_log, accelerator, models)  # early stopping's, and the judge's
    with (Stopping(cfg, accelerator, resume_folder, resume_command(cfg, DEFAULTS)) as stopping,
          TrainingLog(cfg, accelerator, output_dir, step, max_steps) as log):
        if step == 0 and accelerator.is_main_process:  # the base model, for comparison
            save_samples(cfg, prompts, accelerator, models, network, tokenizer, 0)
            val_log.record(0, validation, accelerator, models, cfg.seed)
        models.unet.train()
        while step < max_steps and not stopping.stopped_early:
            epoch = step // steps_per_epoch
            for batch in epoch_batches(epoch, step, steps_per_epoch, cfg, accelerator, sampler, train_data, dataloader):
                # Forward and backward; the update at the end of an accumulation window.
                micro_loss, finite = train_micro_batch(batch, step, cfg, accelerator, models, network, optimizer)
                log.micro_batch(micro_loss)
                if not accelerator.sync_gradients:
                    continue
                # An optimizer step done or, not finite, skipped (its step counts: the weights stay as they were).
                lr_scheduler.step()
                if ema and finite:
                    ema.update()
                step += 1
                log.optimizer_step(step, lr_scheduler.get_last_lr()[0], finite)
                if stopping.count_nonfinite(finite, step, log.progress):  # too many in a row: heal (or stop)
                    step = stopping.roll_back(step, network, optimizer, lr_scheduler, ema)
                    break  # the epoch's batches start again at the checkpoint's step
                # Checkpoint, validation loss and samples on their schedules; a stop request saves, then stops.
                stop_now = stopping.requested()
                if accelerator.is_main_process and (stop_now or due(step, cfg.checkpointing_steps)):
                    stopping.evaluated(step, scorer(step, network, dataset, log.started_at))  # early stopping, opt in
                    checkpoint_run(cfg, step, network, optimizer, lr_scheduler, dataset, identity | fp32_parts,
                                   stopping.counters(), log.started_at, ema, accelerator.scaler)
                if accelerator.is_main_process and (stop_now or due(step, cfg.validation_loss_steps)):
                    val_log.record(step, validation, accelerator, models, cfg.seed)
                if stop_now:
                    raise stopping.on_request(step)
                if accelerator.is_main_process and due(step, cfg.sample_steps):
                    save_samples(cfg, prompts, accelerator, models, network, tokenizer, step)
                if step >= max_steps or stopping.out_of_patience():
                    break
            log.end_epoch(epoch, step)

    # Save: the final LoRA file (and its EMA twin), samples from it, its validation loss, the interop self-test.
    accelerator.wait_for_everyone()
    final_path = output_dir / LORA_FILE_NAME
    if accelerator.is_main_process:
        save_lora_files(cfg, network, ema, final_path, lora_metadata(cfg, dataset, step, log.started_at))
        if not due(step, cfg.sample_steps):  # the last step's samples, unless the schedule just drew them
            save_samples(cfg, prompts, accelerator, models, network, tokenizer, step)
        val_log.record(step, validation, accelerator, models, cfg.seed)
        interop_self_test(cfg, final_path, accelerator, models)
        scorer.finish()  # judge_checkpoints: every checkpoint x multiplier scored, one recommended
        # Summary: the HTML report, and one screen of what was done and where it is.
        report_path = write_run_report(output_dir)
        print(summary_text(output_dir, final_path, step, log.start_step, time.time() - log.start_time, log.loss,
                           stopping, report_path, dataset, len(validation or ()), val_log))
    accelerator.end_training()
    return final_path


# ---------------------------------------------------------------------------------------------------------------
# main's own helpers, in the order main calls them

def make_accelerator(cfg, output_dir: Path) -> Accelerator:
    return Accelerator(
        gradient_accumulation_steps=micro_batches_per_step(cfg), mixed_precision=cfg.mixed_precision,
        # The sampler yields global batches, each split into one slice per process (see BucketBatchSampler).
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        # A trained token is in some captions only: on several processes its vectors get no gradient in a batch
        # without it (a class batch, a dropped caption), which DDP must be told to expect.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.train_token else None,
        log_with="tensorboard" if importlib.util.find_spec("tensorboard") else None,
        project_dir=str(output_dir / LOGS_DIR),
    )


def prepare_for_training(cfg, accelerator: Accelerator, models: StepModels, optimizer,
                         dataloader) -> tuple[StepModels, torch.optim.Optimizer, torch.utils.data.DataLoader]:
    """accelerate's prepare on the modules holding LoRA layers (the UNet, and the text encoder when it trains), the
    optimizer and the data; returns (`models` with the prepared modules, optimizer, dataloader). A text encoder
    holding a trained token counts as training (its gradients are synchronised)."""
    text_encoder_trains = cfg.train_text_encoder or bool(cfg.train_token)
    trained = [models.unet, models.text_encoder] if text_encoder_trains else [models.unet]
    *trained, optimizer, dataloader = accelerator.prepare(*trained, optimizer, dataloader)
    text_encoder = trained[1] if text_encoder_trains else models.text_encoder
    return replace(models, unet=trained[0], text_encoder=text_encoder, trained=trained), optimizer, dataloader


def make_schedule(cfg, optimizer, micro_batches_per_epoch: int):
    """(optimizer steps per epoch, optimizer steps in the run, the learning-rate scheduler)."""
    steps_per_epoch = math.ceil(micro_batches_per_epoch / micro_batches_per_step(cfg))
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    # Stepped once per optimizer step by us (not by accelerate), so warm-up counts optimizer steps.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps)
    return steps_per_epoch, max_steps, lr_scheduler


def due(step: int, every: int) -> bool:
    """Whether a schedule of every `every` steps (0: never) falls on `step`."""
    return bool(every) and step % every == 0


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s")
    try:
        main(parse_config())
    except (ConfigError, DatasetError, LoRAError, CheckpointError) as error:  # prompt-file errors are ConfigErrors
        sys.exit(f"error: {error}")
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
