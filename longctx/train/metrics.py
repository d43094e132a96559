"""Training metrics: FLOPs and MFU, per-device memory, and the writers (console, jsonl, TensorBoard).

FLOPs per token of one training step (forward + backward = 3 × forward):
  6·N                     matmul weights, N = parameters except the embedding lookup
  + 6·L·H·D·layers        attention scores and values: 2 matmuls × 2 FLOPs × L·H·D per token
                          forward, × 3 for training, × 1/2 for the causal mask
with L the row length (an upper bound for packed rows: documents attend only within themselves).
MFU = achieved FLOP/s / peak FLOP/s of the devices. Only process 0 writes anything.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax

from longctx.model.config import ModelConfig

# Dense bf16 peak FLOP/s per device, by a substring of jax's device_kind.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v6", 918e12),
    ("TPU v4", 275e12),
)


def flops_per_token(cfg: ModelConfig, length: int) -> float:
  matmul_params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (
      0 if cfg.tie_word_embeddings else 1)
  attention = 6 * length * cfg.num_heads * cfg.head_dim * cfg.num_layers
  return 6.0 * matmul_params + attention


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return flops
  return None


def device_memory() -> dict[str, float]:
  """Peak and current bytes in use on this process's first device, in GiB (when reported)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  out = {}
  if "peak_bytes_in_use" in stats:
    out["memory_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
  if "bytes_in_use" in stats:
    out["memory_gib"] = stats["bytes_in_use"] / 2**30
  return out


class MetricsWriter:
  """metrics.jsonl and TensorBoard event files under `directory`, process 0 only."""

  def __init__(self, directory: str):
    self.enabled = jax.process_index() == 0
    self._tb = None
    self.path = os.path.join(directory, "metrics.jsonl")
    if self.enabled:
      os.makedirs(directory, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))
      except ImportError:  # optional: metrics.jsonl is always written
        self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(directory: str) -> list[dict[str, Any]]:
  path = os.path.join(directory, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_losses(workdir: str, stages: list[str], path: str | None = None) -> str | None:
  """loss.png: the loss of every stage against the global step, stage boundaries marked."""
  if jax.process_index() != 0:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  offset = 0
  for name in stages:
    records = read_metrics(os.path.join(workdir, name))
    if not records:
      continue
    ax.plot([offset + r["step"] for r in records], [r["loss"] for r in records], label=name)
    offset += records[-1]["step"]
    ax.axvline(offset, color="grey", lw=0.5, ls=":")
  ax.set_xlabel("optimizer step (all stages)")
  ax.set_ylabel("training loss")
  ax.legend()
  ax.grid(alpha=0.3)
  path = path or os.path.join(workdir, "loss.png")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
