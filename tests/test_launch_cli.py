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


@pytest.mark.matrix
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
    (["--config=configs/none.py", "--config.train.steps=3"],
     "longctx: --config=configs/none.py: expected a config file"),
], ids=["typo", "unknown", "stage_typo", "bad_value", "missing_file", "missing_file_override"])
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


@pytest.mark.slow
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


def _help(module, *args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", module, *args, "--help"], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=300, check=False)


@pytest.mark.matrix
@pytest.mark.parametrize("module, args, shown", [
    ("longctx.plan", [], ["--max_len", "--num_devices", "(default: '0.9')"]),
    ("longctx.data", ["inspect"], ["--max_batches", "(default: '0/1')"]),
    ("longctx.convert", ["to-hf"], ["--max_shard_size", "--base_only", "--no_progress",
                                    "(default: 5GB)"]),
    ("longctx.convert", ["to-peft"], ["--modules_to_save", "--base_model", "(default: None)"]),
    ("longctx.eval", ["perplexity"], ["--attention {dense,tiled,context_parallel}",
                                      "--strategy {ring,all_gather,ulysses}", "--max_windows",
                                      "(default: tiled)"]),
], ids=["plan", "data", "convert_to_hf", "convert_to_peft", "eval"])
def test_every_command_helps_with_its_flags_spelled_one_way(module, args, shown):
  """`--help` of each command exits 0 and shows each option, underscored, with its default."""
  result = _help(module, *args)
  assert result.returncode == 0, result.stderr[-2000:]
  text = " ".join(result.stdout.split())
  for item in shown:
    assert item in text, (item, result.stdout[-3000:])
  dashed = [w for w in text.split() if w.startswith("--") and "-" in w[2:].split("=")[0]]
  assert not dashed, dashed


def test_old_dashed_flags_still_work_with_a_note(capsys):
  """Flags spelled before the one spelling (`--max-shard-size`, plan's `--max-len`) are read as
  the new ones, and the note names the new spelling."""
  from longctx import convert
  from longctx.cli import old_spellings, respell
  argv = respell(["to-hf", "ckpt", "out", "--max-shard-size", "30KB", "--base-only",
                  "--no-progress"], convert._OLD)
  args = convert._parser().parse_args(argv)
  assert (args.max_shard_size, args.base_only, args.no_progress) == (30_000, True, True)
  err = capsys.readouterr().err
  assert "note: --max-shard-size is now spelled --max_shard_size" in err
  assert "note: --no-progress is now spelled --no_progress" in err
  assert respell(["--max-len=H100", "--json"], old_spellings("--max_len")) == [
      "--max_len=H100", "--json"]
