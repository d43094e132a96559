"""Timing shared by the bench scripts."""
from __future__ import annotations

import time

import jax


def best_seconds(fn, args, repeats: int, warmup: bool = False) -> float:
  """The best wall time of `repeats` calls fn(*args), each waited for (after one untimed call
  if `warmup`, e.g. to compile a jitted fn)."""
  if warmup:
    jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best
