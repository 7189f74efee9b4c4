"""Measure generated images: FID against a folder of real images, CLIP score against their prompts, and a sweep
over checkpoints x LoRA multipliers that writes both into one table.

    python evaluate.py fid GENERATED REFERENCE
    python evaluate.py clip-score FOLDER --prompts_file prompts.txt --clip_model openai/clip-vit-large-patch14
    python evaluate.py sweep --checkpoints out/dog/checkpoint-500 out/dog/checkpoint-1000 --multipliers 0 0.5 1 \
        --reference my_dog --output_dir out/dog/evaluation --clip_model openai/clip-vit-large-patch14 \
        --pretrained_model_name_or_path sd14 --prompts_file prompts.txt --num_images 8
    python evaluate.py report out/dog       # (re)write a training run's report.html
    python evaluate.py judge out/dog --dino_model dino-vits16 --clip_model clip-vit-base-patch32   # which checkpoint?

A folder of images means every .png .jpg .jpeg .webp .bmp under it, sub-folders included, except hidden files
and the `*-grid.png` contact sheets generate.py and train_lora.py write. Every flag the sweep does not know goes to
generate.py (model, prompts, sampler, size, seed), so each row is drawn exactly as generate.py would draw it.
The sweep writes `metrics.csv` and `metrics.md` to its `--output_dir` and each row's images to a sub-folder;
`report.py` shows `<run output_dir>/evaluation/metrics.csv` in the run's report.

Reading the numbers. FID is a distance (lower is closer to the reference images), CLIP score a similarity
(higher follows the prompt better). FID is biased upward by small samples, the more so the fewer the images
(Chong & Forsyth 2020, "Effectively Unbiased FID and Inception Score"): compare rows drawn with the same number
of images only. The default features are torchvision's Inception-v3, not the TensorFlow graph of the FID paper,
so the values rank checkpoints consistently but are not comparable with published FIDs.
"""

import argparse
import contextlib
import csv
import io
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import generate
from sdlora.files import IMAGE_EXTENSIONS, image_files
from sdlora.judge import JudgeError, judge_run
from sdlora.lora_file import LORA_FILE_NAME, LoRAError
from sdlora.report import ReportError, write_report
from sdlora.sampling import prompt_texts
from sdlora.settings import ConfigError, RenamedFlag, check_model_source

FEATURE_BATCH_SIZE = 32  # images per forward pass of a feature extractor or of CLIP
METRICS_COLUMNS = ("checkpoint", "multiplier", "images", "fid", "clip_score", "images_dir")

# Images of any size in, one feature row per image out: (N images) -> (N, D) tensor.
FeatureExtractor = Callable[[list[Image.Image]], torch.Tensor]
# Images and one prompt per image in, one score per image out: (N images, N prompts) -> (N,) tensor.
ClipScoreFunction = Callable[[list[Image.Image], list[str]], torch.Tensor]


class EvaluationError(ValueError):
    """A user mistake or a missing resource; the message names it and the fix."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------------------
# Images on disk


def list_images(folder: str | Path) -> list[Path]:
    """The image files under `folder` as the dataset scan lists them (sdlora.files.image_files: sub-folders
    included, hidden files left out), without the `*-grid` contact sheets, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{folder} is not a folder; pass a folder of images (png, jpg, jpeg, webp, bmp)")
    paths = [path for path in image_files(folder) if not path.stem.endswith("-grid")]
    if not paths:
        raise EvaluationError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); check the path")
    return paths


def open_images(paths: list[Path]) -> list[Image.Image]:
    """The images at `paths`, decoded to RGB; an unreadable file stops with its name."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as error:
            raise EvaluationError(f"{path} cannot be read as an image ({error}); remove or replace it") from None
    return images


def extract_features(paths: list[Path], extractor: FeatureExtractor,
                     batch_size: int = FEATURE_BATCH_SIZE) -> torch.Tensor:
    """(N, D) float64 features of the images at `paths`, read in batches so memory stays flat for any N."""
    batches = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batches.append(extractor(open_images(paths[start:start + batch_size])).detach().double().cpu())
    return torch.cat(batches)


# ---------------------------------------------------------------------------------------------------------------
# FID


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D), in float64, of (N, D) features: the Gaussian FID fits to a set."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise EvaluationError(f"FID needs at least 2 images on each side, got features of shape "
                              f"{tuple(features.shape)}; generate or collect more images")
    features = features.double()
    return features.mean(dim=0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix: V diag(sqrt(max(lambda, 0))) V^T from eigh.

    Eigenvalues a rounding error below zero (a singular covariance, fewer images than dimensions) are clamped.
    """
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), squared, as FID defines it.

        d^2 = |mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))

    (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
    eq. 6; Dowson & Landau 1982 for the closed form.) sigma1 sigma2 is not symmetric; instead of a general
    (complex) matrix square root: with R1 = sigma1^(1/2) and R2 = sigma2^(1/2) (symmetric, from eigh),
    (R1 R2)(R1 R2)^T = R1 sigma2 R1, whose eigenvalues are those of sigma1 sigma2 = R1 (R1 sigma2) (AB and BA
    share their eigenvalues) and are >= 0. So Tr((sigma1 sigma2)^(1/2)) = sum_i sqrt(lambda_i(R1 sigma2 R1)) =
    sum of the singular values of R1 R2 (its nuclear norm), in float64. The SVD route, rather than the square roots
    of eigvalsh(R1 sigma2 R1), matters when a covariance is singular (fewer images than dimensions): the null
    eigenvalues come out as +-1e-16 and their square roots as 1e-8 each, ~1e-6 over 2048 dimensions, whereas the
    null singular values of R1 R2 stay at 1e-16. For diagonal covariances d^2 reduces to
    |mu1 - mu2|^2 + sum_i (s1_i - s2_i)^2, s the standard deviations.
    Shapes: mu (D,), sigma (D, D). Identical inputs give 0 up to float64 rounding (which may be slightly negative).
    """
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    trace_sqrt = torch.linalg.svdvals(sqrtm_psd(sigma1) @ sqrtm_psd(sigma2)).sum()
    mean_term = (mu1 - mu2).square().sum()
    return float(mean_term + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def fid(generated_features: torch.Tensor, reference_features: torch.Tensor) -> float:
    """FID of two (N, D) feature sets: the Frechet distance of the Gaussians fitted to each."""
    return frechet_distance(*gaussian_statistics(generated_features), *gaussian_statistics(reference_features))


def fid_of_folders(generated: str | Path, reference: str | Path, extractor: FeatureExtractor) -> float:
    """FID between the images of two folders (see `list_images`), with features from `extractor`."""
    return fid(extract_features(list_images(generated), extractor),
               extract_features(list_images(reference), extractor))


class InceptionFeatures:
    """2048-d average-pool features of torchvision's Inception-v3 (ImageNet weights), the layer FID is defined on.

    Each image is resized whole to 299x299 (bilinear, no crop), scaled to [0, 1] and normalised with the ImageNet
    mean and std; the model's `transform_input` then maps that to the [-1, 1] input its weights were trained on.
    The weights (104 MB) are fetched once into torch's cache (`torch.hub.get_dir()/checkpoints`).
    """

    SIZE = 299
    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, device: torch.device | None = None):
        self.device = device or default_device()
        self.model = None  # loaded on the first call, so a sweep checks its settings before any download

    def load(self) -> nn.Module:
        from torchvision.models import Inception_V3_Weights, inception_v3

        state_dict = load_inception_weights(Inception_V3_Weights.IMAGENET1K_V1)
        model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
        model.load_state_dict(state_dict)
        model.fc = nn.Identity()  # the pooled features, not the 1000 ImageNet logits
        return model.eval().to(self.device)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        if self.model is None:
            self.model = self.load()
        batch = torch.stack([pil_to_tensor(image.resize((self.SIZE, self.SIZE), Image.BILINEAR))
                             for image in images]).to(self.device, torch.float32) / 255
        mean = torch.tensor(self.MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.STD, device=self.device).view(1, 3, 1, 1)
        return self.model((batch - mean) / std)  # eval mode: (N, 2048), no auxiliary logits


def load_inception_weights(weights) -> dict:
    """The state dict of torchvision `weights`, downloaded once (hash-checked) into torch's cache."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError, EOFError) as error:  # offline (URLError is an OSError), or a damaged file
        raise EvaluationError(
            f"cannot load the Inception-v3 weights FID uses ({type(error).__name__}: {str(error)[:200]}). They are "
            f"downloaded once from {weights.url} to {cached}: run this once with network access, or copy that "
            f"file there from a machine that has it (TORCH_HOME moves the cache; delete a damaged copy first). "
            f"In code, pass your own feature extractor instead") from None


# ---------------------------------------------------------------------------------------------------------------
# CLIP score


class ClipScorer:
    """CLIP score of image-prompt pairs: 100 * max(cos(E_image, E_text), 0), so each score lies in [0, 100].

    Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", define
    CLIP-S = w * max(cos, 0) with w = 2.5; w = 100 is the convention of torchmetrics and of text-to-image papers.
    E are the projected embeddings of a transformers `CLIPModel` (image tower and text tower); prompts longer
    than CLIP's context (77 tokens) are truncated, as the text encoder of Stable Diffusion truncates them.
    """

    def __init__(self, model, processor, device: torch.device | None = None):
        self.device = device or default_device()
        self.model = model.eval().to(self.device)
        self.processor = processor

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: torch.device | None = None) -> "ClipScorer":
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(name_or_path)
            processor = CLIPProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as error:  # no such id or folder, offline, or not a CLIP checkpoint
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise EvaluationError(
                f"--clip_model {name_or_path!r} cannot be loaded ({first_line[:200]}); give a hub id such as "
                f"openai/clip-vit-large-patch14 (downloaded once; `hf download ID` to fetch it ahead) or a local "
                f"folder with a CLIPModel and its processor") from None
        return cls(model, processor, device)

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """(N,) scores of images[i] against prompts[i], float32 on the CPU."""
        if len(images) != len(prompts):
            raise EvaluationError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            image_embeds = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
            text_embeds = self.model.get_text_features(input_ids=inputs["input_ids"].to(self.device),
                                                       attention_mask=inputs["attention_mask"].to(self.device))
        cosine = F.cosine_similarity(image_embeds.pooler_output, text_embeds.pooler_output, dim=-1)
        return (100 * cosine.clamp(min=0)).float().cpu()


def pair_prompts(num_images: int, prompts: list[str]) -> list[str]:
    """The prompt of each image in generate.py's order: the images of prompt p are consecutive, so with
    k = num_images / len(prompts) images per prompt, image i has prompt i // k (one prompt: all images)."""
    if not prompts or num_images % len(prompts):
        raise EvaluationError(
            f"{num_images} images and {len(prompts)} prompts: the number of images must be a multiple of the "
            f"number of prompts (generate.py draws num_images per prompt, in prompt order); fix the prompts file")
    per_prompt = num_images // len(prompts)
    return [prompts[index // per_prompt] for index in range(num_images)]


def clip_score_of_paths(paths: list[Path], prompts: list[str], scorer: ClipScoreFunction,
                        batch_size: int = FEATURE_BATCH_SIZE) -> float:
    """Mean CLIP score of the images at `paths` against `prompts` (paired as by `pair_prompts`)."""
    paired = pair_prompts(len(paths), prompts)
    scores = [scorer(open_images(paths[start:start + batch_size]), paired[start:start + batch_size])
              for start in range(0, len(paths), batch_size)]
    return float(torch.cat(scores).mean())


# ---------------------------------------------------------------------------------------------------------------
# Sweep: checkpoints x multipliers


def lora_file_of(checkpoint: str | Path) -> Path:
    """A LoRA file, or a run / checkpoint folder holding pytorch_lora_weights.safetensors."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / LORA_FILE_NAME
    if not path.is_file():
        raise EvaluationError(f"--checkpoints {checkpoint}: no LoRA file there; pass a .safetensors LoRA file or a "
                              f"folder holding {LORA_FILE_NAME} (a run's output_dir or one of its checkpoint-<step>)")
    return path


def row_folder_name(index: int, lora_file: Path, multiplier: float) -> str:
    """`00-checkpoint-500-multiplier0.5`: the index keeps rows of two runs with equally named checkpoints apart."""
    label = lora_file.parent.name if lora_file.name == LORA_FILE_NAME else lora_file.stem
    return f"{index:02d}-{label}-multiplier{multiplier:g}"


def parse_generate_args(argv: list[str]) -> argparse.Namespace:
    """generate.py's own parser reads the flags the sweep passes on; only argparse's error line is kept."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return generate.parse_config(argv)
    except SystemExit:
        message = captured.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise EvaluationError(f"{message} (flags the sweep does not know go to generate.py; see "
                              f"`python generate.py --help`)") from None


def sweep(checkpoints: list[str | Path], multipliers: list[float], reference: str | Path, output_dir: str | Path,
          generate_args: list[str], extractor: FeatureExtractor, clip_scorer: ClipScoreFunction | None = None,
          ) -> Path:
    """Draw the prompts with every checkpoint at every multiplier (generate.py, same seeds for every row), score each
    row's images (FID against `reference`; CLIP score when `clip_scorer` is given) and write metrics.csv and
    metrics.md to `output_dir`. Returns the path of metrics.csv; one row per checkpoint x multiplier, in that
    order."""
    # Check everything before the first (slow) image: generate.py settings, LoRA files, prompts, base model.
    if any(token == "--lora" or token.startswith("--lora=") for token in generate_args):
        raise EvaluationError("--lora: the sweep sets the LoRA of each row; pass --checkpoints and --multipliers "
                              "instead")
    base_cfg = parse_generate_args(generate_args)
    lora_files = [lora_file_of(checkpoint) for checkpoint in checkpoints]
    if not multipliers:
        raise EvaluationError("--multipliers is empty; give at least one LoRA multiplier, e.g. --multipliers 0 0.5 1")
    for lora_file in lora_files:
        generate.check_config(parse_generate_args([*generate_args, "--lora", str(lora_file)]))
    prompts = generate.read_prompts(base_cfg)
    check_model_source(base_cfg.pretrained_model_name_or_path)
    reference_features = extract_features(list_images(reference), extractor)
    output_dir = Path(output_dir)

    rows = []
    for index, lora_file in enumerate(lora_files):
        for multiplier in multipliers:
            folder = output_dir / row_folder_name(index, lora_file, multiplier)
            cfg = parse_generate_args([*generate_args, "--lora", f"{lora_file}:{multiplier}", "--output_dir",
                                       str(folder)])
            paths = generate.main(cfg)[:-1]  # the grid comes last
            rows.append({
                "checkpoint": str(lora_file), "multiplier": multiplier, "images": len(paths),
                "fid": fid(extract_features(paths, extractor), reference_features),
                "clip_score": clip_score_of_paths(paths, prompts, clip_scorer) if clip_scorer else "",
                "images_dir": folder.name,
            })
            print(f"{lora_file} at multiplier {multiplier:g}: FID {rows[-1]['fid']:.4g}"
                  + (f", CLIP score {rows[-1]['clip_score']:.2f}" if clip_scorer else ""))
    return write_metrics(rows, output_dir)


def write_metrics(rows: list[dict], output_dir: Path) -> Path:
    """metrics.csv (full precision, for programs and report.py) and metrics.md (rounded, for people)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path = output_dir / "metrics.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (output_dir / "metrics.md").write_text(markdown_table(rows), encoding="utf-8")
    return csv_path


def markdown_table(rows: list[dict]) -> str:
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(METRICS_COLUMNS) + " |", "|" + "---|" * len(METRICS_COLUMNS)]
    lines += ["| " + " | ".join(cell(row[column]) for column in METRICS_COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Command line


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line naming the fix, like every other error here."""

    def error(self, message: str):
        sys.exit(f"error: {message}; see `python {self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{fid,clip-score,sweep,report,judge}")
    fid_command = commands.add_parser("fid", help="FID of a folder of generated images against a reference folder")
    fid_command.add_argument("generated", help="folder of generated images")
    fid_command.add_argument("reference", help="folder of reference (real) images")
    clip_command = commands.add_parser("clip-score", help="mean CLIP score of a folder of images against prompts")
    clip_command.add_argument("folder", help="folder of images, in generate.py's order (sorted by name)")
    clip_command.add_argument("--prompts_file", required=True, help="one prompt per line, as generate.py reads it")
    clip_command.add_argument("--clip_model", required=True, help="hub id or folder of a transformers CLIPModel")
    sweep_command = commands.add_parser("sweep", allow_abbrev=False,
                                        help="FID and CLIP score for every checkpoint x LoRA multiplier; other flags "
                                             "go to generate.py")
    sweep_command.add_argument("--checkpoints", nargs="+", required=True, metavar="PATH",
                               help="LoRA files, or folders holding pytorch_lora_weights.safetensors")
    sweep_command.add_argument("--multipliers", nargs="+", type=float, default=(1.0,),
                               help="LoRA multipliers (strengths); 0 is the base model")
    sweep_command.add_argument("--scales", nargs="+", type=float, dest="multipliers", action=RenamedFlag,
                               help=argparse.SUPPRESS)
    sweep_command.add_argument("--reference", required=True, help="folder of reference (real) images for FID")
    sweep_command.add_argument("--output_dir", required=True, help="metrics.csv, metrics.md and the images go here")
    sweep_command.add_argument("--clip_model", default="", help="hub id or folder of a CLIPModel; empty: no CLIP score")
    report_command = commands.add_parser("report", help="write (or rewrite) a training run's report.html")
    report_command.add_argument("run", help="the output_dir of a training run")
    judge_command = commands.add_parser("judge", help="score every checkpoint of a run at several multipliers, "
                                                      "recommend one (sdlora/judge.py); unset flags: the run's judge_*")
    judge_command.add_argument("run", help="the output_dir of a training run")
    judge_command.add_argument("--multipliers", nargs="+", type=float, help="LoRA multipliers, e.g. 0.6 0.8 1.0")
    judge_command.add_argument("--prompts", nargs="+", help="the subject in new contexts, with the trigger phrase")
    judge_command.add_argument("--prior_prompts", nargs="+", help="prompts the LoRA must leave as they were")
    judge_command.add_argument("--samples_per_prompt", type=int, help="images per prompt")
    judge_command.add_argument("--dino_model", help="local folder of facebook/dino-vits16")
    judge_command.add_argument("--clip_model", help="local folder of a CLIP model")
    return parser


def run_command(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "sweep":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "fid":
        value = fid_of_folders(args.generated, args.reference, InceptionFeatures())
        print(f"FID {value:.4f}  ({args.generated} vs {args.reference})")
    elif args.command == "clip-score":
        prompts = prompt_texts(args.prompts_file, "--prompts_file")
        value = clip_score_of_paths(list_images(args.folder), prompts, ClipScorer.from_pretrained(args.clip_model))
        print(f"CLIP score {value:.4f}  ({args.folder})")
    elif args.command == "report":
        print(f"report: {write_report(args.run)}")
    elif args.command == "judge":
        judge_run(args.run, {name: getattr(args, name) for name in ("multipliers", "prompts", "prior_prompts",
                                                                      "samples_per_prompt", "dino_model", "clip_model")})
        print(f"report: {write_report(args.run)}")
    else:
        scorer = ClipScorer.from_pretrained(args.clip_model) if args.clip_model else None
        csv_path = sweep(args.checkpoints, args.multipliers, args.reference, args.output_dir, extra,
                         InceptionFeatures(), scorer)
        print((csv_path.parent / "metrics.md").read_text(encoding="utf-8") + f"written: {csv_path}")


def main(argv: list[str] | None = None) -> None:
    """Run one command; a user mistake exits with one `error: ...` line (the option and the fix), no traceback."""
    try:
        run_command(argv)
    except (EvaluationError, ConfigError, LoRAError, ReportError, JudgeError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
