"""The training loop: every stage of a config, in order, resumable from the workdir.

  <workdir>/config.json                 the config this workdir trains (another one is refused)
  <workdir>/<stage>/checkpoints/<step>/ orbax CheckpointManager: train state, data state and
                                        an integrity digest per step (checkpoint.manager)
  <workdir>/<stage>/final/              the stage's final parameters (longctx params checkpoint)
  <workdir>/<stage>/metrics.jsonl, tensorboard/, profile/

A stage starts from the previous stage's final parameters (the first from `init`) with a fresh
optimizer; a stage with a complete `final/` is skipped, one with checkpoints resumes from the
newest that restores. Everything that can be checked without compute is checked first
(train.checks).

The step loop (`_steps`) dispatches step n + 1 before it reads step n's metrics, so the device
is never idle while the host builds the next batch and writes logs; hooks (train.hooks) do the
rest. Crash safety, kill point by kill point (tests/test_faults.py kills at each):
  during a step, or an async save   orbax finalises a step by renaming its directory; the rerun
                                    resumes from the newest complete step, and metrics.jsonl is
                                    cut back to it (a partial last line repaired)
  after the last step's checkpoint  the rerun restores it, runs no step and writes final/
  while final/ is written           final/ is complete only once model_config.json, written
                                    last, exists; until then the rerun rewrites it
  between stages                    the next stage starts from the complete final/
A non-finite loss stops the run after saving the last good state; a checkpoint that does not
restore is moved aside and the previous one used (checkpoint.manager.restore_latest).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Callable, Sequence

import jax
import ml_collections
from jax.sharding import Mesh

from longctx.checkpoint import manager as ckpt
from longctx.parallel.mesh import make_mesh
from longctx.train import checks
from longctx.train import metrics as metrics_lib
from longctx.train.config import (InitKind, StageSpec, checkpoint_config,
                                  init_config, mesh_config, read_stages)
from longctx.train.data import GlobalBatches
from longctx.train.hooks import Hook, Preemption, StepContext, StepRecord, profile_hook
from longctx.train.runner import StageRunner


@dataclasses.dataclass
class StageSummary:
  name: str
  steps: int
  first_loss: float | None = None  # of the steps run in this call (None: none ran)
  last_loss: float | None = None
  tokens: int = 0
  seconds: float = 0.0
  resumed_from: int | None = None
  skipped: bool = False
  preempted: bool = False
  reached: int | None = None  # the step a stopped (preempted) stage saved, of `steps`


class NonFiniteLossError(FloatingPointError):
  """A step's loss or gradient norm was not finite; the last good state was saved."""

  def __init__(self, message: str, step: int, loss: float, grad_norm: float,
               checkpoint: str | None):
    super().__init__(message)
    self.step, self.loss, self.grad_norm, self.checkpoint = step, loss, grad_norm, checkpoint


def run(config: ml_collections.ConfigDict, workdir: str, *, log: Callable[[str], None] = print,
        devices=None, preflight: bool = True, hooks: Sequence[Hook] = ()) -> list[StageSummary]:
  """Train every stage of `config` in `workdir`; returns a summary per stage.

  preflight: before anything is materialised, compile every stage's step from abstract shapes
  and refuse (MemoryPlanError: the plan's breakdown and the cheapest config change that fits)
  a stage whose plan exceeds the devices' memory (train.memory); the compiled steps are then
  the ones that train.
  hooks: more hooks (train.hooks.Hook) for every stage, after the built-in ones. One that calls
  `ctx.request_stop()` stops the run after that step with a checkpoint, as SIGTERM does.
  Raises NonFiniteLossError (after saving the last good state), CheckpointError (no checkpoint
  of a stage restores), ValueError / ConfigMismatchError / FileNotFoundError before compute.
  """
  stages = read_stages(config)
  mesh = make_mesh(dataclasses.asdict(mesh_config(config)), devices)
  checks.check_all(config, stages, mesh, workdir)
  log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
      f"{jax.process_count()} process(es); stages: {', '.join(s.name for s in stages)}")
  plans = checks.preflight(config, stages, mesh, workdir, log) if preflight else {}
  summaries: list[StageSummary] = []
  previous_final: str | None = None
  init_kind = init_config(config).kind
  with Preemption() as preemption:
    for i, stage in enumerate(stages):
      final_dir = os.path.join(workdir, stage.name, "final")
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
      stage_run = _StageRun(stage, mesh, config, os.path.join(workdir, stage.name), init, log,
                            preemption, plans.get(stage.name))
      summary = stage_run(list(hooks))
      summaries.append(summary)
      if summary.preempted:
        break
      previous_final = final_dir
  return summaries


def _planned_step(runner: StageRunner, planned):
  """The step the pre-flight compiled (for rows of its length), else jit for other lengths."""
  jitted = runner.compiled_step()
  if planned is None:
    return jitted
  shape = planned.batch_shape

  def step(state, batches, denominator, ok):
    if batches["inputs"].shape == shape:
      return planned.compiled(state, batches, denominator, ok)
    return jitted(state, batches, denominator, ok)
  return step


@dataclasses.dataclass
class _Pending:
  """A dispatched step whose metrics the host has not read yet."""
  step: int
  metrics: dict
  shape: tuple[int, int, int]
  data_state: dict  # the data iterators' state after this step's batch


class _NonFinite(Exception):
  def __init__(self, record: StepRecord, good_step: int, good_data: dict):
    super().__init__(record.step)
    self.record, self.good_step, self.good_data = record, good_step, good_data


def _fetch(pending: _Pending) -> StepRecord:
  m = {k: float(v) for k, v in jax.device_get(pending.metrics).items()}
  return StepRecord(pending.step, m, *pending.shape)


class _StepLoop:
  """Steps start+1 … last with metrics read one step late; see the module docstring."""

  def __init__(self, step_fn, loader: GlobalBatches, last: int, hooks: list[Hook],
               preemption: Preemption):
    self.step_fn, self.loader, self.last, self.preemption = step_fn, loader, last, preemption
    self.lagged = [h for h in hooks if not h.needs_state]
    self.synced = [h for h in hooks if h.needs_state]
    self.pending: collections.deque[_Pending] = collections.deque()
    self.stop = False
    # XLA:CPU runs every emulated device's part of a program on one shared thread pool; with a
    # second multi-device program queued, a device can block in its collective while the pool
    # threads its peers need are taken, and the rendezvous times out. On CPU the next step is
    # therefore dispatched only once the previous one is done (its batch is still built while
    # that step runs, and its metrics are still read one step late).
    self.serial = jax.devices()[0].platform == "cpu"

  def __call__(self, state, start: int, ok):
    """(state, the step reached, stopped early?). Raises _NonFinite; `self.state` is then the
    last good step's state (the step's latch: train.step)."""
    self.good = (start, self.loader.get_state())
    self.state, step = state, start
    while step < self.last:
      batches, denominator, shape = next(self.loader)
      if self.serial:
        jax.block_until_ready((state, ok))
      state, m = self.step_fn(state, batches, denominator, ok)
      self.state = state  # the input was donated: this is the only live state
      ok, step = m["applied"], step + 1
      self.pending.append(_Pending(step, m, shape, self.loader.get_state()))
      self.stop = self.stop or self.preemption.reached(step)
      due = [h for h in self.synced if h.due(step, self.last)]
      sync = self.stop or step == self.last or bool(due)
      self._drain(keep=0 if sync else 1)
      if self.stop and self.pending:  # a lagged hook asked: the step in flight is the last
        self._drain(keep=0)
      if self.pending:
        continue
      ctx = StepContext(self.record, self.last, state)
      for hook in due:
        hook.fn(ctx)
      self.stop = self.stop or ctx.stop_requested
      if self.stop and step < self.last:
        return state, step, True
    return state, step, False

  def _drain(self, keep: int) -> None:
    """Reads the metrics of all pending steps but the newest `keep`, runs the lagged hooks."""
    while len(self.pending) > keep:
      done = self.pending.popleft()
      self.record = _fetch(done)
      if not self.record.metrics["finite"]:
        raise _NonFinite(self.record, *self.good)
      self.good = (done.step, done.data_state)
      ctx = StepContext(self.record, self.last)
      for hook in self.lagged:
        if hook.due(done.step, self.last):
          hook.fn(ctx)
      self.stop = self.stop or ctx.stop_requested


class _StageRun:
  """One stage: restore or initialise, the step loop with its hooks, then final/."""

  def __init__(self, stage: StageSpec, mesh: Mesh, config, stage_dir: str, init, log,
               preemption: Preemption, planned):
    self.stage, self.mesh, self.config, self.dir, self.init = stage, mesh, config, stage_dir, init
    self.log, self.preemption, self.planned = log, preemption, planned
    self.ckpt_cfg = checkpoint_config(config)
    self.final_dir = os.path.join(stage_dir, "final")
    self.summary = StageSummary(stage.name, stage.train.steps)
    self.saved: int | None = None

  def __call__(self, extra_hooks: list[Hook]) -> StageSummary:
    stage = self.stage
    self.runner = runner = StageRunner(stage, self.mesh, int(self.config.seed), self.log)
    layout = stage.attention.batch_layout
    self.loader = GlobalBatches(stage.data, self.mesh,
                                stage.train.micro_batches, layout)
    self.manager = ckpt.make_manager(os.path.join(self.dir, "checkpoints"),
                                     self.ckpt_cfg.max_to_keep, self.ckpt_cfg.async_save)
    start, state = self._start()
    self.writer = metrics_lib.MetricsWriter(self.dir, resume_step=start, log=self.log)
    hooks = self._hooks(start) + extra_hooks
    loop = _StepLoop(_planned_step(runner, self.planned), self.loader, stage.train.steps, hooks,
                     self.preemption)
    began = time.perf_counter()
    try:
      state, step, stopped = loop(state, start, runner.first_ok())
    except _NonFinite as bad:  # the latch kept the last good step's state (train.step)
      self._save(bad.good_step, loop.state, bad.good_data, wait=True)
      raise self._non_finite(bad) from None
    finally:
      for hook in hooks:
        if hook.close is not None:
          hook.close()
      self.writer.close()
      self.manager.wait_until_finished()
    self.summary.seconds = time.perf_counter() - began
    if stopped:
      self._save(step, state, self.loader.get_state(), wait=True)
      self.log(f"[{stage.name}] stopped at step {step}; checkpoint saved in "
               f"{self.manager.directory}")
      self.summary.preempted, self.summary.reached = True, step
      return self.summary
    return self._finish(state)

  def _start(self):
    """(step, state): the newest checkpoint that restores, else the stage's init."""
    restored = ckpt.restore_latest(self.manager, self.runner.abstract_state, self.log)
    if restored is not None:
      step, state, data_states = restored
      self.loader.set_state(data_states)
      self.summary.resumed_from = self.saved = step
      self.log(f"[{self.stage.name}] resumed at step {step} from {self.manager.directory}")
      return step, state
    init = self.init
    params = self.runner.random_params() if init is None else self.runner.load_params(*init)
    self.log(f"[{self.stage.name}] {self.runner.model_cfg.num_params():,} parameters from "
             f"{'random init' if init is None else init[1]}; {self.stage.train.steps} steps")
    return 0, self.runner.init_state(params)

  def _hooks(self, start: int) -> list[Hook]:
    train = self.stage.train
    log_hook = metrics_lib.LogHook(self.stage, self.runner.model_cfg, self.writer, self.summary,
                                   start)
    hooks = [Hook("log", log_hook, every=1, close=log_hook.close)]
    if self.stage.eval.every_steps:
      hooks.append(self._eval_hook(log_hook))
    hooks.append(Hook("checkpoint", lambda ctx: self._save(ctx.record.step, ctx.state,
                                                           self.loader.get_state()),
                      every=self.ckpt_cfg.every_steps, needs_state=True))
    profile = profile_hook(os.path.join(self.dir, "profile"), train.profile_start,
                           train.profile_steps, self.log)
    return hooks + ([profile] if profile else [])

  def _eval_hook(self, log_hook) -> Hook:
    from longctx.train.evaluate import Evaluator
    evaluator = Evaluator(self.stage, self.runner.model_cfg, self.mesh)

    def fn(ctx: StepContext) -> None:
      began = time.perf_counter()
      results = evaluator(ctx.state.params)
      log_hook.pause(time.perf_counter() - began)  # not part of tokens/s
      self.writer.write(ctx.record.step, results)
      log_hook.say(f"[{self.stage.name}] step {ctx.record.step}: " + ", ".join(
          f"{k} {v:.4g}" for k, v in results.items()))
    return Hook("eval", fn, every=self.stage.eval.every_steps, needs_state=True)

  def _save(self, step: int, state, data_state: dict, wait: bool = False) -> None:
    if step > 0 and step != self.saved:
      ckpt.save(self.manager, step, state, data_state)
      self.saved = step
    if wait:
      self.manager.wait_until_finished()

  def _non_finite(self, bad: _NonFinite) -> NonFiniteLossError:
    m, name, step = bad.record.metrics, self.stage.name, bad.record.step
    where = None if not self.saved else os.path.join(os.fspath(self.manager.directory),
                                                     str(self.saved))
    lr = checks.flag(self.config, name, "train.learning_rate")
    if where:
      kept = (f"The last good state, step {self.saved}, is saved in {where}. To resume from "
              f"it, rerun the same command with a lower learning rate, e.g. "
              f"{lr}={self.stage.train.learning_rate / 2:g}")
    else:
      kept = ("No step before it was applied, so nothing was saved; a rerun starts the stage "
              f"from its start (e.g. with a lower learning rate, {lr}=…)")
    return NonFiniteLossError(
        f"[{name}] step {step}: loss {m['loss']}, grad norm {m['grad_norm']} — not finite; the "
        f"update was not applied and the run stopped. {kept} (a resumed run accepts changes "
        f"to {checks.resumable_changes()}).", step, m["loss"], m["grad_norm"], where)

  def _finish(self, state) -> StageSummary:
    s, name = self.summary, self.stage.name
    ckpt.save_final_params(self.final_dir, state.params, self.runner.model_cfg,
                           assets_from=self.init[1] if self.init else None)
    self.manager.close()
    stats = self.loader.example_stats()
    skipped = {k: v for k, v in stats.items()
               if v and k in ("truncated", "dropped", "skipped", "no_target")}
    ran = ("no step left to run (resumed at the last step)" if s.first_loss is None else
           f"loss {s.first_loss:.4f} -> {s.last_loss:.4f}; {s.tokens:,} tokens in "
           f"{s.seconds:.1f} s")
    self.log(f"[{name}] done: {ran}; final weights in {self.final_dir}"
             + (f"; examples not used as-is: {skipped} of {stats.get('examples', 0)}"
                if skipped else ""))
    return s
