"""Context-parallel strategies behind one entry point (DESIGN.md contract 3, "Strategies").

Legend: B batch, L sequence, H query heads, K kv heads, D head dim, P devices of the axis.

    out = context_parallel_attention(q, k, v, seg, mesh=mesh, axis="seq", strategy="ulysses")

A `Strategy` names how the sequence's attention is split over the devices of `axis`:
  ring        K/V chunks travel a ring of P ppermute steps (ring.py).
  all_gather  K/V are all-gathered once; the backward reduce-scatters dK/dV (all_gather.py).
  ulysses     all_to_all from sequence- to head-sharding and back (ulysses.py); H % P == 0.
  hybrid      Ulysses over axis[0] around the ring over axis[1] (ulysses.py, USP);
              axis = (ulysses_axis, ring_axis).
Every strategy permutes natural-order inputs into the layout, runs under `jax.shard_map` and
unpermutes (`layouts.run_context_parallel`), on Auto or Explicit meshes (meshes.py).

Hybrid's sharding: the sequence dim is sharded over the mesh axes (ring_axis, ulysses_axis),
ring major, and the layout balances the R ring devices only. Device (r, u) then holds slots
[(r·U + u)·C, (r·U + u + 1)·C) of the permuted row, so the all_to_all over the Ulysses axis
concatenates, in u order, exactly ring chunk r of the layout: [r·U·C, (r+1)·U·C).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Union

from longctx.attention.layouts import LayoutLike, run_context_parallel, sequence_axes
from longctx.names import Name


class Strategy(Name):
  """How attention over one sequence is split across devices (see the module docstring)."""
  RING = "ring"
  ALL_GATHER = "all_gather"
  ULYSSES = "ulysses"
  HYBRID = "hybrid"

  @classmethod
  def parse(cls, strategy: Union["Strategy", str], what: str | None = None) -> "Strategy":
    """Accepts a Strategy or its name ("all-gather" too); raises ValueError listing the names."""
    return super().parse(strategy, what or "context-parallel strategy")


StrategyLike = Union[Strategy, str]
# The strategies over one sequence axis (the hybrid needs two, or `ulysses_devices`): what eval
# and the planner's traffic table offer.
ONE_AXIS = tuple(s for s in Strategy if s is not Strategy.HYBRID)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A strategy resolved on a mesh: the mesh axes sharding the sequence (major first), how many
  devices the layout balances, and the per-device function local(q, k, v, seg, index)."""
  seq_axes: tuple[str, ...]
  layout_devices: int
  local: Callable


def _one_axis(strategy: Strategy, mesh, axis) -> str:
  if not isinstance(axis, str):
    raise ValueError(f"strategy {strategy.value!r} runs over one mesh axis; got axis={axis!r} "
                     f"(mesh axes {dict(mesh.shape)})")
  return sequence_axes(mesh, axis)[0]


def _plan_ring(mesh, axis, num_heads, kw) -> Plan:
  from longctx.attention.ring import ring_attention
  axis = _one_axis(Strategy.RING, mesh, axis)
  return Plan((axis,), mesh.shape[axis], functools.partial(ring_attention, axis=axis, **kw))


def _without_layout(kw) -> dict:
  """The keyword arguments without the layout, which only the ring uses (to stop early)."""
  return {k: v for k, v in kw.items() if k not in ("layout", "layout_devices")}


def _plan_all_gather(mesh, axis, num_heads, kw) -> Plan:
  from longctx.attention.all_gather import all_gather_attention
  axis = _one_axis(Strategy.ALL_GATHER, mesh, axis)
  return Plan((axis,), mesh.shape[axis],
              functools.partial(all_gather_attention, axis=axis, **_without_layout(kw)))


def _plan_ulysses(mesh, axis, num_heads, kw) -> Plan:
  from longctx.attention.ulysses import check_heads, ulysses_attention
  axis = _one_axis(Strategy.ULYSSES, mesh, axis)
  check_heads(num_heads, mesh.shape[axis], axis)
  return Plan((axis,), mesh.shape[axis],
              functools.partial(ulysses_attention, axis=axis, **_without_layout(kw)))


def _plan_hybrid(mesh, axis, num_heads, kw) -> Plan:
  from longctx.attention.ulysses import check_heads, hybrid_attention
  if isinstance(axis, str) or len(tuple(axis)) != 2 or len(set(axis)) != 2:
    raise ValueError(f"strategy 'hybrid' needs axis=(ulysses_axis, ring_axis), two distinct "
                     f"mesh axes; got axis={axis!r} (mesh axes {dict(mesh.shape)})")
  ulysses_axis, ring_axis = sequence_axes(mesh, axis)
  check_heads(num_heads, mesh.shape[ulysses_axis], ulysses_axis)
  local = functools.partial(hybrid_attention, ulysses_axis=ulysses_axis, ring_axis=ring_axis,
                            **kw)
  return Plan((ring_axis, ulysses_axis), mesh.shape[ring_axis], local)


_PLANNERS = {Strategy.RING: _plan_ring, Strategy.ALL_GATHER: _plan_all_gather,
             Strategy.ULYSSES: _plan_ulysses, Strategy.HYBRID: _plan_hybrid}


def plan(strategy: StrategyLike, mesh, axis, num_heads: int, **local_kwargs) -> Plan:
  """The `Plan` of `strategy` on `mesh`; local_kwargs go to the per-device function.
  `layout` (and `layout_devices`, default the plan's) among them: the layout of the rows, which
  lets a ring with a windowed mask stop early (`ring.ring_hops`); the other strategies take
  no layout. Raises ValueError on an unknown strategy, axes not in the mesh, or head counts
  Ulysses cannot split."""
  strategy = Strategy.parse(strategy)
  resolved = _PLANNERS[strategy](mesh, axis, num_heads, local_kwargs)
  if local_kwargs.get("layout") is not None and local_kwargs.get("layout_devices") is None \
      and strategy in (Strategy.RING, Strategy.HYBRID):
    local = functools.partial(resolved.local, layout_devices=resolved.layout_devices)
    resolved = dataclasses.replace(resolved, local=local)
  return resolved


def context_parallel_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL=None, *, mesh, axis="seq",
                               causal=True, layout: LayoutLike = "zigzag",
                               strategy: StrategyLike = "ring", scale=None, block_q=None,
                               block_k=None, block_q_bwd=None, block_k_bwd=None, mask_spec=None,
                               kernel=None):
  """Context-parallel attention over mesh axis `axis` on global arrays in natural order.

  Applies the layout, runs the strategy's per-device function under `jax.shard_map`, and
  undoes the layout. q: [B, L, Hq, D]; k, v: [B, L, Hkv, D]; segment_ids: [B, L] int32
  (0 = padding) or None; layout: Layout or "contiguous" / "zigzag" / "striped";
  strategy: Strategy or "ring" / "all_gather" / "ulysses" / "hybrid" (axis =
  (ulysses_axis, ring_axis) for hybrid); block_*: tile sizes and kernel: the inner kernel (see
  `ring.ring_attention`). Returns out like q, equal to `dense_attention` (values and
  gradients). Other mesh axes see the arrays replicated. The mesh may be Auto or Explicit
  (`jax.make_mesh`'s default), the inputs unsharded or sharded (meshes.py).
  Raises ValueError on bad shapes, dtypes, layouts, strategies, axes, head counts Ulysses
  cannot split, or lengths the layout cannot split.
  """
  from longctx.attention.kernels import check_vma
  from longctx.attention.reference import check_inputs

  check_inputs(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
  resolved = plan(strategy, mesh, axis, q_BLHD.shape[2], causal=causal, scale=scale,
                  block_q=block_q, block_k=block_k, block_q_bwd=block_q_bwd,
                  block_k_bwd=block_k_bwd, mask_spec=mask_spec, kernel=kernel, layout=layout)
  return run_context_parallel(resolved.local, q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, mesh=mesh,
                              axis=resolved.seq_axes, layout=layout,
                              check_vma=check_vma(kernel), layout_devices=resolved.layout_devices)
