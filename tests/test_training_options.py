"""Options experienced trainers expect: buckets, caption controls, repeats, Min-SNR, noise offset, EMA, targets."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

import train_lora
from sdlora.run_files import EMA_FILE_NAME
from sdlora.training_step import SampleRandomness, diffusion_loss, min_snr_weights
from conftest import REPO_ROOT, assert_close_to_scale, shaped_dataset
from dataset import BucketBatchSampler, CustomDataset, bucket_size
from sdlora.ema import Ema


def run(tiny_model_dir, output_dir, dataset_path, *extra):
    cfg = train_lora.parse_config([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_path", str(dataset_path),
        "--output_dir", str(output_dir), "--resolution", "128", "--max_train_steps", "6",
        "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--sample_prompts", *extra])
    return train_lora.main(cfg)


@pytest.mark.parametrize("width, height", [(1024, 512), (512, 1024), (300, 300), (2000, 300), (130, 100)])
def test_bucket_keeps_aspect_within_area_and_step(width, height):
    """A bucket has sides in steps of 64, at most resolution² pixels and never more than the image (no upscale),
    and the aspect ratio of the image (clamped to 4:1) within the 64-px rounding."""
    bucket_w, bucket_h = bucket_size(width, height, 512, upscale=False)
    assert bucket_w % 64 == 0 and bucket_h % 64 == 0
    assert bucket_w * bucket_h <= min(512 * 512, max(width * height, 64 * 64))
    ratio = min(max(width / height, 0.25), 4.0)
    assert abs(bucket_w / bucket_h - ratio) <= ratio * 64 / min(bucket_w, bucket_h)
    upscaled = bucket_size(width, height, 512, upscale=True)
    assert upscaled[0] * upscaled[1] >= bucket_w * bucket_h


def test_bucket_batches_share_one_shape_and_keep_aspect(tmp_path):
    """With buckets every batch holds one training size, and each image's tensor has its bucket's shape."""
    root = shaped_dataset(tmp_path / "d", {"wide1.png": (256, 128), "wide2.png": (260, 130), "tall.png": (128, 256),
                                           "square.png": (200, 200), "wide3.png": (256, 128)})
    data = CustomDataset(root, resolution=128, buckets=True)
    sampler = BucketBatchSampler([data.sizes[e] for e in data.order], 2, seed=0)
    batches = [[draw.index for draw in batch] for batch in sampler]
    assert sorted(i for batch in batches for i in batch) == list(range(len(data)))
    for batch in batches:
        shapes = {tuple(data[i]["pixel_values"].shape) for i in batch}
        assert len(shapes) == 1
    wide = [e.path.name for e in data.examples].index("wide1.png")
    assert data[wide]["pixel_values"].shape == (3, 64, 128)  # 2:1 kept, within 128² px, sides in steps of 64
    assert "buckets (items)" in data.summary()


def test_global_batches_on_several_processes_are_the_single_process_batches_padded():
    """With 2 processes and batch 2, each global batch is the batch-4 single-process batch (same items, same
    order of batches), padded to 4 with weight-0 draws, and its real draws' weights sum to the process count."""
    sizes = [(128, 64)] * 5 + [(64, 128)] * 2 + [(64, 64)]  # buckets of 5, 2 and 1: no batch of 4 divides them
    one = list(BucketBatchSampler(sizes, 4, seed=3, processes=1))
    two = list(BucketBatchSampler(sizes, 2, seed=3, processes=2))
    assert len(two) == len(one) == len(BucketBatchSampler(sizes, 2, seed=3, processes=2)) == 4
    for single, split in zip(one, two):
        real = [draw for draw in split if draw.weight > 0]
        assert [draw.index for draw in real] == [draw.index for draw in single]
        assert len(split) == 4 and len({sizes[draw.index] for draw in split}) == 1
        assert sum(draw.weight for draw in real) == pytest.approx(2.0)
        assert sum(draw.weight for draw in single) == pytest.approx(1.0)


def test_resume_with_buckets_is_exact(tiny_model_dir, tmp_path):
    """A bucketed run (batch 2, mixed shapes, cached latents) resumed mid-run ends bitwise equal to the reference."""
    root = shaped_dataset(tmp_path / "d", {"a.png": (256, 128), "b.png": (260, 130), "c.png": (128, 256),
                                           "d.png": (200, 200), "e.png": (140, 280)})
    extra = ("--aspect_ratio_buckets", "true", "--train_batch_size", "2", "--random_flip", "true")
    reference = load_file(str(run(tiny_model_dir, tmp_path / "ref", root, *extra)))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "ref" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed = load_file(str(run(tiny_model_dir, tmp_path / "resumed", root, *extra,
                                "--resume_from_checkpoint", "latest")))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_tag_shuffle_keeps_the_first_tags_and_the_trigger(tmp_path):
    """Shuffled captions keep the trigger phrase and the first keep_tags tags in place, the same tag set,
    and change from epoch to epoch."""
    root = shaped_dataset(tmp_path / "d", {"x.png": (128, 128)})
    data = CustomDataset(root, resolution=64, shuffle_tags=True, keep_tags=1, trigger_phrase="sks")
    seen = set()
    for epoch in range(8):
        data.begin_epoch(epoch)
        tags = data.caption(0).split(", ")
        assert tags[:2] == ["sks", "a photo of x.png"] and sorted(tags[2:]) == ["red", "small", "square"]
        seen.add(tuple(tags))
    assert len(seen) > 1
    assert data.possible_captions() is None


def test_caption_dropout_rate_and_cached_empty_caption(tmp_path):
    """caption_dropout empties about that share of captions, and the empty caption is among the cacheable ones."""
    root = shaped_dataset(tmp_path / "d", {f"{i}.png": (128, 128) for i in range(20)})
    data = CustomDataset(root, resolution=64, caption_dropout=0.3)
    captions = [data.caption(i) for i in range(len(data)) for data.epoch in range(10)]
    assert 0.2 < captions.count("") / len(captions) < 0.4
    assert "" in data.possible_captions()


def test_folder_repeats_follow_the_kohya_convention(tmp_path):
    """Images under `3_subject/` appear three times per epoch, others once."""
    shaped_dataset(tmp_path / "d" / "3_subject", {"s.png": (128, 128)})
    shaped_dataset(tmp_path / "d" / "reg", {"r.png": (128, 128)})
    data = CustomDataset(tmp_path / "d", resolution=64)
    names = [data.examples[e].path.name for e in data.order]
    assert sorted(names) == ["r.png", "s.png", "s.png", "s.png"]


def test_min_snr_weights_equal_the_formula():
    """Min-SNR weights are min(SNR, gamma)/SNR for epsilon and min(SNR, gamma)/(SNR+1) for v-prediction."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([0, 10, 250, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected_eps = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    expected_v = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)
    # Per-element relative: every weight is positive and at least 5 / SNR_max, so each element's own size is its
    # scale. Elementwise arithmetic rounds alike on every processor (7e-10 from float64 measured); 1e-5 allowed.
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, 5.0, False).double(), expected_eps,
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, 5.0, True).double(), expected_v,
                               rtol=1e-5, atol=0)
    assert expected_eps[-1] == 1.0 and expected_eps[0] < 1.0  # noisy steps untouched, easy steps damped


def test_noise_offset_adds_a_per_channel_constant():
    """With noise_offset the noise is N(0,1) plus offset times one N(0,1) value per sample and channel."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents, states, seen = torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, 32), {}

    def spy_unet(noisy, timesteps, encoder_hidden_states):
        seen["noisy"], seen["t"] = noisy, timesteps
        return type("Out", (), {"sample": torch.zeros_like(noisy)})()

    randomness = SampleRandomness(0, 0, torch.tensor([0, 1]), torch.device("cpu"))
    diffusion_loss(latents, states, spy_unet, scheduler, randomness, 0.0, 0.1)
    fresh = SampleRandomness(0, 0, torch.tensor([0, 1]), torch.device("cpu")).generators
    noise = torch.stack([torch.randn(4, 8, 8, generator=g) + 0.1 * torch.randn(4, 1, 1, generator=g) for g in fresh])
    expected = scheduler.add_noise(latents, noise, seen["t"])
    # The same elementwise formula (equal here); an FMA where the code fuses a multiply-add rounds once less.
    assert_close_to_scale(seen["noisy"], expected, rtol=1e-6)


def test_ema_update_follows_the_warmup_formula():
    """Update t mixes in the weight with 1 - d, d = min(decay, (1 + t) / (10 + t)): 2/11 at the first update."""
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = Ema([weight], decay=0.9)
    with torch.no_grad():
        weight.copy_(torch.tensor([3.0, 0.0]))
    ema.update()
    d1 = 2 / 11
    # fp32 against float64 arithmetic of two products and a sum: a rounding or two of the largest value (9e-8 measured).
    assert_close_to_scale(ema.shadow[0], torch.tensor([d1 * 1 + (1 - d1) * 3, d1 * 2]), rtol=1e-6)
    ema.updates = 1000  # long past the warm-up: the decay is the one asked for
    ema.update()
    assert_close_to_scale(ema.shadow[0], torch.tensor([0.9 * (d1 + (1 - d1) * 3) + 0.1 * 3, 0.9 * d1 * 2]), rtol=1e-6)


def test_ema_of_a_lora_growing_from_zero_keeps_its_strength():
    """A weight that grows from 0 to 1 over 1000 updates, as a LoRA's zero-initialised `up` does, averaged with
    decay 0.999: the EMA ends within 10 % of it (without the warm-up it would keep 0.37 of its zero start)."""
    weight = torch.nn.Parameter(torch.zeros(1))
    ema = Ema([weight], decay=0.999)
    for t in range(1, 1001):
        with torch.no_grad():
            weight.fill_(1 - (1 - t / 1000) ** 2)  # fast at first, then levelling off
        ema.update()
    assert ema.shadow[0].item() >= 0.9 * weight.item()


def test_ema_starts_from_the_resumed_weights(tiny_model_dir, tmp_path):
    """Resuming with an EMA from a checkpoint that has none starts the average at the resumed weights, not at the
    fresh LoRA's zeros: resumed at the last step, the EMA file equals the LoRA file."""
    data = REPO_ROOT / "examples" / "dataset"
    run(tiny_model_dir, tmp_path / "plain", data)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "plain" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    run(tiny_model_dir, tmp_path / "resumed", data, "--ema_decay", "0.999", "--resume_from_checkpoint", "latest",
        "--resume_despite_changes", "true")
    live = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    ema = load_file(str(tmp_path / "resumed" / EMA_FILE_NAME))
    assert any(live[k].abs().sum() > 0 for k in live if "lora_up" in k)
    assert all(torch.equal(ema[k], live[k]) for k in live)


def test_ema_file_is_written_and_survives_resume(tiny_model_dir, tmp_path):
    """With ema_decay the run writes pytorch_lora_weights_ema.safetensors, different from the live weights,
    and a resumed run's EMA file equals the uninterrupted run's bitwise."""
    data = REPO_ROOT / "examples" / "dataset"
    run(tiny_model_dir, tmp_path / "ref", data, "--ema_decay", "0.9")
    live = load_file(str(tmp_path / "ref" / "pytorch_lora_weights.safetensors"))
    ema = load_file(str(tmp_path / "ref" / EMA_FILE_NAME))
    assert ema.keys() == live.keys() and any(not torch.equal(ema[k], live[k]) for k in live)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "ref" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run(tiny_model_dir, tmp_path / "resumed", data, "--ema_decay", "0.9", "--resume_from_checkpoint", "latest")
    resumed = load_file(str(tmp_path / "resumed" / EMA_FILE_NAME))
    assert all(torch.equal(resumed[k], ema[k]) for k in ema)


def test_text_encoder_learning_rate_gets_its_own_group(tiny_model_dir, text_encoder):
    """With a text-encoder LoRA the optimizer has a UNet group at learning_rate and a text-encoder group at
    text_encoder_lr, covering every LoRA weight once."""
    from diffusers import UNet2DConditionModel

    from lora_diffusion import inject_trainable_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    network = inject_trainable_lora(unet, text_encoder=text_encoder)
    cfg = train_lora.parse_config(["--learning_rate", "1e-4", "--text_encoder_lr", "5e-5"])
    optimizer = train_lora.make_optimizer(cfg, network)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-4, 5e-5]
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in network.parameters())
    assert len(optimizer.param_groups[1]["params"]) == 2 * 8  # 2 layers x 4 projections, down and up


def test_all_targets_train_feed_forward_and_1x1_projections(tiny_model_dir, tmp_path):
    """lora_targets all adds feed-forward and proj_in/proj_out (1x1 conv, 4-D weights) to the file."""
    final = run(tiny_model_dir, tmp_path / "out", REPO_ROOT / "examples" / "dataset", "--lora_targets", "all",
                "--max_train_steps", "2")
    tensors = load_file(str(final))
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
    assert tensors[proj_in].dim() == 4 and tensors[proj_in].shape[2:] == (1, 1)
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2.lora_up.weight" in tensors
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj.alpha" in tensors


def test_a_split_trigger_word_and_too_few_pictures_are_said_at_start(tmp_path, capsys):
    """A trigger word the tokenizer cuts into pieces is named with its pieces, a one-token word is not, and a
    dataset of fewer than 3 pictures gets a warning naming its folder and the risk; 3 pictures get none."""
    from types import SimpleNamespace
    from transformers import CLIPTokenizer
    from sdlora.training_data import report_trigger_and_image_count

    tokenizer = CLIPTokenizer.from_pretrained(REPO_ROOT / "models" / "tiny-sd-world", subfolder="tokenizer")
    two = shaped_dataset(tmp_path / "two", {"a.png": (64, 64), "b.png": (64, 64)})
    report_trigger_and_image_count(SimpleNamespace(trigger_phrase="sks zqxw", dataset_path=str(two)),
                                   CustomDataset(two, resolution=64), tokenizer)
    said = capsys.readouterr().out
    assert "'zqxw' is 4 tokens" in said and "word 'sks'" not in said
    assert f"2 training image(s) in {two}" in said and "fewer than 3" in said
    three = shaped_dataset(tmp_path / "three", {f"{i}.png": (64, 64) for i in range(3)})
    report_trigger_and_image_count(SimpleNamespace(trigger_phrase="sks", dataset_path=str(three)),
                                   CustomDataset(three, resolution=64), tokenizer)
    assert capsys.readouterr().out == ""
