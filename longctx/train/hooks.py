"""What runs around the train step: hooks, each due every `every` steps (and at a stage's end).

The loop (train/loop.py) dispatches step n + 1 before it reads step n's metrics, so the device
always has the next step queued while the host builds batches and writes logs. A hook sees a
`StepRecord`: step n's metrics on the host. Two kinds:

  needs_state=False   runs when the record arrives, one step late (logging, profiling);
  needs_state=True    runs in step with the device: at a step where such a hook is due the loop
                      reads the metrics before dispatching the next step, so the hook sees the
                      state after step n, already known finite (checkpointing, evaluation).

A hook may ask the loop to stop after the current step (`ctx.request_stop`); the loop then
saves a checkpoint at that step, as on preemption.
"""
from __future__ import annotations

import dataclasses
import signal
from typing import Any, Callable

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """Step `step`'s metrics on the host (loss, grad_norm, learning_rate, finite) and its shape."""
  step: int
  metrics: dict[str, float]
  micro_batches: int
  rows: int
  length: int

  @property
  def tokens(self) -> int:
    """Slots of the step's rows, padding included."""
    return self.micro_batches * self.rows * self.length


@dataclasses.dataclass
class StepContext:
  """What a hook is called with. `state` is the train state after `record.step` for hooks with
  needs_state=True, else None; `last_step` the stage's final step."""
  record: StepRecord
  last_step: int
  state: Any = None
  stop_requested: bool = False

  def request_stop(self) -> None:
    self.stop_requested = True


@dataclasses.dataclass
class Hook:
  """`fn(ctx)` at every step that is a multiple of `every` (0: never), and at the stage's last
  step when `at_end`."""
  name: str
  fn: Callable[[StepContext], None]
  every: int = 1
  needs_state: bool = False
  at_end: bool = True
  close: Callable[[], None] | None = None

  def due(self, step: int, last_step: int) -> bool:
    return bool(self.every and step % self.every == 0) or (self.at_end and step == last_step)


# ---- preemption ----------------------------------------------------------------------------------
class Preemption:
  """Whether the run should stop now to be preempted, decided at a step every process reaches.

  Multi-process with JAX's preemption service (`jax.distributed`; on by default): the service
  catches the scheduler's SIGTERM and agrees on a sync step in the background;
  `multihost_utils.reached_preemption_sync_point(step)` is a local check, no collective.
  One process (or the service disabled): a SIGTERM handler sets a flag, read at every step;
  with several processes and no service the flags are combined by a host allgather.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._service = False

  def __enter__(self):
    from jax._src import distributed
    self._service = (jax.process_count() > 1
                     and distributed.global_state.preemption_sync_manager is not None)
    if not self._service:
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

  def reached(self, step: int) -> bool:
    """Called by every process at every step, with the same step."""
    if self._service:
      from jax.experimental import multihost_utils
      self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
      return self.requested
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


# ---- profiling -----------------------------------------------------------------------------------
def profile_hook(directory: str, start: int, steps: int, log) -> Hook | None:
  """A JAX profiler trace of steps start+1 … start+steps into `directory` (TensorBoard's
  profile plugin or Perfetto read it); None when start is 0."""
  if start <= 0 or steps <= 0:
    return None
  tracing = [False]

  def fn(ctx: StepContext) -> None:
    step = ctx.record.step
    if step == start and not tracing[0]:
      jax.profiler.start_trace(directory)
      tracing[0] = True
    elif tracing[0] and (step >= start + steps or step == ctx.last_step):
      jax.profiler.stop_trace()
      log(f"profile of steps {start + 1}-{step} in {directory}")
      tracing[0] = False

  def close() -> None:
    if tracing[0]:
      jax.profiler.stop_trace()
      tracing[0] = False
  return Hook("profile", fn, every=1, close=close)
