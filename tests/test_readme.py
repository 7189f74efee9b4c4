"""The README documents what the scripts accept, and .ci/run runs the README's test commands."""

import re

import generate
import train_lora
from conftest import REPO_ROOT


def test_every_constant_is_in_the_readme_table():
    """Each constant of train_lora.py and generate.py has a row `| `name` |` in the README."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    missing = [name for module in (train_lora, generate) for name in module.CONFIG_NAMES
               if f"| `{name}` |" not in readme]
    assert not missing, f"README lacks rows for {missing}"


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
