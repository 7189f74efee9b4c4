"""The checkpoint judge: which kept checkpoint, at which multiplier, to use.

For every valid `checkpoint-<step>` of a run (and the final file when no checkpoint has its step) at every multiplier
of `judge_multipliers`, the base model with that LoRA fused draws a fixed set of prompts with fixed seeds:
  - the training captions (fidelity: does it draw the subject it was shown?),
  - the subject in new contexts (editability: `judge_prompts`, or derived from the trigger phrase),
  - prompts without the trigger (`judge_prior_prompts`, or the editability prompts with the trigger phrase replaced
    by its class word): what the LoRA must leave as the base model draws it, compared image by image, same seeds.
Scores, as DreamBooth measures subject and prompt fidelity (Ruiz et al. 2023, arXiv:2208.12242, section 4.1):
  - subject fidelity: the mean cosine similarity of every image of a trigger prompt to every training image, in
    DINO ViT-S/16 features (`judge_dino_model`), CLIP image embeddings (`judge_clip_model`) and, always, the base
    model's own VAE encoder statistics (below);
  - prompt fidelity (CLIP-T): the CLIP score of each editability image against its prompt (with `judge_clip_model`);
  - the held-out loss of the checkpoint's step, from val_loss_log.jsonl (when the run held images out).
The rule (RULE) turns them into one score per row; the best row is recommended and its file copied to
pytorch_lora_weights_best.safetensors with the judgement in its metadata. No checkpoint is ever deleted and the final
file is never written.

The VAE features: each level of the base model's VAE encoder (after conv_in, each down block, the mid block) pooled
to its channels' mean and standard deviation (the style statistics of AdaIN, Huang & Belongie 2017), each level
L2-normalised, concatenated, centred on the base model's own images of the same prompts and L2-normalised. They need
no download, exist for every SD model (the tiny one too) and see colour, tone and texture well; they see outline
poorly (a star and a square of one colour are about as close as two stars), so for a subject give the DINO or CLIP
weights. Centring removes what every picture of the model shares (a background, a palette), which otherwise makes
every pair look alike.
"""

import csv
import hashlib
import json
import math
from argparse import Namespace
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from sdlora.checkpoints import check_checkpoint, list_checkpoints
from sdlora.files import atomic_write
from sdlora.lora_file import LORA_FILE_NAME, fuse_lora_file, read_lora_file
from sdlora.run_files import CONFIG_NAME, VAL_LOSS_LOG_NAME

JUDGE_DIR = "judge"  # the table, the grid and the recommendation, in the run folder
BEST_FILE_NAME = "pytorch_lora_weights_best.safetensors"
TABLE_NAME = "judge.csv"
GRID_NAME = "grid.png"
RECOMMENDATION_NAME = "recommendation.json"
FIDELITY_PROMPTS_AT_MOST = 8  # training captions drawn (the distinct ones, in file order): the cost stays bounded
EDIT_TEMPLATES = ("a {} on the beach", "a {} in the snow", "a {} on a wooden table", "a painting of a {}")
GRID_CELL_PX = 96  # side of one image in the checkpoint x multiplier grid
RULE = ("score = mean of (subject fidelity gain: 0 = as alike to the training images as the base model's images, 1 = "
        "the most alike an image can be, along their common direction; prior kept: 1 = prompts without the trigger drawn as the base model draws them, 0 = drawn like the "
        "training images; with CLIP, prompt fidelity: CLIP-T relative to the base model's, at most 1), in the first "
        "of DINO, CLIP-I, VAE features that is available; ties go to the lower held-out loss, then the earlier "
        "checkpoint, then the lower multiplier")


class JudgeError(ValueError):
    """A user mistake or a missing resource; the message names it and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# What to judge, with which prompts


@dataclass(frozen=True)
class Candidate:
    label: str  # "checkpoint-600", or "final" for the final file
    step: int
    path: Path  # the LoRA file


def candidates(run_dir: Path) -> list[Candidate]:
    """Every valid checkpoint, oldest first, and the final file when no checkpoint holds its step."""
    found = [Candidate(folder.name, int(folder.name.removeprefix("checkpoint-")), folder / LORA_FILE_NAME)
             for folder in list_checkpoints(run_dir) if check_checkpoint(folder) is None]
    final = run_dir / LORA_FILE_NAME
    if final.is_file():
        step = int(read_lora_file(final)[1].get("step", -1))
        if step not in {candidate.step for candidate in found}:
            found.append(Candidate("final", step, final))
    if not found:
        raise JudgeError(f"{run_dir} holds no valid checkpoint-<step> folder and no {LORA_FILE_NAME}: nothing to "
                         f"judge. Point at a training run's output_dir, or train with checkpointing_steps > 0 (e.g. "
                         f"a tenth of max_train_steps) so there are checkpoints to choose from")
    return found


def check_base_model(candidate: Candidate, base_model: str) -> None:
    """Refuse a LoRA file made for another base model than the run's (its `base_model` metadata)."""
    with safe_open(str(candidate.path), "pt") as f:
        made_for = (f.metadata() or {}).get("base_model")
    if made_for and Path(made_for).name != Path(base_model).name:
        raise JudgeError(f"{candidate.path} was trained on {made_for!r}, this run on {base_model!r}: the judge samples "
                         f"with the run's base model, where that file does not fit. Remove it from the run folder "
                         f"or judge it in its own run")


def trigger_prompts(trigger: str, given: tuple[str, ...], option: str = "judge_prompts") -> list[str]:
    """The editability prompts: `given`, each of which must name the trigger phrase, or derived from it."""
    if given:
        missing = [prompt for prompt in given if trigger and trigger not in prompt]
        if missing:
            raise JudgeError(f"--{option} {missing[0]!r} does not contain the trigger phrase {trigger!r}: such a "
                             f"prompt cannot show the subject. Put {trigger!r} in every judge prompt, e.g. "
                             f"\"a {trigger} on the beach\"")
        return list(given)
    if not trigger:
        return []
    return [template.format(trigger) for template in EDIT_TEMPLATES]


def prior_prompts(trigger: str, edit_prompts: list[str], given: tuple[str, ...]) -> list[str]:
    """Prompts the LoRA must leave alone: `given`, or the editability prompts with the trigger phrase replaced by its
    last word (the class word of "sks dog"), or left out when the trigger is one word."""
    if given:
        return list(given)
    words = trigger.split()
    if not trigger or len(words) < 2:
        return []
    return [prompt.replace(trigger, words[-1]) for prompt in edit_prompts]


def judge_problem(cfg) -> str | None:
    """Why a run's judge_* settings cannot work, or None: checked at minute 0 (train_lora.check_config), so a judge
    that could not run is never found out at the end of a long run."""
    return settings_problem(cfg.trigger_phrase.strip(), JudgeSettings.of_run(vars(cfg)))


def settings_problem(trigger: str, settings: "JudgeSettings") -> str | None:
    """The one check of judge settings, for train_lora.py's and evaluate.py's."""
    try:
        trigger_prompts(trigger, settings.prompts)
    except JudgeError as error:
        return str(error)
    if not settings.multipliers or min(settings.multipliers) <= 0:
        return (f"--judge_multipliers {' '.join(map(str, settings.multipliers))}: give positive LoRA multipliers, "
                f"e.g. 0.6 0.8 1.0")
    if settings.samples_per_prompt < 1:
        return f"--judge_samples_per_prompt {settings.samples_per_prompt}: at least 1"
    for option, folder, example in (("judge_dino_model", settings.dino_model, "facebook/dino-vits16"),
                                    ("judge_clip_model", settings.clip_model, "openai/clip-vit-base-patch32")):
        if folder and not (Path(folder) / "config.json").is_file():
            return (f"--{option} {folder}: no model folder there (no config.json). Give the local folder of {example} "
                    f"(fetch it once where there is network: `hf download {example} --local-dir FOLDER`), or leave "
                    f"--{option} empty to judge without it")
    return None


# ---------------------------------------------------------------------------------------------------------------
# Features and scores


def image_batch(images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1], as the VAE takes them."""
    return torch.stack([torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1)
                        .permute(2, 0, 1) for image in images])


class VaeFeatures:
    """The base model's VAE encoder statistics of an image (see the module docstring): (N, D), before centring."""

    def __init__(self, vae):
        self.encoder = vae.encoder

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        parameter = next(self.encoder.parameters())
        h = self.encoder.conv_in(image_batch(images).to(parameter.device, parameter.dtype))
        levels = [h]
        for block in self.encoder.down_blocks:
            h = block(h)
            levels.append(h)
        levels.append(self.encoder.mid_block(h))
        return torch.cat([F.normalize(torch.cat([level.mean((2, 3)), level.std((2, 3))], dim=1).float(), dim=1)
                          for level in levels], dim=1).cpu()


class DinoFeatures:
    """The CLS embedding of a DINO ViT (transformers ViTModel, e.g. facebook/dino-vits16), as DreamBooth's DINO."""

    def __init__(self, folder: str, device: torch.device):
        from transformers import AutoImageProcessor, ViTModel

        self.model = load_scorer(ViTModel, folder, "judge_dino_model", "facebook/dino-vits16").eval().to(device)
        self.processor = load_scorer(AutoImageProcessor, folder, "judge_dino_model", "facebook/dino-vits16")
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu()


class ClipFeatures:
    """CLIP's projected image embeddings (CLIP-I) and the CLIP score of image-prompt pairs (CLIP-T)."""

    def __init__(self, folder: str, device: torch.device):
        from transformers import CLIPModel, CLIPProcessor

        self.model = load_scorer(CLIPModel, folder, "judge_clip_model", "openai/clip-vit-base-patch32").eval().to(device)
        self.processor = load_scorer(CLIPProcessor, folder, "judge_clip_model", "openai/clip-vit-base-patch32")
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return pooled(self.model.get_image_features(pixel_values=pixels)).float().cpu()

    @torch.no_grad()
    def text_score(self, images: list[Image.Image], prompts: list[str]) -> float:
        """Mean CLIP score, 100 * max(cos, 0) per pair (as evaluate.py's ClipScorer)."""
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        image = pooled(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device)))
        text = pooled(self.model.get_text_features(input_ids=inputs["input_ids"].to(self.device),
                                                   attention_mask=inputs["attention_mask"].to(self.device)))
        return float((100 * F.cosine_similarity(image, text, dim=-1).clamp(min=0)).mean())


def load_picture(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def pooled(output) -> torch.Tensor:
    """get_*_features returns a tensor in older transformers, an output with the embedding as pooler_output in newer."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_scorer(kind, folder: str, option: str, example: str):
    """`kind.from_pretrained(folder)` from a local folder only; an error names the option, the folder and the fix."""
    if not Path(folder).is_dir():
        raise JudgeError(f"--{option} {folder}: no such folder. Give the local folder of {example} (fetch it once "
                         f"where there is network: `hf download {example} --local-dir FOLDER`), or leave --{option} "
                         f"empty to judge without it")
    try:
        loaded = kind.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise JudgeError(f"--{option} {folder} cannot be loaded as a {kind.__name__} ({first_line[:200]}); give the "
                         f"folder of {example} as `hf download` or save_pretrained writes it") from None
    expected = {"ViTModel": "vit", "CLIPModel": "clip"}.get(kind.__name__)
    found = getattr(getattr(loaded, "config", None), "model_type", expected)
    if found != expected:  # transformers loads another architecture's folder with a warning only
        raise JudgeError(f"--{option} {folder} holds a {found!r} model, not a {expected!r} one; give the folder of "
                         f"{example}")
    return loaded


def mean_cosine(a: torch.Tensor, b: torch.Tensor, same_set: bool = False) -> float:
    """Mean cosine similarity over all pairs (rows of a, rows of b); `same_set`: a is b, the diagonal left out."""
    sims = F.normalize(a.double(), dim=1) @ F.normalize(b.double(), dim=1).T
    if same_set:
        n = sims.shape[0]
        return float((sims.sum() - sims.diagonal().sum()) / max(n * (n - 1), 1))
    return float(sims.mean())


def matched_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of a[i] to b[i]: the same prompt and seed with and without the LoRA."""
    return float(F.cosine_similarity(a.double(), b.double(), dim=1).mean())


# ---------------------------------------------------------------------------------------------------------------
# The judge


@dataclass
class JudgeSettings:
    multipliers: tuple[float, ...] = (0.6, 0.8, 1.0)
    prompts: tuple[str, ...] = ()  # editability; () derives them from the trigger phrase
    prior_prompts: tuple[str, ...] = ()  # () derives them from the editability prompts and the class word
    samples_per_prompt: int = 2
    dino_model: str = ""
    clip_model: str = ""

    @classmethod
    def of_run(cls, config: dict, **overrides) -> "JudgeSettings":
        """The run's judge_* settings from its config.json, then `overrides` (those not None)."""
        settings = cls(**{name: tuple(config[f"judge_{name}"]) if isinstance(config.get(f"judge_{name}"), list)
                          else config[f"judge_{name}"] for name in cls.__dataclass_fields__ if f"judge_{name}" in config})
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, tuple(value) if isinstance(value, list) else value)
        return settings


@dataclass
class Row:
    candidate: Candidate
    multiplier: float
    raw: dict  # fidelity per feature, prior per feature, clip_t
    images: list[Image.Image] = field(repr=False, default_factory=list)
    held_out_loss: float | None = None
    scores: dict = field(default_factory=dict)  # filled by Judge.score


class Judge:
    """Samples and scores one run's checkpoints; built once (the base model loaded and its own images drawn), then
    asked per checkpoint (early stopping does so during training) or for all of them (`judge_all`)."""

    def __init__(self, run_dir: str | Path, overrides: dict | None = None, device: torch.device | None = None):
        self.run_dir = Path(run_dir)
        config_path = self.run_dir / CONFIG_NAME
        if not config_path.is_file():
            raise JudgeError(f"{self.run_dir} has no {CONFIG_NAME}: it is not a training run's output_dir. Pass the "
                             f"output_dir train_lora.py wrote")
        self.config = json.loads(config_path.read_text(encoding="utf-8"))
        self.settings = JudgeSettings.of_run(self.config, **(overrides or {}))
        self.check_settings()
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.skipped = []
        self.extractors = {}  # name -> callable images -> (N, D), in order of preference
        if self.settings.dino_model:
            self.extractors["dino"] = DinoFeatures(self.settings.dino_model, self.device)
        else:
            self.skipped.append("DINO subject fidelity (judge_dino_model is empty: give the local folder of "
                                "facebook/dino-vits16)")
        self.clip = ClipFeatures(self.settings.clip_model, self.device) if self.settings.clip_model else None
        if self.clip:
            self.extractors["clip"] = self.clip
        else:
            self.skipped.append("CLIP-I subject fidelity and CLIP-T prompt fidelity (judge_clip_model is empty: give "
                                "the local folder of a CLIP model, e.g. openai/clip-vit-base-patch32)")
        if not self.edit_prompts:
            self.skipped.append("editability (no judge_prompts and no trigger_phrase to derive them from)")
        if not self.prior:
            self.skipped.append("prior kept (no judge_prior_prompts, and no class word in the trigger phrase)")
        self.rows: dict[tuple[str, float], Row] = {}  # drawn once per (weights, multiplier)
        self.judged: list[Row] = []  # judge_all's rows, scored, in checkpoint then multiplier order
        self.pipeline = None  # loaded on the first judgement, after every check

    def check_settings(self) -> None:
        trigger = self.config.get("trigger_phrase", "").strip()
        problem = settings_problem(trigger, self.settings)
        if problem:
            raise JudgeError(problem)
        self.edit_prompts = trigger_prompts(trigger, self.settings.prompts)
        self.prior = prior_prompts(trigger, self.edit_prompts, self.settings.prior_prompts)

    # --- the base model and its own images -------------------------------------------------------------------

    def load(self) -> None:
        import generate
        from sdlora.training_data import make_dataset

        config = self.config
        settings = generate.parse_config(["--pretrained_model_name_or_path", config["pretrained_model_name_or_path"],
                                          "--mixed_precision", "auto", "--lora"])
        self.pipeline = generate.load_pipeline(settings, [])
        self.pipeline.set_progress_bar_config(disable=True)
        self.extractors["vae"] = VaeFeatures(self.pipeline.vae)
        self.base_weights = {name: {k: v.detach().clone() for k, v in getattr(self.pipeline, name).state_dict().items()}
                             for name in ("unet", "text_encoder")}
        dataset = make_dataset(Namespace(**config), config["dataset_path"])
        examples = [example for example in dataset.examples if not example.prior]
        trigger = config.get("trigger_phrase", "").strip()
        captions = [example.caption if not trigger or example.caption.startswith(trigger)
                    else f"{trigger}, {example.caption}" if example.caption else trigger for example in examples]
        self.fidelity_prompts = list(dict.fromkeys(captions))[:FIDELITY_PROMPTS_AT_MOST]
        size = config["resolution"]  # the training images as the model drew them: centre crops at its resolution
        training = [ImageOps.fit(load_picture(example.path), (size, size), Image.BICUBIC) for example in examples]
        base_images = self.draw()
        self.base = {"features": {}, "train": {}, "fidelity": {}, "floor": {}}
        count = self.trigger_count()
        for name, extract in self.extractors.items():
            base_features = extract(base_images)
            centre = base_features.mean(0) if name == "vae" else None
            self.base["features"][name] = (base_features, centre)
            train = self.centred(name, extract(training))
            self.base["train"][name] = train
            self.base["fidelity"][name] = mean_cosine(self.centred(name, base_features[:count]), train)
            self.base["floor"][name] = (mean_cosine(self.centred(name, base_features[count:]), train)
                                        if len(base_images) > count else None)
        # The most alike an image can be to the training images: mean_j cos(x, t_j) = x . mean_j t_j (unit vectors)
        # is at most |mean_j t_j|, reached by an image along their common direction.
        self.base["ceiling"] = {name: float(F.normalize(train.double(), dim=1).mean(0).norm())
                                for name, train in self.base["train"].items()}
        self.base["clip_t"] = self.clip_t(base_images) if self.clip and self.edit_prompts else None
        self.base_images = base_images

    def centred(self, name: str, features: torch.Tensor) -> torch.Tensor:
        centre = self.base["features"][name][1]
        return features if centre is None else features - centre

    def prompt_list(self) -> list[str]:
        """Every prompt drawn, each samples_per_prompt times: fidelity, editability, then prior prompts."""
        k = self.settings.samples_per_prompt
        return [p for p in self.fidelity_prompts + self.edit_prompts + self.prior for _ in range(k)]

    def trigger_count(self) -> int:
        return (len(self.fidelity_prompts) + len(self.edit_prompts)) * self.settings.samples_per_prompt

    @torch.no_grad()
    def draw(self) -> list[Image.Image]:
        """The prompts with seeds seed + index (CPU generators: the same images on any device)."""
        seed, size = self.config.get("seed", 0), self.config["resolution"]
        prompts, images = self.prompt_list(), []
        for start in range(0, len(prompts), 8):
            batch = prompts[start:start + 8]
            generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(batch))]
            images += self.pipeline(batch, generator=generators, height=size, width=size,
                                    num_inference_steps=self.config.get("sample_inference_steps", 25),
                                    guidance_scale=self.config.get("sample_guidance_scale", 7.5)).images
        return images

    def clip_t(self, images: list[Image.Image]) -> float:
        k, start = self.settings.samples_per_prompt, len(self.fidelity_prompts) * self.settings.samples_per_prompt
        edit_images = images[start:start + len(self.edit_prompts) * k]
        return self.clip.text_score(edit_images, [p for p in self.edit_prompts for _ in range(k)])

    # --- one checkpoint at one multiplier ---------------------------------------------------------------------

    def judge_candidate(self, candidate: Candidate) -> list[Row]:
        """Every multiplier of one candidate, drawn and scored (kept, so each is drawn once)."""
        check_base_model(candidate, self.config["pretrained_model_name_or_path"])
        if self.pipeline is None:
            self.load()
        rows = []
        for multiplier in self.settings.multipliers:
            key = (file_digest(candidate.path), multiplier)
            if key not in self.rows:
                for name, weights in self.base_weights.items():
                    getattr(self.pipeline, name).load_state_dict(weights)
                fuse_lora_file(candidate.path, self.pipeline.unet, self.pipeline.text_encoder, multiplier)
                self.rows[key] = self.measure(candidate, multiplier, self.draw())
            # A row drawn earlier for the same weights (early stopping's, before the checkpoint was saved) is this
            # candidate's: its file and its held-out loss (logged since) are taken now.
            rows.append(replace(self.rows[key], candidate=candidate,
                                held_out_loss=held_out_loss(self.run_dir, candidate.step)))
        for name, weights in self.base_weights.items():
            getattr(self.pipeline, name).load_state_dict(weights)
        self.score(rows)
        return rows

    def measure(self, candidate: Candidate, multiplier: float, images: list[Image.Image]) -> Row:
        count, raw = self.trigger_count(), {}
        for name, extract in self.extractors.items():
            features = extract(images)
            raw[f"fidelity_{name}"] = mean_cosine(self.centred(name, features[:count]), self.base["train"][name])
            if len(images) > count:
                raw[f"prior_{name}"] = matched_cosine(self.centred(name, features[count:]),
                                                      self.centred(name, self.base["features"][name][0][count:]))
        raw["clip_t"] = self.clip_t(images) if self.clip and self.edit_prompts else None
        return Row(candidate, multiplier, raw, images, held_out_loss(self.run_dir, candidate.step))

    def score(self, rows: list[Row]) -> None:
        """Each row's normalised parts and score (RULE), in the first feature space available."""
        name = next(iter(self.extractors))
        base_fidelity, ceiling, floor = (self.base["fidelity"][name], self.base["ceiling"][name],
                                         self.base["floor"][name])
        for row in rows:
            parts = {"fidelity_gain": clamp01((row.raw[f"fidelity_{name}"] - base_fidelity) / (ceiling - base_fidelity))
                     if ceiling != base_fidelity else 0.0}
            if floor is not None:
                parts["prior_kept"] = clamp01((row.raw[f"prior_{name}"] - floor) / (1 - floor))
            if row.raw["clip_t"] is not None and self.base["clip_t"]:
                parts["prompt_fidelity"] = min(row.raw["clip_t"] / self.base["clip_t"], 1.0)
            row.scores = dict(parts, score=sum(parts.values()) / len(parts), features=name)

    def score_checkpoint(self, candidate: Candidate) -> float:
        """The best score of a candidate over the multipliers: what early stopping compares."""
        return max(row.scores["score"] for row in self.judge_candidate(candidate))

    # --- every checkpoint, the table, the grid, the pick ------------------------------------------------------

    def judge_all(self) -> dict:
        """Judge every candidate, write judge/judge.csv, judge/grid.png and judge/recommendation.json, copy the pick
        to pytorch_lora_weights_best.safetensors; returns the recommendation."""
        found = candidates(self.run_dir)
        for candidate in found:  # every file refused now, before the first (slow) image
            check_base_model(candidate, self.config["pretrained_model_name_or_path"])
        rows = self.judged = [row for candidate in found for row in self.judge_candidate(candidate)]
        best = min(rows, key=lambda row: (-round(row.scores["score"], 6), row.held_out_loss
                                          if row.held_out_loss is not None else math.inf,
                                          row.candidate.step, row.multiplier))
        folder = self.run_dir / JUDGE_DIR
        folder.mkdir(exist_ok=True)
        write_table(rows, folder / TABLE_NAME)
        self.write_grid(found, rows, folder / GRID_NAME)
        recommendation = {
            "checkpoint": best.candidate.label, "step": best.candidate.step, "multiplier": best.multiplier,
            "file": str(best.candidate.path.relative_to(self.run_dir)), "scores": best.scores, "raw": best.raw,
            "held_out_loss": best.held_out_loss, "rule": RULE, "skipped": self.skipped,
            "prompts": {"fidelity": self.fidelity_prompts, "editability": self.edit_prompts, "prior": self.prior},
            "samples_per_prompt": self.settings.samples_per_prompt, "multipliers": list(self.settings.multipliers),
        }
        (folder / RECOMMENDATION_NAME).write_text(json.dumps(recommendation, indent=2) + "\n", encoding="utf-8")
        copy_best(best, self.run_dir / BEST_FILE_NAME)
        return recommendation

    def write_grid(self, found: list[Candidate], rows: list[Row], path: Path) -> None:
        """Rows: the base model, then each candidate; columns: the multipliers; each cell the first image of up to
        four prompts (editability first, then a caption, then a prior prompt)."""
        k, n_fid, n_edit = self.settings.samples_per_prompt, len(self.fidelity_prompts), len(self.edit_prompts)
        picks = [(n_fid + i) * k for i in range(min(n_edit, 2))] + [0] * bool(n_fid)
        picks += [(n_fid + n_edit) * k] * bool(self.prior)
        picks = picks[:4]
        by_key = {(row.candidate.label, row.multiplier): row for row in rows}
        lines = [("base model", [self.base_images] * len(self.settings.multipliers))]
        lines += [(candidate.label, [by_key[(candidate.label, m)].images for m in self.settings.multipliers])
                  for candidate in found]
        cell, label_px = GRID_CELL_PX, 16
        width = cell * len(picks)
        sheet = Image.new("RGB", (110 + width * len(self.settings.multipliers),
                                  label_px + len(lines) * (cell + 4)), "white")
        pen = ImageDraw.Draw(sheet)
        for column, multiplier in enumerate(self.settings.multipliers):
            pen.text((110 + column * width + 4, 2), f"multiplier {multiplier:g}", fill="black")
        for line, (label, images_per_column) in enumerate(lines):
            top = label_px + line * (cell + 4)
            pen.text((4, top + cell // 2 - 6), label, fill="black")
            for column, images in enumerate(images_per_column):
                for slot, index in enumerate(picks):
                    sheet.paste(images[index].resize((cell, cell)), (110 + column * width + slot * cell, top))
        sheet.save(path)


def clamp01(value: float) -> float:
    return min(max(value, 0.0), 1.0)


def file_digest(path: Path) -> str:
    """sha256 of a LoRA file's tensors (names, dtypes, shapes, values), not of its bytes: the metadata (a save time)
    may differ between two files of the same weights."""
    digest = hashlib.sha256()
    tensors, _ = read_lora_file(path)
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def held_out_loss(run_dir: Path, step: int) -> float | None:
    """The run's held-out loss at `step` (the last row written for it), or None."""
    path = run_dir / VAL_LOSS_LOG_NAME
    if not path.is_file():
        return None
    value = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step") == step and isinstance(row.get("val_loss"), (int, float)):
            value = float(row["val_loss"])
    return value


TABLE_COLUMNS = ("checkpoint", "step", "multiplier", "score", "fidelity_gain", "prior_kept", "prompt_fidelity",
                 "held_out_loss", "fidelity_dino", "fidelity_clip", "fidelity_vae", "prior_dino", "prior_clip",
                 "prior_vae", "clip_t", "features")


def write_table(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        for row in rows:
            values = {"checkpoint": row.candidate.label, "step": row.candidate.step, "multiplier": row.multiplier,
                      "held_out_loss": row.held_out_loss, **row.raw, **row.scores}
            writer.writerow({column: "" if values.get(column) is None else values.get(column, "")
                             for column in TABLE_COLUMNS})


def copy_best(best: Row, path: Path) -> None:
    """The recommended file, tensors unchanged, its metadata plus which checkpoint, multiplier and scores."""
    tensors, metadata = read_lora_file(best.candidate.path)
    metadata = dict(metadata, judge_checkpoint=best.candidate.label, judge_step=str(best.candidate.step),
                    judge_multiplier=f"{best.multiplier:g}", judge_scores=json.dumps(best.scores),
                    judge_rule=RULE)
    atomic_write(path, safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata))


def judge_run(run_dir: str | Path, overrides: dict | None = None, judge: Judge | None = None) -> dict:
    """`python evaluate.py judge RUN_DIR` and `judge_checkpoints true`: judge every checkpoint (with the run's judge_*
    settings, then `overrides`; or with `judge`, which early stopping already used), say what was skipped, write the
    table and grid, recommend one. Returns the recommendation."""
    judge = judge or Judge(run_dir, overrides)
    for line in judge.skipped:
        print(f"judge: skipped {line}")
    recommendation = judge.judge_all()
    print(summary_line(recommendation, Path(run_dir)))
    return recommendation


def summary_line(recommendation: dict, run_dir: Path) -> str:
    scores = ", ".join(f"{name} {value:.3f}" for name, value in recommendation["scores"].items()
                       if isinstance(value, float))
    return (f"judge: use {recommendation['checkpoint']} at multiplier {recommendation['multiplier']:g} ({scores}) "
            f"-> {run_dir / BEST_FILE_NAME}; table and grid in {run_dir / JUDGE_DIR}")
