"""The README and docs/options.md document what the repository holds and what the scripts accept, and .ci/run
runs the README's test commands."""

import re
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


def commands(lines: list[str]) -> list[str]:
    """The shell commands of `lines`: comments (a `#` at the start or after a space) and blank lines dropped."""
    return [command for line in lines if (command := re.sub(r"(^|\s)#.*", "", line).strip())]


def test_ci_runs_the_readme_test_block():
    """.ci/run runs every command of the README's test block (the bash block holding the pytest command), in the
    same order: the Chromium install and the pip install + pytest line the README gives users."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [block for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
              if "python -m pytest -q tests" in block]
    assert len(blocks) == 1, f"the README needs one bash block with the test command, has {len(blocks)}"
    readme_commands = commands(blocks[0].splitlines())
    assert readme_commands[-1] == "pip install -r requirements.txt -r requirements-dev.txt && python -m pytest -q tests"
    assert any("apt-get install -y chromium" in command for command in readme_commands), readme_commands
    ci_commands = commands((REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines())
    missing = [command for command in readme_commands if command not in ci_commands]
    assert not missing, f".ci/run lacks the README's {missing}"
    positions = [ci_commands.index(command) for command in readme_commands]
    assert positions == sorted(positions), f".ci/run runs the README's commands in another order: {ci_commands}"
