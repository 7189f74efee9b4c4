"""Loss masks: read from a mask folder or the alpha channel, cropped, mirrored and bucketed with their pictures,
shrunk to the latent grid by area, refused at start when unusable, reported by the dataset check."""

import argparse
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dataset as dataset_module
import train_lora
from conftest import REPO_ROOT
from dataset import CustomDataset, DatasetError
from sdlora.caching import latent_mask_cache
from sdlora.losses import check_mask_settings, latent_mask
from sdlora.settings import ConfigError

MODEL = REPO_ROOT / "models" / "tiny-sd-world"


def picture_and_mask(folder, masks, name: str, size=(96, 64), seed=0):
    """A picture whose red squares are exactly where its mask is white, so a crop of one can be checked against
    the crop of the other."""
    rng = random.Random(seed)
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    for _ in range(4):
        x, y = rng.randrange(0, size[0] - 16), rng.randrange(0, size[1] - 16)
        mask[y:y + 16, x:x + 16] = 255
    picture = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    picture[..., 0] = mask
    folder.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text("a red square")
    Image.fromarray(mask).save(masks / f"{name}.png")


def test_latent_mask_averages_the_pixels_of_each_latent_cell():
    """4x4 -> 2x2 by area: a white left half stays [[1, 0], [1, 0]]; one white pixel of a 2x2 cell gives 1/4."""
    half = torch.tensor([[1.0, 1, 0, 0]] * 4)[None, None]
    assert torch.equal(latent_mask(half, (2, 2)), torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]]))
    one = torch.zeros(1, 1, 4, 4)
    one[0, 0, 0, 0] = 1.0
    assert torch.equal(latent_mask(one, (2, 2)), torch.tensor([[[[0.25, 0.0], [0.0, 0.0]]]]))


@pytest.mark.parametrize("buckets", [False, True])
def test_masks_follow_random_crops_flips_and_buckets(tmp_path, buckets):
    """Over many draws of random crops and mirroring (square or bucketed, resized or not), each item's mask is
    white exactly where its picture is red."""
    for index, size in enumerate([(96, 64), (128, 64), (192, 128)]):  # the last one is also resized
        picture_and_mask(tmp_path / "d", tmp_path / "m", f"p{index}", size=size, seed=index)
    data = CustomDataset(tmp_path / "d", resolution=64, center_crop=False, random_flip=True, buckets=buckets,
                         seed=5, masked_loss=True, mask_path=str(tmp_path / "m"))
    flips = set()
    for epoch in range(4):
        data.begin_epoch(epoch)
        for item in range(len(data)):
            entry = data[item]
            red = entry["pixel_values"][0] > 0
            assert entry["mask"].shape == (1, *entry["pixel_values"].shape[1:])
            assert torch.equal(entry["mask"][0] > 0.5, red)
            flips.add(data.augmentation(item)[1])
    assert flips == {True, False}


def test_the_alpha_channel_is_the_mask_without_a_mask_folder(tmp_path):
    """An RGBA picture's alpha is its mask (opaque = 1, transparent = 0); a picture without alpha trains on every
    pixel and is counted in the summary."""
    (tmp_path / "d").mkdir()
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:, :32, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "d" / "a.png")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "d" / "b.png")
    data = CustomDataset(tmp_path / "d", resolution=64, masked_loss=True)
    by_name = {data.examples[data.order[i]].path.name: data[i]["mask"] for i in range(len(data))}
    assert torch.equal(by_name["a.png"][0, :, :32], torch.ones(64, 32))
    assert torch.equal(by_name["a.png"][0, :, 32:], torch.zeros(64, 32))
    assert torch.equal(by_name["b.png"], torch.ones(1, 64, 64))
    assert "1 image(s): no mask: trained on every pixel" in data.summary()


def test_cached_masks_are_the_item_masks_on_the_latent_grid(tmp_path):
    """The mask cached beside a latent is the dataset item's mask shrunk by latent_mask, for both mirrorings."""
    picture_and_mask(tmp_path / "d", tmp_path / "m", "p")
    data = CustomDataset(tmp_path / "d", resolution=64, random_flip=True, masked_loss=True,
                         mask_path=str(tmp_path / "m"))
    latents = {(0, flip): (torch.zeros(4, 16, 16), torch.zeros(4, 16, 16)) for flip in (False, True)}
    cached = latent_mask_cache(data, latents)
    for flip in (False, True):
        assert torch.equal(cached[(0, flip)], latent_mask(data.mask(0, flip)[None], (16, 16))[0])
    assert not torch.equal(cached[(0, False)], cached[(0, True)])


def test_an_all_white_mask_trains_exactly_as_no_mask(tmp_path):
    """Masks that keep every pixel change nothing: the LoRA is bitwise the unmasked run's."""
    for index in range(3):
        picture_and_mask(tmp_path / "d", tmp_path / "unused", f"p{index}", seed=index)
        Image.new("L", (96, 64), 255).save(tmp_path / "unused" / f"p{index}.png")

    def run(output, *extra):
        return load_file(str(train_lora.main(train_lora.parse_config([
            "--pretrained_model_name_or_path", str(MODEL), "--dataset_path", str(tmp_path / "d"), "--output_dir",
            str(tmp_path / output), "--resolution", "64", "--max_train_steps", "3", "--checkpointing_steps", "0",
            "--learning_rate", "1e-3", "--sample_steps", "0", "--sample_prompts", "--interop_check", "false",
            *extra]))))

    plain, masked = run("plain"), run("masked", "--masked_loss", "true", "--mask_path", str(tmp_path / "unused"))
    assert all(torch.equal(plain[key], masked[key]) for key in plain)


def test_unusable_masks_and_no_masks_are_refused_at_start(tmp_path):
    """A mask of another size, one that is no image, and masked_loss with no mask at all: DatasetError naming the
    file and the fix."""
    picture_and_mask(tmp_path / "d", tmp_path / "m", "p")
    Image.new("L", (50, 50)).save(tmp_path / "m" / "p.png")
    with pytest.raises(DatasetError, match=r"p.png: mask p.png is 50x50, the picture 96x64"):
        CustomDataset(tmp_path / "d", resolution=64, masked_loss=True, mask_path=str(tmp_path / "m"))
    (tmp_path / "m" / "p.png").write_text("not an image")
    with pytest.raises(DatasetError, match="cannot be read as an image"):
        CustomDataset(tmp_path / "d", resolution=64, masked_loss=True, mask_path=str(tmp_path / "m"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="none of the 1 pictures .* has a mask .* set mask_path"):
        CustomDataset(tmp_path / "d", resolution=64, masked_loss=True, mask_path=str(tmp_path / "empty"))


@pytest.mark.parametrize("changes, words", [
    (dict(masked_loss=False), "without --masked_loss"),
    (dict(mask_path="missing"), "is not a folder"),
    (dict(mask_path="d/masks"), "inside --dataset_path"),
])
def test_mask_settings_that_cannot_work_are_refused(tmp_path, monkeypatch, changes, words):
    """mask_path without masked_loss, a mask folder that does not exist, or one inside the pictures: refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d" / "masks").mkdir(parents=True)
    (tmp_path / "m").mkdir()
    cfg = argparse.Namespace(**({"masked_loss": True, "mask_path": "m", "dataset_path": "d"} | changes))
    with pytest.raises(ConfigError, match=words):
        check_mask_settings(cfg)


def test_the_dataset_check_lists_pictures_without_masks_and_wrong_sized_masks(tmp_path, capsys):
    """python dataset.py --check reports the masks found, the pictures without one and a mask of another size."""
    for name in ("good", "missing", "wrong"):
        picture_and_mask(tmp_path / "d", tmp_path / "m", name)
    (tmp_path / "m" / "missing.png").unlink()
    Image.new("L", (64, 64)).save(tmp_path / "m" / "wrong.png")
    dataset_module.main(["--check", str(tmp_path / "d"), "--resolution", "64", "--mask_path", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert "1 found, 1 picture(s) without one" in out and "1 unusable" in out
    assert "no mask: missing.png" in out
    assert "unusable: wrong.png: mask wrong.png is 64x64, the picture 96x64" in out
