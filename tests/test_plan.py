"""`python -m longctx.plan`: the abstract plan agrees with the compiled step of a real run."""
import os
import subprocess
import sys

import jax

from longctx import plan as plan_lib
from longctx.parallel.mesh import make_mesh
from longctx.train import loop
from longctx.train.config import read_stages
from longctx.train.data import GlobalBatches
from tests.test_train import ROOT, tiny_config


def test_plan_matches_the_compiled_step_of_a_real_run():
  config = tiny_config()
  stage = read_stages(config)[1]
  mesh = make_mesh({"data": 2, "seq": 4})
  planned = plan_lib.plan_stage(stage, mesh)
  # The real thing: materialised state and a real batch, compiled by the training loop's code.
  runner = loop.StageRunner(stage, mesh, seed=0, log=lambda *_: None)
  state = runner.init_state(runner.random_params())
  batches, denominator, _ = next(GlobalBatches(stage.data, stage.num_shards, mesh, 1,
                                               stage.attention.layout))
  memory = runner.compiled_step().lower(state, batches, denominator).compile().memory_analysis()
  real = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  assert abs(planned.total_bytes - real) <= 0.1 * real, (planned, real)
  shard = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
  assert planned.params_bytes == shard((state.trainable, state.frozen))
  assert planned.optimizer_bytes == shard((state.opt_state, state.step))


def test_plan_command():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "-m", "longctx.plan", "--config=configs/tiny.py",
       "--config.stages.long.data.max_len=1024", "--config.stage_order=long"],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "stage long" in result.stdout and "H100 80GB: fits" in result.stdout, result.stdout
