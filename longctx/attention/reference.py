"""Dense attention: the oracle every other implementation is tested against (DESIGN.md, contract 3).

Legend: B batch, L sequence (queries), S sequence (keys), H query heads, K kv heads,
G query heads per kv head (H = K·G), D head dim.

The mask is defined here, once, from each token's *original* (natural-order) index and its
segment id, so that every layout and every implementation masks the same pairs:

    allowed(q, s) = seg[q] == seg[s]  and  seg[q] != 0
                    and (not causal or idx[s] <= idx[q])
                    and (no group or group(idx[q]) == group(idx[s]))
                    and (no window or idx[s] > idx[q] - window)

with group(i) = (i + shift) // group_size (S²-Attn, METHODS.md §2, without wrap-around), and
a sliding window of W keys: the query itself and the W − 1 before it (transformers'
`kv_idx > q_idx - sliding_window`; Mistral, Gemma 3's local layers).
A query row that allows nothing (padding) has output 0 and log-sum-exp −inf.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Static description of the attention mask beyond segment ids.

  causal: keys after the query (by original index) are masked.
  group_size: if set, queries attend only keys in the same group (idx + group_shift) // group_size.
  group_shift: offset of the group boundaries (S²-Attn's shifted half uses group_size // 2),
  ≥ 0: with indices ≥ 0 too, the Pallas kernels' truncating division equals floor division.
  window: if set (≥ 1), a query at index i attends only keys at index > i − window (a sliding
  window; with causal, the W keys i − W + 1 … i).
  """
  causal: bool = True
  group_size: Optional[int] = None
  group_shift: int = 0
  window: Optional[int] = None

  def __post_init__(self):
    if self.group_size is not None and self.group_size < 1:
      raise ValueError(f"MaskSpec.group_size must be ≥ 1; found {self.group_size}")
    if self.group_shift < 0:
      raise ValueError(f"MaskSpec.group_shift must be ≥ 0; found {self.group_shift}")
    if self.window is not None and self.window < 1:
      raise ValueError(f"MaskSpec.window must be ≥ 1 (or None: no window); found {self.window}")


def make_mask(idx_q_BQ, seg_q_BQ, idx_s_BS, seg_s_BS, mask_spec: MaskSpec):
  """Boolean mask [B, Q, S] of allowed (query, key) pairs; see the module docstring."""
  mask_BQS = (seg_q_BQ[:, :, None] == seg_s_BS[:, None, :]) & (seg_q_BQ[:, :, None] != 0)
  if mask_spec.causal:
    mask_BQS &= idx_s_BS[:, None, :] <= idx_q_BQ[:, :, None]
  if mask_spec.group_size is not None:
    grp_q_BQ = (idx_q_BQ + mask_spec.group_shift) // mask_spec.group_size
    grp_s_BS = (idx_s_BS + mask_spec.group_shift) // mask_spec.group_size
    mask_BQS &= grp_q_BQ[:, :, None] == grp_s_BS[:, None, :]
  if mask_spec.window is not None:
    mask_BQS &= idx_s_BS[:, None, :] > idx_q_BQ[:, :, None] - mask_spec.window
  return mask_BQS


def check_inputs(q_BLHD, k_BSKD, v_BSKD, segment_ids_BL=None):
  """Validates shapes and dtypes of an attention call; raises ValueError with what was found."""
  if q_BLHD.ndim != 4 or k_BSKD.ndim != 4 or v_BSKD.ndim != 4:
    raise ValueError(f"q, k, v must be [B, L, H, D]; got shapes {q_BLHD.shape}, {k_BSKD.shape}, "
                     f"{v_BSKD.shape}")
  if k_BSKD.shape != v_BSKD.shape:
    raise ValueError(f"k and v shapes differ: {k_BSKD.shape} vs {v_BSKD.shape}")
  b, l, h, d = q_BLHD.shape
  bk, s, kh, dk = k_BSKD.shape
  if (b, l, d) != (bk, s, dk):
    raise ValueError(f"q {q_BLHD.shape} and k {k_BSKD.shape} disagree in batch, length or head "
                     "dim (self-attention needs the same [B, L, ., D])")
  if h % kh:
    raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({kh}) for GQA/MQA")
  if not (q_BLHD.dtype == k_BSKD.dtype == v_BSKD.dtype):
    raise ValueError(f"q, k, v dtypes differ: {q_BLHD.dtype}, {k_BSKD.dtype}, {v_BSKD.dtype}")
  if not jnp.issubdtype(q_BLHD.dtype, jnp.floating):
    raise ValueError(f"q, k, v must be floating point; got {q_BLHD.dtype}")
  if segment_ids_BL is not None:
    if segment_ids_BL.shape != (b, l):
      raise ValueError(f"segment_ids must be [B, L] = {(b, l)}; got {segment_ids_BL.shape}")
    if not jnp.issubdtype(segment_ids_BL.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be integer; got {segment_ids_BL.dtype}")


def default_scale(head_dim: int, scale: Optional[float]) -> float:
  return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def masked_dense_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS, *, scale=None):
  """Dense attention under an explicit boolean mask [B, L, S]; float32 math, output in q.dtype.

  Returns (out_BLHD, lse_BLH); fully masked rows give out 0 and lse −inf, with finite gradients.
  """
  b, l, h, d = q_BLHD.shape
  kh = k_BSKD.shape[2]
  q_BLKGD = q_BLHD.astype(jnp.float32).reshape(b, l, kh, h // kh, d)
  s_BKGLS = jnp.einsum("blkgd,bskd->bkgls", q_BLKGD, k_BSKD.astype(jnp.float32))
  s_BKGLS = s_BKGLS * default_scale(d, scale)
  mask_B11LS = mask_BLS[:, None, None, :, :]
  s_BKGLS = jnp.where(mask_B11LS, s_BKGLS, NEG_INF)
  m_BKGL = jax.lax.stop_gradient(s_BKGLS.max(axis=-1))
  m_BKGL = jnp.where(jnp.isneginf(m_BKGL), 0.0, m_BKGL)
  p_BKGLS = jnp.exp(s_BKGLS - m_BKGL[..., None])
  l_BKGL = p_BKGLS.sum(axis=-1)
  empty_BKGL = l_BKGL == 0
  p_BKGLS = p_BKGLS / jnp.where(empty_BKGL, 1.0, l_BKGL)[..., None]
  o_BLKGD = jnp.einsum("bkgls,bskd->blkgd", p_BKGLS, v_BSKD.astype(jnp.float32))
  lse_BKGL = jnp.where(empty_BKGL, NEG_INF, m_BKGL + jnp.log(jnp.where(empty_BKGL, 1.0, l_BKGL)))
  lse_BLH = jnp.transpose(lse_BKGL, (0, 3, 1, 2)).reshape(b, l, h)
  return o_BLKGD.reshape(b, l, h, d).astype(q_BLHD.dtype), lse_BLH


def dense_attention_with_lse(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL=None, *, causal=True,
                             scale=None, mask_spec: Optional[MaskSpec] = None):
  """Dense attention in natural order; returns (out_BLHD, lse_BLH). See `dense_attention`."""
  check_inputs(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
  b, l = q_BLHD.shape[:2]
  mask_spec = MaskSpec(causal=causal) if mask_spec is None else mask_spec
  seg_BL = jnp.ones((b, l), jnp.int32) if segment_ids_BL is None else segment_ids_BL
  idx_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32)[None, :], (b, l))
  mask_BLS = make_mask(idx_BL, seg_BL, idx_BL, seg_BL, mask_spec)
  return masked_dense_attention(q_BLHD, k_BLKD, v_BLKD, mask_BLS, scale=scale)


def dense_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL=None, *, causal=True, scale=None,
                    mask_spec: Optional[MaskSpec] = None):
  """The oracle: O(L²) attention, float32 math, output in q.dtype.

  q: [B, L, Hq, D]; k, v: [B, L, Hkv, D] with Hq % Hkv == 0 (GQA/MQA, K/V never repeated);
  segment_ids: [B, L] int (0 = padding; a padding query attends nothing and outputs 0);
  scale: softmax scale, default 1/sqrt(D). `mask_spec` overrides `causal` with a full MaskSpec.
  Raises ValueError on mismatched shapes or dtypes.
  """
  return dense_attention_with_lse(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal=causal,
                                  scale=scale, mask_spec=mask_spec)[0]
