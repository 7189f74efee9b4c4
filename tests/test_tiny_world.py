"""tiny_world.py and the shipped pretrained model: the classifier, the held-out concepts, and a model that follows prompts."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from PIL import Image, ImageDraw

import pretrain_tiny
from sdlora import tiny_world
import train_lora
from conftest import REPO_ROOT
from sdlora.settings import ConfigError, check_model_source

SHIPPED_MODEL = REPO_ROOT / "models" / "tiny-sd-world"


def test_classifier_reads_every_concept_off_drawn_pictures():
    """On 600 drawn pictures of every shape, colour, background and size (held-out ones included) the classifier
    reads each attribute right at least 99 % of the time."""
    rng = random.Random(3)
    wrong, total = 0, 0
    for _ in range(600):
        picture = tiny_world.random_picture(rng, shapes=tiny_world.SHAPES + tiny_world.HELD_OUT_SHAPES,
                                            colours=tuple(tiny_world.ALL_COLOURS))
        seen = tiny_world.classify(tiny_world.draw(picture, rng))
        wrong += sum(seen[name] != getattr(picture, name) for name in ("shape", "colour", "background", "size"))
        total += 4
    assert wrong / total <= 0.01


@pytest.mark.parametrize("lab1, lab2, expected", [
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),  # pair 1
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),  # pair 7: one colour achromatic
    ((50.0, 2.49, -0.001), (50.0, -2.49, 0.0009), 7.1792),  # pair 13: mean hue across 0 degrees
    ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),  # pair 17: a large difference
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),  # pair 25
    ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082),  # pair 34: near black
])
def test_ciede2000_reproduces_sharma_wu_dalal_test_pairs(lab1, lab2, expected):
    """CIEDE2000 matches the published test data of Sharma, Wu & Dalal (2005, Table 1) to 1e-4, both ways round."""
    for first, second in ((lab1, lab2), (lab2, lab1)):
        assert abs(float(tiny_world.ciede2000(np.array(first), np.array(second))) - expected) < 1e-4


def test_reader_reads_clean_drawings_of_every_known_shape():
    """Every known shape (held-out ones included), drawn 6 times at each size in random places and colours, is read
    as itself: its outline overlaps its own prototype by IoU >= SHAPE_WITHIN_IOU (0.7) and best."""
    rng = random.Random(4)
    for shape in tiny_world.PROTOTYPE_SHAPES:
        for size in tiny_world.SIZES:
            for _ in range(6):
                picture = tiny_world.Picture(shape, rng.choice(tuple(tiny_world.ALL_COLOURS)),
                                             rng.choice(tuple(tiny_world.BACKGROUNDS)), size)
                seen = tiny_world.classify(tiny_world.draw(picture, rng))
                assert (seen["shape"], seen["size"]) == (shape, size), (picture, seen)


def test_a_purple_tinted_blue_triangle_is_not_graded_blue():
    """A triangle painted half blue, half purple is 8.1 CIEDE2000 from blue, past COLOUR_WITHIN_DE00 (8), so it
    reads 'other' (the palette reader, nearest in RGB however far, called it blue); pure blue still reads blue."""
    tint = tuple(round((b + p) / 2) for b, p in zip(tiny_world.COLOURS["blue"], tiny_world.ALL_COLOURS["purple"]))
    assert tiny_world.COLOUR_WITHIN_DE00 == 8.0
    tinted, blue = (tiny_world.draw_shape("triangle", fill, tiny_world.BACKGROUNDS["black"], 40, (32, 32))
                    for fill in (tint, tiny_world.COLOURS["blue"]))
    assert tiny_world.classify(tinted)["colour"] == "other"
    assert tiny_world.classify_by_palette(tinted)["colour"] == "blue"
    assert tiny_world.classify(blue)["colour"] == "blue"


def test_a_triangle_bent_into_another_shape_is_not_a_triangle():
    """A triangle leaning into a hook, or with its base pushed in to an arrowhead, overlaps no prototype by IoU 0.7
    (0.59 and 0.60 to the triangle's), so it reads 'other', not triangle (the palette reader: triangle and star)."""
    side, scale = 40, tiny_world.SUPERSAMPLE
    cx, cy, h = 32, 32, side / 2
    bent = {"hook": [(cx + 0.9 * h, cy - h), (cx + h, cy + h), (cx - h, cy + h), (cx - 0.2 * h, cy)],
            "arrowhead": [(cx, cy - h), (cx + h, cy + h), (cx, cy + 0.2 * h), (cx - h, cy + h)]}
    for name, points in bent.items():
        image = Image.new("RGB", (64 * scale, 64 * scale), tiny_world.BACKGROUNDS["white"])
        ImageDraw.Draw(image).polygon([(x * scale, y * scale) for x, y in points], fill=tiny_world.COLOURS["red"])
        seen = tiny_world.classify(image.resize((64, 64), Image.LANCZOS))
        assert seen["shape"] == "other", (name, seen)


def test_classifier_reads_shapes_after_the_shipped_vae():
    """Through a round trip of the shipped model's VAE, whose blur rounds small shapes off, the classifier still
    reads the shape of at least 95 % of the world's circles, squares and triangles and of its large stars (small
    stars do not survive this VAE, which never saw a star)."""
    vae = AutoencoderKL.from_pretrained(str(SHIPPED_MODEL), subfolder="vae").eval()
    rng = random.Random(11)
    pictures = [tiny_world.random_picture(rng, shapes=tiny_world.SHAPES + tiny_world.HELD_OUT_SHAPES)
                for _ in range(240)]
    drawn = torch.stack([torch.from_numpy(np.asarray(tiny_world.draw(p, rng), dtype=np.float32) / 127.5 - 1)
                         .permute(2, 0, 1) for p in pictures])
    with torch.no_grad():
        decoded = vae.decode(vae.encode(drawn).latent_dist.mean).sample.clamp(-1, 1)
    graded = [(p, tiny_world.classify(Image.fromarray(((d.permute(1, 2, 0).numpy() + 1) * 127.5).round()
                                                      .astype(np.uint8)))["shape"])
              for p, d in zip(pictures, decoded) if not (p.shape == "star" and p.size == "small")]
    assert sum(seen == p.shape for p, seen in graded) / len(graded) >= 0.95


def test_pretraining_never_draws_or_names_a_held_out_concept():
    """The world's pictures and captions for pretraining contain no held-out shape or colour, in 5000 draws."""
    rng = random.Random(0)
    held_out = set(tiny_world.HELD_OUT_SHAPES) | set(tiny_world.HELD_OUT_COLOURS)
    for _ in range(5000):
        picture = tiny_world.random_picture(rng)
        assert {picture.shape, picture.colour}.isdisjoint(held_out)
        assert set(tiny_world.caption(picture, rng).replace(",", " ").split()).isdisjoint(held_out)


def test_prompts_name_the_attributes_the_classifier_grades():
    """A prompt's attribute words are found wherever they stand; a trigger word is not an attribute."""
    assert tiny_world.named_attributes("a small red circle on a gray background") == {
        "shape": "circle", "colour": "red", "size": "small", "background": "gray"}
    assert tiny_world.named_attributes("a sks square") == {"shape": "square"}


def test_concept_datasets_draw_the_concept_and_caption_it_with_the_trigger(tmp_path):
    """Each concept's 8 pictures show the concept to the classifier and every caption carries 'sks'."""
    for concept in tiny_world.CONCEPTS.values():
        folder = tiny_world.write_concept_dataset(concept, tmp_path / concept.name)
        images = sorted(folder.glob("*.png"))
        assert len(images) == 8
        for image in images:
            assert tiny_world.classify(Image.open(image))[concept.attribute] == concept.value
            assert "sks" in image.with_suffix(".txt").read_text(encoding="utf-8").split()


def test_every_word_of_the_world_is_one_token_of_the_shipped_tokenizer():
    """The shipped tokenizer reads each world word, held-out and trigger words as a single token."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED_MODEL, subfolder="tokenizer")
    for word in pretrain_tiny.world_words():
        assert len(tokenizer.tokenize(word)) == 1, word


def test_later_concepts_are_no_words_of_the_shipped_model():
    """The concepts designed after the build (cross, heart, ..., orange, cyan) were never named in pretraining, not
    even as a token: the shipped tokenizer splits each into several byte pieces."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED_MODEL, subfolder="tokenizer")
    for word in tiny_world.LATER_SHAPES + tuple(tiny_world.LATER_COLOURS):
        assert word not in pretrain_tiny.world_words()
        assert len(tokenizer.tokenize(word)) > 1, word


def test_shipped_model_follows_prompts_of_its_world():
    """Sampled fresh from the shipped model, 24 prompts naming all four attributes get colour and background right in
    >= 95 % of images and shape and size in >= 70 % (79 % and 100 % measured; training.json has the 72-prompt
    figures)."""
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = list(pretrain_tiny.EVAL_PROMPTS[::3])
    tally = tiny_world.score(list(zip(prompts, tiny_world.sample(pipe, prompts, seed=7))))
    shares = {name: hit / total for name, (hit, total) in tally.items()}
    assert set(shares) == {"shape", "colour", "background", "size"}
    assert min(shares["colour"], shares["background"]) >= 0.95, shares
    assert min(shares["shape"], shares["size"]) >= 0.7, shares


def test_shipped_model_record_says_how_it_was_built():
    """training.json names the command, the seed, a time within the hour and every attribute's accuracy: colour and
    background at least 90 %, shape and size at least 80 % (85 % recorded, short of the 90 % aimed for)."""
    record = json.loads((SHIPPED_MODEL / "training.json").read_text(encoding="utf-8"))
    assert record["command"].startswith("python pretrain_tiny.py") and record["seed"] == pretrain_tiny.SEED
    phases = ("vae", "world_encoding", "unet_and_text_encoder")
    assert sum(record[phase]["seconds"] for phase in phases) <= 3600
    shares = {name: entry["share"] for name, entry in record["accuracy"].items()}
    assert set(shares) == {"shape", "colour", "background", "size"}
    assert min(shares["colour"], shares["background"]) >= 0.9 and min(shares["shape"], shares["size"]) >= 0.8, shares


@pytest.mark.parametrize("damage", ["truncated_unet", "bad_config_json", "wrong_config"])
def test_a_damaged_shipped_model_is_refused_with_how_to_restore_it(tmp_path, damage):
    """A truncated weight file or a broken config in a copy of the shipped model is named, with the git checkout
    and the pretrain_tiny.py rebuild as the fix, before anything loads."""
    copy = tmp_path / "tiny-sd-world"
    shutil.copytree(SHIPPED_MODEL, copy)
    if damage == "truncated_unet":
        weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        named = "unet/diffusion_pytorch_model.safetensors"
    elif damage == "bad_config_json":
        (copy / "vae" / "config.json").write_text("{ not json", encoding="utf-8")
        named = "vae/config.json"
    else:  # valid JSON, wrong model: the UNet's widths no longer match its weights
        config_path = copy / "unet" / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["block_out_channels"] = [2 * width for width in config["block_out_channels"]]
        config_path.write_text(json.dumps(config), encoding="utf-8")
        named = "unet/config.json"
    with pytest.raises(ConfigError) as refused:
        check_model_source(str(copy))
    assert named in str(refused.value) and "pretrain_tiny.py" in str(refused.value)
    assert "git checkout" in str(refused.value)
    cfg = train_lora.parse_config(["--pretrained_model_name_or_path", str(copy), "--output_dir", str(tmp_path / "run"),
                                   "--dataset_path", str(REPO_ROOT / "examples/dataset"), "--resolution", "64"])
    with pytest.raises(ConfigError, match="pretrain_tiny.py"):  # train_lora.py refuses it the same way, at its start
        train_lora.main(cfg)
