"""Helpers shared by several test files (no test file imports another): attention inputs, the
small trainer config, run control, and loading a config file as a module. Topical helpers live
beside them: hf_models.py (transformers oracles), fault_config.py (the fault-injection config),
real_model.py (SmolLM2), bench_scripts.py (running bench/)."""
import importlib.util
import os

import jax.numpy as jnp
import numpy as np

from tests.fault_config import tiny_config_with

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- attention inputs --------------------------------------------------------------------------


def make_inputs(rng, b=2, l=32, h=4, kh=4, d=8, dtype=jnp.float32):
  """q [B, L, H, D], k and v [B, L, K, D], standard normal."""
  q = jnp.asarray(rng.normal(size=(b, l, h, d)), dtype)
  k = jnp.asarray(rng.normal(size=(b, l, kh, d)), dtype)
  v = jnp.asarray(rng.normal(size=(b, l, kh, d)), dtype)
  return q, k, v


def random_segments(rng, b, l):
  """Documents of random lengths (crossing every chunk boundary) followed by padding."""
  rows = []
  for _ in range(b):
    n_pad = int(rng.integers(0, l // 4))
    cuts = np.sort(rng.choice(np.arange(1, l - n_pad), size=3, replace=False))
    row = np.searchsorted(cuts, np.arange(l), side="right") + 1
    row[l - n_pad:] = 0
    rows.append(row)
  return jnp.asarray(np.stack(rows), jnp.int32)


# ---- the trainer -------------------------------------------------------------------------------

SMALL = {
    "data.source.num_examples": 24, "data.source.min_tokens": 32, "data.source.max_tokens": 300,
    "data.window": 16, "train.log_every": 1, "checkpoint.every_steps": 2,
    "checkpoint.async_save": True,
    "stages.short.data.max_len": 128, "stages.short.train.steps": 3,
    "stages.long.data.max_len": 256, "stages.long.train.steps": 3,
}
SMALL_FLAGS = [f"--config.{k}={v}" for k, v in SMALL.items()]


def tiny_config(overrides=None):
  """configs/tiny.py made small (SMALL), with `overrides` ({"dotted.key": value})."""
  return tiny_config_with({**SMALL, **(overrides or {})})


def stop_after(steps):
  """A hook that stops the run (with a checkpoint, as SIGTERM does) after `steps` steps of this
  call, across stages."""
  from longctx.train.hooks import Hook
  count = [0]

  def fn(ctx):
    count[0] += 1
    if count[0] >= steps:
      ctx.request_stop()
  return Hook("stop_after", fn, every=1, needs_state=True, at_end=True)


def losses(workdir, stage):
  """[(step, loss)] of a stage's metrics.jsonl."""
  from longctx.train.metrics import read_metrics
  return [(r["step"], r["loss"]) for r in read_metrics(os.path.join(workdir, stage))
          if "loss" in r]


def config_module(path):
  """A config file (configs/NAME.py) loaded as a module."""
  name = os.path.basename(path)[:-3]
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
