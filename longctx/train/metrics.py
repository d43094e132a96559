"""Training metrics: FLOPs and MFU, per-device memory, and the writers (console, jsonl, TensorBoard).

FLOPs per token of one training step (forward + backward = 3 × forward):
  6·N                     matmul weights, N = parameters except the embedding lookup
  + 12·k·H·D per layer    attention scores and values: 2 matmuls × 2 FLOPs × k·H·D per token
                          forward, × 3 for training, with k the keys a query sees on average:
                          L/2 under the causal mask, W·(1 − W/2L) with a sliding window W < L
with L the row length (an upper bound for packed rows: documents attend only within themselves).
tokens/s counts every slot of the step's rows, padding included (packing fills ~98% of them).
MFU = achieved FLOP/s / peak FLOP/s of the devices. Only process 0 writes anything.
"""
from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import jax
from etils import epath

from longctx.model.config import ModelConfig
from longctx.parallel import devices



def keys_per_query(length: int, window: int | None) -> float:
  """The keys a query attends on average in a causal row of `length` tokens: (L + 1)/2 ≈ L/2,
  or with a sliding window W < L, (1/L)·Σ min(i + 1, W) = W − W(W − 1)/2L."""
  if window is None or window >= length:
    return length / 2  # the usual L/2 (MFU conventions); exactly (L + 1)/2
  return window - window * (window - 1) / (2 * length)


def flops_per_token(cfg: ModelConfig, length: int) -> float:
  matmul_params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (
      0 if cfg.tie_word_embeddings else 1)
  attention = sum(12 * keys_per_query(length, w) * cfg.num_heads * cfg.head_dim
                  for w in cfg.layer_windows)
  return 6.0 * matmul_params + attention


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
  if override_tflops > 0:
    return override_tflops * 1e12
  return devices.peak_flops(jax.devices()[0].device_kind)


def device_memory() -> dict[str, float]:
  """Peak and current bytes in use on this process's first device, in GiB (when reported)."""
  stats = devices.memory_stats()
  out = {}
  if "peak_bytes_in_use" in stats:
    out["memory_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
  if "bytes_in_use" in stats:
    out["memory_gib"] = stats["bytes_in_use"] / 2**30
  return out


def missing_metric_notes(peak: float | None) -> dict[str, str]:
  """Why a record has no `mfu` or no device memory, said in the record itself (on a CPU, both)."""
  device = jax.devices()[0]
  notes = {}
  if not peak:
    notes["mfu_note"] = (f"no mfu: no peak FLOP/s is known for device kind {device.device_kind!r}"
                         "; set train.peak_tflops_per_device to get one")
  if not device_memory():
    notes["memory_note"] = (f"no memory_gib: the {device.platform} backend reports no memory "
                            "statistics")
  return notes


class MetricsWriter:
  """metrics.jsonl and TensorBoard event files under `directory`, process 0 only.

  Each record is one JSON line, appended and flushed as it is written. `resume_step`: the step
  a resumed stage restarts after; lines logged after it (they are re-run) and a partial last
  line (a kill mid-write) are dropped first, and the repair is reported through `log`.
  Object stores (gs://…) cannot append, so there the file is rewritten whole on each record.
  """

  def __init__(self, directory: str, resume_step: int | None = None, log=print):
    self.enabled = jax.process_index() == 0
    self._tb = None
    self.path = epath.Path(directory) / "metrics.jsonl"
    self._append = "://" not in os.fspath(directory)
    self._lines: list[str] = []
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      self._lines = _kept_lines(self.path, resume_step, log)
      self.path.write_text("".join(line + "\n" for line in self._lines))
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.fspath(epath.Path(directory) / "tensorboard"))
    except ImportError:  # optional: metrics.jsonl is always written
      self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    line = json.dumps({"step": step, **metrics})
    if self._append:
      with open(os.fspath(self.path), "a") as f:
        f.write(line + "\n")
    else:
      self._lines.append(line)
      self.path.write_text("".join(x + "\n" for x in self._lines))
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _kept_lines(path: epath.Path, resume_step: int | None, log) -> list[str]:
  """The lines of an existing metrics.jsonl up to `resume_step` (all, if None); a line that does
  not parse is dropped and reported (only the last can be partial: a kill mid-append)."""
  kept, dropped, later = [], [], 0
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      dropped.append(number)
      continue
    if resume_step is None or step <= resume_step:
      kept.append(line)
    else:
      later += 1
  if dropped:
    log(f"{path}: dropped {len(dropped)} unreadable line(s) (line {dropped}; a partial write)")
  if later:
    log(f"{path}: dropped {later} record(s) after step {resume_step}, which is re-run")
  return kept


class LogHook:
  """The logging hook of a stage (train.hooks, called once per step's record, one step late):
  the progress bar, the summary's losses and tokens, and every `train.log_every` steps (and at
  the last) a metrics.jsonl record with tokens/s, step time, TFLOP/s (MFU) and device memory
  over the steps since the previous record."""

  def __init__(self, stage, model_cfg: ModelConfig, writer: MetricsWriter, summary, start: int):
    self.every, self.cfg, self.writer, self.summary = stage.train.log_every, model_cfg, writer, summary
    self.peak = peak_flops_per_device(stage.train.peak_tflops_per_device)
    self.notes = missing_metric_notes(self.peak)
    self.bar = None
    if jax.process_index() == 0:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=stage.train.steps, initial=start, desc=stage.name, dynamic_ncols=True,
                      leave=True)
    self._window(time.perf_counter())

  def _window(self, now: float) -> None:
    self.tokens, self.steps, self.began = 0, 0, now

  def pause(self, seconds: float) -> None:
    """Host time (evaluation) not to count in tokens/s."""
    self.began += seconds

  def say(self, text: str) -> None:
    if self.bar is not None:
      self.bar.write(text)

  def __call__(self, ctx) -> None:
    r, s = ctx.record, self.summary
    loss = r.metrics["loss"]
    s.first_loss = loss if s.first_loss is None else s.first_loss
    s.last_loss = loss
    s.tokens += r.tokens
    self.tokens, self.steps = self.tokens + r.tokens, self.steps + 1
    if self.bar is not None:
      self.bar.update(1)
    if not (r.step % self.every == 0 or r.step == ctx.last_step):
      return
    now = time.perf_counter()
    elapsed = max(now - self.began, 1e-9)
    record = {"loss": loss, "grad_norm": r.metrics["grad_norm"],
              "learning_rate": r.metrics["learning_rate"], "tokens_per_s": self.tokens / elapsed,
              "step_time_s": elapsed / self.steps, "seq_len": r.length}
    achieved = self.tokens / elapsed * flops_per_token(self.cfg, r.length)
    record["tflops_per_device"] = achieved / jax.device_count() / 1e12
    if self.peak:
      record["mfu"] = achieved / (self.peak * jax.device_count())
    record.update(device_memory())
    record.update(self.notes)
    self.writer.write(r.step, record)
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
    self._window(now)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def read_metrics(directory: str) -> list[dict[str, Any]]:
  path = epath.Path(directory) / "metrics.jsonl"
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:  # blank, or a partial last line of a killed run (repaired on resume)
      continue
  return records


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
