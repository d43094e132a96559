"""What longctx knows of the devices it runs on, in one place: the accelerators it plans for
(memory), their peak FLOP/s (MFU), and the one probe of a device's memory and the host's RAM.
Used by the planner and pre-flight (train.memory), the step metrics (train.metrics) and the eval
commands' length check (eval.common)."""
from __future__ import annotations

import os

import jax

# The accelerators `plan` reports a fit for and `plan --max_len=NAME` takes: (name, bytes).
ACCELERATORS = (("H100 80GB", 80e9), ("H200 141GB", 141e9), ("TPU v5p 95GB", 95e9),
                ("TPU v5e 16GB", 16e9))

# Dense bf16 peak FLOP/s per device, by a substring of jax's device_kind.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v6", 918e12),
    ("TPU v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
  """The dense bf16 peak FLOP/s of a device of this kind, or None when unknown (a CPU)."""
  for name, flops in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


def memory_stats(device=None) -> dict:
  """The backend's memory statistics of `device` (default: this process's first), or {} where
  it reports none (CPU backends)."""
  device = jax.local_devices()[0] if device is None else device
  if device.platform == "cpu":
    return {}
  try:
    return device.memory_stats() or {}
  except Exception:  # noqa: BLE001  a backend without memory statistics
    return {}


def host_ram(available: bool = True) -> float:
  """The host's available RAM in bytes (MemAvailable), or its physical RAM."""
  if available:
    try:
      with open("/proc/meminfo") as f:
        for line in f:
          if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024
    except OSError:
      pass
  pages = "SC_AVPHYS_PAGES" if available else "SC_PHYS_PAGES"
  return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf(pages))
