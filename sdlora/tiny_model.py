"""Build a tiny, randomly initialised Stable Diffusion 1.x model in diffusers layout.

The shapes follow SD 1.4 (UNet2DConditionModel with cross-attention, AutoencoderKL with a factor-8 latent,
CLIP text encoder, CLIP BPE tokenizer, scaled-linear DDPM/PNDM schedule) but every width is tiny, so the
whole model builds and runs in seconds on a CPU. It is what the demo and the tests train on: the real
loading code (`from_pretrained` of a folder) is exercised without any download.

    python -m sdlora.tiny_model OUT_DIR     # writes model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
"""

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_CROSS_ATTENTION_DIM = 32

# The SD 1.x noise schedule (CompVis v1-inference.yaml); the sampler the model repo ships is PNDM.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def clip_byte_vocab() -> dict[str, int]:
    """CLIP's byte-level BPE alphabet without merges: every byte, every byte ending a word, then the two specials.

    Same byte-to-unicode table and special tokens as the real CLIP vocabulary, so the real `CLIPTokenizer`
    class reads it; only the 48,894 learned merges are left out (one token per character).
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    byte_values, code_points = printable[:], printable[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in code_points]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(vocab=clip_byte_vocab(), merges=[], model_max_length=77)


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_CROSS_ATTENTION_DIM, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=TINY_CROSS_ATTENTION_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(sample_size: int = 8, layers_per_block: int = 2) -> UNet2DConditionModel:
    # Two layers per block as in SD 1.x, so A1111's fixed block numbering maps this UNet's keys as it maps SD's.
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=(32, 64), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_CROSS_ATTENTION_DIM, attention_head_dim=8,
    )


def build_vae() -> AutoencoderKL:
    # Four blocks, like SD's VAE, so the latent side is the image side / 8.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215,
    )


def build_tiny_sd(out_dir: str | Path, seed: int = 0, resolution: int = 64) -> Path:
    """Write a tiny SD 1.x pipeline to `out_dir` (diffusers layout) and return the folder."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=build_vae(), text_encoder=build_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=build_unet(sample_size=resolution // 8),
        scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sdlora.tiny_model OUT_DIR")
    print(f"tiny SD 1.x model written to {build_tiny_sd(sys.argv[1])}")
