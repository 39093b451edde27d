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


def test_setup_builds_once_then_is_up_to_date(tmp_path):
    """The stamp logic of launch/setup.sh, on a throw-away venv path whose python only records
    what it is asked to do (the developer's environment is neither used nor changed)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    fake = venv / "bin" / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "LIQE_VENV": str(venv)}

    def setup():
        return subprocess.run(["bash", str(REPO / "launch" / "setup.sh")], capture_output=True, text=True,
                              timeout=60, env=env)

    first = setup()
    assert first.returncode == 0, first.stderr
    assert "building environment" in first.stdout
    installs = [line for line in calls.read_text().splitlines() if " install " in f" {line} "]
    assert any("torch torchvision" in c and "constraints.txt" in c for c in installs)
    assert any("deepspeed" in c and "--no-build-isolation" in c for c in installs)
    assert any(c.endswith(f"-e {REPO}[test]") for c in installs)
    calls.unlink()
    again = setup()
    assert again.returncode == 0 and "environment up to date" in again.stdout
    assert not calls.exists()  # nothing was run
    # a changed pin makes it rebuild
    (venv / ".liqe-dist-stamp").write_text("stale\n")
    assert "building environment" in setup().stdout
