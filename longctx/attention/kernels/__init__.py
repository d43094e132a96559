"""Inner attention kernels by platform (issue 3, item 6).

Tiled and context-parallel attention compute each (query chunk, key chunk) pair with an inner kernel
chosen by name (`TileConfig.kernel`, the `kernel=` argument of the attention functions,
`attention.kernel` in a training config):

  "xla"         pure-JAX tiled online softmax (attention/online_softmax.py), compiled by XLA; every
                platform; the default, and what CI runs ("blockwise" before; still read).
  "pallas_gpu"  Pallas (Triton) FlashAttention-2 kernels (pallas_gpu.py): forward, dq and dk/dv.
  "pallas_tpu"  Pallas (Mosaic) flash kernels (pallas_tpu.py): the same three, with TPU
                layouts and block skipping from scalar-prefetched block ranges.

`query_forward` / `query_backward` lay out a query chunk (and its cotangent and statistics)
once for the kernel a `TileConfig` names and return a function of a key chunk, so the ring
does that work once per layer, not once per step; `pair_forward` / `pair_backward` are the
one-shot forms tiled attention uses. Both Pallas kernels return the lse the ring merges
through, build their masks from segment ids / original indices / S² groups (`block_mask`, so
every ring layout and step), skip the blocks the mask empties and do GQA without repeating K/V.
On their platform they compile (Triton / Mosaic); on any other backend they run in Pallas'
interpreter (slow: for tests).
Their values and gradients are tested against the dense oracle and the pure-JAX kernel in
interpret mode, and their lowering for CUDA / TPU is tested on CPU; neither has run on a GPU
or TPU yet, so they are opt-in, never picked automatically. On a GPU,
`python bench/attention_gpu.py` checks and times pallas_gpu.

Not implemented: cuDNN through `jax.nn.dot_product_attention` (it does not return the lse that
the ring's merge needs) and splash attention (its masks are static, while a ring step's mask
depends on the device and the step).
"""
from __future__ import annotations

from longctx.attention.kernels.base import (KERNELS, Kernel, block_mask, check_kernel,  # noqa: F401
                                           check_vma, interpret, out_struct)


def _pallas(cfg, q_BCHD):
  """The Pallas kernel module of `cfg.kernel` and its keyword arguments; checks the blocks
  (key chunks are as long as query chunks: self-attention)."""
  c, d = q_BCHD.shape[1], q_BCHD.shape[3]
  if cfg.kernel == "pallas_gpu":
    from longctx.attention.kernels import pallas_gpu as module
    module.check_blocks(c, c, d, cfg.block_q, cfg.block_k)
  else:
    from longctx.attention.kernels import pallas_tpu as module
    module.check_blocks(c, c, cfg.block_q, cfg.block_k)
  return module, dict(mask_spec=cfg.mask_spec, scale=cfg.scale, block_q=cfg.block_q,
                      block_k=cfg.block_k,
                      interpret=interpret(cfg.kernel))


def query_forward(cfg, q_BCHD, mq):
  """attend(k_BSKD, v_BSKD, mk) -> (out_BCHD, lse_BCH), float32, of this query chunk (metadata
  mq: `tiles.TokenMeta`) against a key chunk, by `cfg.kernel` (`tiles.TileConfig`)."""
  if Kernel(cfg.kernel).pallas:
    module, kw = _pallas(cfg, q_BCHD)
    return module.forward_for(q_BCHD, mq, **kw)
  from longctx.attention.online_softmax import chunk_forward
  return lambda k, v, mk: chunk_forward(cfg, q_BCHD, k, v, mq, mk)[:2]


def query_backward(cfg, q_BCHD, do_BCHD, lse_BCH, delta_BCH, mq):
  """grads(k_BSKD, v_BSKD, mk) -> (dq, dk, dv), float32, of this query chunk against a key
  chunk, by `cfg.kernel`; lse_BCH is the final log-sum-exp (see `online_softmax.chunk_backward`)."""
  if Kernel(cfg.kernel).pallas:
    module, kw = _pallas(cfg, q_BCHD)
    return module.backward_for(q_BCHD, do_BCHD, lse_BCH, delta_BCH, mq, **kw)
  from longctx.attention.online_softmax import chunk_backward
  return lambda k, v, mk: chunk_backward(cfg, q_BCHD, k, v, do_BCHD, lse_BCH, delta_BCH, mq, mk)


def pair_forward(cfg, q_BCHD, k_BSKD, v_BSKD, mq, mk):
  """(out_BCHD, lse_BCH), float32, of a query chunk against a key chunk (`query_forward`)."""
  return query_forward(cfg, q_BCHD, mq)(k_BSKD, v_BSKD, mk)


def pair_backward(cfg, q_BCHD, k_BSKD, v_BSKD, do_BCHD, lse_BCH, delta_BCH, mq, mk):
  """(dq, dk, dv), float32, of a query chunk against a key chunk (`query_backward`)."""
  return query_backward(cfg, q_BCHD, do_BCHD, lse_BCH, delta_BCH, mq)(k_BSKD, v_BSKD, mk)


__all__ = ["KERNELS", "Kernel", "block_mask", "check_kernel", "check_vma", "interpret",
           "out_struct", "pair_backward", "pair_forward", "query_backward", "query_forward"]
