"""From the data pipeline to global, sharded, layout-permuted step batches.

The global batch of a step is a function of the config alone: `data.num_shards` logical shards,
each a grain pipeline over records s, s+S, s+2S, … (longctx.data.Shard(s, S)) yielding
`batch_size` rows; rows of shard s sit at [s·b, (s+1)·b) of each micro-batch. A process runs
only the shards whose rows its devices hold, so one host × 8 devices and two hosts × 4 devices
see the same global batch, and a checkpoint's data state (one entry per logical shard) restores
under any process count.

On the host, before anything reaches a device: each row's share of contract 2's denominator is
counted (natural order: segments are contiguous there), then every key is permuted into the ring
layout (contract 3: once per batch, at the data → model boundary).
"""
from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from longctx.attention.layouts import Layout
from longctx.data import DataConfig, Shard, make_iterator
from longctx.data.config import BatchingKind
from longctx.data.packing import BATCH_KEYS
from longctx.data.objective import row_denominators
from longctx.errors import ConfigError
from longctx.parallel.mesh import rows_per_step_divisor, step_batch_sharding, step_rows_sharding



def row_parts(seq: int, layout: str | None) -> int:
  """The chunks a row is cut into over `seq` devices (natural order, layout None: seq)."""
  return seq if layout is None else Layout.parse(layout).parts(seq)


def check_length(length: int, seq: int, layout: str | None, where: str = "data.max_len") -> None:
  """ValueError when the ring layout cannot split rows of `length` over `seq` devices."""
  parts = row_parts(seq, layout)
  if length % parts:
    raise ConfigError(f"config {where}: the {layout or 'sequence'} layout over seq={seq} devices "
                      f"needs a multiple of {parts}, found {length}")


class GlobalBatches:
  """Iterator of (batches [K, R, L] dict of jax.Array, denominator [K, R], shape (K, R, L))."""

  def __init__(self, cfg: DataConfig, mesh: Mesh, micro_batches: int,
               layout: str | None):
    self.cfg, self.num_shards, self.mesh = cfg, cfg.num_shards, mesh
    self.micro_batches, self.layout = micro_batches, layout
    self.rows = cfg.num_shards * cfg.batch_size
    divisor = rows_per_step_divisor(mesh)
    if self.rows % divisor:
      raise ConfigError(f"config data.num_shards x data.batch_size = {self.rows} rows per "
                        f"micro-batch: expected a multiple of mesh data x fsdp = {divisor}")
    self.seq = mesh.shape["seq"]
    if cfg.batching is BatchingKind.PACKED:
      check_length(cfg.max_len, self.seq, layout)
    self.sharding = step_batch_sharding(mesh)
    self.row_sharding = step_rows_sharding(mesh)
    self.shards = self._needed_shards()
    self.iterators = {s: make_iterator(cfg, Shard(s, cfg.num_shards)) for s in self.shards}

  def _needed_shards(self) -> list[int]:
    index_map = self.row_sharding.addressable_devices_indices_map(
        (self.micro_batches, self.rows))
    needed = set()
    for index in index_map.values():
      rows = range(self.rows)[index[1]]
      needed.update(r // self.cfg.batch_size for r in rows)
    return sorted(needed)

  # ---- state (one entry per logical shard) ---------------------------------------------------
  def get_state(self) -> dict[str, Any]:
    return {str(s): it.get_state() for s, it in self.iterators.items()}

  def set_state(self, states: dict[str, Any]) -> None:
    missing = [s for s in self.shards if str(s) not in states]
    if missing:
      raise ValueError(f"data state: expected logical shards {self.shards}, found "
                       f"{sorted(states)} (was data.num_shards changed?)")
    for s, it in self.iterators.items():
      it.set_state(states[str(s)])

  def example_stats(self) -> dict[str, int]:
    from longctx.data import find_stats
    total: dict[str, int] = {}
    for it in self.iterators.values():
      for k, v in find_stats(it).items():
        total[k] = total.get(k, 0) + int(v)
    return total

  # ---- batches -------------------------------------------------------------------------------
  def _length(self, parts: list[dict[str, np.ndarray]]) -> int:
    length = max(p["inputs"].shape[1] for p in parts)
    if jax.process_count() > 1 and self.cfg.batching is BatchingKind.SORTED:
      from jax.experimental import multihost_utils
      length = int(np.max(multihost_utils.process_allgather(np.int32(length))))
    multiple = 2 * self.seq if self.layout == "zigzag" else self.seq
    multiple = np.lcm(multiple, self.cfg.pad_multiple)
    return int(-(-length // multiple) * multiple)

  def __iter__(self) -> Iterator:
    return self

  def __next__(self):
    b, k_steps = self.cfg.batch_size, self.micro_batches
    parts = {(k, s): next(self.iterators[s]) for k in range(k_steps) for s in self.shards}
    length = self._length(list(parts.values()))
    host = {key: np.zeros((k_steps, self.rows, length),
                          np.float32 if key == "loss_weights" else np.int32) for key in BATCH_KEYS}
    denominator = np.zeros((k_steps, self.rows), np.int32)
    for (k, s), part in parts.items():
      rows = slice(s * b, (s + 1) * b)
      n = part["inputs"].shape[1]
      for key in BATCH_KEYS:
        host[key][k, rows, :n] = part[key]
      denominator[k, rows] = row_denominators(part, self.cfg.objective)
    if self.layout is not None and self.seq > 1:
      perm = np.asarray(Layout.parse(self.layout).permutation(length, self.seq))
      host = {key: np.take(v, perm, axis=2) for key, v in host.items()}
    batches = {key: jax.make_array_from_callback(v.shape, self.sharding, lambda i, v=v: v[i])
               for key, v in host.items()}
    denom = jax.make_array_from_callback(denominator.shape, self.row_sharding,
                                         lambda i: denominator[i])
    return batches, denom, (k_steps, self.rows, length)
