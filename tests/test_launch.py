"""The launch contract: README quick start, idempotent setup, CI running the test command."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_quick_start_is_two_commands_that_exist():
    text = (REPO / "README.md").read_text()
    block = re.search(r"```\w*\n(.*?)```", text, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert commands == ["bash launch/demo.sh", "bash launch/test.sh"]
    for cmd in commands:
        assert (REPO / cmd.split()[1]).is_file()
    assert "bash launch/test.sh" in (REPO / ".ci" / "run").read_text()


def test_setup_is_idempotent_and_fast_when_nothing_changed():
    proc = subprocess.run(["bash", str(REPO / "launch" / "setup.sh")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "environment up to date" in proc.stdout
