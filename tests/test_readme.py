"""README.md's two commands are the project's contract: CI must run exactly the second one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_two_commands_and_ci_runs_the_second() -> None:
    commands = readme_commands()
    assert len(commands) >= 2
    ci_script = (ROOT / ".ci/run").read_text().splitlines()
    ci_lines = [line for line in ci_script if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [commands[1]]


def test_readme_installs_cpu_torch_first() -> None:
    for command in readme_commands()[:2]:
        assert command.startswith("pip install torch==2.13.0 && ")
