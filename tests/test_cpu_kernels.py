"""cpu_kernels.py: which parts of a bf16 UNet step compute in fp32 on this CPU, and the large convolutions and
matmuls in fp32 where they do."""

import json

import pytest
import torch
import torch.nn.functional as F

from sdlora import cpu_kernels
from sdlora.loading import fp32_parts_here
from sdlora.checkpoints import STATE_JSON
from sdlora.cpu_kernels import Float32Conv2d, Float32Linear, use_fp32_kernels
from sdlora.settings import ConfigError
from test_attention import output_and_lora_grads, relative_error, seeded_lora_unet


def frozen_bf16(layer: torch.nn.Module) -> torch.nn.Module:
    return layer.to(torch.bfloat16).requires_grad_(False)


def output_and_input_grad(layer, x, grad) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.backward(grad)
    return out.detach(), x.grad


def test_a_large_layer_computes_in_fp32_and_rounds_output_and_input_gradient_to_bf16():
    """Over MIN_POSITIONS positions a frozen bf16 layer gives what fp32 arithmetic on its bf16 input and weights
    gives, rounded to bf16, for its output and its input gradient alike (bitwise)."""
    torch.manual_seed(0)
    conv, linear = frozen_bf16(torch.nn.Conv2d(16, 24, 3, padding=1)), frozen_bf16(torch.nn.Linear(16, 24))
    image = torch.randn(1, 16, 32, 32, dtype=torch.bfloat16)  # 1024 positions
    rows = torch.randn(2, 512, 16, dtype=torch.bfloat16)
    assert 32 * 32 >= cpu_kernels.MIN_POSITIONS
    image_grad = torch.randn(1, 24, 32, 32, dtype=torch.bfloat16)
    rows_grad = torch.randn(2, 512, 24, dtype=torch.bfloat16)

    def exact_conv(x):
        return F.conv2d(x, conv.weight.float(), conv.bias.float(), padding=1)

    def exact_linear(x):
        return F.linear(x, linear.weight.float(), linear.bias.float())

    use_fp32_kernels(conv), use_fp32_kernels(linear)
    assert type(conv) is Float32Conv2d and type(linear) is Float32Linear
    for layer, exact, x, grad in ((conv, exact_conv, image, image_grad), (linear, exact_linear, rows, rows_grad)):
        out, x_grad = output_and_input_grad(layer, x, grad)
        x32 = x.float().requires_grad_()
        expected = exact(x32)
        expected.backward(grad.float())
        assert out.dtype == x_grad.dtype == torch.bfloat16
        assert torch.equal(out, expected.to(torch.bfloat16)) and torch.equal(x_grad, x32.grad.to(torch.bfloat16))


def test_a_small_or_trainable_layer_keeps_the_default_kernel():
    """Under MIN_POSITIONS positions, or with a weight that trains, the layer is the plain bf16 one bitwise, and a
    trainable weight still gets its gradient."""
    torch.manual_seed(0)
    conv = frozen_bf16(torch.nn.Conv2d(8, 8, 3, padding=1))
    small = torch.randn(1, 8, 16, 16, dtype=torch.bfloat16)  # 256 positions
    grad = torch.randn(1, 8, 16, 16, dtype=torch.bfloat16)
    default = output_and_input_grad(conv, small, grad)
    use_fp32_kernels(conv)
    assert all(torch.equal(a, b) for a, b in zip(output_and_input_grad(conv, small, grad), default))

    trainable = torch.nn.Linear(8, 8).to(torch.bfloat16)
    rows = torch.randn(2048, 8, dtype=torch.bfloat16)
    default = output_and_input_grad(trainable, rows, torch.ones(2048, 8, dtype=torch.bfloat16))
    trainable.weight.grad = None
    trainable.__class__ = Float32Linear  # as if swapped while frozen, then unfrozen
    ours = output_and_input_grad(trainable, rows, torch.ones(2048, 8, dtype=torch.bfloat16))
    assert all(torch.equal(a, b) for a, b in zip(ours, default)) and trainable.weight.grad is not None


def test_in_bf16_the_unet_step_stays_as_near_fp32_and_keeps_its_weights(tiny_model_dir, unet_inputs, monkeypatch):
    """Every frozen layer of the tiny UNet (MIN_POSITIONS lowered to reach it) in fp32: the output and LoRA
    gradients change (so the kernels are in the step) and stay as near the fp32 computation as bf16's, the LoRA's
    own fp32 layers are left alone, and the state dict is the same tensors under the same keys."""
    monkeypatch.setattr(cpu_kernels, "MIN_POSITIONS", 0)
    reference = output_and_lora_grads(seeded_lora_unet(tiny_model_dir, torch.float32), unet_inputs, torch.float32)
    unet = seeded_lora_unet(tiny_model_dir, torch.bfloat16)
    in_bf16 = output_and_lora_grads(unet, unet_inputs, torch.bfloat16)
    state = unet.state_dict()
    changed = use_fp32_kernels(unet)
    swapped = [m for m in unet.modules() if type(m) in (Float32Conv2d, Float32Linear)]
    assert changed == len(swapped) > 0 and all(m.weight.dtype == torch.bfloat16 for m in swapped)
    assert all(type(m) is torch.nn.Linear for m in unet.modules() if getattr(m, "weight", None) is not None
               and m.weight.requires_grad)
    in_fp32 = output_and_lora_grads(unet, unet_inputs, torch.bfloat16)

    assert not torch.equal(in_fp32[0], in_bf16[0])
    assert relative_error(in_fp32, reference) < 1.05 * relative_error(in_bf16, reference)
    assert state.keys() == unet.state_dict().keys()
    assert all(state[k] is v or torch.equal(state[k], v) for k, v in unet.state_dict().items())


def never_timed(dtype):
    raise AssertionError("the kernels were timed")


def timings(attention: tuple[float, float], kernels: tuple[float, float], monkeypatch) -> None:
    """Make the probes report these (fp32 seconds, bf16 seconds)."""
    monkeypatch.setattr(cpu_kernels, "attention_timings", lambda dtype: attention)
    monkeypatch.setattr(cpu_kernels, "kernel_timings", lambda dtype: kernels)


def test_the_choice_is_timed_only_on_the_cpu_in_low_precision(monkeypatch, tmp_path):
    """A GPU or fp32 never takes an fp32 part and never times; a resume takes the checkpoint's choice untimed;
    otherwise each part is taken in fp32 only when fp32 is faster by the margin, the two decided apart."""
    cpu, none = torch.device("cpu"), {"fp32_attention": False, "fp32_kernels": False}
    monkeypatch.setattr(cpu_kernels, "attention_timings", never_timed)
    monkeypatch.setattr(cpu_kernels, "kernel_timings", never_timed)
    assert fp32_parts_here(None, torch.device("cuda"), torch.bfloat16) == none
    assert fp32_parts_here(None, cpu, torch.float32) == none
    saved = {"fp32_attention": True, "fp32_kernels": False}
    (tmp_path / STATE_JSON).write_text(json.dumps({"run_identity": saved}))
    assert fp32_parts_here(tmp_path, cpu, torch.bfloat16) == saved
    assert fp32_parts_here(tmp_path, torch.device("cuda"), torch.bfloat16) == none

    for attention, kernels in (((0.5, 1.0), (1.0, 0.5)), ((0.95, 1.0), (0.5, 1.0)), ((1.5, 1.0), (0.9, 1.0))):
        timings(attention, kernels, monkeypatch)
        assert fp32_parts_here(None, cpu, torch.bfloat16) == {
            "fp32_attention": attention[0] <= 0.9 * attention[1], "fp32_kernels": kernels[0] <= 0.9 * kernels[1]}


def test_a_checkpoint_from_before_attention_was_timed_resumes_with_fp32_attention(monkeypatch, tmp_path):
    """A checkpoint that records only the kernel choice was written when every CPU run in bf16 took its attention
    in fp32: a resume keeps both, untimed."""
    (tmp_path / STATE_JSON).write_text(json.dumps({"run_identity": {"fp32_kernels": False}}))
    monkeypatch.setattr(cpu_kernels, "attention_timings", never_timed)
    monkeypatch.setattr(cpu_kernels, "kernel_timings", never_timed)
    assert fp32_parts_here(tmp_path, torch.device("cpu"), torch.bfloat16) == {
        "fp32_attention": True, "fp32_kernels": False}


def test_the_probes_time_both_precisions_of_sd14_shapes():
    """Each probe returns two positive times, fp32 first, and fp32_choices says what it took in one line."""
    for probe in (cpu_kernels.attention_timings, cpu_kernels.kernel_timings):
        fp32, bf16 = probe(torch.bfloat16, repeats=1)
        assert fp32 > 0 and bf16 > 0
    choices, line = cpu_kernels.fp32_choices(torch.bfloat16)
    assert set(choices) == {"fp32_attention", "fp32_kernels"}
    assert "attention fp32" in line and "large convolutions and matmuls fp32" in line


def test_use_fp32_choices_installs_what_it_is_told(tiny_model_dir):
    """Each part goes in only when chosen: attention layers get the fp32 processor, frozen layers the fp32 class."""
    from sdlora.attention import Float32AttentionProcessor

    for attention in (False, True):
        for kernels in (False, True):
            unet = seeded_lora_unet(tiny_model_dir, torch.bfloat16)
            cpu_kernels.use_fp32_choices(unet, {"fp32_attention": attention, "fp32_kernels": kernels})
            processors = {type(p) for p in unet.attn_processors.values()}
            assert (Float32AttentionProcessor in processors) is attention
            assert any(type(m) in (Float32Conv2d, Float32Linear) for m in unet.modules()) is kernels


# The AVX2-only EPYC (no avx512_bf16, no AMX) with torch 2.14.1: a 3x3 convolution, 128 channels over 128 x 128.
AVX2_ONLY_SECONDS = (0.047, 17.68)


def test_a_cpu_whose_low_precision_crawls_is_refused_naming_the_fix(monkeypatch):
    """bf16 timed more than CRAWL_RATIO times slower than fp32 stops with one line naming --mixed_precision bf16,
    the measured figures and --mixed_precision no; at CRAWL_RATIO, when one of the CONFIRMATIONS probes finds it
    fast, on a GPU and without low precision it goes on."""
    monkeypatch.setattr(cpu_kernels, "low_precision_timings", lambda dtype: AVX2_ONLY_SECONDS)
    with pytest.raises(ConfigError) as refused:
        cpu_kernels.check_cpu_precision("bf16", torch.device("cpu"))
    assert str(refused.value) == (
        "--mixed_precision bf16: bf16 computes 376x slower than fp32 on this CPU (a 3x3 convolution and a linear "
        "layer: fp32 47.0 ms, bf16 17680.0 ms; over 3x, as where bf16 instructions such as avx512_bf16 or AMX are "
        "missing), so the run would crawl; use --mixed_precision no")
    monkeypatch.setattr(cpu_kernels, "low_precision_timings", lambda dtype: (1.0, cpu_kernels.CRAWL_RATIO))
    cpu_kernels.check_cpu_precision("bf16", "cpu")
    probes = iter([AVX2_ONLY_SECONDS, AVX2_ONLY_SECONDS, (1.0, 0.5)])  # a busy moment, then the truth
    monkeypatch.setattr(cpu_kernels, "low_precision_timings", lambda dtype: next(probes))
    cpu_kernels.check_cpu_precision("bf16", "cpu")
    monkeypatch.setattr(cpu_kernels, "low_precision_timings", never_timed)
    for precision, device in (("no", "cpu"), ("bf16", "cuda"), ("fp16", torch.device("cuda"))):
        cpu_kernels.check_cpu_precision(precision, device)


def test_the_precision_probe_times_both_precisions():
    """low_precision_timings returns two positive times, fp32 first (its verdict is this machine's own)."""
    fp32, bf16 = cpu_kernels.low_precision_timings(torch.bfloat16, repeats=1)
    assert fp32 > 0 and bf16 > 0
