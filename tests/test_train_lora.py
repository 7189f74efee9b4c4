"""train_lora.py: configuration, refusals, and train -> checkpoint -> resume -> final file on the tiny model."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora import attention
from sdlora import cpu_kernels, loading
import train_lora
from sdlora.checkpoints import STATE_JSON
from sdlora.loading import load_unet
from sdlora.training_step import SampleRandomness, diffusion_loss
from conftest import REPO_ROOT, assert_close_to_scale
from sdlora.settings import ConfigError


def config(tiny_model_dir, output_dir, *extra: str):
    """A fast configuration on the tiny model and the bundled example images."""
    return train_lora.parse_config([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_path", str(REPO_ROOT / "examples/dataset"),
        "--output_dir", str(output_dir), "--resolution", "64", "--rank", "4", "--alpha", "2",
        "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
        "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--sample_steps", "0",
        "--sample_inference_steps", "2", "--center_crop", "false", "--random_flip", "true", *extra,
    ])


def test_flags_override_constants_and_booleans_parse_explicitly():
    """Every constant has a same-named flag; 'false' really means False; untouched constants keep their value."""
    cfg = train_lora.parse_config(["--learning_rate", "5e-5", "--center_crop", "false", "--rank", "16",
                                   "--sample_prompts", "a", "b c"])
    assert cfg.learning_rate == 5e-5 and cfg.center_crop is False and cfg.rank == 16
    assert cfg.sample_prompts == ("a", "b c")
    assert cfg.alpha == train_lora.alpha and cfg.output_dir == train_lora.output_dir
    assert set(train_lora.CONFIG_NAMES) >= {"pretrained_model_name_or_path", "resolution", "train_batch_size",
                                            "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                                            "checkpoints_total_limit", "resume_from_checkpoint", "mixed_precision",
                                            "lr_scheduler", "lr_warmup_steps", "seed", "output_dir", "rank", "alpha",
                                            "dataset_path", "learning_rate"}
    with pytest.raises(SystemExit):
        train_lora.parse_config(["--center_crop", "maybe"])


@pytest.mark.parametrize("flags, message", [
    (["--mixed_precision", "fp8"], "--mixed_precision 'fp8'"),
    (["--resolution", "500"], "--resolution 500"),
    (["--lr_scheduler", "cosine_annealing"], "--lr_scheduler"),
    (["--rank", "0"], "--rank 0"),
    (["--caption_extension", "txt"], "include the dot"),
    (["--optimizer", "sgd"], "--optimizer 'sgd': choose one of adamw, adamw8bit"),
    (["--optimizer", "prodigy"], "set --learning_rate 1.0"),
    (["--lora_targets", "everything"], "--lora_targets 'everything'"),
    (["--caption_dropout", "1.5"], "--caption_dropout 1.5"),
    (["--validation_loss_steps", "-2"], "--validation_loss_steps -2: step counts"),
])
def test_bad_settings_are_refused_naming_the_option(tiny_model_dir, tmp_path, flags, message):
    """A setting that cannot work is refused before anything is written, naming the flag."""
    with pytest.raises(ConfigError, match=message):
        train_lora.main(config(tiny_model_dir, tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


def test_missing_model_is_refused_before_any_work(tmp_path):
    """A base model that is neither a folder nor a reachable hub id stops the run with the fix, writing nothing."""
    cfg = config(tmp_path / "no-such-model", tmp_path / "out")
    with pytest.raises(ConfigError, match="neither an existing folder nor a hub id"):
        train_lora.main(cfg)
    (tmp_path / "half").mkdir()
    with pytest.raises(ConfigError, match="unet/ is missing; vae/ is missing"):
        train_lora.main(config(tmp_path / "half", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_offline_hub_id_is_refused_with_download_hint(tmp_path, monkeypatch):
    """Offline (HF_HUB_OFFLINE=1) and not cached: the message says how to get the model."""
    cfg = config(tmp_path, tmp_path / "out")
    cfg.pretrained_model_name_or_path = "someone/not-cached-model"
    with pytest.raises(ConfigError, match="hf download someone/not-cached-model"):
        train_lora.main(cfg)


def test_resume_with_nothing_to_resume_is_refused(tiny_model_dir, tmp_path):
    """--resume_from_checkpoint latest with no checkpoint refuses instead of silently starting over."""
    with pytest.raises(ConfigError, match="no valid checkpoint in"):
        train_lora.main(config(tiny_model_dir, tmp_path / "out", "--resume_from_checkpoint", "latest"))


def test_user_mistake_prints_one_line_without_traceback(tmp_path):
    """From the command line, a user mistake exits non-zero with 'error: ...' and no traceback."""
    result = subprocess.run([sys.executable, "train_lora.py", "--dataset_path", str(tmp_path / "missing"),
                             "--pretrained_model_name_or_path", str(tmp_path / "missing-model")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "error: pretrained_model_name_or_path" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory):
    """One uninterrupted 6-step run (checkpoints every 2 steps, last 2 kept), with samples at the end."""
    output = tmp_path_factory.mktemp("reference")
    cfg = config(tiny_model_dir, output, "--sample_prompts", "a photo of a cat")
    return train_lora.main(cfg), output


def test_run_writes_final_file_checkpoints_samples_and_report(reference_run):
    """The final LoRA file, the newest checkpoints only, samples, config and data report are where promised."""
    final, output = reference_run
    assert final == output / "pytorch_lora_weights.safetensors" and final.is_file()
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert (output / "samples" / "step000006-00.png").is_file() and (output / "samples" / "step000006-grid.png").is_file()
    assert json.loads((output / "data_report.json").read_text())["usable"] == 4
    assert json.loads((output / "config.json").read_text())["rank"] == 4


def test_final_file_carries_its_metadata_and_fp32_weights(reference_run):
    """The file says its rank, alpha, targets, base model, resolution and step, and its tensors are finite fp32."""
    final, _ = reference_run
    with safe_open(str(final), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert metadata["rank"] == "4" and metadata["alpha"] == "2.0" and metadata["step"] == "6"
    assert metadata["resolution"] == "64" and metadata["targets"] == "to_q,to_k,to_v,to_out.0"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_num_train_images"] == "4"
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert all(t.abs().sum() > 0 for t in ups), "every up weight must have trained away from zero"


def test_resume_from_checkpoint_finishes_bitwise_identical(reference_run, tiny_model_dir, tmp_path):
    """Resuming from a mid-run checkpoint (mid-epoch, with random crops and flips) gives the same LoRA bitwise."""
    final, output = reference_run
    resumed_output = tmp_path / "resumed"
    resumed_output.mkdir()
    shutil.copytree(output / "checkpoint-4", resumed_output / "checkpoint-4")
    cfg = config(tiny_model_dir, resumed_output, "--resume_from_checkpoint", "latest", "--sample_prompts")
    resumed = load_file(str(train_lora.main(cfg)))
    reference = load_file(str(final))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_two_runs_with_the_same_seed_are_identical(reference_run, tiny_model_dir, tmp_path):
    """Same seed, same data, same config: bitwise identical LoRA files."""
    final, _ = reference_run
    again = load_file(str(train_lora.main(config(tiny_model_dir, tmp_path / "again", "--sample_prompts"))))
    assert all(torch.equal(again[k], v) for k, v in load_file(str(final)).items())


def test_bf16_with_text_encoder_lora_trains_fp32_weights(tiny_model_dir, tmp_path, monkeypatch):
    """bf16 mixed precision with text-encoder LoRA: finite loss, fp32 LoRA weights, lora_te_ keys trained; on
    a CPU whose fp32 attention is timed faster, every UNet attention layer takes its product in fp32."""
    monkeypatch.setattr(cpu_kernels, "attention_timings", lambda dtype: (0.5, 1.0))
    monkeypatch.setattr(cpu_kernels, "kernel_timings", lambda dtype: (1.0, 0.5))
    upcast = []
    monkeypatch.setattr(cpu_kernels, "use_fp32_attention",
                        lambda unet: upcast.append(attention.use_fp32_attention(unet)))
    cfg = config(tiny_model_dir, tmp_path / "bf16", "--mixed_precision", "bf16", "--train_text_encoder", "true",
                 "--max_train_steps", "2", "--checkpointing_steps", "0", "--sample_prompts")
    tensors = load_file(str(train_lora.main(cfg)))
    assert len(upcast) == 3 and upcast[:2] == [0, 0] and upcast[2] > 0  # the VAE's and text encoder's are no plain SD
    # attention layers, so only the UNet's change
    te_ups = [t for k, t in tensors.items() if k.startswith("lora_te_text_model_") and k.endswith("lora_up.weight")]
    assert len(te_ups) == 8 and all(t.dtype == torch.float32 and t.abs().sum() > 0 for t in te_ups)
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_bf16_on_a_cpu_with_slow_bf16_kernels_resumes_with_the_runs_kernel_choice(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    """Where the timing finds fp32 attention and kernels faster, the run takes them (cpu_kernels.py; MIN_POSITIONS
    lowered to reach the tiny UNet) and its checkpoints say so; a resume takes that choice even where the timing
    now says otherwise, and finishes bitwise as the uninterrupted run. A run that keeps bf16 ends elsewhere."""
    monkeypatch.setattr(cpu_kernels, "MIN_POSITIONS", 0)
    monkeypatch.setattr(cpu_kernels, "attention_timings", lambda dtype: (0.5, 1.0))
    monkeypatch.setattr(cpu_kernels, "kernel_timings", lambda dtype: (0.5, 1.0))
    flags = ("--mixed_precision", "bf16", "--max_train_steps", "4", "--sample_prompts")
    uninterrupted = tmp_path / "uninterrupted"
    reference = load_file(str(train_lora.main(config(tiny_model_dir, uninterrupted, *flags))))
    state = json.loads((uninterrupted / "checkpoint-2" / STATE_JSON).read_text())
    assert state["run_identity"]["fp32_kernels"] is True and state["run_identity"]["fp32_attention"] is True

    monkeypatch.setattr(cpu_kernels, "attention_timings", lambda dtype: (1.0, 0.5))
    monkeypatch.setattr(cpu_kernels, "kernel_timings", lambda dtype: (1.0, 0.5))
    resumed_output = tmp_path / "resumed"
    resumed_output.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-2", resumed_output / "checkpoint-2")
    resumed = load_file(str(train_lora.main(config(tiny_model_dir, resumed_output, *flags,
                                                   "--resume_from_checkpoint", "latest"))))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    in_bf16 = load_file(str(train_lora.main(config(tiny_model_dir, tmp_path / "bf16", *flags))))
    assert not all(torch.equal(in_bf16[k], reference[k]) for k in reference)


def test_bf16_on_a_cpu_where_it_crawls_is_refused_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    """--mixed_precision bf16 where the probe times bf16 hundreds of times slower than fp32 stops at start, before
    any model loads or the output folder is written, and from the command line in one line without a traceback."""
    monkeypatch.setattr(cpu_kernels, "low_precision_timings", lambda dtype: (0.047, 17.68))
    monkeypatch.setattr(train_lora, "load_encoders", lambda *args: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=r"^--mixed_precision bf16: bf16 computes 376x slower .* use --mixed_preci"):
        train_lora.main(config(tiny_model_dir, tmp_path / "out", "--mixed_precision", "bf16"))
    assert not any(path.is_file() for path in tmp_path.rglob("*"))
    patched = ("import runpy, sys; from sdlora import cpu_kernels; "
               "cpu_kernels.low_precision_timings = lambda dtype: (0.047, 17.68); "
               "sys.argv = ['train_lora.py', *sys.argv[1:]]; runpy.run_path('train_lora.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", patched, "--pretrained_model_name_or_path", str(tiny_model_dir),
                             "--output_dir", str(tmp_path / "cli"), "--mixed_precision", "bf16"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --mixed_precision bf16: bf16 computes 376x")


def test_the_vae_and_text_encoder_get_the_unets_timed_choice(tiny_model_dir, tmp_path, monkeypatch):
    """On a CPU where the timing takes the fp32 kernels and attention, the VAE and the text encoder are given the
    same choice as the UNet (one timing decides for every frozen model), and their frozen layers compute in fp32."""
    monkeypatch.setattr(cpu_kernels, "attention_timings", lambda dtype: (0.5, 1.0))
    monkeypatch.setattr(cpu_kernels, "kernel_timings", lambda dtype: (0.5, 1.0))
    given = {}

    def recorded(model, choices):
        cpu_kernels.use_fp32_choices(model, choices)
        fp32_layers = sum(type(m) in (cpu_kernels.Float32Conv2d, cpu_kernels.Float32Linear) for m in model.modules())
        given[type(model).__name__] = (choices, fp32_layers)
    monkeypatch.setattr(loading, "use_fp32_choices", recorded)
    train_lora.main(config(tiny_model_dir, tmp_path / "out", "--mixed_precision", "bf16", "--max_train_steps", "1",
                           "--checkpointing_steps", "0", "--sample_prompts"))
    chosen = {"fp32_attention": True, "fp32_kernels": True}
    assert set(given) == {"AutoencoderKL", "CLIPTextModel", "UNet2DConditionModel"}
    assert all(choices == chosen and fp32_layers > 0 for choices, fp32_layers in given.values()), given


def replayed(items: list[int], draws) -> list:
    """Re-create SampleRandomness's per-sample generators and make each sample's draws in order."""
    generators = SampleRandomness(0, 0, torch.tensor(items), torch.device("cpu")).generators
    return [draws(g) for g in generators]


def test_loss_target_is_velocity_for_v_prediction():
    """With prediction_type v_prediction the loss compares against the velocity, otherwise against the noise."""
    from diffusers import DDPMScheduler

    latents, states = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    seen = {}

    def zero_unet(noisy, timesteps, encoder_hidden_states):
        seen["t"] = timesteps
        return type("Out", (), {"sample": torch.zeros_like(noisy)})()

    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(prediction_type=prediction_type, beta_schedule="scaled_linear",
                                  beta_start=0.00085, beta_end=0.012)
        randomness = SampleRandomness(0, 0, torch.tensor([5, 9]), torch.device("cpu"))
        loss = diffusion_loss(latents, states, zero_unet, scheduler, randomness)
        draws = replayed([5, 9], lambda g: (torch.randn(4, 8, 8, generator=g), torch.randint(0, 1000, (1,), generator=g)))
        noise = torch.stack([n for n, _ in draws])
        assert torch.equal(seen["t"], torch.cat([t for _, t in draws]))
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, seen["t"])
        # A mean of 512 positive squares (no cancellation): summed pairwise, as torch sums, ~log2(512) = 9 roundings
        # of 6e-8 of its value in any order; 1e-5 allowed.
        assert_close_to_scale(loss, target.pow(2).mean(), rtol=1e-5)


def test_sample_randomness_does_not_depend_on_batch_composition():
    """A sample's draws depend on (seed, step, item) only: alone or in a batch, it gets the same noise."""
    together = SampleRandomness(3, 7, torch.tensor([4, 11]), torch.device("cpu")).randn((2, 3), torch.float32)
    alone = SampleRandomness(3, 7, torch.tensor([11]), torch.device("cpu")).randn((2, 3), torch.float32)
    assert torch.equal(together[1], alone[0]) and not torch.equal(together[0], together[1])

def test_new_run_refuses_to_overwrite_an_earlier_run(reference_run, tiny_model_dir):
    """Starting again in an output_dir that holds checkpoints refuses and points at --resume_from_checkpoint."""
    final, output = reference_run
    before = final.read_bytes()
    with pytest.raises(ConfigError, match="already holds a run .*--resume_from_checkpoint latest"):
        train_lora.main(config(tiny_model_dir, output))
    assert final.read_bytes() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unet_read_straight_into_its_dtype_equals_from_pretrained(tiny_model_dir, dtype):
    """load_unet's streamed read (no fp32 copy of the file beside the converted weights) gives the UNet
    from_pretrained gives: the same tensors bitwise, in the same dtype, frozen and in eval mode."""
    from diffusers import UNet2DConditionModel

    streamed = load_unet(str(tiny_model_dir), dtype)
    reference = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet", dtype=dtype)
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype == dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    assert not streamed.training and not any(p.requires_grad for p in streamed.parameters())
    assert not any(p.is_meta for p in streamed.parameters())
