"""The launcher as a newcomer meets it: a mistyped key, a bad value, a missing config file and bad
data each end in one line naming it with exit status 2 (bad data before any compile), `--debug`
keeps the traceback, `--help` exits 0 with every flag and its default, `keys` lists the config."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args, cwd=ROOT):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "longctx.launch", *args], capture_output=True,
                        text=True, cwd=cwd, env=env, timeout=300, check=False)


@pytest.mark.parametrize("args, message", [
    (["--config.train.learning_rat=1e-4"],
     "longctx: unknown config key train.learning_rat (did you mean train.learning_rate?); list "
     "the keys: python -m longctx.launch keys [--config=FILE]"),
    (["--config.nonexistent_key=1"], "longctx: unknown config key nonexistent_key; list the keys"),
    (["--config.stages.short.train.stepz=3"],
     "longctx: unknown config key stages.short.train.stepz (did you mean "
     "stages.short.train.steps?)"),
    (["--config.train.steps=abc"],
     "longctx: config key train.steps: expected int, found 'abc'"),
    (["--config=configs/none.py"],
     "longctx: --config=configs/none.py: expected a config file (e.g. configs/tiny.py), found "
     "nothing there"),
], ids=["typo", "unknown", "stage_typo", "bad_value", "missing_file"])
def test_a_bad_flag_is_one_line_and_exit_2(args, message):
  result = launch(*args)
  assert result.returncode == 2, result.stderr[-2000:]
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith(message), line


def test_help_exits_0_with_every_flag_and_default_and_keys_lists_the_config():
  result = launch("--help")
  assert result.returncode == 0, result.stderr[-2000:]
  for flag in ("--config", "--workdir", "--[no]debug", "--[no]preflight", "(default: 'true')",
               "python -m longctx.launch keys"):
    assert flag in result.stdout, flag
  result = launch("keys", "--config=configs/tiny_passkey.py")
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert "train.learning_rate = 0.003  (float)" in lines, lines[:20]
  assert "stages.ntk.train.learning_rate = 0.001  (float)" in lines


def test_bad_data_is_one_line_before_the_memory_plan(tmp_path):
  """A malformed JSONL line: the DataError's own message (file:line), exit 2, before the
  pre-flight compiles anything; with --debug the traceback."""
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "a fine document"}\n{"text": broken\n' * 4)
  args = [f"--workdir={tmp_path / 'run'}", "--config.data.source.kind=jsonl",
          f"--config.data.source.paths={bad}", "--config.stage_order=short"]
  result = launch(*args)
  assert result.returncode == 2, result.stderr[-2000:]
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith(f"longctx: error: {bad}:2: expected one valid JSON object, found invalid "
                         "JSON") and line.endswith("(--debug shows the traceback)"), line
  assert "memory plan" not in result.stdout, result.stdout  # refused before the pre-flight
  debug = launch(*args, "--debug")
  assert debug.returncode != 0 and "Traceback" in debug.stderr
  assert "DataError" in debug.stderr
