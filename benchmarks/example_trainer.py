"""The diffusers example `train_text_to_image_lora.py`'s training, rebuilt for learning comparisons on the tiny model.

What the example does, step for step (its published training loop; nothing of this suite's trainer is used):
a PEFT LoRA on the UNet's attention projections (`LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
target_modules=["to_k", "to_q", "to_v", "to_out.0"])`, so lora_A starts ~ N(0, 1/rank), lora_B at zero); the
image through the VAE at every step, a latent *sampled* from its posterior, times the scaling factor; the caption
through the frozen text encoder at every step; noise ~ N(0, 1) and a timestep uniform in [0, 1000); MSE against
the noise, mean over the batch; gradient clipping at 1.0; AdamW (betas 0.9/0.999, weight decay 1e-2, eps 1e-8)
with diffusers' get_scheduler. The images are drawn in a shuffled order each epoch, as its DataLoader does.

    train_like_example(model_dir, dataset_dir, out_file, rank=8, learning_rate=1e-3, batch=4, steps=600,
                       warmup=30, scheduler="constant_with_warmup", seed=1)

writes a diffusers-format LoRA file (`unet.<module>.lora_A.weight` ...), which generate.py fuses like any other.
benchmarks/subject_recipe.py --trainer example grades it beside this suite's own training.
"""

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer


def read_pictures(dataset_dir: Path) -> list[tuple[torch.Tensor, str]]:
    """(pixels in [-1, 1], caption) for every .png with a same-stem .txt, in name order."""
    items = []
    for image_path in sorted(Path(dataset_dir).glob("*.png")):
        pixels = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32) / 127.5 - 1
        items.append((torch.from_numpy(pixels).permute(2, 0, 1), image_path.with_suffix(".txt").read_text().strip()))
    return items


def train_like_example(model_dir: Path, dataset_dir: Path, out_file: Path, rank: int = 8,
                       learning_rate: float = 1e-3, batch: int = 4, steps: int = 600, warmup: int = 30,
                       scheduler: str = "constant_with_warmup", seed: int = 1) -> Path:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler(scheduler, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=steps)

    pictures, order = read_pictures(dataset_dir), random.Random(seed)
    queue: list[int] = []
    unet.train()
    for _ in range(steps):
        chosen = []
        while len(chosen) < batch:  # epochs of a shuffled order; a batch may span two epochs
            if not queue:
                queue = list(range(len(pictures)))
                order.shuffle(queue)
            chosen.append(queue.pop())
        pixels = torch.stack([pictures[index][0] for index in chosen])
        ids = tokenizer([pictures[index][1] for index in chosen], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            states = text_encoder(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),)).long()
        prediction = unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, states,
                          return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    state = {f"unet.{name}": tensor.contiguous() for name, tensor in get_peft_model_state_dict(unet).items()}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, out_file)
    return out_file
