"""Pivotal tuning: a token's embedding trained beside the LoRA, saved in the LoRA file (bundle_emb keys) and as a
textual-inversion file, loaded back by generate.py and diffusers, resumed exactly."""

import argparse
import json
import shutil

import diffusers
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

import generate
import train_lora
from conftest import REPO_ROOT
from sdlora import tiny_world
from sdlora.caching import EncodedDataset
from sdlora.pivotal import TokenEmbedding, add_train_token, check_train_token, spell_out
from sdlora.run_files import TEXTUAL_INVERSION_FILE_NAME
from sdlora.settings import ConfigError

MODEL = REPO_ROOT / "models" / "tiny-sd-world"
TOKEN = "<sks>"  # not one token to the shipped tokenizer: added as a new one
BUNDLE_KEY = f"bundle_emb.{TOKEN}.string_to_param.*"


def token_cfg(**changes) -> argparse.Namespace:
    settings = dict(train_token=TOKEN, train_token_new=True, train_token_init="star", train_token_vectors=2,
                    train_token_lr=5e-3, trigger_phrase="")
    return argparse.Namespace(**(settings | changes))


def run(output_dir, dataset_path, *extra):
    cfg = train_lora.parse_config([
        "--pretrained_model_name_or_path", str(MODEL), "--dataset_path", str(dataset_path),
        "--output_dir", str(output_dir), "--resolution", "64", "--max_train_steps", "6", "--checkpointing_steps", "3",
        "--learning_rate", "1e-3", "--train_batch_size", "2", "--sample_steps", "0", "--sample_prompts",
        "--train_token", TOKEN, "--train_token_new", "true", "--train_token_init", "star",
        "--train_token_vectors", "2", "--train_token_lr", "5e-3", *extra])
    return train_lora.main(cfg)


@pytest.fixture(scope="module")
def star_data(tmp_path_factory):
    folder = tiny_world.write_concept_dataset(tiny_world.CONCEPTS["sks-star"], tmp_path_factory.mktemp("star"), 6)
    for caption in folder.glob("*.txt"):  # "a sks ..." -> "a <sks> ..."
        caption.write_text(caption.read_text().replace("sks", TOKEN))
    return folder


@pytest.fixture(scope="module")
def reference(star_data, tmp_path_factory):
    return run(tmp_path_factory.mktemp("reference"), star_data)


def test_token_embedding_puts_the_vectors_at_the_added_ids_only():
    """Hand-picked table and vectors: added ids read the trained vectors, other ids the frozen table, and only the
    vectors at added positions get gradients."""
    base = torch.nn.Embedding(4, 2)
    base.weight.data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    base.requires_grad_(False)
    embedding = TokenEmbedding(base, "tok", [4, 5], torch.tensor([[10.0, 11.0], [20.0, 21.0]]))
    out = embedding(torch.tensor([[1, 4, 5, 3, 4]]))
    assert torch.equal(out, torch.tensor([[[1.0, 1.0], [10.0, 11.0], [20.0, 21.0], [3.0, 3.0], [10.0, 11.0]]]))
    out.sum().backward()
    assert torch.equal(embedding.vectors.grad, torch.tensor([[2.0, 2.0], [1.0, 1.0]]))


def test_a_multi_vector_token_is_spelled_out_as_diffusers_does():
    """A token added with two vectors (tok, tok_1) is written as both in a prompt; other text is untouched."""
    tokenizer = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    assert spell_out("a <sks> on a white background", tokenizer) == "a <sks> on a white background"
    add_train_token(token_cfg(), tokenizer, CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder"))
    assert spell_out("a <sks> on a white background", tokenizer) == "a <sks> <sks>_1 on a white background"
    assert tokenizer.tokenize("a <sks> <sks>_1")[1:] == ["<sks>", "<sks>_1"]


def test_the_vectors_start_as_the_initialiser_word():
    """Each vector starts as train_token_init's embedding; an existing one-token word without one starts as itself."""
    tokenizer = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder")
    table = text_encoder.get_input_embeddings().weight.detach().clone()
    star = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("star"))[0]
    embedding = add_train_token(token_cfg(), tokenizer, text_encoder)
    assert torch.equal(embedding.vectors, table[star].expand(2, -1))
    tokenizer = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    sks = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("sks"))[0]
    existing = token_cfg(train_token="sks", train_token_new=False, train_token_init="", train_token_vectors=1)
    own = add_train_token(existing, tokenizer, CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder"))
    assert torch.equal(own.vectors, table[sks][None])


@pytest.mark.parametrize("changes, words", [
    (dict(train_token="<sks>", train_token_new=False), "--train_token_new true"),
    (dict(train_token_init=""), "--train_token_init"),
    (dict(train_token_init="a star"), "one word that is one token"),
    (dict(train_token="sks.face"), "without spaces, dots"),
    (dict(train_token_vectors=0), "--train_token_vectors 0"),
    (dict(train_token_lr=0.0), "--train_token_lr 0.0"),
    (dict(train_token="<pqr>"), "in no caption"),
])
def test_a_token_that_cannot_train_is_refused_at_start(changes, words):
    """A split token without train_token_new, a new token without an initialiser, an initialiser of several tokens,
    a name other tools cannot key, no vectors, no learning rate, a token no caption names: each refused, naming the
    option."""
    tokenizer = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    with pytest.raises(ConfigError, match=words):
        check_train_token(token_cfg(**changes), tokenizer, ["a <sks> on a black background"])


def test_the_lora_file_bundles_the_trained_vectors_and_the_textual_inversion_file_matches(reference):
    """The LoRA file holds bundle_emb.<token>.string_to_param.* [2, width], moved away from its start, and the
    textual-inversion file holds the same vectors under the token."""
    tensors = load_file(str(reference))
    text_encoder = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    star = text_encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("star</w>")]
    vectors = tensors[BUNDLE_KEY]
    assert vectors.shape == (2, text_encoder.config.hidden_size)
    assert not torch.equal(vectors[0], star) and not torch.equal(vectors[1], star)
    assert torch.equal(load_file(str(reference.parent / TEXTUAL_INVERSION_FILE_NAME))[TOKEN], vectors)


def test_the_interop_self_test_passes_with_a_bundled_embedding(reference):
    """The run's interop self-test reads the file with its bundle: diffusers (given the LoRA tensors alone), the
    A1111 and ComfyUI key rules and the merged outputs all agree with the network."""
    report = json.loads(reference.with_suffix(".interop.json").read_text())
    assert report["ok"] and report["diffusers"] == "ok" and not report["file_problems"]


def test_a1111_key_split_gives_the_token_and_string_to_param(reference):
    """AUTOMATIC1111 (networks.py load_network) splits a bundle key once at the first "." after `bundle_emb` into
    the embedding's name and `string_to_param.<key>`: that must give our token and "*"."""
    bundle = [key for key in load_file(str(reference)) if key.startswith("bundle_emb")]
    assert bundle == [BUNDLE_KEY]
    _, _, part = BUNDLE_KEY.partition(".")
    name, vec_name = part.split(".", 1)
    assert name == TOKEN and vec_name.split(".", 1) == ["string_to_param", "*"]


def test_diffusers_and_generate_read_the_token_as_training_computed_it(reference):
    """diffusers' load_textual_inversion on the textual-inversion file, and generate.py on the LoRA file, give the
    prompt naming the token the same text-encoder output as the trained TokenEmbedding."""
    tokenizer = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder")
    trained = add_train_token(token_cfg(), tokenizer, text_encoder)
    trained.vectors.data = load_file(str(reference))[BUNDLE_KEY]
    prompt = f"a {TOKEN} on a gray background"
    ids = tokenizer(spell_out(prompt, tokenizer), padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = text_encoder(ids)[0]
    for load in ("diffusers", "generate"):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None,
                                                                 requires_safety_checker=False)
        if load == "diffusers":
            pipe.load_textual_inversion(str(reference.parent), weight_name=TEXTUAL_INVERSION_FILE_NAME)
        else:
            generate.load_bundled_embeddings(pipe, reference)
        converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
        their_ids = pipe.tokenizer(converted, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            got = pipe.text_encoder(their_ids)[0]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_resume_with_a_trained_token_is_exact(reference, star_data, tmp_path):
    """Resumed from the mid-run checkpoint, the LoRA and the token's vectors end bitwise equal to the reference."""
    (tmp_path / "resumed").mkdir()
    shutil.copytree(reference.parent / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = load_file(str(run(tmp_path / "resumed", star_data, "--resume_from_checkpoint", "latest")))
    expected = load_file(str(reference))
    assert resumed.keys() == expected.keys() and BUNDLE_KEY in resumed
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)


def test_captions_holding_the_token_are_not_cached(star_data, tmp_path):
    """With the token training, a caption naming it reaches the step as text (encoded with the current vectors);
    the empty caption of caption dropout is still cached."""
    from sdlora.training_data import make_dataset
    cfg = train_lora.parse_config(["--dataset_path", str(star_data), "--resolution", "64", "--caption_dropout", "0.5",
                                   "--train_token", TOKEN])
    dataset = make_dataset(cfg, cfg.dataset_path)
    items = EncodedDataset(dataset, None, {"": torch.zeros(77, 4)})
    seen = [items[index] for index in range(len(items))]
    assert {"text_embedding" in item for item in seen} == {True, False}
    assert all(("text_embedding" in item) == (item["caption"] == "") for item in seen)


def test_without_a_token_the_files_are_as_before(star_data, tmp_path):
    """Without train_token (and the text encoder released after caching), a run writes no bundle key and no
    textual-inversion file."""
    cfg = train_lora.parse_config([
        "--pretrained_model_name_or_path", str(MODEL), "--dataset_path", str(star_data), "--output_dir",
        str(tmp_path), "--resolution", "64", "--max_train_steps", "2", "--checkpointing_steps", "0",
        "--sample_steps", "0", "--sample_prompts"])
    final = train_lora.main(cfg)
    assert not [key for key in load_file(str(final)) if key.startswith("bundle_emb")]
    assert not (tmp_path / TEXTUAL_INVERSION_FILE_NAME).exists()


def test_lora_tools_carry_the_bundled_embedding(reference, tmp_path):
    """convert (kohya layout), resize and merge keep the token's vectors bit for bit; the diffusers/PEFT layout,
    which has no place for them, refuses with the way out."""
    import lora_tools
    from sdlora.lora_file import LoRAError
    vectors = load_file(str(reference))[BUNDLE_KEY]
    lora_tools.convert_lora_file(reference, tmp_path / "kohya.safetensors", "kohya")
    lora_tools.resize_lora_file(reference, tmp_path / "resized.safetensors", 2)
    lora_tools.merge_lora_files(tmp_path / "merged.safetensors", [(reference, 0.5), (reference, 0.5)])
    for name in ("kohya", "resized", "merged"):
        assert torch.equal(load_file(str(tmp_path / f"{name}.safetensors"))[BUNDLE_KEY], vectors)
    with pytest.raises(LoRAError, match="textual-inversion file"):
        lora_tools.convert_lora_file(reference, tmp_path / "peft.safetensors", "peft")
