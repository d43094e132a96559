"""Training metrics: FLOPs and MFU, per-device memory, and the writers (console, jsonl, TensorBoard).

FLOPs per token of one training step (forward + backward = 3 × forward):
  6·N                     matmul weights, N = parameters except the embedding lookup
  + 6·L·H·D·layers        attention scores and values: 2 matmuls × 2 FLOPs × L·H·D per token
                          forward, × 3 for training, × 1/2 for the causal mask
with L the row length (an upper bound for packed rows: documents attend only within themselves).
tokens/s counts every slot of the step's rows, padding included (packing fills ~98% of them).
MFU = achieved FLOP/s / peak FLOP/s of the devices. Only process 0 writes anything.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import jax
from etils import epath

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
    self.path = epath.Path(directory) / "metrics.jsonl"
    self._lines: list[str] = []
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if self.path.exists():  # a resumed stage (already truncated to the restored step)
        self._lines = [x for x in self.path.read_text().splitlines() if x.strip()]
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.fspath(epath.Path(directory) / "tensorboard"))
      except ImportError:  # optional: metrics.jsonl is always written
        self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    # Rewritten whole (small) rather than appended: object stores such as gs:// cannot append.
    self._lines.append(json.dumps({"step": step, **metrics}))
    self.path.write_text("".join(line + "\n" for line in self._lines))
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(directory: str) -> list[dict[str, Any]]:
  path = epath.Path(directory) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    records = [r for r in read_metrics(os.path.join(workdir, name)) if "loss" in r]
    if not records:
      continue
    ax.plot([offset + r["step"] for r in records], [r["loss"] for r in records], label=name)
    offset += records[-1]["step"]
    ax.axvline(offset, color="grey", lw=0.5, ls=":")
  ax.set_xlabel("optimizer step (all stages)")
  ax.set_ylabel("training loss")
  ax.legend()
  ax.grid(alpha=0.3)
  path = path or os.fspath(epath.Path(workdir) / "loss.png")
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  plt.close(fig)
  epath.Path(path).write_bytes(buffer.getvalue())
  return path
