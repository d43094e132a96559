"""`python -m longctx.data inspect` with config overrides and --json; configs/data_example.py."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_inspect_json_with_overrides():
  cmd = [sys.executable, "-m", "longctx.data", "inspect", "--config=configs/data_example.py",
         "--config.data.source.num_examples=6", "--config.data.source.max_tokens=4096",
         "--config.data.max_len=4096", "--config.data.over_length=drop", "--json"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr
  s = json.loads(out.stdout)
  assert s["counts"]["examples"] == 6
  assert s["documents"] + s["counts"]["dropped"] == 6
  assert 0 < s["non_pad_fraction"] <= 1 and s["tokens_per_s"] > 0


def test_inspect_rejects_a_mistyped_override():
  cmd = [sys.executable, "-m", "longctx.data", "inspect", "--config=configs/data_example.py",
         "--config.data.max_lenn=8"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "max_lenn" in out.stderr


def test_inspect_reads_one_epoch_of_a_repeating_source():
  """configs/tiny.py repeats its data (num_epochs=0): inspect stops after one epoch."""
  cmd = [sys.executable, "-m", "longctx.data", "inspect", "--config=configs/tiny.py",
         "--config.data.source.num_examples=5", "--config.data.source.max_tokens=512", "--json"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)["counts"]["examples"] == 5
  assert "inspecting one epoch" in out.stderr
