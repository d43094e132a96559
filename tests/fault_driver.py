"""Runs the trainer on the fault tests' config and kills itself at one chosen point.

  python tests/fault_driver.py WORKDIR POINT [N]

POINT (each at its first occurrence in this run): none (run to the end); step (SIGKILL when
this run's second step's metrics are read, the third step in flight); save (SIGKILL right after
an asynchronous checkpoint save is started); term-save (SIGTERM there instead: the run must stop
with a restorable checkpoint); before-final (SIGKILL as a stage starts writing final/); in-final
(after final/'s arrays, before its marker); between-stages (once a stage is done); random T
(SIGKILL after T seconds).
"""
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

from tests.fault_config import fault_config  # noqa: E402


def _die(sig=signal.SIGKILL):
  sys.stdout.flush()
  os.kill(os.getpid(), sig)


def main(workdir: str, point: str, n: float = 0):
  from longctx.checkpoint import manager
  from longctx.train import loop
  from longctx.train.hooks import Hook
  hooks, log = [], print
  if point == "step":
    seen = []
    hooks.append(Hook("kill", lambda ctx: (seen.append(1), len(seen) == 2 and _die()), every=1))
  elif point in ("save", "term-save"):
    original = manager.save

    def save(*args):
      original(*args)
      _die(signal.SIGKILL if point == "save" else signal.SIGTERM)
    manager.save = save
  elif point == "before-final":
    manager.save_final_params = lambda *a, **k: _die()
  elif point == "in-final":
    manager.mark_complete = lambda *a, **k: _die()
  elif point == "between-stages":
    log = lambda text: (print(text), "] done:" in text and _die())  # noqa: E731
  elif point == "random":
    threading.Timer(n, _die).start()
  loop.run(fault_config(), workdir, log=log, preflight=False, hooks=hooks)
  print("finished")
  os._exit(0)  # the random timer may still be pending


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0)
