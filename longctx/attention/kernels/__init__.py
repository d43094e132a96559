"""Inner attention kernels by platform (issue 3, item 6).

Blockwise and ring attention compute each (query chunk, key chunk) pair with an inner kernel
chosen by name (`TileConfig.kernel`, the `kernel=` argument of the attention functions,
`attention.kernel` in a training config):

  "blockwise"   pure-JAX tiled online softmax (attention/blockwise.py); every platform; the
                default, and what CI runs.
  "pallas_gpu"  Pallas (Triton) FlashAttention-2 kernels (pallas_gpu.py): forward, dq and dk/dv,
                with the lse the ring merges through, masks from segment ids / original
                indices / S² groups, empty blocks skipped, GQA without repeating K/V. On a GPU
                it compiles through Triton; on any other backend it runs in Pallas' interpreter
                (slow: for tests). Its values and gradients are tested against the dense oracle
                in interpret mode, and its lowering to Triton for CUDA is tested on CPU; it has
                not yet run on a GPU, so it is opt-in, not picked automatically. On a GPU,
                `python bench/attention_gpu.py` checks and times it.

Not implemented: a TPU kernel (Pallas splash attention with residuals: its masks are static,
while a ring step's mask depends on the device and step) and cuDNN through
`jax.nn.dot_product_attention` (it does not return the lse that the ring's merge needs).
"""
from __future__ import annotations

from typing import Optional

import jax

KERNELS = ("blockwise", "pallas_gpu")
_PLANNED = {"pallas_tpu": "no TPU kernel yet (splash attention's masks are static; see "
                          "longctx.attention.kernels)",
            "cudnn": "jax.nn.dot_product_attention does not return the lse the ring merges"}


def check_kernel(name: Optional[str]) -> str:
  """The kernel name, validated (None = "blockwise"). Raises ValueError for an unknown name and
  NotImplementedError for a planned kernel that does not exist yet."""
  if name is None:
    return "blockwise"
  name = str(name).lower()
  if name in KERNELS:
    return name
  if name in _PLANNED:
    raise NotImplementedError(f"attention kernel {name!r}: {_PLANNED[name]}; available: "
                              f"{list(KERNELS)}")
  raise ValueError(f"unknown attention kernel {name!r}; expected one of {list(KERNELS)}")


def interpret(platform: Optional[str] = None) -> bool:
  """Whether the Pallas GPU kernel runs interpreted: on every backend but a GPU."""
  platform = jax.default_backend() if platform is None else platform
  return platform not in ("gpu", "cuda", "rocm")


def check_vma(kernel: Optional[str]) -> bool:
  """The `check_vma` a `jax.shard_map` around attention with `kernel` can use: False only for
  the Pallas GPU kernel run interpreted (off GPU), because Pallas' interpreter loses the
  varying-axes types of its loop carries (JAX 0.10) and shard_map's check then refuses them."""
  return not (check_kernel(kernel) == "pallas_gpu" and interpret())


__all__ = ["KERNELS", "check_kernel", "check_vma", "interpret"]
