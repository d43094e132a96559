"""Per-device memory of a stage's train step, from the compiler, before anything is materialised.

`plan_stage` lowers and compiles the step from abstract shapes (the same jit the loop runs) and
reads the compiler's buffer assignment:

  parameters, optimizer state  the train state's per-device shards (arguments, donated)
  batch                        the step's input batch shard
  temporaries                  activations, gradients, attention workspaces (XLA temp buffers)
  total                        arguments + outputs − aliased (donated) + temporaries, on the
                               device: what was offloaded to host memory is not in it
and, from the program itself (the residuals autodiff keeps for the backward of one
micro-batch), the saved activations and what of them is offloaded to pinned host memory.

XLA:CPU ignores memory kinds inside a program (on an emulated CPU mesh an offloaded residual
still sits in its temporaries), so there the offloaded residuals and an offloaded optimizer
state are subtracted from the device total and reported as host bytes; a GPU or TPU compiler
places them itself. XLA:CPU also emulates bfloat16 dynamic-slice / dynamic-update-slice in
float32 (its float-normalization-bf16 pass): the stack of saved layer inputs of a bfloat16 model
then gets a float32 copy twice its size, which GPU and TPU compilers do not make. To estimate
for those, `accelerator_estimate=True` compiles a bfloat16 model as float16 on CPU (the same
sizes, handled natively); the plan says so (`compiled_dtype`). `check_fits` is the launcher's
pre-flight: it refuses a plan over the device's memory with the breakdown and the cheapest
change of config that fits.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax

from longctx.parallel import devices
from longctx.train.config import StageSpec
from longctx.train.step import join_params



@dataclasses.dataclass
class StagePlan:
  stage: str
  mesh: dict
  batch_shape: tuple          # (micro-batches, rows, tokens)
  platform: str
  compiled_dtype: str         # the model's compute dtype in the compiled program
  params_bytes: int           # per device, as below
  optimizer_bytes: int
  batch_bytes: int
  temp_bytes: int
  total_bytes: int            # on the device
  gradient_bytes: int = 0     # of the temporaries: the trainable parameters' gradient shards
  saved_activation_bytes: int = 0   # residuals of one micro-batch kept on the device
  offloaded_activation_bytes: int = 0   # residuals of one micro-batch in pinned host memory
  optimizer_on_host: bool = False       # train.offload_optimizer

  @property
  def host_bytes(self) -> int:
    """Per device, in pinned host memory between and during steps."""
    return self.offloaded_activation_bytes + (self.optimizer_bytes if self.optimizer_on_host
                                              else 0)
  largest_temporaries: list = dataclasses.field(default_factory=list)
  attention_strategy: str = ""  # the configured context-parallel strategy ("" without CP)
  attention_traffic: dict = dataclasses.field(default_factory=dict)  # plan.strategy_traffic
  compiled: Any = dataclasses.field(default=None, repr=False, compare=False)

  def fits(self, capacity: float, headroom: float = 0.9) -> bool:
    return self.total_bytes <= capacity * headroom

  def to_json(self, headroom: float = 0.9) -> dict:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name != "compiled"}
    out["batch_shape"] = list(self.batch_shape)
    out["host_bytes"] = self.host_bytes
    out["fits"] = {name: self.fits(cap, headroom) for name, cap in devices.ACCELERATORS}
    return out


def _shard_bytes(abstract_tree) -> int:
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def _saved_residuals(fn: Callable, *args) -> list:
  """[(aval, what)] of what autodiff keeps for fn's backward (the function behind the public
  jax.ad_checkpoint.print_saved_residuals)."""
  from jax._src.ad_checkpoint import saved_residuals
  return saved_residuals(fn, *args)


def residual_bytes(runner, batches) -> tuple[int, int]:
  """(on the device, offloaded to host) bytes per device of one micro-batch's saved activations:
  the residuals shaped [..., rows, tokens, ...], split as the batch is (rows over data × fsdp,
  tokens over seq)."""
  rows, length = batches["inputs"].shape[1:]
  one = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in batches.items()}
  state = runner.abstract_state
  split = runner.mesh.shape["seq"] * math.prod(runner.mesh.shape[a] for a in ("data", "fsdp"))

  def numerator(trainable, frozen, batch):
    return runner.numerator_fn(join_params(trainable, frozen), batch)

  plain = lambda tree: jax.tree.map(  # noqa: E731
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  device = host = 0
  for aval, what in _saved_residuals(numerator, plain(state.trainable), plain(state.frozen), one):
    shape = tuple(getattr(aval, "shape", ()))
    if what.startswith("from the argument") or not any(
        shape[i:i + 2] == (rows, length) for i in range(len(shape) - 1)):
      continue
    nbytes = math.prod(shape) * aval.dtype.itemsize // split
    if "host" in str(getattr(aval, "memory_space", "")).lower():
      host += nbytes
    else:
      device += nbytes
  return device, host


def plan_stage(stage: StageSpec, mesh, seed: int = 0, *, length: int | None = None,
               report: bool = False, residuals: bool = True, accelerator_estimate: bool = False,
               log=lambda *_: None) -> StagePlan:
  """Compile one stage's train step from abstract shapes and read its memory.

  accelerator_estimate: on CPU, compile a bfloat16 model as float16 (see the module docstring),
  for a GPU / TPU estimate; without it the plan is what this platform would run.
  length: plan rows of this many tokens instead of data.max_len. report: also name the largest
  temporaries (from the compiler's buffer-assignment dump). residuals: measure the saved
  activations (one more trace of the model; always done when activations are offloaded, since
  the device total depends on it)."""
  from longctx.train.runner import StageRunner

  if length is not None:
    stage = _replace(stage, "data", max_len=length)
  if accelerator_estimate and jax.devices()[0].platform == "cpu" and \
      stage.model.dtype == "bfloat16":
    stage = _replace(stage, "model", dtype="float16")
  runner = StageRunner(stage, mesh, seed, log=log)
  batches, denominator = runner.abstract_batch()
  lowered = runner.compiled_step().lower(runner.abstract_state, batches, denominator,
                                           runner.abstract_ok())
  temporaries: list = []
  if report:
    compiled, temporaries = _compile_with_report(lowered)
  else:
    compiled = lowered.compile()
  memory = compiled.memory_analysis()
  state = runner.abstract_state
  params_bytes = _shard_bytes((state.trainable, state.frozen))
  optimizer_bytes = _shard_bytes((state.opt_state, state.step))
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  saved, offloaded = (residual_bytes(runner, batches)
                      if residuals or stage.model.remat_offload else (0, 0))
  compiler_places_host = bool(memory.host_temp_size_in_bytes or memory.host_argument_size_in_bytes)
  if not compiler_places_host:  # XLA:CPU: the offloaded bytes are in the device figures
    total -= offloaded + (optimizer_bytes if stage.train.offload_optimizer else 0)
  plan = StagePlan(stage.name, dict(mesh.shape), tuple(batches["inputs"].shape),
                   jax.devices()[0].platform, stage.model.dtype, params_bytes, optimizer_bytes,
                   _shard_bytes(batches) + _shard_bytes(denominator),
                   int(memory.temp_size_in_bytes), int(total),
                   gradient_bytes=_shard_bytes(state.trainable), saved_activation_bytes=saved,
                   offloaded_activation_bytes=offloaded,
                   optimizer_on_host=stage.train.offload_optimizer,
                   largest_temporaries=temporaries, compiled=compiled)
  return plan


def _compile_with_report(lowered, top: int = 6):
  """(compiled, the largest temporary buffers by the op that produces them), the latter from
  the compiler's buffer-assignment dump (longctx.train.hlo_report)."""
  import re
  import tempfile
  from longctx.train.hlo_report import read_buffer_report
  with tempfile.TemporaryDirectory(prefix="longctx-plan-") as tmp:
    compiled = lowered.compile({"xla_dump_to": tmp})
    return compiled, read_buffer_report(tmp, top=top, module=re.compile(r"train_step"))


# ---- the pre-flight check -------------------------------------------------------------------
def device_capacity() -> tuple[float, str]:
  """(bytes one device may use, where that figure comes from). CPU devices, emulated or not,
  share their host's available RAM. With several processes, the smallest figure of any, so
  that every process takes the same decision."""
  device = jax.local_devices()[0]
  stats = devices.memory_stats(device)
  if "bytes_limit" in stats:
    capacity, where = float(stats["bytes_limit"]), f"{device.device_kind} memory"
  else:
    available, n = devices.host_ram(), jax.local_device_count()
    capacity = available / n
    where = f"{available / 2**30:.1f} GiB of available host RAM over {n} devices"
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    smallest = float(np.min(multihost_utils.process_allgather(np.float32(capacity))))
    if smallest < capacity:
      capacity, where = smallest, "the smallest over the processes"
  return capacity, where


def gb(n: float) -> str:
  return f"{n / 1e9:,.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:,.1f} MB"


def describe(plan: StagePlan) -> list[str]:
  """The breakdown of a plan, as lines."""
  host = plan.optimizer_on_host
  lines = [f"stage {plan.stage}: mesh {plan.mesh}, step batch {plan.batch_shape} (micro-batches, "
           f"rows, tokens), compiled for {plan.platform} in {plan.compiled_dtype}",
           f"  per device: parameters {gb(plan.params_bytes)}, optimizer state "
           f"{gb(plan.optimizer_bytes)}{' (host)' if host else ''}, batch {gb(plan.batch_bytes)}, "
           f"temporaries {gb(plan.temp_bytes)} (gradients {gb(plan.gradient_bytes)}, saved "
           f"activations {gb(plan.saved_activation_bytes)}); total on the device "
           f"{gb(plan.total_bytes)}" + (f"; in host memory {gb(plan.host_bytes)}"
                                        if plan.host_bytes else "")]
  if plan.largest_temporaries:
    lines.append("  largest temporaries: " + "; ".join(
        f"{gb(t['bytes'])} {t['shape']} {t['name']}" for t in plan.largest_temporaries))
  return lines


class MemoryPlanError(ValueError):
  """A stage's plan does not fit the devices; the message holds the breakdown and a fix."""


# Changes of config that lower memory, cheapest in throughput first: ([(key, value)], change).
def _fix_candidates(stage: StageSpec, seq: int):
  from longctx.model.config import RematPolicy
  from longctx.train.runner import has_host_memory
  per_device = stage.data.max_len // seq  # a chunk of a quarter of it at most, 8192 tokens at most
  chunk = max((c for c in range(1, min(per_device // 4, 8192) + 1) if per_device % c == 0),
              default=0)
  if not stage.train.loss_chunk and chunk:
    yield [("train.loss_chunk", chunk)], lambda s: _replace(s, "train", loss_chunk=chunk)
  if not stage.model.mlp_chunk and chunk:
    yield [("model.mlp_chunk", chunk)], lambda s: _replace(s, "model", mlp_chunk=chunk)
  if stage.model.remat is RematPolicy.NONE:
    yield [("model.remat", "full")], lambda s: _replace(s, "model", remat=RematPolicy.FULL)
  if has_host_memory() and "layer_input" not in stage.model.remat_offload:
    offload = stage.model.remat_offload + ("layer_input",)
    yield [("model.remat_offload", ",".join(offload))], lambda s: _replace(
        s, "model", remat_offload=offload)
  if has_host_memory() and not stage.train.offload_optimizer:
    yield [("train.offload_optimizer", True)], lambda s: _replace(s, "train",
                                                                  offload_optimizer=True)
  if stage.data.batch_size % 2 == 0:
    b, k = stage.data.batch_size // 2, 2 * stage.train.micro_batches
    yield [("data.batch_size", b), ("train.micro_batches", k)], lambda s: _replace(
        _replace(s, "data", batch_size=b), "train", micro_batches=k)


def _replace(stage: StageSpec, section: str, **changes) -> StageSpec:
  return dataclasses.replace(stage, **{section: dataclasses.replace(getattr(stage, section),
                                                                    **changes)})


def cheapest_fix(stage: StageSpec, mesh, limit: float, seed: int = 0, log=lambda *_: None):
  """([(key, value)], plan) of the shortest prefix of `_fix_candidates` whose plan is within
  `limit` bytes per device, or ([], None) when none is."""
  applied = []
  for changes, change in _fix_candidates(stage, mesh.shape["seq"]):
    stage = change(stage)
    applied.extend(changes)
    plan = plan_stage(stage, mesh, seed, residuals=False)
    log(f"  with {', '.join(f'{k}={v}' for k, v in applied)}: {gb(plan.total_bytes)} per device")
    if plan.total_bytes <= limit:
      return applied, plan
  return [], None


def check_fits(stage: StageSpec, plan: StagePlan, mesh, capacity: float, where: str,
               headroom: float = 0.9, seed: int = 0, log=lambda *_: None,
               flag=lambda key: key) -> None:
  """The pre-flight check: MemoryPlanError with the breakdown and the cheapest fix when the
  plan exceeds `headroom` of `capacity` bytes per device. flag(key): how to spell a config key
  on the command line (e.g. "--config.train.loss_chunk")."""
  limit = capacity * headroom
  if plan.total_bytes <= limit:
    return
  log(f"[{stage.name}] the plan needs {gb(plan.total_bytes)} per device, more than "
      f"{gb(limit)}: looking for the cheapest change that fits")
  detailed = plan_stage(stage, mesh, seed, report=True)
  fix, fixed = cheapest_fix(stage, mesh, limit, seed, log)
  lines = [f"stage {stage.name} does not fit: its plan needs {gb(plan.total_bytes)} per device, "
           f"more than {headroom:.0%} of {gb(capacity)} ({where})."] + describe(detailed)
  if fix:
    lines.append(f"The cheapest change that fits ({gb(fixed.total_bytes)} per device): "
                 + " ".join(f"{flag(k)}={v}" for k, v in fix))
  else:
    lines.append("No change of chunks, remat, offload or micro-batches fits: spread the state "
                 "over more devices (mesh fsdp / seq) or shorten data.max_len "
                 "(`python -m longctx.plan --max_len=...` finds the longest that fits).")
  raise MemoryPlanError("\n".join(lines))
