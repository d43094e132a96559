"""The training loop: every stage of a config, in order, resumable from the workdir.

  <workdir>/config.json           the config this workdir trains (a different one is refused)
  <workdir>/<stage>/checkpoints/  orbax CheckpointManager: train state + data state per step
  <workdir>/<stage>/final/        the stage's final parameters (longctx params checkpoint)
  <workdir>/<stage>/metrics.jsonl, tensorboard/

A stage starts from the previous stage's final parameters (the first from `init`) with a fresh
optimizer; a stage with a `final/` is skipped, one with checkpoints resumes from the latest.
Everything that can be checked without compute (every stage's config, the mesh against the
devices, lengths against the layout, the init path, the workdir) is checked first.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Callable

import jax
import ml_collections
from etils import epath
import numpy as np
from jax.sharding import Mesh

from longctx.checkpoint import manager as ckpt
from longctx.data.config import parse_enum
from longctx.parallel.mesh import make_mesh
from longctx.train import metrics as metrics_lib
from longctx.train.config import (AttentionImpl, InitKind, StageSpec, checkpoint_config,
                                  mesh_config, read_stages)
from longctx.train.architecture import read_architecture
from longctx.train.data import GlobalBatches, check_length
from longctx.train.runner import HOST_MEMORY, StageRunner, check_same_architecture, s2_group

# Config sections that may differ when a run resumes in the same workdir.
_RESUMABLE_CHANGES = ("mesh", "checkpoint", "attention", "eval")


class ConfigMismatchError(ValueError):
  pass


@dataclasses.dataclass
class StageSummary:
  name: str
  steps: int
  first_loss: float | None = None
  last_loss: float | None = None
  tokens: int = 0
  seconds: float = 0.0
  resumed_from: int | None = None
  skipped: bool = False
  preempted: bool = False


# ---- checks before compute ----------------------------------------------------------------------
def _comparable(cd: dict) -> dict:
  return {k: v for k, v in cd.items() if k not in _RESUMABLE_CHANGES}


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Write <workdir>/config.json, or refuse a workdir that trains another config."""
  path = epath.Path(workdir) / "config.json"
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    saved = json.loads(path.read_text())
    if _comparable(saved) != _comparable(current):
      diff = sorted(k for k in set(_comparable(saved)) | set(_comparable(current))
                    if saved.get(k) != current.get(k))
      raise ConfigMismatchError(
          f"workdir {workdir} holds checkpoints of another config: sections {diff} differ from "
          f"{path}. Use a new --workdir, or restore that config (only {list(_RESUMABLE_CHANGES)} "
          "may change on resume).")
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2, sort_keys=True))


def check_stage(stage: StageSpec, mesh: Mesh, first: bool, init_kind: InitKind,
                init_path: str) -> None:
  seq = mesh.shape["seq"]
  layout = stage.attention.layout if stage.attention.impl is AttentionImpl.RING else None
  if stage.attention.impl is not AttentionImpl.RING and seq > 1:
    raise ValueError(f"config stages.{stage.name}.attention.impl={stage.attention.impl.value!r} "
                     f"with mesh seq={seq}: only 'ring' splits a row across devices")
  check_length(stage.data.max_len, seq, layout, f"stages.{stage.name}.data.max_len")
  check_memory_options(stage, seq, layout)
  if stage.lora.enabled and stage.lora.s2_group_fraction > 0:
    from longctx.attention.shifted_sparse import check_s2
    try:
      check_s2(stage.data.max_len, stage.model.num_heads, stage.model.num_kv_heads,
               s2_group(stage))
    except ValueError as e:
      raise ValueError(f"config stages.{stage.name}.lora.s2_group_fraction="
                       f"{stage.lora.s2_group_fraction} (data.max_len={stage.data.max_len}): {e}; "
                       "lora.s2_group_fraction=0 trains LoRA with full attention") from None
  if first and init_kind is not InitKind.RANDOM:
    if not init_path:
      raise ValueError(f"config init.path: expected a directory for init.kind="
                       f"{init_kind.value!r}, found ''")
    marker = "config.json" if init_kind is InitKind.HF else "model_config.json"
    if not (epath.Path(init_path) / marker).exists():
      raise FileNotFoundError(f"config init.path: expected {marker} in {init_path} "
                              f"(init.kind={init_kind.value!r})")
    check_same_architecture(read_architecture(init_path), stage.model, init_path)


def check_memory_options(stage: StageSpec, seq: int, layout: str | None) -> None:
  """Token chunks that tile every row length the stage can see; host memory for offload."""
  from longctx.data.config import BatchingKind
  from longctx.model.chunking import check_chunk
  from longctx.train.runner import has_host_memory
  if stage.data.batching is BatchingKind.PACKED:
    length = stage.data.max_len
  else:  # sorted batches are padded to multiples of this, so a chunk must tile it
    length = int(np.lcm(2 * seq if layout == "zigzag" else seq, stage.data.pad_multiple))
  where = f"stages.{stage.name}."
  check_chunk(length, seq, stage.train.loss_chunk, where + "train.loss_chunk")
  check_chunk(length, seq, stage.model.mlp_chunk, where + "model.mlp_chunk")
  offload = [key for key, on in (("model.remat_offload", stage.model.remat_offload),
                                 ("train.offload_optimizer", stage.train.offload_optimizer)) if on]
  if offload and not has_host_memory():
    kinds = sorted({m.kind for m in jax.devices()[0].addressable_memories()})
    raise ValueError(f"config {where}{offload[0]}: offloading needs a '{HOST_MEMORY}' memory "
                     f"on the {jax.devices()[0].platform} devices, found memories {kinds}")


# ---- preemption ----------------------------------------------------------------------------------
class Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint at the next step and stops cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


# ---- the loop ------------------------------------------------------------------------------------
def _progress(total: int, initial: int, desc: str):
  if jax.process_index() != 0:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)


def run(config: ml_collections.ConfigDict, workdir: str, *, log: Callable[[str], None] = print,
        devices=None, stop_after_steps: int | None = None,
        preflight: bool = True) -> list[StageSummary]:
  """Train every stage of `config` in `workdir`; returns a summary per stage.

  preflight: before anything is materialised, compile every stage's step from abstract shapes
  and refuse (MemoryPlanError: the plan's breakdown and the cheapest config change that fits)
  a stage whose plan exceeds the devices' memory (train.memory); the compiled steps are then
  the ones that train.

  stop_after_steps: stop (saving a checkpoint, as on SIGTERM) once this many optimizer steps
  have run in this call — for tests of interrupted runs.
  """
  stages = read_stages(config)
  mesh = make_mesh(dataclasses.asdict(mesh_config(config)), devices)
  ckpt_cfg = checkpoint_config(config)
  init_kind = parse_enum(InitKind, config.init.kind, "init.kind")
  for i, stage in enumerate(stages):
    check_stage(stage, mesh, i == 0, init_kind, config.init.path)
  check_workdir(workdir, config)
  log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
      f"{jax.process_count()} process(es); stages: {', '.join(s.name for s in stages)}")

  plans = _preflight(config, stages, mesh, workdir, log) if preflight else {}
  summaries: list[StageSummary] = []
  previous_final: str | None = None
  budget = [stop_after_steps]
  with Preemption() as preemption:
    for i, stage in enumerate(stages):
      stage_dir = os.path.join(workdir, stage.name)
      final_dir = os.path.join(stage_dir, "final")
      if ckpt.is_complete(final_dir):
        log(f"[{stage.name}] done earlier ({final_dir}); skipping")
        summaries.append(StageSummary(stage.name, stage.train.steps, skipped=True))
        previous_final = final_dir
        continue
      if previous_final:
        init = (InitKind.CHECKPOINT, previous_final)
      elif i == 0 and init_kind is not InitKind.RANDOM:
        init = (init_kind, config.init.path)
      else:
        init = None  # random
      summary = _run_stage(stage, mesh, config, ckpt_cfg, stage_dir, final_dir, init=init,
                           log=log, preemption=preemption, budget=budget,
                           planned=plans.get(stage.name))
      summaries.append(summary)
      if summary.preempted:
        break
      previous_final = final_dir
  return summaries


def _preflight(config, stages: list[StageSpec], mesh: Mesh, workdir: str, log) -> dict:
  """{stage name: its plan} for the stages still to run; MemoryPlanError if one does not fit."""
  from longctx.train import memory
  capacity, where = memory.device_capacity()
  plans = {}
  for stage in stages:
    if ckpt.is_complete(os.path.join(workdir, stage.name, "final")):
      continue
    plan = memory.plan_stage(stage, mesh, int(config.seed), residuals=False)
    log(f"[{stage.name}] memory plan: {memory.gb(plan.total_bytes)} per device"
        + (f" (+ {memory.gb(plan.host_bytes)} in host memory)" if plan.host_bytes else "")
        + f"; {where}")
    memory.check_fits(stage, plan, mesh, capacity, where, seed=int(config.seed), log=log,
                      flag=lambda key, name=stage.name: _flag(config, name, key))
    plans[stage.name] = plan
  return plans


def _flag(config, stage_name: str, key: str) -> str:
  """The command-line spelling of a config key for one stage: the stage's own override when it
  has one, else the top-level key (which every stage inherits)."""
  stage_cd = config.stages.get(stage_name) if "stages" in config and config.stages else None
  if stage_cd is not None:
    node = stage_cd
    for part in key.split("."):
      node = node.get(part) if hasattr(node, "get") else None
      if node is None:
        break
    else:
      return f"--config.stages.{stage_name}.{key}"
  return f"--config.{key}"


def _planned_step(runner: StageRunner, planned):
  """The step the pre-flight compiled (for rows of its length), else jit for other lengths."""
  jitted = runner.compiled_step()
  if planned is None:
    return jitted
  shape = planned.batch_shape

  def step(state, batches, denominator):
    if batches["inputs"].shape == shape:
      return planned.compiled(state, batches, denominator)
    return jitted(state, batches, denominator)
  return step


def _run_stage(stage: StageSpec, mesh: Mesh, config, ckpt_cfg, stage_dir: str, final_dir: str,
               *, init, log, preemption: Preemption, budget: list,
               planned=None) -> StageSummary:
  runner = StageRunner(stage, mesh, int(config.seed), log)
  cfg = runner.model_cfg
  summary = StageSummary(stage.name, stage.train.steps)
  layout = stage.attention.layout if stage.attention.impl is AttentionImpl.RING else None
  loader = GlobalBatches(stage.data, stage.num_shards, mesh, stage.train.micro_batches, layout)
  manager = ckpt.make_manager(os.path.join(stage_dir, "checkpoints"), ckpt_cfg.max_to_keep,
                              ckpt_cfg.async_save)
  writer = metrics_lib.MetricsWriter(stage_dir)
  start_step = manager.latest_step()
  if start_step is not None:
    state, data_states = ckpt.restore(manager, start_step, runner.abstract_state)
    loader.set_state(data_states)
    summary.resumed_from = start_step
    _truncate_metrics(writer.path, start_step)
    log(f"[{stage.name}] resumed at step {start_step} from {manager.directory}")
  else:
    params = runner.random_params() if init is None else runner.load_params(*init)
    state = runner.init_state(params)
    start_step = 0
    source = "random init" if init is None else f"{init[1]}"
    log(f"[{stage.name}] {cfg.num_params():,} parameters from {source}; "
        f"{stage.train.steps} steps")

  step_fn = _planned_step(runner, planned)
  evaluator = None
  if stage.eval.every_steps:
    from longctx.train.evaluate import Evaluator
    evaluator = Evaluator(stage, cfg, mesh)
  peak = metrics_lib.peak_flops_per_device(stage.train.peak_tflops_per_device)
  bar = _progress(stage.train.steps, start_step, stage.name)
  step = start_step
  window_tokens, window_start, window_steps = 0, time.perf_counter(), 0
  stage_start = time.perf_counter()
  try:
    while step < stage.train.steps:
      batches, denominator, (micro, rows, length) = next(loader)
      state, m = step_fn(state, batches, denominator)
      m = jax.device_get(m)
      if not m["finite"]:
        raise FloatingPointError(
            f"[{stage.name}] step {step + 1}: loss {float(m['loss'])}, grad norm "
            f"{float(m['grad_norm'])} — not finite. The update was not applied; the last good "
            f"checkpoint is step {manager.latest_step()} in {manager.directory}.")
      step += 1
      loss = float(m["loss"])
      summary.first_loss = loss if summary.first_loss is None else summary.first_loss
      summary.last_loss = loss
      step_tokens = micro * rows * length  # slots, padding included
      summary.tokens += step_tokens
      window_tokens += step_tokens
      window_steps += 1
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
      evaluation = {}
      if evaluator is not None and evaluator.due(step, stage.train.steps):
        eval_start = time.perf_counter()
        evaluation = evaluator(state.params)
        window_start += time.perf_counter() - eval_start  # not part of tokens/s
        if bar is not None:
          bar.write(f"[{stage.name}] step {step}: " + ", ".join(
              f"{k} {v:.4g}" for k, v in evaluation.items()))
      if not (step % stage.train.log_every == 0 or step == stage.train.steps):
        if evaluation:
          writer.write(step, evaluation)
      else:
        elapsed = time.perf_counter() - window_start
        record = {"loss": loss, "grad_norm": float(m["grad_norm"]),
                  "learning_rate": float(m["learning_rate"]),
                  "tokens_per_s": window_tokens / elapsed,
                  "step_time_s": elapsed / window_steps, "seq_len": length}
        achieved = window_tokens / elapsed * metrics_lib.flops_per_token(cfg, length)
        record["tflops_per_device"] = achieved / jax.device_count() / 1e12
        if peak:
          record["mfu"] = achieved / (peak * jax.device_count())
        record.update(metrics_lib.device_memory())
        record.update(evaluation)
        writer.write(step, record)
        if bar is not None:
          bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        window_tokens, window_start, window_steps = 0, time.perf_counter(), 0
      if budget[0] is not None:
        budget[0] -= 1
      stop_now = budget[0] is not None and budget[0] <= 0
      if preemption.any_process() or stop_now:
        ckpt.save(manager, step, state, loader.get_state())
        manager.wait_until_finished()
        log(f"[{stage.name}] stopped at step {step}; checkpoint saved in {manager.directory}")
        summary.preempted = True
        return summary
      if step % ckpt_cfg.every_steps == 0 or step == stage.train.steps:
        ckpt.save(manager, step, state, loader.get_state())
  finally:
    if bar is not None:
      bar.close()
    writer.close()
    manager.wait_until_finished()
  summary.seconds = time.perf_counter() - stage_start
  ckpt.save_final_params(final_dir, state.params, cfg, assets_from=init[1] if init else None)
  manager.close()
  stats = loader.example_stats()
  skipped = {k: v for k, v in stats.items() if v and k in ("truncated", "dropped", "skipped",
                                                          "no_target")}
  log(f"[{stage.name}] done: loss {summary.first_loss:.4f} -> {summary.last_loss:.4f}; "
      f"{summary.tokens:,} tokens in {summary.seconds:.1f} s; final weights in {final_dir}"
      + (f"; examples not used as-is: {skipped} of {stats.get('examples', 0)}" if skipped else ""))
  return summary


def _truncate_metrics(path: str, step: int) -> None:
  """Drop lines logged after the restored step (they are re-run)."""
  path = epath.Path(path)
  if jax.process_index() != 0 or not path.exists():
    return
  lines = [line for line in path.read_text().splitlines()
           if line.strip() and json.loads(line)["step"] <= step]
  path.write_text("".join(line + "\n" for line in lines))
