"""The typed attention spec (attention/spec.py): parsing and its errors, and the functions it
builds against the dense oracle (values and gradients) for every impl and strategy, in natural
order and on permuted rows, on Explicit meshes (`jax.make_mesh`'s default) with sharded inputs.

Legend: B batch, L sequence, H query heads, K kv heads, D head dim.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as PS

from longctx.attention import (AttentionImpl, AttentionSpec, Kernel, Layout, Strategy, Tiles,
                               dense_attention, permute, unpermute)
from tests.helpers import make_inputs, random_segments

TOL = 2e-5
L = 32


def _positions(seg_BL):
  """Document positions of packed rows: 0, 1, … from each document's start."""
  seg = np.asarray(seg_BL)
  pos = np.zeros_like(seg)
  for b in range(seg.shape[0]):
    for t in range(1, seg.shape[1]):
      pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
  return jnp.asarray(pos, jnp.int32)


def _case(h=4, kh=2, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = make_inputs(rng, l=L, h=h, kh=kh)
  seg = random_segments(rng, 2, L)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * (seg[..., None, None] > 0)
  return q, k, v, seg, _positions(seg), ct


def _value_and_grads(fn, q, k, v, ct):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out,) + vjp(ct)


def _assert_close(want, got, seg):
  keep = np.asarray(seg > 0)[..., None, None]
  for name, w, g in zip(("out", "dq", "dk", "dv"), want, got):
    err = float(np.abs(np.where(keep, np.asarray(w) - np.asarray(g), 0)).max()) if name == "out" \
        else float(np.abs(np.asarray(w) - np.asarray(g)).max())
    assert err < TOL, (name, err)


def _oracle(q, k, v, seg, ct):
  return _value_and_grads(lambda q, k, v: dense_attention(q, k, v, seg), q, k, v, ct)


def test_strings_parse_into_the_registries():
  spec = AttentionSpec(impl="ring", strategy="all-gather", layout="STRIPED", kernel=None)
  assert spec.impl is AttentionImpl.CONTEXT_PARALLEL  # "ring": the name before the strategies
  assert (spec.strategy, spec.layout, spec.kernel) == (Strategy.ALL_GATHER, Layout.STRIPED,
                                                       Kernel.XLA)
  assert spec.strategy == "all_gather" and f"{spec.layout}" == "striped"
  assert spec.batch_layout is Layout.STRIPED
  assert AttentionSpec(impl="dense").batch_layout is None
  assert AttentionSpec(s2_group=8).full_attention().s2_group == 0
  assert spec.local_kwargs() == dict(block_q=None, block_k=None, block_q_bwd=None,
                                     block_k_bwd=None, kernel="xla")


@pytest.mark.parametrize("kwargs,error,match", [
    ({"strategy": "ringg"}, ValueError, r"strategy: expected one of \['ring', 'all_gather', "),
    ({"layout": "spiral"}, ValueError, r"layout: expected one of \['contiguous', 'zigzag'"),
    ({"impl": "flash"}, ValueError, r"impl: expected one of \['dense', 'tiled', 'context_"),
    ({"kernel": "flash9000"}, ValueError, "unknown attention kernel 'flash9000'"),
    ({"kernel": "splash"}, NotImplementedError, "splash attention's masks are static"),
    ({"impl": "tiled", "kernel": "pallas_gpu"}, ValueError,
     "kernel='pallas_gpu' needs impl='context_parallel' .found 'tiled'"),
    ({"s2_group": 8, "causal": False}, ValueError, "s2_group=8 .S²-Attn. needs causal"),
])
def test_bad_spec_names_what_was_expected(kwargs, error, match):
  with pytest.raises(error, match=match):
    AttentionSpec(**kwargs)


def test_bad_function_arguments():
  mesh = jax.make_mesh((8,), ("seq",))
  with pytest.raises(ValueError, match="needs a mesh"):
    AttentionSpec().function()
  with pytest.raises(ValueError, match="batch_axes / head_axis need permuted=True"):
    AttentionSpec().function(mesh, batch_axes="seq")
  with pytest.raises(ValueError, match="permuted rows needs causal"):
    AttentionSpec(causal=False).function(mesh, permuted=True)
  q, k, v, seg, pos, _ = _case(h=4)
  fn = AttentionSpec(strategy="ulysses", s2_group=8).function(jax.make_mesh((4,), ("seq",)))
  with pytest.raises(ValueError, match="num_heads=2 is not divisible by 4 .S²-Attn runs Ulysses "
                                       "on the plain and the shifted"):
    fn(q, k, v, seg, pos)


@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_one_device_impls_equal_dense(impl):
  q, k, v, seg, pos, ct = _case()
  fn = AttentionSpec(impl=impl, tiles=Tiles(8, 8)).function()
  got = jax.jit(lambda q, k, v: _value_and_grads(lambda q, k, v: fn(q, k, v, seg, pos),
                                                 q, k, v, ct))(q, k, v)
  _assert_close(_oracle(q, k, v, seg, ct), got, seg)


@pytest.mark.matrix
@pytest.mark.parametrize("strategy,h,kh", [("ring", 4, 2), ("all_gather", 4, 1),
                                           ("ulysses", 8, 2)])
def test_natural_order_on_an_explicit_mesh_with_sharded_inputs(strategy, h, kh):
  """What a new user writes: `jax.make_mesh` (Explicit axes) and inputs sharded on it."""
  q, k, v, seg, pos, ct = _case(h=h, kh=kh)
  mesh = jax.make_mesh((2, 4), ("data", "seq"))
  shard = lambda x, *axes: jax.device_put(x, NamedSharding(mesh, PS(*axes)))  # noqa: E731
  qs, ks, vs = (shard(x, "data", "seq") for x in (q, k, v))
  fn = AttentionSpec(strategy=strategy, layout="zigzag", tiles=Tiles(4, 4)).function(mesh)
  got = jax.jit(lambda q, k, v: _value_and_grads(lambda q, k, v: fn(q, k, v, seg, pos),
                                                 q, k, v, shard(ct, "data", "seq")))(qs, ks, vs)
  assert got[0].sharding.is_equivalent_to(qs.sharding, q.ndim)
  _assert_close(_oracle(q, k, v, seg, ct), got, seg)


@pytest.mark.parametrize("strategy,layout", [("ring", "striped"), ("all_gather", "zigzag"),
                                             ("ulysses", "contiguous")])
def test_permuted_rows_with_positions_equal_dense(strategy, layout):
  """The trainer's path: rows in the layout once, positions as the mask index, rows over data
  and heads over tensor (data=2 × seq=2 × tensor=2). (Every strategy × layout on the original
  index: tests/test_attention_strategies.py.)"""
  q, k, v, seg, pos, ct = _case(h=4, kh=2)
  mesh = jax.make_mesh((2, 2, 2), ("data", "seq", "tensor"))
  fn = AttentionSpec(strategy=strategy, layout=layout, tiles=Tiles(4, 4)).function(
      mesh, permuted=True, batch_axes="data", head_axis="tensor")

  def natural(q, k, v):
    args = [permute(x, layout, 2) for x in (q, k, v, seg, pos)]
    return unpermute(fn(*args), layout, 2)
  got = jax.jit(lambda q, k, v: _value_and_grads(natural, q, k, v, ct))(q, k, v)
  _assert_close(_oracle(q, k, v, seg, ct), got, seg)


def test_hybrid_through_the_spec():
  q, k, v, seg, pos, ct = _case(h=4, kh=2)
  mesh = jax.make_mesh((2, 4), ("u", "r"))
  fn = AttentionSpec(strategy="hybrid", tiles=Tiles(4, 4)).function(mesh, seq_axis=("u", "r"))
  got = jax.jit(lambda q, k, v: _value_and_grads(lambda q, k, v: fn(q, k, v, seg, pos),
                                                 q, k, v, ct))(q, k, v)
  _assert_close(_oracle(q, k, v, seg, ct), got, seg)


def test_hybrid_on_permuted_rows_splits_the_sequence_axis():
  """The trainer's hybrid: seq (4 devices) split into ring 2 × Ulysses 2, heads over tensor;
  values and gradients. Then an Explicit mesh with inputs sharded on it (values)."""
  from jax.sharding import AxisType, Mesh
  q, k, v, seg, pos, ct = _case(h=4, kh=2)
  spec = AttentionSpec(strategy="hybrid", ulysses_devices=2, tiles=Tiles(4, 4))
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("seq", "tensor"),
              axis_types=(AxisType.Auto,) * 2)
  fn = spec.function(mesh, permuted=True, head_axis="tensor")

  def natural(q, k, v):
    return unpermute(fn(*[permute(x, "zigzag", 4) for x in (q, k, v, seg, pos)]), "zigzag", 4)
  got = jax.jit(lambda q, k, v: _value_and_grads(natural, q, k, v, ct))(q, k, v)
  _assert_close(_oracle(q, k, v, seg, ct), got, seg)

  explicit = jax.make_mesh((2, 4), ("data", "seq"))
  fn = spec.function(explicit, permuted=True, batch_axes="data")
  args = [jax.device_put(permute(x, "zigzag", 4), NamedSharding(explicit, PS("data", "seq")))
          for x in (q, k, v, seg, pos)]
  out = unpermute(jnp.asarray(np.asarray(jax.jit(fn)(*args))), "zigzag", 4)
  _assert_close(got[:1], (out,), seg)
  with pytest.raises(ValueError, match="set ulysses_devices"):
    AttentionSpec(strategy="hybrid").function(mesh, permuted=True)
  with pytest.raises(ValueError, match="ulysses_devices=3 must divide the 4 devices of 'seq'"):
    AttentionSpec(strategy="hybrid", ulysses_devices=3).function(mesh, permuted=True)(
        q, k, v, seg, pos)
