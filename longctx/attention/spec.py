"""One typed description of how a model's attention is computed (DESIGN.md contract 3, "The
attention spec").

Legend: B batch, L sequence, H query heads, K kv heads, D head dim.

    spec = AttentionSpec(impl="context_parallel", strategy="ulysses", layout="zigzag",
                         tiles=Tiles(block_q=256, block_k=512))
    attend = spec.function(mesh, seq_axis="seq", permuted=True, batch_axes=("data", "fsdp"))
    out_BLHD = attend(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL)

An `AttentionSpec` is built once (the trainer reads it from a config's `attention` section) and
names everything that picks an algorithm: the implementation (dense oracle, tiled on one
device (online softmax over tiles), or context parallel), the context-parallel strategy and
layout, the inner kernel (`kernels.Kernel`), the tiles, causality and LongLoRA's S²-Attn group. `function` turns it into
the model's attention function, so the model and the trainer hold no algorithm of their own.

`permuted`: False: rows arrive in natural order and a context-parallel function permutes them
into the layout and back on every call (what casual users and tests do). True: the batch was put
in the layout once, at the data → model boundary (`layouts.permute_batch`), and positions serve
as the mask index: within a document they increase with the original index and segment ids keep
documents apart, so causal masking (and S²'s groups, taken on positions) stays exact.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax

from longctx.attention.kernels.base import Kernel, check_vma
from longctx.attention.layouts import Layout
from longctx.names import Name, renamed
from longctx.attention.strategies import Strategy

AttentionFn = Callable[..., jax.Array]


# "ring": the name before the strategies existed (then strategy must be "ring"); "blockwise":
# also the name of the inner kernel (now "xla"), so the one-device impl says what it does.
@renamed({"ring": "context_parallel", "blockwise": "tiled"})
class AttentionImpl(Name):
  """Where a row's attention runs."""
  DENSE = "dense"                         # the O(L²) oracle, one device per row
  TILED = "tiled"                         # tiled online softmax, one device per row
  CONTEXT_PARALLEL = "context_parallel"   # a row split over a mesh axis by `strategy`


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes, forward (block_q × block_k) and backward; None = the defaults of
  `tiles.tile_config`."""
  block_q: Optional[int] = None
  block_k: Optional[int] = None
  block_q_bwd: Optional[int] = None
  block_k_bwd: Optional[int] = None

  def kwargs(self) -> dict:
    return dataclasses.asdict(self)


def _parse(enum_cls, value, key):
  try:
    return enum_cls.parse(value)
  except ValueError:
    raise ValueError(f"{key}: expected one of {enum_cls.names()}, found {value!r}") from None


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """How attention is computed; strings are accepted for the enums (see the module docstring).

  s2_group: LongLoRA's S²-Attn group size G (even, dividing L; groups on positions); 0 = full
  attention. ulysses_devices: the hybrid's Ulysses devices U on permuted rows, where one
  sequence axis of S devices is split into S/U ring × U Ulysses devices (`meshes.split_axis`;
  on natural-order rows the hybrid takes two mesh axes instead). The Pallas kernels run inside `jax.shard_map` only, so impl must be
  context_parallel for them.
  """
  impl: AttentionImpl = AttentionImpl.CONTEXT_PARALLEL
  strategy: Strategy = Strategy.RING
  layout: Layout = Layout.ZIGZAG
  kernel: Kernel = Kernel.XLA
  tiles: Tiles = Tiles()
  causal: bool = True
  s2_group: int = 0
  ulysses_devices: int = 0

  def __post_init__(self):
    from longctx.attention.kernels.base import check_kernel
    set_ = functools.partial(object.__setattr__, self)
    set_("impl", _parse(AttentionImpl, self.impl, "impl"))
    set_("strategy", _parse(Strategy, self.strategy, "strategy"))
    set_("layout", _parse(Layout, self.layout, "layout"))
    set_("kernel", check_kernel(self.kernel))
    if self.kernel.pallas and self.impl is not AttentionImpl.CONTEXT_PARALLEL:
      # under plain jit XLA cannot split a Pallas call over the data / tensor axes: it would
      # gather the global batch onto every device; shard_map runs it per device
      raise ValueError(f"kernel={self.kernel.value!r} needs impl='context_parallel' (found "
                       f"{self.impl.value!r}): a Pallas call runs per device inside shard_map; "
                       "use kernel='xla'")
    if self.s2_group and not self.causal:
      raise ValueError(f"s2_group={self.s2_group} (S²-Attn) needs causal attention: its groups "
                       "are taken on positions")

  @property
  def context_parallel(self) -> bool:
    return self.impl is AttentionImpl.CONTEXT_PARALLEL

  @property
  def batch_layout(self) -> Optional[Layout]:
    """The layout the trainer's batches are permuted into (None: natural order)."""
    return self.layout if self.context_parallel else None

  def full_attention(self) -> "AttentionSpec":
    """This spec without S²-Attn (evaluation and inference use full attention)."""
    return dataclasses.replace(self, s2_group=0)

  def local_kwargs(self) -> dict:
    """The keyword arguments of the per-device functions (ring_attention & co.)."""
    return dict(self.tiles.kwargs(), kernel=self.kernel.value)

  def function(self, mesh: Optional[jax.sharding.Mesh] = None, *, seq_axis="seq",
               permuted: bool = False, batch_axes=None, head_axis=None,
               window: Optional[int] = None) -> "LayerAttention":
    """The model's attention function fn(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL).

    mesh / seq_axis: where a context-parallel spec splits the row (seq_axis: a mesh axis, or
    (ulysses_axis, ring_axis) for the hybrid strategy, natural order only). permuted: see the
    module docstring. batch_axes / head_axis (permuted only): the mesh axes that split the rows
    and the heads (data and tensor parallelism), so attention runs where the activations
    already are instead of gathering them. window: the layer's sliding window W (each query
    attends the W keys up to itself; None = global), the model's property rather than the
    algorithm's: the answer's `with_window(W)` is the same function for a layer of window W,
    which is how a model with local and global layers gets one function per kind from one
    spec (`LayerAttention`). Raises ValueError for a combination that cannot exist, naming it.
    """
    make = functools.partial(self._function, mesh, seq_axis=seq_axis, permuted=permuted,
                             batch_axes=batch_axes, head_axis=head_axis)
    return LayerAttention(make, window)

  def _function(self, mesh, window, *, seq_axis, permuted, batch_axes, head_axis) -> AttentionFn:
    mask = self.mask(window)
    if not self.context_parallel:
      from longctx.attention.shifted_sparse import at_positions
      return at_positions(self) if self.s2_group else _one_device(self, mask)
    if mesh is None:
      raise ValueError(f"attention impl 'context_parallel' (strategy "
                       f"{self.strategy.value!r}) needs a mesh")
    if permuted:
      return _in_layout(self, mesh, seq_axis, batch_axes, head_axis, mask)
    if batch_axes is not None or head_axis is not None:
      raise ValueError("batch_axes / head_axis need permuted=True")
    return _natural(self, mesh, seq_axis, mask)

  def mask(self, window: Optional[int] = None):
    """The `MaskSpec` of a layer with this spec and `window` (None: global attention).
    ValueError on a window < 1, or a window with S²-Attn (whose groups already bound the keys
    a query sees: the two together are not defined)."""
    from longctx.attention.reference import MaskSpec
    if window is not None and self.s2_group:
      raise ValueError(f"a sliding window ({window}) with S²-Attn (s2_group={self.s2_group}): "
                       "the combination is not defined; train a windowed model with full "
                       "attention (attention.s2_group=0)")
    if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
      raise ValueError(f"sliding window: expected a positive number of tokens or None, found "
                       f"{window!r}")
    return MaskSpec(causal=self.causal, window=None if window is None else int(window))


class LayerAttention:
  """`AttentionSpec.function`'s answer: the attention function of a layer with `window` (None:
  global), called as contract 3's fn(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL).

  `with_window(W)` is the same spec's function (same mesh and axes) for a layer of window W,
  made once per window and shared by all of them: the model (model.llama) asks it for each
  kind of layer it has. Any object with `__call__` and `with_window` can stand in its place.
  """

  def __init__(self, make: Callable[[Optional[int]], AttentionFn], window: Optional[int]):
    self.window = window
    self._make, self._fn = make, make(window)  # a bad window raises here, by name
    self._by_window = {window: self}

  def __call__(self, q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL):
    return self._fn(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL)

  def with_window(self, window: Optional[int]) -> "LayerAttention":
    if window not in self._by_window:
      other = LayerAttention(self._make, window)
      other._by_window = self._by_window
      self._by_window[window] = other
    return self._by_window[window]

  def __repr__(self) -> str:
    return f"LayerAttention(window={self.window})"


_RING, _ULYSSES = "seq_ring", "seq_ulysses"  # the hybrid's split of the sequence axis


def _one_device(spec: AttentionSpec, mask) -> AttentionFn:
  from longctx.attention.local import tiled_attention
  from longctx.attention.reference import dense_attention
  if spec.impl is AttentionImpl.DENSE:
    run = functools.partial(dense_attention, mask_spec=mask)
  else:
    run = functools.partial(tiled_attention, mask_spec=mask, **spec.local_kwargs())

  def fn(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL):
    del positions_BL
    return run(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
  return fn


def _natural(spec: AttentionSpec, mesh, seq_axis, mask) -> AttentionFn:
  from longctx.attention.strategies import context_parallel_attention
  if spec.s2_group:
    from longctx.attention.layouts import permute, unpermute
    if not isinstance(seq_axis, str):
      raise ValueError(f"S²-Attn runs over one sequence axis; got seq_axis={seq_axis!r}")
    in_layout = _in_layout(spec, mesh, seq_axis, None, None, mask)
    size = mesh.shape[seq_axis]

    def s2(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL):
      out = in_layout(*(permute(x, spec.layout, size) for x in (
          q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL)))
      return unpermute(out, spec.layout, size)
    return s2

  def fn(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL):
    del positions_BL
    return context_parallel_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, mesh=mesh,
                                      axis=seq_axis, mask_spec=mask, layout=spec.layout,
                                      strategy=spec.strategy, **spec.local_kwargs())
  return fn


def _in_layout(spec: AttentionSpec, mesh, seq_axis, batch_axes, head_axis, mask) -> AttentionFn:
  """Attention on rows already in the layout, positions as the mask index (causal only; a
  window on positions is exact too: within a document they differ as the original indices)."""
  from jax.sharding import PartitionSpec as P

  from longctx.attention.meshes import run_on_auto_mesh
  from longctx.attention.shifted_sparse import s2_local
  from longctx.attention.strategies import plan

  if not spec.causal:
    raise ValueError("attention on permuted rows needs causal attention: positions stand in "
                     "for the original token index only under a causal mask")
  hybrid = spec.strategy is Strategy.HYBRID
  if not isinstance(seq_axis, str) or (hybrid and spec.ulysses_devices < 1):
    raise ValueError(f"strategy {spec.strategy.value!r} with seq_axis={seq_axis!r} on permuted "
                     "rows: the trainer's batches are laid out over one sequence axis (for the "
                     "hybrid, set ulysses_devices: it splits that axis into ring × Ulysses)")
  heads = 1 if head_axis is None else mesh.shape[head_axis]
  parts = mesh.shape[seq_axis]  # the devices the batch's layout is over
  # the hybrid: seq split ring-major (same placement); the layout stays over all S devices,
  # which balances any grouping of them into ring devices (masks use the index)
  seq = (_RING, _ULYSSES) if hybrid else seq_axis
  axis = (_ULYSSES, _RING) if hybrid else seq_axis
  act, tok = P(batch_axes, seq, head_axis, None), P(batch_axes, seq)

  def local(q_BCHD, k_BCKD, v_BCKD, seg_BC, pos_BC, *, mesh, length):
    def attend(mask, q, k, v, seg, index):
      return plan(spec.strategy, mesh, axis, q.shape[2], mask_spec=mask, layout=spec.layout,
                  layout_devices=parts,
                  **spec.local_kwargs()).local(q, k, v, seg, index)
    if spec.s2_group:
      return s2_local(attend, q_BCHD, k_BCKD, v_BCKD, seg_BC, pos_BC, length=length,
                      group_size=spec.s2_group, head_axis=head_axis, heads=heads)
    return attend(mask, q_BCHD, k_BCKD, v_BCKD, seg_BC, pos_BC)

  def body(auto_mesh, q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL):
    _check_split(spec, mesh, seq_axis, head_axis, q_BLHD, k_BLKD)
    if hybrid:
      from longctx.attention.meshes import split_axis
      auto_mesh = split_axis(auto_mesh, seq_axis, spec.ulysses_devices, (_RING, _ULYSSES))
    fn = functools.partial(local, mesh=auto_mesh, length=q_BLHD.shape[1])
    run = jax.shard_map(lambda q, k, v, s, i: fn(q, k, v, s, i), mesh=auto_mesh,
                        in_specs=(act, act, act, tok, tok), out_specs=act,
                        check_vma=check_vma(spec.kernel))
    args = (q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL)
    if hybrid and not jax.sharding.get_abstract_mesh().empty:
      with jax.sharding.use_abstract_mesh(auto_mesh.abstract_mesh):  # shard_map's own
        return run(*args)
    return run(*args)

  return functools.partial(run_on_auto_mesh, body, mesh)


def _check_split(spec, mesh, seq_axis, head_axis, q_BLHD, k_BLKD) -> None:
  """ValueError (naming the axes and counts) when the heads cannot be split as asked."""
  hq, hk = q_BLHD.shape[2], k_BLKD.shape[2]
  heads = 1 if head_axis is None else mesh.shape[head_axis]
  if heads > 1 and (hq % heads or hk % heads):
    raise ValueError(f"{head_axis!r} ({heads} devices) must divide the query heads ({hq}) and "
                     f"the kv heads ({hk})")
  if spec.s2_group:
    from longctx.attention.shifted_sparse import check_s2
    check_s2(q_BLHD.shape[1], hq, hk, spec.s2_group)
    if heads > 1 and heads % 2:
      raise ValueError(f"S²-Attn with heads split over {head_axis!r} needs an even number of "
                       f"devices on it (each holding one half's heads); found {heads}")
  if spec.strategy in (Strategy.ULYSSES, Strategy.HYBRID):
    from longctx.attention.ulysses import check_heads
    size = mesh.shape[seq_axis] if spec.strategy is Strategy.ULYSSES else spec.ulysses_devices
    if size < 1 or mesh.shape[seq_axis] % size:
      raise ValueError(f"hybrid: ulysses_devices={size} must divide the {mesh.shape[seq_axis]} "
                       f"devices of {seq_axis!r}")
    halves = spec.s2_group and heads == 1  # each S² head part runs its own Ulysses
    try:
      from longctx.attention.shifted_sparse import s2_ulysses_heads
      check_heads(s2_ulysses_heads(hq, hk) if halves else hq // heads, size, seq_axis)
    except ValueError as e:
      where = (" (S²-Attn runs Ulysses on the plain and the shifted query heads apart)"
               if halves else "") + (
          f" (after {head_axis!r} split the {hq} query heads over {heads} devices)"
          if heads > 1 else "")
      raise ValueError(f"{e}{where}") from None

