"""`python -m longctx.launch [--config=configs/NAME.py] [--workdir=DIR] [--config.key=value ...]`.

Trains every stage of the config (contract 5), resuming from the workdir. With no flags it runs
the embedded default, configs/tiny.py, on this machine's CPU in a fresh temporary workdir.

Multi-host: one process per host. `jax.distributed.initialize()` detects SLURM, Open MPI, TPU
pods and Kubernetes (JobSet) by itself; --coordinator_address / --num_processes / --process_id
name the coordinator explicitly (e.g. two processes on one machine). A single process on a
machine with no cluster environment skips it.
"""
from __future__ import annotations

import os
import sys
import tempfile

if "jax" not in sys.modules and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
  # On a CPU-only machine, emulate 8 devices so the sharded code paths run (DESIGN.md, tests).
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "tiny.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "ml_collections config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go; a rerun in the "
                               "same workdir resumes. Default: a new temporary directory.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (hosts)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
_LOCAL_DEVICES = flags.DEFINE_integer("local_device_count", None,
                                      "CPU only: devices to emulate in this process")
_PREFLIGHT = flags.DEFINE_bool("preflight", True, "before materialising anything, compile each "
                               "stage's step and refuse one whose memory plan exceeds the "
                               "devices' memory (--nopreflight: skip the check)")

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JOBSET_NAME", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def initialize_distributed() -> None:
  """jax.distributed.initialize() with explicit flags, or auto-detected on a cluster."""
  if _LOCAL_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _LOCAL_DEVICES.value)
  explicit = {k: v for k, v in (("coordinator_address", _COORDINATOR.value),
                                ("num_processes", _NUM_PROCESSES.value),
                                ("process_id", _PROCESS_ID.value)) if v is not None}
  if explicit:
    if len(explicit) != 3:
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go together; "
                           f"found only {sorted(explicit)}")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**explicit)
  elif any(k in os.environ for k in _CLUSTER_ENV) and not _is_single_host_tpu():
    jax.distributed.initialize()


def _is_single_host_tpu() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return bool(hosts) and "," not in hosts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.key=value overrides")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  initialize_distributed()
  from longctx.train.loop import run
  config = _CONFIG.value
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="longctx-")
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)
  say(f"longctx: config {config_flags.get_config_filename(flags.FLAGS['config'])}; "
      f"workdir {workdir}")
  from longctx.checkpoint.manager import CheckpointError
  from longctx.train.loop import NonFiniteLossError
  from longctx.train.memory import MemoryPlanError
  try:
    summaries = run(config, workdir, log=say, preflight=_PREFLIGHT.value)
  except MemoryPlanError as e:
    say(f"longctx: refused before training: {e}")
    sys.exit(2)
  except (NonFiniteLossError, CheckpointError) as e:
    say(f"longctx: stopped: {e}")
    sys.exit(3)
  say("summary:")
  for s in summaries:
    if s.skipped:
      say(f"  {s.name}: done earlier")
    elif s.first_loss is None:
      say(f"  {s.name}: nothing to do")
    else:
      rate = s.tokens / s.seconds if s.seconds else float("nan")
      say(f"  {s.name}: {s.steps} steps, loss {s.first_loss:.4f} -> {s.last_loss:.4f}, "
          f"{s.tokens:,} tokens, {rate:,.0f} tokens/s" + (" (stopped early)" if s.preempted else ""))
  from longctx.train.metrics import plot_losses
  plot = plot_losses(workdir, [s.name for s in summaries])
  say(f"metrics: {workdir}/<stage>/metrics.jsonl and tensorboard/; loss curve: {plot}; "
      f"final weights: {workdir}/<stage>/final")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
