"""Tiles of the attention kernels: their sizes, the tokens' metadata, and whether a tile pair
is empty, full or partial.

`tile_config` turns the requested tile sizes (None = the tuned defaults of each kernel) into the
`TileConfig` of one (query chunk, key chunk) pair: sizes fitted to the chunk lengths, the mask
(`mask_spec`), the softmax scale and the kernel's name. `tiled_length` / `fitted_tiles` catch
lengths with no tile size near the requested ones. Every kernel masks from `TokenMeta` (each token's original
index and segment id) and decides from `TileStats` (a tile's ranges of both) by
`tile_full_empty`, before any score is computed, whether a tile pair can be skipped or needs no
mask. Legend: B batch, L sequence, C query chunk, S key chunk.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from longctx.attention.kernels import base as kernels
from longctx.attention.reference import MaskSpec


# Default tile sizes (queries × keys) of the forward and of the backward: 1024 × 1024, with the
# query tile divided by G = Hq / Hkv so that a tile's score rows (R = G·Q, online_softmax.py's
# legend) stay 1024 under GQA. On XLA:CPU the tile products contract only D (64–128), and at
# 1024 they run at 84–95% of a large matmul's speed (58–70% at 512), with a quarter of the
# per-tile loop and dispatch overhead; bench/RESULTS.md ("Tiles", "Where the time goes") has the
# measurements. The backward's can differ (FlashAttention kernels tile the two passes apart too).
BLOCK_Q, BLOCK_K = 1024, 1024
BLOCK_Q_BWD, BLOCK_K_BWD = 1024, 1024
# The Pallas GPU kernel's defaults: a Triton program holds its tiles in registers / shared
# memory, so they are much smaller (FlashAttention-2's 128 × 64 forward, 64 × 64 backward).
GPU_BLOCK_Q, GPU_BLOCK_K, GPU_BLOCK_Q_BWD, GPU_BLOCK_K_BWD = 128, 64, 64, 64
# The Pallas TPU kernel's: multiples of 128 (lanes); a 512 × 512 float32 score block is 1 MiB
# of VMEM, as in splash attention's default blocks.
TPU_BLOCK_Q, TPU_BLOCK_K, TPU_BLOCK_Q_BWD, TPU_BLOCK_K_BWD = 512, 512, 512, 512


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Static settings of the inner kernel: mask, softmax scale, tile sizes (block_q ×
  block_k in the forward; block_q_bwd × block_k_bwd in the backward, None = the forward's) and
  which kernel computes a chunk pair (`kernels.KERNELS`)."""
  mask_spec: MaskSpec
  scale: float
  block_q: int
  block_k: int
  block_q_bwd: int | None = None
  block_k_bwd: int | None = None
  kernel: str = "xla"

  def backward(self) -> "TileConfig":
    """The config the backward pass tiles with."""
    return dataclasses.replace(self, block_q=self.block_q_bwd or self.block_q,
                               block_k=self.block_k_bwd or self.block_k, block_q_bwd=None,
                               block_k_bwd=None)


def tile_config(mask_spec: MaskSpec, scale: float, c: int, s: int, block_q=None, block_k=None,
                block_q_bwd=None, block_k_bwd=None, kernel=None, group: int = 1,
                cap: int | None = None) -> TileConfig:
  """The TileConfig of a C-query, S-key chunk pair, every block reduced to a divisor of its
  length (`fit_block`).

  None = default: the forward's tiles default to (BLOCK_Q // group, BLOCK_K) (GPU_BLOCK_* /
  TPU_BLOCK_* for the Pallas kernels, whose programs take one query head each); the
  backward's to the forward's where the caller set those, else to (BLOCK_Q_BWD // group,
  BLOCK_K_BWD). So `block_q=block_k=128` tiles both passes at 128, and no arguments gives the
  tuned pairs. kernel: a name of `kernels.KERNELS`, None = "xla". group: G = Hq / Hkv,
  the query heads that share a tile's rows in the pure-JAX kernel. cap: the largest default
  tile (the ring passes C/2, so the two halves of a zigzag chunk, far apart in the sequence,
  never share a tile and causal skipping keeps working); blocks given are not capped.
  """
  kernel = kernels.check_kernel(kernel)
  rows = lambda block: max(1, block // max(1, group))
  defaults = {"pallas_gpu": (GPU_BLOCK_Q, GPU_BLOCK_K, GPU_BLOCK_Q_BWD, GPU_BLOCK_K_BWD),
              "pallas_tpu": (TPU_BLOCK_Q, TPU_BLOCK_K, TPU_BLOCK_Q_BWD, TPU_BLOCK_K_BWD)}.get(
                  kernel, (rows(BLOCK_Q), BLOCK_K, rows(BLOCK_Q_BWD), BLOCK_K_BWD))
  step = {"pallas_tpu": 128}.get(kernel, 1)  # the TPU kernel's blocks are multiples of 128
  if cap is not None:
    defaults = tuple(min(block, max(step, cap)) for block in defaults)
  explicit = block_q is not None or block_k is not None
  block_q = defaults[0] if block_q is None else block_q
  block_k = defaults[1] if block_k is None else block_k
  if block_q_bwd is None:
    block_q_bwd = block_q if explicit else defaults[2]
  if block_k_bwd is None:
    block_k_bwd = block_k if explicit else defaults[3]
  for name, value in (("block_q", block_q), ("block_k", block_k), ("block_q_bwd", block_q_bwd),
                      ("block_k_bwd", block_k_bwd)):
    if int(value) < 1:
      raise ValueError(f"{name} must be a positive tile size; got {value}")
  fit = functools.partial(fit_block, step=step, power_of_two=kernel == "pallas_gpu")
  return TileConfig(mask_spec, scale, fit(c, block_q), fit(s, block_k), fit(c, block_q_bwd),
                    fit(s, block_k_bwd), kernel)


class TokenMeta(NamedTuple):
  """Per-token metadata used for masking: original index and segment id, both [B, C] int32."""
  index: jax.Array
  segment: jax.Array


def fit_block(length: int, block: int, step: int = 1, power_of_two: bool = False) -> int:
  """The largest tile size <= block that divides length, is a multiple of `step` and, if
  asked, a power of two (what the Pallas TPU / GPU kernels need). If none is, `block` reduced
  to `length`, for the kernel's own check to report."""
  block = max(1, min(block, length))
  for size in range(block - block % step, 0, -step):
    if not length % size and (not power_of_two or not size & (size - 1)):
      return size
  return block


class TileStats(NamedTuple):
  """Per-tile ranges of the token metadata, each [.., N] int32: enough to tell, without
  building the mask, that a tile pair is certainly empty or certainly fully visible."""
  lo: jax.Array
  hi: jax.Array
  seg_lo: jax.Array
  seg_hi: jax.Array


def tile_full_empty(mask_spec: MaskSpec, sq: TileStats, sk: TileStats):
  """(full, empty), booleans, of one tile pair of one head, from the tiles' index and segment
  ranges (scalars); the Pallas kernels use it too.

  Both tests are sufficient conditions, so a tile called empty is empty and one called full is
  full (see `reference.make_mask`); anything else is MASKED and builds its mask. In causal
  attention only tiles on the diagonal are MASKED: the others skip the mask and its `where`;
  with a window of W, tiles wholly before i − W are skipped too, so the work grows with L·W.
  """
  full = ((sq.seg_lo == sq.seg_hi) & (sk.seg_lo == sk.seg_hi) & (sq.seg_lo == sk.seg_lo)
          & (sq.seg_lo != 0))
  empty = (sq.seg_hi < sk.seg_lo) | (sk.seg_hi < sq.seg_lo) | ((sq.seg_lo == 0) & (sq.seg_hi == 0))
  if mask_spec.causal:
    full &= sk.hi <= sq.lo
    empty |= sk.lo > sq.hi
  if mask_spec.group_size is not None:
    gq_lo, gq_hi, gk_lo, gk_hi = ((x + mask_spec.group_shift) // mask_spec.group_size
                                  for x in (sq.lo, sq.hi, sk.lo, sk.hi))
    full &= (gq_lo == gq_hi) & (gk_lo == gk_hi) & (gq_lo == gk_lo)
    empty |= (gq_hi < gk_lo) | (gk_hi < gq_lo)
  if mask_spec.window is not None:  # every key > every query − W; no key > any query − W
    full &= sk.lo > sq.hi - mask_spec.window
    empty |= sk.hi <= sq.lo - mask_spec.window
  return full, empty


def natural_meta(segment_ids_BL, b: int, l: int) -> TokenMeta:
  """Metadata of a natural-order sequence: index 0..L-1, segment ids (all 1 if None)."""
  seg = jnp.ones((b, l), jnp.int32) if segment_ids_BL is None else segment_ids_BL.astype(jnp.int32)
  idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32)[None, :], (b, l))
  return TokenMeta(idx, seg)


def tiled_length(length: int, tiles) -> int:
  """The length to run `length` tokens at: `length` itself, or, when its best tiles are under a
  quarter of those a power-of-two length gets (a prime length would be tiled by 1 token),
  `length` rounded up to a multiple of min(128, the smallest such tile).
  tiles(c, s) -> TileConfig (`tile_config` with all but the lengths bound)."""
  sizes = lambda cfg: (cfg.block_q, cfg.block_k, cfg.block_q_bwd, cfg.block_k_bwd)
  ideal = sizes(tiles(1 << 30, 1 << 30))  # powers of two: the requested tiles, rounded down
  if all(4 * got >= min(want, length) for got, want in zip(sizes(tiles(length, length)), ideal)):
    return length
  granule = min(128, *ideal)
  return -(-length // granule) * granule


def fitted_tiles(length: int, tiles, what: str) -> TileConfig:
  """tiles(length, length), warning (once per trace) when the length has no tile size near the
  requested ones (`tiled_length`) and the caller, `what`, cannot pad it."""
  cfg, padded = tiles(length, length), tiled_length(length, tiles)
  if padded != length:
    warnings.warn(f"{what}: {length} tokens have no tile size near the requested ones (got "
                  f"{cfg.block_q} x {cfg.block_k}), so they run in many tiny tiles; padded to "
                  f"{padded} tokens they would not", stacklevel=3)
  return cfg
