"""The README's Quickstart is the contract: exactly two commands, and CI runs the second."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_quickstart_has_exactly_two_commands_that_pin_torch():
    commands = quickstart_commands()
    assert len(commands) == 2
    for command in commands:
        assert "pip install torch==2.13.0" in command
        assert command.index("torch==2.13.0") < command.index("pip install -e")
    assert commands[0].endswith("bitnet158 demo")


def test_ci_runs_quickstart_command_two_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quickstart_commands()[1] in ci
