"""The README and docs/options.md document what the repository holds and what the scripts accept."""

import subprocess

import generate
import train_lora
from conftest import REPO_ROOT


def test_every_constant_is_in_the_options_table():
    """Each constant of train_lora.py and generate.py has a row `| `name` |` in docs/options.md."""
    options = (REPO_ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    missing = [name for module in (train_lora, generate) for name in module.CONFIG_NAMES
               if f"| `{name}` |" not in options]
    assert not missing, f"docs/options.md lacks rows for {missing}"


def test_the_file_table_names_every_top_level_entry_and_module():
    """The README's file table has a row for every tracked top-level file and folder and every sdlora/ module."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    entries = {name.split("/")[0] + ("/" if "/" in name else "") for name in tracked}
    entries |= {name for name in tracked if name.startswith("sdlora/") and name.endswith(".py")
                and name != "sdlora/__init__.py"}
    missing = sorted(entry for entry in entries if f"| `{entry}` |" not in readme)
    assert not missing, f"README's file table lacks rows for {missing}"


def test_ci_runs_the_readme_test_command():
    """.ci/run runs the same pytest command the README gives users."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest -q tests" in readme and "python -m pytest -q tests" in ci
