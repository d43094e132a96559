"""The inner kernels' names and what every kernel shares (the mask of a block pair, output
shapes, whether a Pallas kernel runs interpreted). Imports nothing of longctx: the tiles, the
Pallas kernels and the dispatch in kernels/__init__.py all build on it.
"""
from __future__ import annotations

from typing import Optional, Union

import jax

from longctx.names import Name, renamed


# "blockwise": the pure-JAX kernel's name until "blockwise" also named the one-device impl (now
# "tiled") and the module; the kernel is named by what compiles it.
@renamed({"blockwise": "xla"})
class Kernel(Name):
  """The registry of inner kernels (a `Name`: a Kernel equals, and formats as, its name)."""
  XLA = "xla"                # pure-JAX online softmax (attention/online_softmax.py); anywhere
  PALLAS_GPU = "pallas_gpu"  # Pallas (Triton) FlashAttention-2
  PALLAS_TPU = "pallas_tpu"  # Pallas (Mosaic) flash kernels

  @property
  def pallas(self) -> bool:
    """Whether this is a Pallas kernel (per device, inside shard_map; interpreted off its
    platform)."""
    return self is not Kernel.XLA


KERNELS = tuple(Kernel)
_PLATFORMS = {Kernel.PALLAS_GPU: ("gpu", "cuda", "rocm"), Kernel.PALLAS_TPU: ("tpu",)}
_PLANNED = {"cudnn": "jax.nn.dot_product_attention does not return the lse the ring merges",
            "splash": "splash attention's masks are static; a ring step's mask is not (use "
                      "pallas_tpu)"}


def check_kernel(name: Optional[Union[str, Kernel]]) -> Kernel:
  """The Kernel of a name (None = XLA). Raises ValueError for an unknown name and
  NotImplementedError for a planned kernel that does not exist yet."""
  if name is None:
    return Kernel.XLA
  if str(name).lower() in _PLANNED:
    raise NotImplementedError(f"attention kernel {name!r}: {_PLANNED[str(name).lower()]}; "
                              f"available: {Kernel.names()}")
  return Kernel.parse(name, "attention kernel")


def block_mask(mask_spec, iq_Q1, sq_Q1, ik_1T, sk_1T):
  """[Q, T] allowed pairs of a query block and a key block from their original indices and
  segment ids, given as a column [Q, 1] and a row [1, T] (`reference.make_mask` inside a
  Pallas kernel). Indices are ≥ 0, so truncating division is floor division."""
  from jax import lax
  mask = (sq_Q1 == sk_1T) & (sq_Q1 != 0)
  if mask_spec.causal:
    mask &= ik_1T <= iq_Q1
  if mask_spec.group_size is not None:
    gq = lax.div(iq_Q1 + mask_spec.group_shift, mask_spec.group_size)
    gk = lax.div(ik_1T + mask_spec.group_shift, mask_spec.group_size)
    mask &= gq == gk
  if mask_spec.window is not None:
    mask &= ik_1T > iq_Q1 - mask_spec.window
  return mask


def interpret(kernel: str = "pallas_gpu", platform: Optional[str] = None) -> bool:
  """Whether a Pallas kernel runs interpreted: on every backend but its own."""
  platform = jax.default_backend() if platform is None else platform
  return platform not in _PLATFORMS[check_kernel(kernel)]


def check_vma(kernel: Optional[str]) -> bool:
  """The `check_vma` a `jax.shard_map` around attention with `kernel` can use: False only for
  a Pallas kernel run interpreted (off its platform), because Pallas' interpreter loses the
  varying-axes types of its loop carries (JAX 0.10) and shard_map's check then refuses them."""
  kernel = check_kernel(kernel)
  return not (kernel in _PLATFORMS and interpret(kernel))


def out_struct(shape, like):
  """A float32 pallas_call output shape that varies over the same mesh axes as `like` (inside
  `jax.shard_map` with check_vma, pallas_call needs to be told)."""
  import jax.numpy as jnp
  mat = getattr(jax.typeof(like), "manual_axis_type", None)
  if mat is None:
    return jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.ShapeDtypeStruct(shape, jnp.float32, manual_axis_type=mat)
