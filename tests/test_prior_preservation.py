"""Prior preservation: class images trained beside the instance images, topped up once by the base model."""

import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_lora
from sdlora.files import image_files
from sdlora.training_samples import training_prompts
from conftest import shaped_dataset
from dataset import BucketBatchSampler
from sdlora.settings import ConfigError


def config(tiny_model_dir, tmp_path, *extra: str):
    instances = shaped_dataset(tmp_path / "instances", {f"i{n}.png": (64, 64) for n in range(3)})
    return train_lora.parse_config([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_path", str(instances),
        "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--max_train_steps", "4",
        "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--sample_prompts",
        "--sample_inference_steps", "2", "--interop_check", "false", *extra])


def test_class_batches_follow_instance_batches_and_carry_the_prior_weight():
    """Each instance batch is followed by a class batch of the same size; instance draws weigh 2 in all, class draws
    2 x prior_loss_weight; over passes, every class item comes once before any comes twice."""
    prior = [False] * 5 + [True] * 3
    sampler = BucketBatchSampler([(64, 64)] * 8, 2, seed=1, prior=prior, prior_loss_weight=0.5)
    seen = []
    for epoch in range(3):
        sampler.begin_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 6  # 3 instance batches (2, 2, 1 images), each with a class batch
        for instance, classes in zip(batches[::2], batches[1::2]):
            assert not any(prior[d.index] for d in instance) and all(prior[d.index] for d in classes)
            assert sum(d.weight for d in instance) == pytest.approx(2.0)
            assert sum(d.weight for d in classes) == pytest.approx(1.0)
            seen += [d.index for d in classes]
    assert sorted(seen[:3]) == [5, 6, 7]  # the first pass of the class stream holds each class image once


def test_missing_class_images_are_generated_once_and_reused(tiny_model_dir, tmp_path):
    """An empty class folder is filled to num_class_images (image and caption each) before training; a second run
    and a resume generate nothing and train on the same files."""
    classes = tmp_path / "classes"
    cfg = config(tiny_model_dir, tmp_path, "--class_data_path", str(classes), "--class_prompt", "a photo of a cat",
                 "--num_class_images", "3")
    train_lora.main(cfg)
    made = image_files(classes)
    assert len(made) == 3
    assert all(p.with_suffix(".txt").read_text(encoding="utf-8") == "a photo of a cat" for p in made)
    stamps = {p: p.stat().st_mtime_ns for p in made}
    shutil.rmtree(tmp_path / "out" / "checkpoint-4")
    (tmp_path / "out" / "pytorch_lora_weights.safetensors").unlink()
    train_lora.main(config(tiny_model_dir, tmp_path, "--class_data_path", str(classes), "--class_prompt",
                           "a photo of a cat", "--num_class_images", "3", "--resume_from_checkpoint", "latest"))
    assert {p: p.stat().st_mtime_ns for p in image_files(classes)} == stamps
    report = (tmp_path / "out" / "data_report.json").read_text(encoding="utf-8")
    assert '"class_images": 3' in report and '"training": 3' in report
    assert [prompt.prompt for prompt in training_prompts(cfg)] == ["a photo of a cat"]  # base vs LoRA


def test_a_vanishing_prior_weight_trains_the_instance_lora(tiny_model_dir, tmp_path):
    """The step's loss is the instance loss plus prior_loss_weight x the class loss: with the weight near 0 the
    LoRA is the one trained without class images (within float rounding); with 1 it is not."""
    classes = shaped_dataset(tmp_path / "classes", {f"c{n}.png": (64, 64) for n in range(2)})
    for image in classes.glob("*.png"):  # class images unlike the instances, so their loss pulls elsewhere
        Image.new("RGB", (64, 64), (20, 200, 220)).save(image)
    without = load_file(str(train_lora.main(config(tiny_model_dir, tmp_path / "a"))))
    runs = {}
    for weight in ("1e-12", "1.0"):
        runs[weight] = load_file(str(train_lora.main(config(
            tiny_model_dir, tmp_path / weight, "--class_data_path", str(classes), "--class_prompt", "a photo",
            "--num_class_images", "0", "--prior_loss_weight", weight))))
    # The instance micro-batches compute alike in both runs; the class loss's 1e-12 share of a gradient, even where
    # Adam divides by eps (1e-8), moves a weight by under 1e-6 of a step. So the tolerance is a share of the distance
    # Adam travels (about the learning rate per step): 2.5e-4 of it (1e-6; equal here), and the weight-1 run must
    # move 100 times that.
    travel = 1e-3 * 4  # --learning_rate x --max_train_steps of config()
    for key in without:
        torch.testing.assert_close(runs["1e-12"][key], without[key], rtol=0, atol=2.5e-4 * travel)
    assert max((runs["1.0"][k] - without[k]).abs().max().item() for k in without) > 2.5e-2 * travel


@pytest.mark.parametrize("extra, fragment", [
    (("--prior_loss_weight", "0.5"), "class_data_path is empty"),
    (("--class_prompt", "a dog"), "class_data_path is empty"),
    (("--class_data_path", "CLASSES"), "needs --class_prompt"),
    (("--class_data_path", "INSTANCES", "--class_prompt", "a dog"), "overlap"),
    (("--class_data_path", "INSTANCES/sub", "--class_prompt", "a dog"), "overlap"),
    (("--class_data_path", "MISSING", "--class_prompt", "a dog", "--num_class_images", "0"),
     "set --num_class_images"),
    (("--class_data_path", "CLASSES", "--class_prompt", "a dog", "--prior_loss_weight", "0"), "must be positive"),
])
def test_class_settings_that_cannot_work_are_refused_at_start(tiny_model_dir, tmp_path, extra, fragment):
    """Each mistake is refused before anything loads, naming the option and the fix."""
    (tmp_path / "classes").mkdir()
    names = {"CLASSES": str(tmp_path / "classes"), "MISSING": str(tmp_path / "nowhere"),
             "INSTANCES": str(tmp_path / "instances")}
    extra = [next((value + arg[len(key):] for key, value in names.items() if arg.startswith(key)), arg)
             for arg in extra]
    with pytest.raises(ConfigError, match=fragment):
        train_lora.check_config(config(tiny_model_dir, tmp_path, *extra))
