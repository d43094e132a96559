"""What commit c0e0a78 wrote still reads, evaluates and resumes (tests/fixtures/compat_c0e0a78:
its README says how it was made). The fixture is a recipe spelled as c0e0a78 spelled it
(attention impl and kernel "blockwise"), its command-line flags, the workdir its launcher wrote
(stage `short` done, `long` stopped by SIGTERM at step 5 with a checkpoint) and a passkey cache.
A change of config keys, enum spellings or file formats must keep these passing: old spellings
still parse, old files still read, an old run resumes where it stopped.

Every test works on a copy in tmp_path: the committed fixture is never written.
"""
import functools
import json
import math
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from longctx.attention.kernels.base import Kernel
from longctx.attention.spec import AttentionImpl
from longctx.checkpoint import manager as ckpt
from longctx.checkpoint.params import load_params
from longctx.eval.__main__ import main as eval_main
from longctx.model.config import ModelConfig
from longctx.train import checks, loop
from longctx.train.config import read_stages
from tests.helpers import ROOT, config_module, losses

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "compat_c0e0a78")


def _copy(tmp_path) -> str:
  """A writable copy of the fixture."""
  return shutil.copytree(FIXTURE, tmp_path / "fixture")


def _flags(name: str) -> list[str]:
  """The command-line flags the fixture was made with: "launch" or "passkey"."""
  with open(os.path.join(FIXTURE, "commands.json")) as f:
    return json.load(f)[name]


def _recipe_config(fixture: str) -> ml_collections.ConfigDict:
  """The recipe with its launch flags applied, each value read as the type of the recipe's value
  there, as the launcher's flag parser does (the flags hold ints and strings only)."""
  config = config_module(os.path.join(fixture, "recipe.py")).get_config()
  for flag in _flags("launch"):
    key, value = flag.removeprefix("--config.").split("=", 1)
    current = functools.reduce(lambda c, k: c[k], key.split("."), config)
    config.update_from_flattened_dict({key: type(current)(value)})
  return config


def _saved_step(workdir: str, stage: str) -> int:
  return max(int(d) for d in os.listdir(os.path.join(workdir, stage, "checkpoints"))
             if d.isdigit())


def test_saved_config_reads_as_the_recipe(tmp_path):
  """config.json (the whole config, as c0e0a78 wrote it) reads into the same stages as the
  recipe with its flags; the old spellings parse to the kinds they meant; the launcher's check
  accepts the workdir for this recipe; final/'s model_config.json is the stage's model."""
  fixture = _copy(tmp_path)
  workdir = os.path.join(fixture, "workdir")
  config = _recipe_config(fixture)
  with open(os.path.join(workdir, "config.json")) as f:
    saved = ml_collections.ConfigDict(json.load(f))
  short, long = read_stages(config)
  assert read_stages(saved) == [short, long]
  for stage, tile, theta in ((short, 64, 10000.0), (long, 128, 500000.0)):
    assert stage.attention.impl is AttentionImpl("blockwise"), stage.attention
    assert stage.attention.kernel is Kernel("blockwise"), stage.attention
    assert (stage.attention.tiles.block_q, stage.attention.tiles.block_k) == (tile, tile)
    assert stage.model.rope.theta == theta and stage.model.hidden_size == 16
  checks.check_workdir(workdir, config)  # raises ConfigMismatchError on a key it reads otherwise
  # the recipe respelled in today's names (docs/DESIGN.md, "Glossary") trains the same config
  renamed = _recipe_config(fixture)
  for section in (renamed.attention, renamed.stages.long.attention):
    section.impl, section.kernel = "tiled", "xla"
  checks.check_workdir(workdir, renamed)
  final = os.path.join(workdir, "short", "final")
  assert ckpt.is_complete(final) and not ckpt.is_complete(os.path.join(workdir, "long", "final"))
  assert ModelConfig.from_directory(final) == short.model
  model, params = load_params(final)
  assert model == short.model and params["embed_tokens"].shape == (260, 16)


def test_final_weights_evaluate(tmp_path):
  """`longctx.eval perplexity` reads short/final and gives a finite perplexity, no better than
  certain and no worse than a few times uniform over the 260 byte ids (4 steps of training)."""
  fixture = _copy(tmp_path)
  text = tmp_path / "text.txt"
  text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
  out = tmp_path / "ppl.json"
  assert eval_main(["perplexity", f"--checkpoint={fixture}/workdir/short/final",
                    f"--data={text}", "--lengths=64", "--stride=64", "--max_windows=2",
                    f"--out={out}"]) == 0
  report = json.loads(out.read_text())
  assert [r["windows"] for r in report["results"]] == [2]
  ppl = report["results"][0]["ppl"]
  assert math.isfinite(ppl) and 1 < ppl < 3 * 260, report


def test_passkey_cache_is_reused(tmp_path):
  """The passkey command, rerun with the fixture's flags, takes every trial from the cache that
  c0e0a78 wrote: its run record (attention "blockwise", the model's RoPE) still matches
  (eval.common.check_run_file), so nothing is generated again. The record's checkpoint path is
  where the fixture was made; it is pointed at the copy, as for a directory that never moved."""
  fixture = _copy(tmp_path)
  final = os.path.join(fixture, "workdir", "short", "final")
  run_file = os.path.join(fixture, "eval", "passkey.run.json")
  with open(run_file) as f:
    run = json.load(f)
  with open(run_file, "w") as f:
    json.dump({**run, "checkpoint": final}, f)
  trials = os.path.join(fixture, "eval", "passkey.trials.jsonl")
  with open(trials) as f:
    cached = f.read()
  with open(os.path.join(fixture, "eval", "passkey.json")) as f:
    before = json.load(f)
  out = os.path.join(fixture, "eval", "passkey.json")
  assert eval_main(["passkey", f"--checkpoint={final}", *_flags("passkey"), f"--out={out}"]) == 0
  with open(trials) as f:
    assert f.read() == cached  # no trial was run again
  with open(out) as f:
    after = json.load(f)
  assert after["results"] == before["results"] and after["accuracy"] == before["accuracy"]


@pytest.mark.slow
def test_stopped_run_resumes_with_the_same_command(tmp_path):
  """`python -m longctx.launch` with the fixture's recipe and flags skips the finished `short`,
  resumes `long` from its step-5 checkpoint (train state and data position) and finishes it.
  An uninterrupted run of the same config (here, in this process) has the same losses: c0e0a78's
  for the steps it ran, and the resumed run's for the rest."""
  fixture = _copy(tmp_path)
  workdir = os.path.join(fixture, "workdir")
  stopped = _saved_step(workdir, "long")
  config = _recipe_config(fixture)
  steps = config.stages.long.train.steps
  assert 0 < stopped < steps
  result = subprocess.run([sys.executable, "-m", "longctx.launch",
                           f"--config={fixture}/recipe.py", f"--workdir={workdir}",
                           *_flags("launch")], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "[short] done earlier" in result.stdout, result.stdout[-3000:]
  assert f"[long] resumed at step {stopped}" in result.stdout, result.stdout[-3000:]
  assert "[long] done:" in result.stdout, result.stdout[-3000:]
  assert ckpt.is_complete(os.path.join(workdir, "long", "final"))
  saved_long = losses(os.path.join(FIXTURE, "workdir"), "long")
  resumed_long = losses(workdir, "long")
  assert [s for s, _ in resumed_long] == list(range(1, steps + 1))
  assert resumed_long[:stopped] == saved_long  # c0e0a78's records kept as they were
  fresh = str(tmp_path / "fresh")
  loop.run(_recipe_config(fixture), fresh, log=lambda *_: None, preflight=False)
  for stage, run in (("short", os.path.join(FIXTURE, "workdir")), ("long", workdir)):
    a, b = losses(fresh, stage), losses(run, stage)
    assert [s for s, _ in a] == [s for s, _ in b], stage
    np.testing.assert_allclose([x for _, x in b], [x for _, x in a], rtol=0, atol=1e-6,
                               err_msg=stage)
