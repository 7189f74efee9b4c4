"""The README documents what the scripts accept."""

import generate
import train_lora
from conftest import REPO_ROOT


def test_every_constant_is_in_the_readme_table():
    """Each constant of train_lora.py and generate.py has a row `| `name` |` in the README."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    missing = [name for module in (train_lora, generate) for name in module.CONFIG_NAMES
               if f"| `{name}` |" not in readme]
    assert not missing, f"README lacks rows for {missing}"


def test_ci_runs_the_readme_test_command():
    """.ci/run runs the same pytest command the README gives users."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest -q tests" in readme and "python -m pytest -q tests" in ci
