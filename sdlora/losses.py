"""What the diffusion loss measures, per element and per sample: L2, or the pseudo-Huber / smooth-L1 losses with a
threshold scheduled over the timesteps; loss masks on the latent grid; debiased-estimation weighting; the range
timesteps are drawn from.

Pseudo-Huber for diffusion: Khrapov et al. 2024, "Improving Diffusion Models's Data-Corruption Resistance using
Scheduled Pseudo-Huber Loss" (arXiv:2403.16728). The losses and schedules are those of kohya's sd-scripts
(library/train_util.py: conditional_loss, get_huber_threshold_if_needed; its huber_scale is left at 1), the
weighting is kohya's library/custom_train_functions.py apply_debiased_estimation.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sdlora.settings import ConfigError

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
NUM_TIMESTEPS = 1000  # SD 1.x's training schedule: timesteps are drawn from [min_timestep, max_timestep) within it
DEBIASED_SNR_CAP = 1000.0  # kohya's cap: SNR(0) is about 1175 for SD 1.x and unbounded for other schedules


@dataclass(frozen=True)
class LossSpec:
    """The loss settings of a run (train_lora.py's loss_type, huber_c, huber_schedule, debiased_estimation,
    min_timestep, max_timestep); the default is plain L2 over every timestep."""

    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    debiased_estimation: bool = False
    min_timestep: int = 0
    max_timestep: int = NUM_TIMESTEPS

    @classmethod
    def of(cls, cfg) -> "LossSpec":
        return cls(cfg.loss_type, cfg.huber_c, cfg.huber_schedule, cfg.debiased_estimation, cfg.min_timestep,
                   cfg.max_timestep)


def check_loss_settings(cfg) -> None:
    """Refuse a loss setting that cannot work, or would silently do nothing."""
    if cfg.loss_type not in LOSS_TYPES:
        raise ConfigError(f"--loss_type {cfg.loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    if cfg.huber_schedule not in HUBER_SCHEDULES:
        raise ConfigError(f"--huber_schedule {cfg.huber_schedule!r}: choose one of {', '.join(HUBER_SCHEDULES)}")
    if not cfg.huber_c > 0:
        raise ConfigError(f"--huber_c {cfg.huber_c}: the Huber threshold must be positive (kohya's default 0.1)")
    if cfg.loss_type == "l2" and (cfg.huber_c, cfg.huber_schedule) != (LossSpec.huber_c, LossSpec.huber_schedule):
        raise ConfigError(f"--huber_c {cfg.huber_c} / --huber_schedule {cfg.huber_schedule} with --loss_type l2: "
                          f"they shape the huber and smooth_l1 losses only; set --loss_type huber or smooth_l1")
    if not 0 <= cfg.min_timestep < cfg.max_timestep <= NUM_TIMESTEPS:
        raise ConfigError(f"--min_timestep {cfg.min_timestep} --max_timestep {cfg.max_timestep}: timesteps are drawn "
                          f"from [min_timestep, max_timestep), which must be a non-empty range within [0, "
                          f"{NUM_TIMESTEPS}), e.g. --min_timestep 200 --max_timestep 1000")


def check_mask_settings(cfg) -> None:
    """A mask folder needs masked_loss, exists, and lies outside the pictures (else its masks would train as
    pictures)."""
    if not cfg.mask_path:
        return
    if not cfg.masked_loss:
        raise ConfigError(f"--mask_path {cfg.mask_path} without --masked_loss: the masks would be ignored; set "
                          f"--masked_loss true")
    folder, pictures = Path(cfg.mask_path).resolve(), Path(cfg.dataset_path).resolve()
    if not folder.is_dir():
        raise ConfigError(f"--mask_path {cfg.mask_path} is not a folder; point it at the folder of mask images")
    if folder == pictures or pictures in folder.parents:
        raise ConfigError(f"--mask_path {cfg.mask_path} is inside --dataset_path {cfg.dataset_path}: its masks "
                          f"would be trained on as pictures; keep them in a folder of their own")


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (B x 1 x H x W) on the latent grid (B x 1 x h x w) by area averaging, as kohya's
    apply_masked_loss resizes it: each latent pixel weighs the share of its pixels that are to be learned."""
    return F.interpolate(mask, size=tuple(size), mode="area")


def huber_threshold(spec: LossSpec, timesteps: torch.Tensor, noise_scheduler) -> torch.Tensor:
    """The pseudo-Huber threshold c per sample (B), as kohya's get_huber_threshold_if_needed schedules it:
    constant:    c = huber_c;
    exponential: c = exp(-a t) with a = -ln(huber_c) / 1000: 1 at t = 0, huber_c at t = 1000;
    snr:         c = (1 - huber_c) / (1 + sigma_t)^2 + huber_c, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t):
                 near 1 at low noise (L2-like), near huber_c at high noise (L1-like)."""
    if spec.huber_schedule == "constant":
        return torch.full(timesteps.shape, spec.huber_c, device=timesteps.device)
    if spec.huber_schedule == "exponential":
        rate = -math.log(spec.huber_c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-rate * timesteps.float())
    alpha_bar = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    return (1 - spec.huber_c) / (1 + sigma) ** 2 + spec.huber_c


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, spec: LossSpec, timesteps: torch.Tensor,
                    noise_scheduler, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of each sample (B) between prediction and target (B x C x H x W, computed in fp32), the mean over
    its elements (weighted by `mask`, B x 1 x H x W in [0, 1], when given: see masked_mean). Per element, with d
    the difference and c the sample's huber_threshold (kohya's conditional_loss):
    l2:        d^2;
    huber:     2 c (sqrt(d^2 + c^2) - c)   (~ d^2 for |d| << c, ~ 2 c |d| for |d| >> c);
    smooth_l1: 2 (sqrt(d^2 + c^2) - c)     (~ d^2 / c for |d| << c, ~ 2 |d| for |d| >> c)."""
    prediction, target = prediction.float(), target.float()
    if spec.loss_type == "l2":
        elements = F.mse_loss(prediction, target, reduction="none")
    else:
        c = huber_threshold(spec, timesteps, noise_scheduler).view(-1, 1, 1, 1)
        root = torch.sqrt((prediction - target) ** 2 + c ** 2) - c
        elements = 2 * c * root if spec.loss_type == "huber" else 2 * root
    if mask is None:
        return elements.mean(dim=(1, 2, 3))
    return masked_mean(elements, mask)


def masked_mean(elements: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean of `elements` (B x C x H x W) weighted by `mask` (B x 1 x H x W): what the subject's
    pixels contribute, scaled to the size of an unmasked loss. kohya (apply_masked_loss) multiplies the
    per-element loss by the mask and averages over every element, so a small subject makes a small loss; dividing
    by the mask's mean instead keeps the loss's scale (and the learning rate's meaning) whatever the subject's size.
    An all-black mask gives 0."""
    weighted = (elements * mask).mean(dim=(1, 2, 3))
    return weighted / mask.mean(dim=(1, 2, 3)).clamp(min=1e-6)


def debiased_weights(noise_scheduler, timesteps: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation (kohya's apply_debiased_estimation): 1 / sqrt(SNR_t) for noise targets, 1 / (SNR_t + 1)
    for velocity targets, SNR_t = alpha_bar_t / (1 - alpha_bar_t) capped at 1000."""
    alpha_bar = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = torch.clamp(alpha_bar / (1 - alpha_bar), max=DEBIASED_SNR_CAP)
    return 1 / (snr + 1) if v_prediction else 1 / snr.sqrt()
