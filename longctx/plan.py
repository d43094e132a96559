"""`python -m longctx.plan --config=configs/NAME.py [--num_devices=N] [--config.key=value ...]`.

Per-device memory of every stage of the configured run, before launching: the train step is
lowered and compiled for the configured mesh and sequence length from abstract shapes only (no
parameter is materialised), and the compiler's buffer assignment gives

  parameters + optimizer state   the train state's per-device shards (arguments, donated)
  batch                          the step's input batch shard
  temporaries                    activations, gradients, attention workspaces (XLA temp buffers)
  total                          arguments + outputs − aliased (donated) + temporaries

and whether that fits each named accelerator. On a CPU-only machine the devices are emulated
(`--num_devices`, default: the mesh's size; `--native` compiles for this host's accelerators
instead), so the figure is XLA:CPU's buffer assignment for the
same program: GPU and TPU compilers fuse and schedule differently, so treat it as an estimate
(and keep headroom: the runtime, NCCL buffers and fragmentation are not in it).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys

from absl import app, flags
from ml_collections import config_flags

ACCELERATORS = (("H100 80GB", 80e9), ("H200 141GB", 141e9), ("TPU v5p 95GB", 95e9),
                ("TPU v5e 16GB", 16e9))

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "devices to plan for (default: the "
                                    "mesh's size; needed when a mesh axis is -1)")
_HEADROOM = flags.DEFINE_float("headroom", 0.9, "fraction of an accelerator's memory usable")


@dataclasses.dataclass
class StagePlan:
  stage: str
  mesh: dict
  batch_shape: tuple
  params_bytes: int      # per device
  optimizer_bytes: int   # per device (incl. the step counter)
  batch_bytes: int
  temp_bytes: int
  total_bytes: int

  def fits(self, capacity: float, headroom: float = 0.9) -> bool:
    return self.total_bytes <= capacity * headroom


def _shard_bytes(abstract_tree) -> int:
  import jax
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def plan_stage(stage, mesh, seed: int = 0) -> StagePlan:
  """Compile one stage's train step from abstract shapes and read its memory analysis."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from longctx.parallel.mesh import BATCH_AXES
  from longctx.train.loop import StageRunner

  runner = StageRunner(stage, mesh, seed, log=lambda *_: None)
  k, rows, length = stage.train.micro_batches, stage.num_shards * stage.data.batch_size, \
      stage.data.max_len
  batch_sh = NamedSharding(mesh, P(None, BATCH_AXES, "seq"))
  batches = {key: jax.ShapeDtypeStruct((k, rows, length),
                                       jnp.float32 if key == "loss_weights" else jnp.int32,
                                       sharding=batch_sh)
             for key in ("inputs", "targets", "segment_ids", "positions", "loss_weights")}
  denominator = jax.ShapeDtypeStruct((k, rows), jnp.int32,
                                     sharding=NamedSharding(mesh, P(None, BATCH_AXES)))
  compiled = runner.compiled_step().lower(runner.abstract_state, batches, denominator).compile()
  memory = compiled.memory_analysis()
  state = runner.abstract_state
  params_bytes = _shard_bytes((state.trainable, state.frozen))
  optimizer_bytes = _shard_bytes((state.opt_state, state.step))
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return StagePlan(stage.name, dict(mesh.shape), (k, rows, length), params_bytes,
                   optimizer_bytes, _shard_bytes(batches) + _shard_bytes(denominator),
                   int(memory.temp_size_in_bytes), int(total))


def plan(config, num_devices: int | None = None) -> list[StagePlan]:
  import jax

  from longctx.parallel.mesh import make_mesh
  from longctx.train.config import mesh_config, read_stages

  stages = read_stages(config)
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  mesh = make_mesh(dataclasses.asdict(mesh_config(config)), devices)
  return [plan_stage(s, mesh, int(config.seed)) for s in stages]


def _gb(n: int) -> str:
  return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def _mesh_size(config) -> int | None:
  sizes = [int(config.mesh[a]) for a in ("data", "fsdp", "seq", "tensor")]
  return None if -1 in sizes else math.prod(sizes)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/NAME.py is required")
  n = _NUM_DEVICES.value or _mesh_size(config)
  import jax
  if os.environ.get("JAX_PLATFORMS") == "cpu":
    if n is None:
      raise app.UsageError("the mesh has an axis = -1: give --num_devices=N to plan for N devices")
    jax.config.update("jax_num_cpu_devices", n)
  print(f"planning {config_flags.get_config_filename(flags.FLAGS['config'])} for "
        f"{n or jax.device_count()} {jax.devices()[0].platform} devices (compiling abstract shapes)",
        flush=True)
  for p in plan(config, n):
    print(f"\nstage {p.stage}: mesh {p.mesh}, step batch {p.batch_shape} (micro-batches, rows, "
          f"tokens)")
    print(f"  per device: parameters {_gb(p.params_bytes)}, optimizer state "
          f"{_gb(p.optimizer_bytes)}, batch {_gb(p.batch_bytes)}, temporaries (activations, "
          f"gradients) {_gb(p.temp_bytes)}; total {_gb(p.total_bytes)}")
    fits = [f"{name}: {'fits' if p.fits(cap, _HEADROOM.value) else 'does NOT fit'}"
            for name, cap in ACCELERATORS]
    print(f"  at {_HEADROOM.value:.0%} of memory — " + "; ".join(fits))


if __name__ == "__main__":
  # Plan on emulated CPU devices (a login node will do) unless --native: this host's accelerators,
  # which must then number at least the mesh's size.
  if "--native" not in sys.argv:
    os.environ["JAX_PLATFORMS"] = "cpu"
  else:
    sys.argv.remove("--native")
  app.run(main)
