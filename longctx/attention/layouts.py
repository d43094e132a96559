"""Sequence layouts for context parallelism (DESIGN.md contract 3, METHODS.md §5).

Legend: B batch, L sequence, P devices on the ring, C = L // P local chunk.

A layout is a permutation `perm` of [0, L): the permuted row holds token perm[j] at slot j, and
device p owns slots [p·C, (p+1)·C). So perm[p·C:(p+1)·C] are the original indices of device p's
tokens, which is all the ring needs to mask exactly as the dense reference does.
"""
from __future__ import annotations

from typing import Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from longctx.names import Name


class Layout(Name):
  """Which tokens each device of the ring holds."""
  CONTIGUOUS = "contiguous"  # device p: tokens [p·C, (p+1)·C)
  ZIGZAG = "zigzag"          # 2P chunks; device p: chunks p and 2P−1−p (causal balance)
  STRIPED = "striped"        # token t on device t mod P (causal balance)

  @classmethod
  def parse(cls, layout: Union["Layout", str], what: str | None = None) -> "Layout":
    """Accepts a Layout or its name; raises ValueError listing the valid names."""
    return super().parse(layout, what or "layout")

  def parts(self, num_devices: int) -> int:
    """The chunks a row is cut into over `num_devices`: a row length must be a multiple."""
    return 2 * num_devices if self is Layout.ZIGZAG else num_devices

  def check_length(self, length: int, num_devices: int) -> None:
    """Raises ValueError if this layout cannot split `length` tokens over `num_devices`."""
    parts = self.parts(num_devices)
    if length % parts:
      raise ValueError(f"layout {self.value} over {num_devices} devices needs the sequence "
                       f"length to be a multiple of {parts}; got {length}")

  def permutation(self, length: int, num_devices: int) -> np.ndarray:
    """perm [L] int32: original index of the token at each permuted slot."""
    self.check_length(length, num_devices)
    p = num_devices
    if self is Layout.CONTIGUOUS:
      perm = np.arange(length)
    elif self is Layout.STRIPED:
      perm = np.arange(length).reshape(length // p, p).T.reshape(-1)
    else:
      chunks = np.arange(length).reshape(2 * p, length // (2 * p))
      order = [i for d in range(p) for i in (d, 2 * p - 1 - d)]
      perm = chunks[order].reshape(-1)
    return perm.astype(np.int32)

  def inverse(self, length: int, num_devices: int) -> np.ndarray:
    """inv [L] int32 with permuted[inv] == natural."""
    return np.argsort(self.permutation(length, num_devices)).astype(np.int32)


LayoutLike = Union[Layout, str]


def permute(x_BL, layout: LayoutLike, num_devices: int, axis: int = 1):
  """Reorders axis `axis` (the sequence) of one array from natural order into the layout."""
  layout = Layout.parse(layout)
  perm = layout.permutation(x_BL.shape[axis], num_devices)
  return jnp.take(x_BL, perm, axis=axis)


def unpermute(x_BL, layout: LayoutLike, num_devices: int, axis: int = 1):
  """Inverse of `permute`: back to natural order."""
  layout = Layout.parse(layout)
  inv = layout.inverse(x_BL.shape[axis], num_devices)
  return jnp.take(x_BL, inv, axis=axis)


def original_index(layout: LayoutLike, batch: int, length: int, num_devices: int):
  """[B, L] int32 original index of every slot of a permuted row (the ring's mask input)."""
  perm = Layout.parse(layout).permutation(length, num_devices)
  return jnp.broadcast_to(jnp.asarray(perm)[None, :], (batch, length))


def permute_batch(batch: Mapping[str, jax.Array], layout: LayoutLike, num_devices: int):
  """Permutes every key of a batch dict along axis 1 (contract 1), once per step.

  Targets were aligned before permuting, so they stay aligned. Add an `index` key holding
  `original_index(...)` (or use `positions` with segment ids) to give the ring its mask input.
  Raises ValueError if the keys disagree in sequence length.
  """
  lengths = {k: v.shape[1] for k, v in batch.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"batch keys disagree in sequence length (axis 1): {lengths}")
  return {k: permute(v, layout, num_devices) for k, v in batch.items()}


def unpermute_batch(batch: Mapping[str, jax.Array], layout: LayoutLike, num_devices: int):
  """Inverse of `permute_batch`."""
  return {k: unpermute(v, layout, num_devices) for k, v in batch.items()}


def sequence_axes(mesh, axis) -> tuple[str, ...]:
  """`axis` (a mesh axis name, or a tuple of them sharding the sequence jointly, major first)
  as a tuple; raises ValueError naming the mesh's axes if one is not in the mesh."""
  axes = (axis,) if isinstance(axis, str) else tuple(axis)
  for name in axes:
    if name not in mesh.shape:
      raise ValueError(f"mesh has no axis {name!r}; its axes are {tuple(mesh.shape)} "
                       f"(sizes {dict(mesh.shape)})")
  return axes


def run_context_parallel(local_fn, q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, *, mesh, axis,
                         layout: LayoutLike, check_vma: bool = True, layout_devices=None):
  """Permutes natural-order arrays into `layout`, runs `local_fn` under `jax.shard_map` with the
  sequence sharded over `axis` (with `check_vma`), and unpermutes its output.

  axis: a mesh axis, or a tuple of axes that shard the sequence jointly (major first, as in a
  PartitionSpec). layout_devices: the number of devices the layout balances (default: all of
  `axis`); the hybrid strategy balances its ring devices only. Auto and Explicit meshes both
  work, with unsharded or sharded inputs (`meshes.run_on_auto_mesh`).
  local_fn(q_BCHD, k_BCKD, v_BCKD, seg_BC, index_BC) -> out_BCHD runs on each device's chunk.
  """
  from jax.sharding import PartitionSpec as P

  from longctx.attention.meshes import run_on_auto_mesh
  from longctx.attention.reference import check_inputs

  check_inputs(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
  layout = Layout.parse(layout)
  axes = sequence_axes(mesh, axis)
  size = int(np.prod([mesh.shape[name] for name in axes]))
  parts = size if layout_devices is None else layout_devices
  b, l = q_BLHD.shape[:2]
  layout.check_length(l, parts)
  if l % size:
    raise ValueError(f"the sequence length must be a multiple of the {size} devices of mesh "
                     f"axes {axes}; got {l}")
  seq = axes[0] if len(axes) == 1 else axes
  act, tok = P(None, seq, None, None), P(None, seq)

  def body(mesh, q_BLHD, k_BLKD, v_BLKD, segment_ids_BL):
    seg_BL = jnp.ones((b, l), jnp.int32) if segment_ids_BL is None else segment_ids_BL
    q, k, v, seg = (permute(x, layout, parts) for x in (q_BLHD, k_BLKD, v_BLKD, seg_BL))
    out = jax.shard_map(local_fn, mesh=mesh, in_specs=(act, act, act, tok, tok), out_specs=act,
                        check_vma=check_vma)(q, k, v, seg, original_index(layout, b, l, parts))
    return unpermute(out, layout, parts)

  return run_on_auto_mesh(body, mesh, q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
