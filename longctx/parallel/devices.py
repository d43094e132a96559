"""What longctx knows of the devices it runs on, in one place: the accelerators' published
figures with their sources (`TABLE`: memory, peak FLOP/s for the MFU, HBM, device-link and
host-link bandwidths), and the one probe of a device's memory and the host's RAM.
Used by the planner and pre-flight (train.memory), the step metrics (train.metrics) and the eval
commands' length check (eval.common)."""
from __future__ import annotations

import dataclasses
import os

import jax

@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One accelerator's published figures, per device: memory (bytes), dense bf16 peak FLOP/s,
  HBM bandwidth, the device-to-device fabric and the host link (bytes/s in each direction:
  half the bidirectional figure vendors print), and where they come from. None: not recorded.

  `kinds`: substrings of jax's `device_kind` that name it (the step metrics' MFU). `planned`:
  `plan` reports a fit for it and `plan --max_len=NAME` takes it.
  """
  name: str
  kinds: tuple[str, ...]
  peak_flops: float
  memory_bytes: float | None = None
  hbm_bytes_per_s: float | None = None
  link: str | None = None
  link_bytes_per_s: float | None = None
  host_link_bytes_per_s: float | None = None
  source: str = ""
  planned: bool = False


_HOPPER = ("NVIDIA {} datasheet (SXM): BF16 Tensor Core 1,979 TFLOPS with sparsity, 989.4 dense; "
           "{}; NVLink 900 GB/s and PCIe Gen5 x16 128 GB/s, both bidirectional")
TABLE = (
    Accelerator("H100 80GB", ("H100",), 989.4e12, 80e9, 3.35e12, "NVLink 4", 450e9, 64e9,
                _HOPPER.format("H100 Tensor Core GPU", "80 GB HBM3 at 3.35 TB/s"), True),
    Accelerator("H200 141GB", ("H200",), 989.4e12, 141e9, 4.8e12, "NVLink 4", 450e9, 64e9,
                _HOPPER.format("H200 Tensor Core GPU", "141 GB HBM3e at 4.8 TB/s"), True),
    Accelerator("TPU v5p 95GB", ("TPU v5p",), 459e12, 95e9, 2765e9, "ICI, 3D torus", 600e9,
                None, "cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, 95 GB HBM2e at 2765 "
                "GBps, bidirectional ICI 1200 GBps per chip; no host-link figure", True),
    Accelerator("TPU v5e 16GB", ("TPU v5 lite", "TPU v5e"), 197e12, 16e9, 819e9,
                "ICI, 2D torus", 200e9, None, "cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, "
                "16 GB HBM2 at 819 GBps, bidirectional ICI 400 GBps per chip; no host-link "
                "figure", True),
    # Peak FLOP/s only (MFU on these devices); not planned for.
    Accelerator("A100", ("A100",), 312e12, source="NVIDIA A100 datasheet: BF16 312 TFLOPS dense"),
    Accelerator("L4", ("L4",), 121e12, source="NVIDIA L4 datasheet: BF16 242 TFLOPS with "
                "sparsity, 121 dense"),
    Accelerator("TPU v6e", ("TPU v6",), 918e12, source="cloud.google.com/tpu/docs/v6e: 918 "
                "TFLOPs bf16"),
    Accelerator("TPU v4", ("TPU v4",), 275e12, source="cloud.google.com/tpu/docs/v4: 275 "
                "TFLOPs bf16"),
)

# The accelerators `plan` reports a fit for and `plan --max_len=NAME` takes: (name, bytes).
ACCELERATORS = tuple((a.name, a.memory_bytes) for a in TABLE if a.planned)


def accelerator_of(device_kind: str) -> Accelerator | None:
  """The table's entry for a device of this jax `device_kind`, or None (a CPU, an unknown
  device)."""
  for acc in TABLE:
    if any(kind.lower() in device_kind.lower() for kind in acc.kinds):
      return acc
  return None


def peak_flops(device_kind: str) -> float | None:
  """The dense bf16 peak FLOP/s of a device of this kind, or None when unknown (a CPU)."""
  acc = accelerator_of(device_kind)
  return None if acc is None else acc.peak_flops


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
