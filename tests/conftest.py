"""Shared fixtures: a tiny random SD 1.x model written once per test session, in diffusers layout; and a
flat-colour dataset of given image sizes."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental download fails at once instead of hanging
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from sdlora.tiny_model import build_tiny_sd  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rtol: float,
                          scale: torch.Tensor | float | None = None) -> None:
    """Every element of `actual` within rtol x scale of `expected`; scale = max |expected| unless given.

    Float rounding grows with the magnitude of the numbers a result is summed from, which the tensor's largest value
    stands for, not with each element: a per-element rtol asks near-exactness of elements near zero, and an absolute
    atol means another thing for values of 1e-3 and of 1e3. So rtol counts roundings (fp32's eps is 1.2e-7, fp64's
    2.2e-16), which another processor's summation order or FMA changes in number, not in size."""
    scale = expected.abs().max().item() if scale is None else float(scale)
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale)


def shaped_dataset(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """One flat image per {file name: (width, height)}, each with a caption, in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        Image.new("RGB", size, (120, 60, 30)).save(root / name)
        (root / name).with_suffix(".txt").write_text(f"a photo of {name}, red, square, small", encoding="utf-8")
    return root


def randomize_up(network, seed: int = 1, std: float = 0.1) -> None:
    """Stand-in for training: every layer's up weights drawn from N(0, std^2) with a generator seeded by `seed`
    (layers in the network's order), so every layer has a non-zero delta."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in network.layers.values():
            layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=generator) * std)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture
def sd1_layout_unet() -> UNet2DConditionModel:
    """SD 1.x's block layout (4 levels, 2 layers per block, attention in 3 down and 3 up levels) at tiny widths,
    the layout AUTOMATIC1111's fixed block numbering assumes."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 8, 16, 16),
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32, attention_head_dim=4,
    ).eval()


@pytest.fixture
def unet(tiny_model_dir) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()


@pytest.fixture
def text_encoder(tiny_model_dir) -> CLIPTextModel:
    return CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder").eval()


@pytest.fixture
def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents 2x4x8x8, timesteps, caption embeddings 2x77x32) from a fixed seed."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; each test's main() must be free to pick its own precision."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def pytest_sessionfinish(session, exitstatus):
    """No file the suite wrote may hold a non-finite tensor: scan every .safetensors under the test temp folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    checked, bad = 0, []
    for path in Path(factory.getbasetemp()).rglob("*.safetensors"):
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError):
            continue  # planted unreadable files (a pickle, a truncated checkpoint) are refused elsewhere
        checked += 1
        bad += [f"{path}:{k}" for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    session.config.finite_scan = (checked, bad)
    if bad:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    checked, bad = getattr(config, "finite_scan", (0, []))
    terminalreporter.write_line(f"non-finite scan: {checked} safetensors files written by the suite, "
                                f"{len(bad)} with a non-finite tensor {bad[:3] if bad else ''}")
