"""`python -m longctx.launch [--config=configs/NAME.py] [--workdir=DIR] [--config.key=value ...]`.

Trains every stage of the config (contract 5), resuming from the workdir. With no flags it runs
the embedded default, configs/tiny.py, on this machine's CPU in a fresh temporary workdir.
`python -m longctx.launch keys [--config=...]` lists every config key with its value.

A mistyped key, a bad value, bad data or a missing file ends in one line naming it and exit
status 2 (`--debug` shows the traceback); a memory plan that does not fit also exits 2, a
non-finite loss or an unrestorable checkpoint 3.

Multi-host: one process per host. `jax.distributed.initialize()` detects SLURM, Open MPI, TPU
pods and Kubernetes (JobSet) by itself; --coordinator_address / --num_processes / --process_id
name the coordinator explicitly (e.g. two processes on one machine). A single process on a
machine with no cluster environment skips it.
"""
from __future__ import annotations

import functools
import os
import re
import sys
import tempfile

if "jax" not in sys.modules and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
  # On a CPU-only machine, emulate 8 devices so the sharded code paths run (DESIGN.md, tests).
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from longctx.cli import absl_flags_parser  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "tiny.py")


def _unknown_key(error: Exception, argv: list[str]) -> str:
  """One line for an override of a key the config lacks: ml_collections raises it, with its own
  "Did you mean" hint, while the flag is defined (it reads sys.argv then)."""
  text = str(error).encode().decode("unicode_escape")
  missing = re.search(r"'(\w+)'", text)
  hint = re.search(r'Did you mean "(\w+)"', text)
  for arg in argv[1:]:
    path = arg[len("--config."):].split("=", 1)[0].split(".") if arg.startswith(
        "--config.") else []
    if missing and missing.group(1) in path:
      prefix = path[:path.index(missing.group(1))]
      key = ".".join(prefix + [missing.group(1)])
      did_you_mean = f" (did you mean {'.'.join(prefix + [hint.group(1)])}?)" if hint else ""
      return f"unknown config key {key}{did_you_mean}; list the keys: {_KEYS_COMMAND}"
  return f"bad config override: {text.strip()}; list the keys: {_KEYS_COMMAND}"


_KEYS_COMMAND = "python -m longctx.launch keys [--config=FILE]"
try:
  _CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                            "the ml_collections config file of the run")
except (AttributeError, KeyError) as _error:
  print(f"longctx: {_unknown_key(_error, sys.argv)}", file=sys.stderr)
  sys.exit(2)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go; a rerun in the "
                               "same workdir resumes. Default: a new temporary directory.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (hosts)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
_LOCAL_DEVICES = flags.DEFINE_integer("local_device_count", None,
                                      "CPU only: devices to emulate in this process")
_DEBUG = flags.DEFINE_bool("debug", False, "show the traceback of a config, data or file error "
                           "instead of its one-line message")
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


def config_keys(config, prefix: str = "") -> list[str]:
  """`key = value  (type)` for every leaf of `config`, dotted, in order."""
  lines = []
  for key, value in config.items():
    if hasattr(value, "items"):
      lines += config_keys(value, f"{prefix}{key}.")
    else:
      lines.append(f"{prefix}{key} = {value!r}  ({type(value).__name__})")
  return lines


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing (`cli.absl_flags_parser`: `--help` exits 0, a bad flag value is one line
  with exit 2), and a missing config file one line too."""
  parse = absl_flags_parser(
      __doc__, after_flags=f"\n\n  --config.KEY=VALUE: override one config key; list them "
      f"with: {_KEYS_COMMAND}\n", explain=_bad_value)
  try:
    return parse(argv)
  except OSError:  # an override made the config flag load a file that is not there
    given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    _check_config_file(given[-1] if given else _DEFAULT_CONFIG)
    raise


def _check_config_file(path: str | None = None) -> None:
  """One line and exit 2 when --config names no file."""
  path = path or config_flags.get_config_filename(flags.FLAGS["config"])
  path = path.split(":", 1)[0]  # FILE:ARG
  if not os.path.isfile(path):
    print(f"longctx: --config={path}: expected a config file (e.g. configs/tiny.py), found "
          "nothing there", file=sys.stderr)
    sys.exit(2)


def _bad_value(message: str) -> str:
  """absl's "flag --config.a.b=x: <reason>" as "config key a.b: expected <type>, found 'x'"."""
  match = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", message, re.DOTALL)
  if not match:
    return message
  key, value, reason = match.groups()
  try:  # the config file's own value (the flag is not parsed yet)
    config = flags.FLAGS["config"].value
    expected = type(functools.reduce(lambda c, k: c[k], key.split("."), config)).__name__
  except Exception:  # noqa: BLE001  the message stands without the type
    return f"config key {key}: cannot read {value!r} ({reason})"
  return f"config key {key}: expected {expected}, found {value!r} ({reason})"


def main(argv):
  _check_config_file()
  if argv[1:] == ["keys"]:
    print("\n".join(config_keys(_CONFIG.value)))
    return
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.key=value overrides, "
                         "or the `keys` command")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  initialize_distributed()
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="longctx-")
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)
  say(f"longctx: config {config_flags.get_config_filename(flags.FLAGS['config'])}; "
      f"workdir {workdir}")
  summaries = _train(_CONFIG.value, workdir, say)
  say("summary:")
  for s in summaries:
    if s.skipped:
      say(f"  {s.name}: done earlier")
    elif s.first_loss is None:
      say(f"  {s.name}: nothing to do")
    else:
      rate = s.tokens / s.seconds if s.seconds else float("nan")
      steps = f"stopped at step {s.reached} of {s.steps}" if s.preempted else f"{s.steps} steps"
      say(f"  {s.name}: {steps}, loss {s.first_loss:.4f} -> {s.last_loss:.4f}, "
          f"{s.tokens:,} tokens, {rate:,.0f} tokens/s")
  from longctx.train.metrics import plot_losses
  plot = plot_losses(workdir, [s.name for s in summaries])
  say(f"metrics: {workdir}/<stage>/metrics.jsonl and tensorboard/; loss curve: {plot}; "
      f"final weights: {workdir}/<stage>/final")


def _train(config, workdir: str, say):
  """loop.run, with the exits of the module docstring."""
  from longctx.checkpoint.manager import CheckpointError
  from longctx.errors import user_error
  from longctx.train.loop import NonFiniteLossError, run
  from longctx.train.memory import MemoryPlanError
  try:
    return run(config, workdir, log=say, preflight=_PREFLIGHT.value)
  except MemoryPlanError as e:
    say(f"longctx: refused before training: {e}")
    sys.exit(2)
  except (NonFiniteLossError, CheckpointError) as e:
    say(f"longctx: stopped: {e}")
    sys.exit(3)
  except Exception as e:  # noqa: BLE001  a user's error is one line; a bug keeps its traceback
    error = None if _DEBUG.value else user_error(e)
    if error is None:
      raise
    print(f"longctx: error: {error} (--debug shows the traceback)", file=sys.stderr)
    sys.exit(2)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
