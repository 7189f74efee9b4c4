"""The models a training run uses: the frozen tokenizer, text encoder, VAE and UNet in the training precision, the
UNet readied for training (fp32 parts on a CPU, gradient checkpointing), and the LoRA injected into it."""

from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from lora_diffusion import CONV_TARGETS, UNET_TARGETS, AdapterSpec, inject_trainable_lora, matching_paths
from sdlora.checkpoints import read_state
from sdlora.cpu_kernels import fp32_choices, use_fp32_choices
from sdlora.files import read_safetensors_as
from sdlora.network_weights import network_from_file
from sdlora.pivotal import trained_token
from sdlora.settings import ConfigError

LORA_TARGETS = {"attention": UNET_TARGETS,
                "all": UNET_TARGETS + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")}
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
NO_FP32_PARTS = {"fp32_attention": False, "fp32_kernels": False}


def load_encoders(name_or_path: str, weight_dtype, fp32_parts: dict[str, bool]):
    """Tokenizer, text encoder, VAE and the training noise scheduler; the models frozen in `weight_dtype`, with the
    parts `fp32_parts` names in fp32 as the UNet's (the timed choice covers every frozen model on a CPU)."""
    tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")
    text_encoder = load_text_encoder(name_or_path, weight_dtype)
    vae = load_vae(name_or_path, weight_dtype)
    use_fp32_choices(text_encoder, fp32_parts)
    use_fp32_choices(vae, fp32_parts)
    noise_scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler")
    return tokenizer, text_encoder, vae, noise_scheduler


def load_text_encoder(name_or_path: str, weight_dtype) -> CLIPTextModel:
    text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", dtype=weight_dtype)
    return text_encoder.requires_grad_(False)


def load_vae(name_or_path: str, weight_dtype) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", dtype=weight_dtype).requires_grad_(False)


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


def cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """The local path of a hub model's file when it is in the cache (no download), else None."""
    if Path(repo_id).expanduser().exists() or repo_id.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) else None


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


def agreed_fp32_parts(resume_folder: Path | None, accelerator, weight_dtype) -> dict[str, bool]:
    """fp32_parts_here as the main process decides it, for every process: so that every process computes alike."""
    return broadcast_object_list([fp32_parts_here(resume_folder, accelerator.device, weight_dtype)
                                  if accelerator.is_main_process else None])[0]


def trainable_unet(cfg, weight_dtype, fp32_parts: dict[str, bool]) -> UNet2DConditionModel:
    """The frozen UNet as the loop trains it: in the training precision, with the parts `fp32_parts` names in fp32
    (see fp32_parts_here), gradient checkpointing if asked. LoRA goes in after, with inject_lora."""
    unet = load_unet(cfg.pretrained_model_name_or_path, weight_dtype)
    use_fp32_choices(unet, fp32_parts)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def inject_lora(cfg, unet, text_encoder):
    """LoRA (or the network_type's layers) on the UNet (and the text encoder when it trains); from the
    network_weights file when one is given. The layers' initial weights are drawn from torch's global generator:
    seed it just before, so every run starts alike. A token the text encoder trains (pivotal tuning) joins the
    network."""
    spec = AdapterSpec(cfg.network_type, cfg.lora_dropout, cfg.network_dropout, cfg.rank_dropout, cfg.module_dropout,
                       cfg.lokr_factor, cfg.lora_init)
    if cfg.network_weights:
        network = network_from_file(cfg, unet, text_encoder, spec)
    else:
        if cfg.conv_rank and not matching_paths(unet, CONV_TARGETS):
            raise ConfigError(f"--conv_rank {cfg.conv_rank}: the UNet of {cfg.pretrained_model_name_or_path} has no "
                              f"ResNet or sampler convolutions ({', '.join(CONV_TARGETS)}) to put LoRA on; set "
                              f"--conv_rank 0")
        network = inject_trainable_lora(unet, rank=cfg.rank, alpha=cfg.alpha, targets=LORA_TARGETS[cfg.lora_targets],
                                        text_encoder=text_encoder if cfg.train_text_encoder else None,
                                        conv_rank=cfg.conv_rank, conv_alpha=cfg.conv_alpha, spec=spec)
    if trained_token(text_encoder) is not None:
        network.add_token(trained_token(text_encoder))
    if cfg.train_text_encoder:
        text_encoder.train()
    return network
