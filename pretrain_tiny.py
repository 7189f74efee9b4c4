"""Pretrain the tiny text-to-image model that ships in models/tiny-sd-world/, from scratch, on the CPU.

    python pretrain_tiny.py                 # about 52 minutes on 2 cores; resumes if interrupted
    python pretrain_tiny.py --probe         # about 10 minutes: the same build at a quarter of the steps

It is a Stable Diffusion 1.x model in miniature, saved with `StableDiffusionPipeline.save_pretrained`:
`AutoencoderKL` (4 latent channels, 4x downsampling at 64 px), a CLIP text encoder read through the real
`CLIPTokenizer` class, a `UNet2DConditionModel` with cross-attention and `to_q/to_k/to_v/to_out.0`, and the SD 1.x
noise schedule. Its world is tiny_world.py: it learns to draw what a caption asks, and never sees the held-out
concepts there, which are for a LoRA to teach it.

Three phases, each resumable: the VAE on pictures of every colour (so it can decode a colour the world never shows),
then the UNet and the text encoder together on the world's captioned pictures, then an evaluation by the world's
classifier, written with a sample grid and the training record beside the model.
"""

import argparse
import io
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image, ImageDraw
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdlora import tiny_world
from sdlora.ema import Ema
from sdlora.files import atomic_write
from sdlora.sampling import make_grid
from sdlora.tiny_model import SD_SCHEDULE, clip_byte_vocab

MODEL_DIR = Path("models/tiny-sd-world")
WORK_DIR = Path("pretrain_work")  # resumable state; not part of the model (pretrain_work/probe for --probe)
SEED = 0
TEXT_WIDTH = 64  # text-encoder hidden size = UNet cross-attention dim
VAE_STEPS, VAE_BATCH, VAE_LR = 2000, 16, 2e-3
UNET_STEPS, UNET_BATCH, UNET_LR = 5600, 32, 6e-4
WORLD_IMAGES = 24_000  # distinct pictures encoded once; captions are drawn afresh at each step
EMPTY_CAPTION_SHARE = 0.1  # trains the unconditional prediction that classifier-free guidance needs
EMA_DECAY = 0.999
# Offset noise (Guttenberg 2023, crosslabs.org/blog/diffusion-with-offset-noise): SD 1.x's schedule leaves a
# trace of each latent's mean in the noisiest inputs, so a model trained on flat backgrounds learns to read the
# background off the starting noise and draws a random tint. An extra per-channel offset hides that trace.
NOISE_OFFSET = 0.15
SAVE_EVERY_S = 120  # seconds between resumable checkpoints
# Words that become single tokens: the world's, the held-out ones (named only after pretraining, by a LoRA's
# captions or a user) and the usual rare trigger words, as the real CLIP vocabulary has them all.
EXTRA_WORDS = ("a", "of", "on", "with", "photo", "picture", "background", "shape", "style", "sks", "ohwx", "in")


# ---------------------------------------------------------------------------------------------------------------
# The model's parts

def build_command() -> str:
    """The command that built the model, with absolute paths made relative to where it ran, so the record
    names no folder of one machine."""
    words = [os.path.relpath(word) if os.path.isabs(word) else word for word in sys.argv]
    return "python " + shlex.join(words)


def world_words() -> list[str]:
    # The later concepts (tiny_world.LATER_*) were designed after the build and are no words of it.
    colours = tuple(tiny_world.COLOURS | tiny_world.HELD_OUT_COLOURS)
    return sorted(set(tiny_world.SHAPES + tiny_world.HELD_OUT_SHAPES + colours + tuple(tiny_world.BACKGROUNDS)
                      + tiny_world.SIZES + EXTRA_WORDS))


def build_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level alphabet plus one BPE merge chain per word, so each word of the world is one token.

    Token ids: CLIP's bytes first, then each merged piece once, then CLIP's two special tokens last."""
    alphabet = [token for token in clip_byte_vocab() if not token.startswith("<|")]
    tokens, merges = dict.fromkeys(alphabet), []
    for word in world_words():
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            tokens[pieces[0]] = None
    tokens.update(dict.fromkeys(["<|startoftext|>", "<|endoftext|>"]))
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=77)
    for word in world_words():
        assert len(tokenizer.tokenize(word)) == 1, f"{word!r} is not one token: {tokenizer.tokenize(word)}"
    return tokenizer


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    )


def build_unet() -> UNet2DConditionModel:
    # Three levels (16, 8, 4 latent px) with two layers per block as in SD, so the A1111/ComfyUI key numbering
    # applies to its LoRA files unchanged. Attention sits at 8 and 4 px and in the mid block: at 16 px it would
    # cost 40 % of the step on a CPU, and a 64 px picture of one shape needs no finer attention.
    return UNet2DConditionModel(
        sample_size=tiny_world.IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64), norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=4,
    )


# ---------------------------------------------------------------------------------------------------------------
# Pictures

def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def any_colour_picture(rng: random.Random) -> Image.Image:
    """One ellipse or convex polygon of any colour on a background of any colour: the VAE's wider gamut.

    Convex shapes only, so the held-out star is never drawn; uniform colours, so purple is among them."""
    def colour():
        return tuple(rng.randrange(256) for _ in range(3))
    size = tiny_world.IMAGE_SIZE * tiny_world.SUPERSAMPLE
    image = Image.new("RGB", (size, size), colour())
    draw = ImageDraw.Draw(image)
    cx, cy, r = rng.uniform(size / 4, 3 * size / 4), rng.uniform(size / 4, 3 * size / 4), rng.uniform(size / 10, size / 3)
    if rng.random() < 0.4:
        draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r], fill=colour())
    else:
        angles = sorted(rng.uniform(0, 2 * math.pi) for _ in range(rng.randint(3, 8)))
        draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles], fill=colour())
    return image.resize((tiny_world.IMAGE_SIZE, tiny_world.IMAGE_SIZE), Image.LANCZOS)


def vae_batch(rng: random.Random, batch: int) -> torch.Tensor:
    images = []
    for _ in range(batch):
        if rng.random() < 0.5:
            images.append(tiny_world.draw(tiny_world.random_picture(rng), rng))
        else:
            images.append(any_colour_picture(rng))
    return to_tensor(images)


# ---------------------------------------------------------------------------------------------------------------
# Resumable state

def save_state(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_state(path: Path) -> dict | None:
    return torch.load(path, weights_only=False) if path.is_file() else None


class Clock:
    """Seconds spent in a phase, carried across resumes, and when to save next."""

    def __init__(self, spent: float = 0.0):
        self.start, self.spent_before, self.last_save = time.time(), spent, time.time()

    def spent(self) -> float:
        return self.spent_before + time.time() - self.start

    def save_due(self) -> bool:
        if time.time() - self.last_save >= SAVE_EVERY_S:
            self.last_save = time.time()
            return True
        return False


# ---------------------------------------------------------------------------------------------------------------
# Phase 1: the VAE

def train_vae(steps: int, work_dir: Path) -> tuple[AutoencoderKL, float]:
    """Reconstruction (L1 + MSE) with a small KL term, as SD's VAE minus the perceptual and GAN terms."""
    final = work_dir / "vae_done.pt"
    torch.manual_seed(SEED)
    vae = build_vae()
    with torch.no_grad():  # start the posterior narrow (std 0.05): a wide one hides the picture in noise
        vae.quant_conv.bias[vae.config.latent_channels:] = -6.0
    if (done := load_state(final)) is not None:
        vae.load_state_dict(done["vae"])
        return vae, done["seconds"]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    state_path, step, rng, clock = work_dir / "vae_state.pt", 0, random.Random(SEED), Clock()
    if (state := load_state(state_path)) is not None:
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        step, clock = state["step"], Clock(state["seconds"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"vae: resumed at step {step}")
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = VAE_LR * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        pixels = vae_batch(rng, VAE_BATCH)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = F.l1_loss(reconstruction, pixels) + F.mse_loss(reconstruction, pixels) + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 100 == 0:
            print(f"vae step {step}/{steps} loss {loss.item():.4f} ({clock.spent():.0f} s)", flush=True)
        if clock.save_due() or step == steps:
            save_state(state_path, {"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                    "seconds": clock.spent(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state()})
    save_state(final, {"vae": vae.state_dict(), "seconds": clock.spent()})
    return vae, clock.spent()


# ---------------------------------------------------------------------------------------------------------------
# Phase 2: the UNet and the text encoder

@torch.no_grad()
def encode_world(vae: AutoencoderKL, count: int,
                 work_dir: Path) -> tuple[list[tiny_world.Picture], torch.Tensor, torch.Tensor, float]:
    """The world's pictures (drawn from the seed), their VAE posteriors (mean, std), encoded once, and the seconds
    that took."""
    path = work_dir / f"world_{count}.pt"
    if (cached := load_state(path)) is not None:
        return cached["pictures"], cached["mean"], cached["std"], cached["seconds"]
    started, rng, pictures, means, stds = time.time(), random.Random(SEED + 1), [], [], []
    for start in range(0, count, 256):
        batch = [tiny_world.random_picture(rng) for _ in range(min(256, count - start))]
        pictures += batch
        posterior = vae.encode(to_tensor([tiny_world.draw(p, rng) for p in batch])).latent_dist
        means.append(posterior.mean.half())
        stds.append(posterior.std.half())
    mean, std, seconds = torch.cat(means), torch.cat(stds), time.time() - started
    save_state(path, {"pictures": pictures, "mean": mean, "std": std, "seconds": seconds})
    return pictures, mean, std, seconds


def train_unet(steps: int, pictures, latent_mean, latent_std, tokenizer, scaling_factor: float, work_dir: Path):
    torch.manual_seed(SEED)
    unet, text_encoder = build_unet(), build_text_encoder(tokenizer)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=UNET_LR, weight_decay=0.01)
    ema = Ema(parameters, EMA_DECAY)
    schedule = DDPMScheduler(**SD_SCHEDULE)
    alphas = schedule.alphas_cumprod
    state_path, step, rng, clock = work_dir / "unet_state.pt", 0, random.Random(SEED + 2), Clock()
    if (state := load_state(state_path)) is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        ema.shadow, ema.updates = state["ema"], state["ema_updates"]
        step, clock = state["step"], Clock(state["seconds"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"unet: resumed at step {step}")
    warmup = 200
    while step < steps:
        lr = UNET_LR * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        items = [rng.randrange(len(pictures)) for _ in range(UNET_BATCH)]
        captions = ["" if rng.random() < EMPTY_CAPTION_SHARE else tiny_world.caption(pictures[i], rng) for i in items]
        index = torch.tensor(items)
        latents = (latent_mean[index].float() + latent_std[index].float() * torch.randn_like(latent_std[index].float()))
        latents = latents * scaling_factor
        noise = torch.randn_like(latents) + NOISE_OFFSET * torch.randn(UNET_BATCH, 4, 1, 1)
        timesteps = torch.randint(0, schedule.config.num_train_timesteps, (UNET_BATCH,))
        noisy = schedule.add_noise(latents, noise, timesteps)
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        # Min-SNR weighting (Hang et al. 2023, arXiv:2303.09556), gamma 5, for epsilon prediction.
        snr = alphas[timesteps] / (1 - alphas[timesteps])
        weight = torch.clamp(snr, max=5.0) / snr
        loss = (weight * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        ema.update()
        step += 1
        if step % 100 == 0:
            print(f"unet step {step}/{steps} loss {loss.item():.4f} lr {lr:.2e} ({clock.spent():.0f} s)", flush=True)
        if clock.save_due() or step == steps:
            save_state(state_path, {
                "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                "optimizer": optimizer.state_dict(), "ema": ema.shadow, "ema_updates": ema.updates, "step": step,
                "seconds": clock.spent(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state()})
    ema.copy_to_parameters()
    return unet, text_encoder, clock.spent()


# ---------------------------------------------------------------------------------------------------------------
# Phase 3: save, grade, record

EVAL_PROMPTS = tuple(f"a {size} {colour} {shape} on a {background} background"
                     for shape in tiny_world.SHAPES for colour in tiny_world.COLOURS
                     for background in tiny_world.BACKGROUNDS for size in tiny_world.SIZES)


def grade(pipe: StableDiffusionPipeline) -> dict[str, tuple[int, int]]:
    prompts = list(EVAL_PROMPTS)
    return tiny_world.score(list(zip(prompts, tiny_world.sample(pipe, prompts, seed=1234))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", action="store_true", help="a quarter of the steps, into pretrain_work/probe")
    parser.add_argument("--output_dir", default=str(MODEL_DIR))
    args = parser.parse_args()
    scale = 4 if args.probe else 1
    work_dir, output_dir = WORK_DIR, Path(args.output_dir)
    if args.probe:
        work_dir, output_dir = WORK_DIR / "probe", WORK_DIR / "probe" / "model"
    started = time.time()
    tokenizer = build_tokenizer()
    vae, vae_seconds = train_vae(VAE_STEPS // scale, work_dir)
    vae.eval().requires_grad_(False)
    pictures, latent_mean, latent_std, encode_seconds = encode_world(vae, WORLD_IMAGES // scale, work_dir)
    scaling_factor = float(1 / latent_mean.float().std())  # SD's 0.18215 is the same measurement on its VAE
    vae.register_to_config(scaling_factor=scaling_factor)
    print(f"vae done in {vae_seconds:.0f} s; latent scaling factor {scaling_factor:.4f}", flush=True)
    unet, text_encoder, unet_seconds = train_unet(UNET_STEPS // scale, pictures, latent_mean, latent_std, tokenizer,
                                                  scaling_factor, work_dir)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(output_dir)
    accuracy = grade(pipe)
    showcase = [p for p in EVAL_PROMPTS if "large" in p][::3][:24]
    make_grid(tiny_world.sample(pipe, showcase, seed=99), columns=6).save(output_dir / "samples.png")
    record = {
        "command": build_command(), "seed": SEED, "torch_threads": torch.get_num_threads(),
        "vae": {"steps": VAE_STEPS // scale, "batch": VAE_BATCH, "lr": VAE_LR, "seconds": round(vae_seconds)},
        "world_encoding": {"images": WORLD_IMAGES // scale, "seconds": round(encode_seconds)},
        "unet_and_text_encoder": {"steps": UNET_STEPS // scale, "batch": UNET_BATCH, "lr": UNET_LR,
                                  "empty_caption_share": EMPTY_CAPTION_SHARE, "ema_decay": EMA_DECAY, "noise_offset": NOISE_OFFSET,
                                  "seconds": round(unet_seconds)},
        "parameters": {"unet": sum(p.numel() for p in unet.parameters()),
                       "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                       "vae": sum(p.numel() for p in vae.parameters())},
        "held_out": {"shapes": list(tiny_world.HELD_OUT_SHAPES), "colours": list(tiny_world.HELD_OUT_COLOURS)},
        "accuracy": {name: {"correct": hit, "of": total, "share": round(hit / total, 3)}
                     for name, (hit, total) in accuracy.items()},
        "evaluation": f"{len(EVAL_PROMPTS)} prompts 'a SIZE COLOUR SHAPE on a BACKGROUND background', "
                      "PNDM 25 steps, guidance 3, seed 1234, graded by tiny_world.classify",
        "wall_seconds_this_session": round(time.time() - started),
    }
    (output_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record["accuracy"], indent=2))
    print(f"model written to {output_dir}")


if __name__ == "__main__":
    main()
