"""evaluate.py: the Frechet distance against its closed form, FID against noise, CLIP score against a manual
cosine, the sweep's table, and one-line CLI errors. All offline: tiny random CLIP, pixel-thumbnail features."""

import csv
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

import evaluate
from conftest import assert_close_to_scale, randomize_up
from lora_diffusion import inject_trainable_lora
from sdlora.tiny_model import build_tokenizer


def thumbnail_features(images: list[Image.Image]) -> torch.Tensor:
    """8x8 RGB thumbnails, flattened to 192 values in [0, 1]: an offline stand-in for Inception features."""
    return torch.stack([torch.from_numpy(np.asarray(image.resize((8, 8), Image.BILINEAR), dtype=np.float32) / 255)
                        .flatten() for image in images])


def smooth_images(count: int, seed: int, size: int = 64) -> torch.Tensor:
    """(count, 3, size, size) images in [0, 1]: random 4x4 colour fields upsampled bicubically (smooth blobs)."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, 4, 4, generator=generator)
    return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def write_pngs(images: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{index:03d}.png")
    return folder


def add_noise(images: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + std * noise).clamp(0, 1)


def build_tiny_clip() -> tuple[CLIPModel, CLIPProcessor]:
    """A random CLIPModel (2-layer towers, 32 wide, 32 px images) and its processor, built in milliseconds."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def random_lora(tiny_model_dir: Path, path: Path, seed: int) -> Path:
    """A UNet LoRA file with non-zero up weights (so multiplier 1 changes the images) for the tiny model."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    network = inject_trainable_lora(unet, rank=4, alpha=4.0)
    randomize_up(network, seed, std=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    return network.save(path)


def test_frechet_distance_equals_closed_form_for_diagonal_gaussians():
    """For diagonal covariances d^2 = |mu1-mu2|^2 + sum (s1-s2)^2; a common rotation of both Gaussians keeps it."""
    mu1, mu2 = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 2.0, 0.0])
    var1, var2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 4.0, 1.0])
    by_hand = (1 + 4) + ((1 - 2) ** 2 + (2 - 2) ** 2 + (3 - 1) ** 2)  # = 10
    # float64 throughout (7e-16 of the value measured): 1e-9 relative.
    assert evaluate.frechet_distance(mu1, torch.diag(var1), mu2, torch.diag(var2)) == pytest.approx(by_hand, rel=1e-9)

    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    rotated = evaluate.frechet_distance(rotation @ mu1.double(), rotation @ torch.diag(var1).double() @ rotation.T,
                                        rotation @ mu2.double(), rotation @ torch.diag(var2).double() @ rotation.T)
    assert rotated == pytest.approx(by_hand, rel=1e-9)  # non-diagonal covariances: the eigen route is exercised


def test_fid_of_a_folder_with_itself_is_zero_and_grows_with_noise(tmp_path):
    """FID(folder, itself) is 0 within float64 rounding of the traces that cancel; noise on one side raises it, more
    noise more."""
    clean = smooth_images(24, seed=0)
    clean_dir = write_pngs(clean, tmp_path / "clean")
    some_dir = write_pngs(add_noise(clean, 0.05, seed=1), tmp_path / "noise005")
    more_dir = write_pngs(add_noise(clean, 0.20, seed=1), tmp_path / "noise020")

    itself = evaluate.fid_of_folders(clean_dir, clean_dir, thumbnail_features)
    some = evaluate.fid_of_folders(some_dir, clean_dir, thumbnail_features)
    more = evaluate.fid_of_folders(more_dir, clean_dir, thumbnail_features)
    # Tr(S) + Tr(S) - 2 Tr((S S)^(1/2)) cancels terms of size 2 Tr(S) (21.5 here) in float64: -3.2e-14 measured,
    # 1.5e-15 of them; 1e-12 of them allowed.
    features = evaluate.extract_features(evaluate.list_images(clean_dir), thumbnail_features).double()
    assert abs(itself) <= 1e-12 * 2 * torch.cov(features.T).trace().item()
    assert some > 1e-4, f"noise of std 0.05 must show: FID {some}"
    assert more > 2 * some, f"4x the noise must raise FID clearly: {more} vs {some}"


def test_clip_score_equals_manual_cosine_and_lies_in_0_100():
    """Each score is 100 * max(cos, 0) of the projected image and text embeddings, computed here tower by tower."""
    model, processor = build_tiny_clip()
    images = [Image.fromarray(np.asarray(image.permute(1, 2, 0) * 255, dtype=np.uint8))
              for image in smooth_images(4, seed=3)]
    prompts = ["a photo of a cat", "a red rocket", "sks dog on a beach", "x" * 300]  # the last is truncated to 77
    scores = evaluate.ClipScorer(model, processor, device=torch.device("cpu"))(images, prompts)

    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        text_embeds = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                             attention_mask=inputs["attention_mask"]).pooler_output)
    cosine = (image_embeds * text_embeds).sum(-1) / (image_embeds.norm(dim=-1) * text_embeds.norm(dim=-1))
    # A cosine's rounding scales with |a| |b| / (|a| |b|) = 1, not with the cosine (about 0.003 for this random
    # model), so the score's own scale is 100: 9e-9 of it measured (batched against tower by tower), 1e-6 allowed.
    assert_close_to_scale(scores, 100 * cosine.clamp(min=0), rtol=1e-6, scale=100)
    assert scores.shape == (4,) and bool(((scores >= 0) & (scores <= 100)).all())
    assert bool((scores == 0).any() and (scores > 0).any()), "both sides of max(cos, 0) must be exercised"


def test_pair_prompts_follows_generate_order_and_refuses_a_mismatch():
    """Images of one prompt are consecutive (generate.py's order); a count that is no multiple is refused."""
    assert evaluate.pair_prompts(4, ["a", "b"]) == ["a", "a", "b", "b"]
    assert evaluate.pair_prompts(3, ["a"]) == ["a", "a", "a"]
    with pytest.raises(evaluate.EvaluationError, match="multiple of the number of prompts"):
        evaluate.pair_prompts(3, ["a", "b"])


def test_inception_weights_offline_error_names_the_cache_and_the_fix(tmp_path, monkeypatch):
    """Offline with no cached weights, the error names the URL, the cache file and the ways out, not a traceback."""
    import torch.hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    extractor = evaluate.InceptionFeatures(device=torch.device("cpu"))  # loads on first use
    with pytest.raises(evaluate.EvaluationError) as error:
        extractor([Image.new("RGB", (64, 64))])
    message = str(error.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "inception_v3_google-0cc3c7bd.pth") in message
    assert "https://download.pytorch.org/models/inception_v3_google" in message
    assert "network access" in message and "feature extractor" in message


def test_a_folder_of_images_is_listed_as_the_dataset_scan_lists_it_without_grids(tmp_path):
    """evaluate.py reads a folder through the dataset's image listing (upper-case suffixes in, sub-folders in,
    hidden files and OS droppings out), less the `*-grid` contact sheets."""
    from sdlora.files import image_files

    for name in ("a.png", "B.JPG", "sub/c.webp", "run-grid.png", ".hidden.png", "._d.jpg", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert evaluate.list_images(tmp_path) == [tmp_path / "B.JPG", tmp_path / "a.png", tmp_path / "sub" / "c.webp"]
    assert [p for p in image_files(tmp_path) if p.name != "run-grid.png"] == evaluate.list_images(tmp_path)


def test_sweep_writes_one_row_per_checkpoint_and_multiplier(tiny_model_dir, tmp_path):
    """The table has one row per checkpoint x multiplier, in that order; multiplier 0 rows (the base model) are
    equal."""
    checkpoints = [random_lora(tiny_model_dir, tmp_path / f"run/checkpoint-{step}/pytorch_lora_weights.safetensors",
                               seed=step).parent for step in (10, 20)]
    reference = write_pngs(smooth_images(4, seed=5), tmp_path / "reference")
    (tmp_path / "prompts.txt").write_text("a photo of a cat\n# a comment\n", encoding="utf-8")
    clip_dir = tmp_path / "clip"
    for part in build_tiny_clip():
        part.save_pretrained(clip_dir)
    generate_args = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--prompts_file",
                     str(tmp_path / "prompts.txt"), "--num_images", "2", "--height", "64", "--width", "64",
                     "--num_inference_steps", "2"]

    csv_path = evaluate.sweep(checkpoints, [0.0, 1.0], reference, tmp_path / "evaluation", generate_args,
                              thumbnail_features, evaluate.ClipScorer.from_pretrained(str(clip_dir)))
    rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
    expected = [(str(c / "pytorch_lora_weights.safetensors"), s) for c in checkpoints for s in (0.0, 1.0)]
    assert [(row["checkpoint"], float(row["multiplier"])) for row in rows] == expected
    assert all(row["images"] == "2" and float(row["fid"]) >= 0 and 0 <= float(row["clip_score"]) <= 100
               for row in rows)
    assert all(len(evaluate.list_images(csv_path.parent / row["images_dir"])) == 2 for row in rows)
    assert rows[0]["fid"] == rows[2]["fid"] and rows[0]["clip_score"] == rows[2]["clip_score"]  # both the base model
    assert rows[1]["fid"] != rows[0]["fid"], "multiplier 1 must change the images"
    markdown = (csv_path.parent / "metrics.md").read_text(encoding="utf-8").splitlines()
    assert len(markdown) == 2 + len(expected) and markdown[0].startswith("| checkpoint | multiplier |")


def test_cli_mistakes_exit_with_one_error_line_naming_the_fix(tmp_path, capsys):
    """A missing folder, a missing option and a flag the sweep owns each exit with one `error:` line, no traceback."""
    cases = [
        (["fid", str(tmp_path / "nope"), str(tmp_path)], "is not a folder"),
        (["clip-score", str(tmp_path), "--prompts_file", "p.txt"], "--clip_model"),
        (["sweep", "--checkpoints", str(tmp_path), "--reference", str(tmp_path), "--output_dir", str(tmp_path)],
         "no LoRA file there"),
        (["sweep", "--checkpoints", "a", "--reference", "r", "--output_dir", "o", "--lora", "x.safetensors"],
         "--lora: the sweep sets the LoRA"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(argv)
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and expected in message and "\n" not in message, (argv, message)
    assert "Traceback" not in capsys.readouterr().err


def test_old_scales_flag_still_works_with_a_one_line_note(tmp_path, capsys):
    """`sweep --scales` (renamed --multipliers) is still read, into the same setting, after a one-line note."""
    args, _ = evaluate.build_parser().parse_known_args(
        ["sweep", "--checkpoints", "a", "--scales", "0", "0.5", "--reference", "r", "--output_dir", "o"])
    assert args.multipliers == [0.0, 0.5]
    assert capsys.readouterr().err == "note: --scales is now --multipliers; the old name goes in the next release\n"
    args, _ = evaluate.build_parser().parse_known_args(["sweep", "--checkpoints", "a", "--reference", "r",
                                                        "--output_dir", "o"])
    assert args.multipliers == (1.0,) and capsys.readouterr().err == ""


def test_cli_clip_score_prints_the_mean_score_of_a_folder(tmp_path, capsys):
    """`clip-score FOLDER` prints the mean of the per-image scores of a saved CLIP model, prompts paired in order."""
    model, processor = build_tiny_clip()
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    images_dir = write_pngs(smooth_images(4, seed=7), tmp_path / "images")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n", encoding="utf-8")

    evaluate.main(["clip-score", str(images_dir), "--prompts_file", str(tmp_path / "prompts.txt"),
                   "--clip_model", str(tmp_path / "clip")])
    printed = float(capsys.readouterr().out.split()[2])
    images = evaluate.open_images(evaluate.list_images(images_dir))
    expected = evaluate.ClipScorer(model, processor, torch.device("cpu"))(images, ["a cat", "a cat", "a dog", "a dog"])
    assert printed == pytest.approx(float(expected.mean()), abs=1e-4)  # the print's 4 decimals (half a unit: 5e-5)
