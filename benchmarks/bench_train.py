"""Speed and memory of a training step and of generation, on the full SD 1.4 architecture with random weights.

    python benchmarks/bench_train.py                      # 256 and 512 px, fp32 and bf16 (CPU) / fp16 (GPU)
    python benchmarks/bench_train.py --resolutions 512 --precisions bf16 --steps 3
    python benchmarks/bench_train.py --resolutions 512 --precisions fp16 --batch_sizes 1 4 8 --variants ours paired

Step time and memory do not depend on weight values, so the published SD 1.4 shapes (UNet 859.5 M, VAE 83.7 M,
CLIP ViT-L/14 text encoder 123 M) with random weights give the real cost. For each resolution and precision,
each variant (--variants) runs in its own process (so each peak memory is its own), rank 4, batch 1 (--batch_sizes
for more: images/s beside s/step):
  ours    train_lora.py as shipped (latents and text embeddings cached), profiled over its 2nd and 3rd steps
  naive   train_lora.py encoding every image with the VAE and every caption with the text encoder at every step
  peft    the outside floor: the UNet with a PEFT LoRA of the same rank and targets, forward, backward and AdamW
          on inputs already encoded, as the diffusers example trains it
  frozen  the lower bound: no LoRA, frozen forward and backward to the input latents
  example the diffusers example's step, rebuilt (VAE and text encoder at every step, PEFT LoRA)
  paired  ours, peft, frozen and example taken in turn in one process, ratios per round (paired-speedups: the
          floor and each speed-up so; paired-channels-last: the floor, channels_last and the floor again)
  floor   the same step with our LoRALayer and train_lora.py's timed choice of the parts in fp32 on the CPU
          (cpu_kernels.py); floor-fp32-/floor-bf16-attention and -kernels force one choice, floor-channels-last,
          floor-fused-adamw and floor-compile try one change each, side by side with it (the forced variants
          that equal this machine's choice show the run's noise)
then generation: generate.py's pipeline with one fused LoRA against the base pipeline alone. A low precision that
would crawl on this CPU (cpu_kernels.check_cpu_precision, where bf16 instructions are missing) is skipped at start,
its reason printed and kept in the results file and under the table.
Results go to benchmarks/results-<device>.json and a markdown table is printed; BENCHMARKS.md keeps them.
"""

import argparse
import functools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from sdlora.tiny_model import SD_SCHEDULE, build_tokenizer  # noqa: E402
from sdlora.training_log import log_step  # noqa: E402
from sdlora.training_step import train_micro_batch  # noqa: E402

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXAMPLE_DATASET = ROOT / "examples" / "dataset"


def build_sd14(folder: Path) -> Path:
    """SD 1.4's published architecture (SD14_ARCH.md) with random weights, saved in diffusers layout."""
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215, sample_size=512)
    tokenizer = build_tokenizer()  # byte-level CLIP alphabet: token ids, not vocabulary size, reach the model
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    counts = {name: sum(p.numel() for p in model.parameters()) / 1e6
              for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    print("parameters (M): " + ", ".join(f"{k} {v:.1f}" for k, v in counts.items()), flush=True)
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


class MemorySampler:
    """Resident memory sampled every 50 ms in a background thread, so the peak of the training steps can be told
    apart from the peak of loading (an fp32 checkpoint converted to bf16 briefly holds both)."""

    def __init__(self):
        import psutil
        import threading

        self.process, self.samples, self.running = psutil.Process(), [], True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while self.running:
            self.samples.append((time.time(), self.process.memory_info().rss / 2**20))
            time.sleep(0.05)

    def peak_after(self, start: float) -> float:
        self.running = False
        self.thread.join()
        return max((rss for t, rss in self.samples if t >= start), default=float("nan"))


def peak_memory_mb(sampler: "MemorySampler") -> float:
    """The whole process's peak: CUDA's max_memory_allocated, or on a CPU the highest RSS sampled. Not ru_maxrss:
    Linux carries the parent's high-water mark across fork and exec into it."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return max(rss for _, rss in sampler.samples)


def train_args(model_dir: Path, output_dir: Path, resolution: int, precision: str, steps: int,
               dataset: Path = EXAMPLE_DATASET, batch: int = 1) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model_dir), "--dataset_path", str(dataset),
            "--output_dir", str(output_dir), "--resolution", str(resolution), "--train_batch_size", str(batch),
            "--max_train_steps", str(steps), "--checkpointing_steps", "0", "--sample_prompts",
            "--mixed_precision", "no" if precision == "fp32" else precision, "--interop_check", "false"]


def profiled(step_hook_owner, hook_name: str):
    """A CPU profiler recording the 2nd and 3rd optimizer steps, stepped from `step_hook_owner.hook_name` (a
    function called once per step), and the hook's restorer."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities, schedule=schedule(wait=1, warmup=0, active=2, repeat=1))
    original = getattr(step_hook_owner, hook_name)

    def hooked(*args, **kwargs):
        result = original(*args, **kwargs)
        profiler.step()
        return result

    setattr(step_hook_owner, hook_name, hooked)
    return profiler, lambda: setattr(step_hook_owner, hook_name, original)


def profile_table(profiler) -> str:
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS)


PROFILE_ROWS = 12


def batch_dataset(folder: Path, batch: int) -> Path:
    """`batch` copies of the square example image and its caption: the bundled images differ in shape, so at
    512 px they fall into different size buckets and would never fill a batch of more than one."""
    folder.mkdir()
    for index in range(batch):
        (folder / f"{index}.jpg").write_bytes((EXAMPLE_DATASET / "astronaut.jpg").read_bytes())
        (folder / f"{index}.txt").write_text((EXAMPLE_DATASET / "astronaut.txt").read_text())
    return folder


def measure_script(model_dir: Path, resolution: int, precision: str, steps: int, naive: bool, batch: int) -> dict:
    """train_lora.main as users run it; step times from its loss log (wall time between logged steps); the peak
    while loading (before the first step) and during the steps apart; a profile of steps 2 and 3. Batch 1 trains on
    the bundled example images, a larger batch on copies of the square one (batch_dataset)."""
    import train_lora
    from sdlora import training_log
    from sdlora.run_files import LOSS_LOG_NAME

    sampler = MemorySampler()
    profiler, restore = profiled(training_log, "log_step")
    with tempfile.TemporaryDirectory() as output_dir:
        dataset = EXAMPLE_DATASET if batch == 1 else batch_dataset(Path(output_dir) / "data", batch)
        run_dir = Path(output_dir) / "run"
        args = train_args(model_dir, run_dir, resolution, precision, steps + 1, dataset, batch)
        if naive:
            args += ["--cache_latents", "false", "--cache_text_embeddings", "false"]
        with profiler:
            train_lora.main(train_lora.parse_config(args))
        restore()
        rows = [json.loads(line) for line in (run_dir / LOSS_LOG_NAME).read_text().splitlines()]
    times = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]  # the first step (warm-up) is not counted
    before_steps = max((rss for t, rss in sampler.samples if t < rows[0]["time"] - times[0]), default=float("nan"))
    return {"step_seconds": times, "peak_mb": peak_memory_mb(sampler), "load_peak_mb": before_steps,
            "train_peak_mb": sampler.peak_after(rows[0]["time"]), "profile": profile_table(profiler)}


FLOORS = {  # variant: how the UNet is trained in the floor measurement
    "floor": "our LoRALayer on the attention projections, AdamW",
    "peft": "a PEFT LoRA of the same rank and targets (unet.add_adapter, as the diffusers example), AdamW",
    "frozen": "no LoRA and no weight gradients: frozen forward and backward to the input latents",
    "example": "the diffusers example's step (VAE and text encoder at every step, PEFT LoRA), see ExampleStep",
    "floor-again": "floor once more, on its own copy of the UNet: in a paired run its ratio to the floor is the "
                   "run's noise",
    "floor-channels-last": "floor with the UNet and its inputs in channels_last memory format",
    "floor-fused-adamw": "floor with AdamW(fused=True)",
    "floor-compile": "floor with torch.compile(unet); its first (compiling) step reported apart",
    "floor-fp32-attention": "floor with the attention product in fp32 whatever the timing says (attention.py)",
    "floor-bf16-attention": "floor with the attention product in the training precision whatever the timing says",
    "floor-fp32-kernels": "floor with the large convolutions and matmuls in fp32 whatever the timing says "
                          "(cpu_kernels.py)",
    "floor-bf16-kernels": "floor with the large convolutions and matmuls in the training precision whatever the "
                          "timing says",
}


def add_peft_lora(unet) -> list:
    """A PEFT LoRA of our rank and targets, as the diffusers example adds it; returns its trainable weights."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    for p in parameters:  # the example keeps the trainable LoRA weights in fp32 (cast_training_params)
        p.data = p.data.float()
    return parameters


@functools.cache
def timed_fp32_parts(device: str, dtype: torch.dtype) -> dict[str, bool]:
    """The parts of the step train_lora.py would compute in fp32 on this machine, timed once per process so that
    every step measured in it takes the same choice."""
    from train_lora import fp32_parts_here

    return fp32_parts_here(None, device, dtype)


def floor_unet(variant: str, model_dir: Path, dtype: torch.dtype, device: str):
    """(UNet ready for the variant's step, its trainable parameters)."""
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", dtype=dtype).to(device)
    unet.requires_grad_(False)
    if variant == "frozen":
        return unet, []
    if variant == "peft":
        return unet, add_peft_lora(unet)
    from sdlora.cpu_kernels import use_fp32_choices
    from lora_diffusion import inject_trainable_lora

    network = inject_trainable_lora(unet, rank=4, alpha=4.0)
    fp32_parts = dict(timed_fp32_parts(device, dtype))
    for part in ("attention", "kernels"):
        if variant in (f"floor-fp32-{part}", f"floor-bf16-{part}"):
            fp32_parts[f"fp32_{part}"] = variant == f"floor-fp32-{part}"
    use_fp32_choices(unet, fp32_parts)
    if variant == "floor-channels-last":
        unet = unet.to(memory_format=torch.channels_last)
    if variant == "floor-compile":
        unet = torch.compile(unet)
    return unet, network.parameters()


class FloorStep:
    """One bare training step of a floor variant (see FLOORS) on fixed inputs already encoded: forward, backward,
    AdamW. Calling it returns (seconds for the step, seconds of them in the optimizer)."""

    def __init__(self, variant: str, model_dir: Path, resolution: int, precision: str, device: str, batch: int):
        self.variant, self.precision, self.device = variant, precision, device
        self.dtype = PRECISION_DTYPES[precision]
        self.unet, parameters = floor_unet(variant, model_dir, self.dtype, device)
        self.optimizer = (torch.optim.AdamW(parameters, lr=1e-4, fused=variant == "floor-fused-adamw")
                          if parameters else None)
        side = resolution // 8
        memory_format = torch.channels_last if variant == "floor-channels-last" else torch.contiguous_format
        self.latents = torch.randn(batch, 4, side, side, device=device, dtype=self.dtype).to(
            memory_format=memory_format)
        width = self.unet.config.cross_attention_dim
        self.states = torch.randn(batch, 77, width, device=device, dtype=self.dtype)
        self.noise = torch.randn_like(self.latents)
        self.timesteps = torch.full((batch,), 500, device=device)

    def __call__(self) -> tuple[float, float]:
        start = time.perf_counter()
        noisy = (self.latents + self.noise).requires_grad_(self.variant == "frozen")
        with torch.autocast(self.device, dtype=self.dtype, enabled=self.precision != "fp32"):
            prediction = self.unet(noisy, self.timesteps, self.states).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), self.noise.float())
        loss.backward()
        optimizer_start = time.perf_counter()
        if self.optimizer:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.perf_counter() - optimizer_start


class ExampleStep:
    """The diffusers example `train_text_to_image_lora.py`'s step, rebuilt from its published training loop: the
    frozen VAE and text encoder cast to the training precision and run at every step (the image through the VAE,
    a latent sampled from its posterior; the caption through the text encoder), noise and timestep, the UNet with a
    PEFT LoRA under autocast, MSE, backward, gradient clipping at 1.0, AdamW (weight decay 1e-2) and its schedule.
    Loaded as the example loads: each model in fp32, then cast. Calling it returns (seconds for the step, 0.0)."""

    def __init__(self, model_dir: Path, resolution: int, precision: str, device: str, batch: int):
        from diffusers import DDPMScheduler
        from transformers import CLIPTokenizer

        self.precision, self.device, self.dtype = precision, device, PRECISION_DTYPES[precision]
        self.vae, self.text_encoder, self.unet = (
            cls.from_pretrained(model_dir, subfolder=folder).requires_grad_(False).to(device, dtype=self.dtype)
            for cls, folder in ((AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder"),
                                (UNet2DConditionModel, "unet")))
        self.parameters = add_peft_lora(self.unet)
        tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        self.input_ids = tokenizer(["a photo of a dog on the grass"] * batch, padding="max_length", truncation=True,
                                   max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
        self.pixel_values = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
        self.scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        self.optimizer = torch.optim.AdamW(self.parameters, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)  # "constant"

    def __call__(self) -> tuple[float, float]:
        start = time.perf_counter()
        latents = self.vae.encode(self.pixel_values.to(self.dtype)).latent_dist.sample()
        latents = latents * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),),
                                  device=self.device).long()
        noisy_latents = self.scheduler.add_noise(latents, noise, timesteps)
        states = self.text_encoder(self.input_ids, return_dict=False)[0]
        with torch.autocast(self.device, dtype=self.dtype, enabled=self.precision != "fp32"):
            prediction = self.unet(noisy_latents, timesteps, states, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        loss.item()  # the example's progress bar shows the step's loss
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, 0.0


class ScriptStep:
    """train_lora.py's own step on its own UNet and LoRA, as its loop takes it with the caches on: the micro-batch
    (noise and timestep draws, forward, backward, finiteness check, gradient clipping, optimizer step), the
    learning-rate schedule and the log line. Calling it returns (seconds for the step, 0.0)."""

    def __init__(self, model_dir: Path, resolution: int, precision: str, output_dir: Path, batch: int):
        import train_lora
        from diffusers import DDPMScheduler

        from tqdm import tqdm

        from sdlora.loading import inject_lora, trainable_unet
        from sdlora.settings import resolve_machine_settings
        from sdlora.training_step import StepModels

        self.cfg = resolve_machine_settings(
            train_lora.parse_config(train_args(model_dir, output_dir, resolution, precision, 1000, batch=batch)))
        self.accelerator = train_lora.make_accelerator(self.cfg, output_dir)
        dtype = PRECISION_DTYPES[precision]
        device = self.accelerator.device
        unet = trainable_unet(self.cfg, dtype, timed_fp32_parts(device.type, dtype))
        torch.manual_seed(self.cfg.seed)
        self.network = inject_lora(self.cfg, unet, None)
        optimizer = train_lora.make_optimizer(self.cfg, self.network)
        width = unet.config.cross_attention_dim
        unet, self.optimizer = self.accelerator.prepare(unet, optimizer)
        self.lr_scheduler = train_lora.make_schedule(self.cfg, self.optimizer, 4)[2]
        scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        self.models = StepModels(unet, None, None, scheduler, 0.18215, [unet])
        side = resolution // 8
        self.batch = {"index": torch.arange(batch), "loss_weight": torch.full((batch,), 1 / batch),  # as Draw weighs
                      "latent_mean": torch.randn(batch, 4, side, side, device=device, dtype=dtype),
                      "latent_std": torch.full((batch, 4, side, side), 0.01, device=device, dtype=dtype),
                      "text_embedding": torch.randn(batch, 77, width, device=device, dtype=dtype)}
        self.step, self.progress = 0, tqdm(total=1000, disable=True)
        unet.train()

    def __call__(self) -> tuple[float, float]:
        start = time.perf_counter()
        loss, finite = train_micro_batch(self.batch, self.step, self.cfg, self.accelerator, self.models, self.network,
                                         self.optimizer)
        self.lr_scheduler.step()
        self.step += 1
        log_step(self.progress, self.accelerator, None, self.step, loss, self.lr_scheduler.get_last_lr()[0], finite)
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, 0.0


PAIRED = {  # a paired variant: (the step every other is compared with, the others)
    "paired": ("ours", ("peft", "frozen", "example")),
    "paired-speedups": ("floor", ("floor-fp32-attention", "floor-bf16-attention", "floor-fp32-kernels",
                                  "floor-bf16-kernels", "floor-channels-last", "floor-fused-adamw")),
    "paired-channels-last": ("floor", ("floor-channels-last", "floor-again")),
}


TRAINING_VARIANTS = ["ours", "naive", *PAIRED, *FLOORS]


def make_step(variant: str, model_dir: Path, resolution: int, precision: str, device: str, output_dir: Path,
              batch: int):
    if variant == "ours":
        return ScriptStep(model_dir, resolution, precision, output_dir, batch)
    if variant == "example":
        return ExampleStep(model_dir, resolution, precision, device, batch)
    return FloorStep(variant, model_dir, resolution, precision, device, batch)


def measure_paired(paired: str, model_dir: Path, resolution: int, precision: str, rounds: int, batch: int) -> dict:
    """The steps of PAIRED[paired] (paired: ours, peft, frozen and the example; paired-speedups: the floor and
    each speed-up), each on its own copy of the UNet in one process, taken in turn, the order rotated each round:
    a change in the machine's speed hits them all alike, so the ratio of two steps in the same round is the fine
    measure that separate processes (10-40 % apart on a shared machine) cannot give. The memory of several
    models in one process says nothing; each variant's own peak comes from its own process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference, others = PAIRED[paired]
    with tempfile.TemporaryDirectory() as output_dir:
        steps = {name: make_step(name, model_dir, resolution, precision, device, Path(output_dir), batch)
                 for name in (reference, *others)}
        times = {name: [] for name in steps}
        for index in range(rounds + 1):  # the first round warms up
            names = list(steps)[index % len(steps):] + list(steps)[:index % len(steps)]
            for name in names:
                seconds = steps[name]()[0]
                if index:
                    times[name].append(seconds)
    if paired == "paired":  # ours against each floor and the example
        ratios = {f"ours/{other}": [a / b for a, b in zip(times["ours"], times[other])] for other in others}
    else:  # each speed-up against the floor
        ratios = {f"{other}/floor": [a / b for a, b in zip(times[other], times["floor"])] for other in others}
    return {"step_seconds": times, "ratios": ratios}


def measure_floor(variant: str, model_dir: Path, resolution: int, precision: str, steps: int, batch: int) -> dict:
    """What a LoRA trainer cannot avoid per step (see FLOORS): forward, backward, optimizer step on inputs already
    encoded; the optimizer step's own time is reported too."""
    sampler = MemorySampler()  # from the start, so the loading peak is seen
    device = "cuda" if torch.cuda.is_available() else "cpu"
    step = make_step(variant, model_dir, resolution, precision, device, Path("unused"), batch)
    times, optimizer_times, first_step_done = [], [], 0.0
    profiler, restore = profiled(sys.modules[__name__], "step_done")
    with profiler:
        for _ in range(steps + 1):
            first_step_done = first_step_done or (time.time() if times else 0.0)
            seconds, optimizer_seconds = step()
            times.append(seconds)
            optimizer_times.append(optimizer_seconds)
            step_done()
    restore()
    return {"step_seconds": times[1:], "first_step_seconds": times[0], "optimizer_seconds": optimizer_times[1:],
            "peak_mb": peak_memory_mb(sampler), "load_peak_mb": max(
                (rss for t, rss in sampler.samples if t < first_step_done - times[0]), default=float("nan")),
            "train_peak_mb": sampler.peak_after(first_step_done),
            "profile": profile_table(profiler)}


def step_done() -> None:
    """Called after each floor step; the profiler steps on it."""


def measure_generation(model_dir: Path, resolution: int, precision: str, steps: int, repeats: int) -> dict:
    """generate.py's pipeline, base alone and with one rank-4 LoRA fused: seconds per image."""
    import generate
    from lora_diffusion import inject_trainable_lora

    with tempfile.TemporaryDirectory() as folder:
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        network = inject_trainable_lora(unet, rank=4, alpha=4.0)
        for layer in network.layers.values():
            torch.nn.init.normal_(layer.up.weight, std=0.01)
        lora_path = network.save(Path(folder) / "lora.safetensors")
        del unet, network
        cfg = generate.parse_config(["--pretrained_model_name_or_path", str(model_dir), "--height", str(resolution),
                                     "--width", str(resolution), "--num_inference_steps", str(steps),
                                     "--mixed_precision", "no" if precision == "fp32" else precision])
        pipelines = {"base": generate.load_pipeline(cfg, []), "fused": generate.load_pipeline(cfg, [(lora_path, 0.8)])}
        results = {name: [] for name in pipelines}
        for index in range(repeats + 1):  # alternate base and fused, so drift in machine speed hits both alike
            for name, pipeline in pipelines.items():
                pipeline.set_progress_bar_config(disable=True)
                start = time.perf_counter()
                pipeline("a photo", num_inference_steps=steps, height=resolution, width=resolution,
                         generator=torch.Generator("cpu").manual_seed(index))
                if index:  # the first round warms up
                    results[name].append(time.perf_counter() - start)
    return results


def run_one(args) -> None:
    """Child process: one measurement, printed as the last line of JSON."""
    model_dir = Path(args.model_dir)
    if args.variant in PAIRED:
        result = measure_paired(args.variant, model_dir, args.resolution, args.precision, args.steps, args.batch)
    elif args.variant in FLOORS:
        result = measure_floor(args.variant, model_dir, args.resolution, args.precision, args.steps, args.batch)
    elif args.variant == "generation":
        result = measure_generation(model_dir, args.resolution, args.precision, args.generation_steps, args.steps)
    else:
        result = measure_script(model_dir, args.resolution, args.precision, args.steps, args.variant == "naive",
                                args.batch)
    print(json.dumps(result))


def child(args, variant: str, resolution: int, precision: str, batch: int = 1) -> dict:
    command = [sys.executable, __file__, "--one", variant, "--model_dir", args.model_dir, "--steps", str(args.steps),
               "--resolution_one", str(resolution), "--precision_one", precision, "--batch_one", str(batch),
               "--generation_steps", str(args.generation_steps)]
    print(f"  {variant:10s} {resolution} px {precision} batch {batch} ...", end=" ", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:  # recorded, and the other variants still run
        print(f"failed:\n{result.stderr[-3000:]}", flush=True)
        return {"failed": result.stderr[-3000:]}
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(medians({k: v for k, v in measured.items() if k != "profile"})), flush=True)
    return measured


def medians(measured):
    """Each list of a result (nested or not) as its median, for the progress line."""
    if isinstance(measured, dict):
        return {k: medians(v) for k, v in measured.items()}
    return round(statistics.median(measured), 3) if isinstance(measured, list) else round(measured, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--model_dir", default=str(ROOT / "benchmarks" / ".sd14-random"))
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"] if device == "cpu" else ["fp32", "fp16"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant, after one warm-up step")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1], help="images per training step")
    parser.add_argument("--generation_steps", type=int, default=4, help="sampler steps per generated image")
    parser.add_argument("--generation_resolution", type=int, default=512)
    parser.add_argument("--parts", nargs="+", choices=["training", "generation"], default=["training", "generation"],
                        help="one part alone keeps the other part's results already in the results file")
    parser.add_argument("--variants", nargs="+", default=["ours", "peft", "frozen"],
                        choices=TRAINING_VARIANTS,
                        help="training variants, each in its own process; paired: ours, peft, frozen and example "
                             "in turn in one process, paired-speedups: floor and each speed-up so (--steps rounds)")
    parser.add_argument("--out", default="", help="results file (default benchmarks/results-<device>.json)")
    parser.add_argument("--one", choices=[*TRAINING_VARIANTS, "generation"], help=argparse.SUPPRESS)
    parser.add_argument("--resolution_one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision_one", help=argparse.SUPPRESS)
    parser.add_argument("--batch_one", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch_sizes {' '.join(map(str, args.batch_sizes))}: each must be at least 1")
    if args.one:
        args.variant, args.resolution, args.precision, args.batch = (args.one, args.resolution_one,
                                                                     args.precision_one, args.batch_one)
        return run_one(args)

    skipped = crawling_precisions(args.precisions, device)
    precisions = [precision for precision in args.precisions if precision not in skipped]
    build_sd14(Path(args.model_dir))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / f"results-{device}.json"
    results = {"device": device, "machine": machine_name(device), "torch": torch.__version__, "steps": args.steps,
               "runs": [], **({"skipped": skipped} if skipped else {})}
    earlier = json.loads(out.read_text()) if out.is_file() else {}
    if "training" not in args.parts:  # the training runs already in the file stay; a new file gets the header
        results = {**results, **earlier}
    elif "generation" not in args.parts and "generation" in earlier:
        results["generation"] = earlier["generation"]
    for resolution in args.resolutions if "training" in args.parts else []:
        for precision in precisions:
            for batch in args.batch_sizes:
                run = {"resolution": resolution, "precision": precision, "batch": batch}
                for variant in args.variants:
                    run[variant] = child(args, variant, resolution, precision, batch)
                results["runs"].append(run)
    if "generation" in args.parts and precisions:
        generation_precision = precisions[-1]
        results["generation"] = {"resolution": args.generation_resolution, "precision": generation_precision,
                                 "steps": args.generation_steps,
                                 **child(args, "generation", args.generation_resolution, generation_precision)}
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}\n\n{markdown(results)}")


def crawling_precisions(precisions: list[str], device: str) -> dict[str, str]:
    """{precision: why} for each low precision that train_lora.py would refuse here because it crawls on this CPU
    (cpu_kernels.check_cpu_precision: hundreds of times slower than fp32 where bf16 instructions are missing), said
    at once; its rows are skipped rather than left to run for hours."""
    from sdlora.cpu_kernels import check_cpu_precision
    from sdlora.settings import ConfigError

    skipped = {}
    for precision in precisions:
        try:
            check_cpu_precision("no" if precision == "fp32" else precision, device)
        except ConfigError as error:
            skipped[precision] = str(error)
            print(f"skipping every {precision} row: {error}", flush=True)
    return skipped


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    return f"{model}, {torch.get_num_threads()} threads"


def markdown(results: dict) -> str:
    """The BENCHMARKS.md tables: per resolution, precision and batch size, each variant's median seconds per
    optimizer step, images per second and memory in MiB, and ours against the PEFT and frozen floors. On a GPU the
    peak is CUDA's max_memory_allocated and the loading and step columns are the host's RSS."""
    memory = ("peak RSS | before steps | during steps" if results["device"] == "cpu" else
              "peak allocated | host RSS before steps | host RSS during steps")
    lines = [f"| px | precision | batch | variant | s/step (median) | images/s | steps | {memory} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ratios, paired = [], []
    for run in results["runs"]:
        medians, batch = {}, run.get("batch", 1)  # files from before --batch_sizes hold batch-1 runs only
        setting = f"{run['resolution']} px {run['precision']}" + (f" batch {batch}" if batch > 1 else "")
        for variant, measured in run.items():
            if variant in ("resolution", "precision", "batch"):
                continue
            row = f"| {run['resolution']} | {run['precision']} | {batch} | {variant} |"
            if "failed" in measured:
                lines.append(f"{row} failed | | | | | |")
                continue
            if variant in PAIRED:
                paired.append(f"{setting}, in turn in one process: " + ", ".join(
                    f"{name} {statistics.median(t):.2f} s/step ({batch / statistics.median(t):.2f} images/s)"
                    for name, t in measured["step_seconds"].items())
                    + "; per-round " + ", ".join(f"{name} median {statistics.median(r):.3f} (range {min(r):.3f}-"
                                                 f"{max(r):.3f})" for name, r in measured["ratios"].items()))
                continue
            medians[variant] = statistics.median(measured["step_seconds"])
            steps = " / ".join(f"{t:.2f}" for t in measured["step_seconds"])
            lines.append(f"{row} {medians[variant]:.2f} | {batch / medians[variant]:.2f} | {steps} | "
                         f"{measured['peak_mb']:.0f} | {measured.get('load_peak_mb', float('nan')):.0f} | "
                         f"{measured.get('train_peak_mb', float('nan')):.0f} |")
        if "ours" in medians and len(medians) > 1:
            ratios.append(f"{setting}: " + ", ".join(
                f"ours / {floor} {medians['ours'] / medians[floor]:.3f}" for floor in medians if floor != "ours"))
    lines += ["", *ratios, *paired]
    lines += [f"{precision} not measured: {why}" for precision, why in results.get("skipped", {}).items()]
    gen = results.get("generation")
    if gen:
        base, fused = statistics.median(gen["base"]), statistics.median(gen["fused"])
        lines.append(f"\nGeneration ({gen['resolution']} px, {gen['precision']}, {gen['steps']} steps, base and fused "
                     f"runs alternated): base {base:.2f} s/image, one fused LoRA {fused:.2f} s/image, fused / base "
                     f"{fused / base:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
