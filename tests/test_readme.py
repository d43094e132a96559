"""README's quick start: exactly two commands, the second one is what CI runs, the first one works."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quick_start_commands():
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quick_start_has_exactly_two_commands():
  commands = _quick_start_commands()
  assert len(commands) == 2 and all("\n" not in c for c in commands), commands
  assert commands[0].endswith("python -m longctx.launch")
  assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci_lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  assert _quick_start_commands()[1] in ci_lines


@pytest.mark.slow
def test_main_job_trains():
  """The first command's job, with fewer steps to keep the suite fast: the loss falls."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "-m", "longctx.launch", "--config.stages.short.train.steps=12",
       "--config.stages.long.train.steps=2", "--config.stages.long.data.max_len=1024"],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "8 cpu devices" in result.stdout and "summary:" in result.stdout, result.stdout
  short = re.search(r"short: 12 steps, loss ([0-9.]+) -> ([0-9.]+)", result.stdout)
  assert short and float(short.group(2)) < float(short.group(1)) - 0.5, result.stdout
