"""Context-parallel strategies (ring, all-gather, Ulysses, hybrid) against the dense oracle:
values and dq/dk/dv for every layout, MHA / GQA / MQA, causal and not, packed documents with
padding; Explicit meshes; bad inputs; HLO bytes against `costs.strategy_bytes`.

Legend: B batch, L sequence, H query heads, K kv heads, D head dim, P devices.

Compiling is what costs time here, so one program per (strategy, mesh, heads, causal) serves
every layout: the harness permutes inputs and passes the original indices as data, the way the
trainer calls the per-device functions (`strategies.plan(...).local`).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from longctx.attention import (Layout, Strategy, all_gather_attention, context_parallel_attention,
                               dense_attention)
from longctx.attention.costs import collective_bytes, strategy_bytes
from longctx.attention.strategies import plan
from tests.helpers import make_inputs, random_segments

TOL = 2e-5
L = 32
LAYOUTS = tuple(Layout)
MESHES = {"p2": ((2,), ("seq",)), "p4": ((4,), ("seq",)), "p8": ((8,), ("seq",)),
          "u2r4": ((2, 4), ("u", "r")), "u4r2": ((4, 2), ("u", "r"))}


def mesh_of(name, explicit=False):
  shape, names = MESHES[name]
  if explicit:
    return jax.make_mesh(shape, names)  # jax 0.10: Explicit axes by default
  devices = np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape)
  return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


def axis_of(mesh_name):
  return MESHES[mesh_name][1] if len(MESHES[mesh_name][0]) == 2 else "seq"


@functools.lru_cache(maxsize=None)
def local_program(strategy, mesh_name, h, kh, causal, b=2, l=L, grad=True):
  """(jitted per-device program: (q, k, v, seg, index, ct) in layout order -> (out, dq, dk, dv)
  or out; the number of devices the layout balances; the shard_map'd function)."""
  mesh = mesh_of(mesh_name)
  resolved = plan(strategy, mesh, axis_of(mesh_name), h, causal=causal, block_q=4, block_k=4)
  seq = resolved.seq_axes[0] if len(resolved.seq_axes) == 1 else resolved.seq_axes
  act, tok = PS(None, seq, None, None), PS(None, seq)

  def run(q, k, v, seg, idx, ct):
    fn = lambda q, k, v: resolved.local(q, k, v, seg, idx)
    if not grad:
      return fn(q, k, v)
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(ct)

  fn = jax.shard_map(run, mesh=mesh, in_specs=(act, act, act, tok, tok, act),
                     out_specs=(act,) * 4 if grad else act)
  return jax.jit(fn), resolved.layout_devices


@functools.lru_cache(maxsize=None)
def dense_program(causal):
  """The oracle's values and gradients, on K/V given at the query heads: `oracle` repeats them
  (query head h uses kv head h // G, as `dense_attention` groups them) and sums dk, dv back
  over each group, so one compiled oracle serves MHA, GQA and MQA."""
  def run(q, k, v, seg, ct):
    out, vjp = jax.vjp(lambda q, k, v: dense_attention(q, k, v, seg, causal=causal), q, k, v)
    return (out,) + vjp(ct)
  return jax.jit(run)


def oracle(q, k, v, seg, ct, causal=True):
  """[out, dq, dk, dv] of `dense_attention` as numpy arrays, dk / dv at the kv heads."""
  b, l, h, d = q.shape
  g = h // k.shape[2]
  out, dq, dk, dv = dense_program(causal)(q, *(jnp.repeat(x, g, axis=2) for x in (k, v)), seg, ct)
  group_sum = lambda x: np.asarray(x).reshape(b, l, h // g, g, d).sum(axis=3)
  return [np.asarray(out), np.asarray(dq), group_sum(dk), group_sum(dv)]


def dense_out(q, k, v):
  """The oracle's output without segment ids (causal)."""
  ones = jnp.ones(q.shape[:2], jnp.int32)
  return oracle(q, k, v, ones, jnp.zeros_like(q))[0]


def check_all_layouts(rng, strategy, mesh_name, heads, causal, layouts=LAYOUTS):
  h, kh = heads
  q, k, v = make_inputs(rng, h=h, kh=kh)
  seg = random_segments(rng, 2, L)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  want = oracle(q, k, v, seg, ct, causal)
  program, parts = local_program(strategy, mesh_name, h, kh, causal, grad=True)  # key as below
  for layout in layouts:
    perm = layout.permutation(L, parts)
    idx = jnp.asarray(np.broadcast_to(perm, (2, L)))
    got = program(*(x[:, perm] for x in (q, k, v, seg)), idx, ct[:, perm])
    for name, w, g in zip(["out", "dq", "dk", "dv"], want, got):
      err = float(np.abs(w[:, perm] - np.asarray(g)).max())
      assert err < TOL, (layout.value, name, err)
    assert np.all(np.asarray(got[0])[np.asarray(seg)[:, perm] == 0] == 0)


HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
FULL = [(s, "p4", hd, c) for s in ("all_gather", "ulysses") for hd in HEADS for c in (True, False)]
THIN = [("all_gather", "p2", "gqa", True), ("all_gather", "p8", "mqa", False),
        ("ulysses", "p2", "mqa", True), ("ulysses", "p8", "h8k2", False),
        ("hybrid", "u2r4", "gqa", True), ("hybrid", "u4r2", "gqa", True),
        ("hybrid", "u4r2", "mqa", False)]
HEADS["h8k2"] = (8, 2)


@pytest.mark.matrix
@pytest.mark.parametrize("strategy,mesh_name,heads,causal", FULL + THIN,
                         ids=["-".join(map(str, c)) for c in FULL + THIN])
def test_strategy_matches_dense_every_layout(rng, strategy, mesh_name, heads, causal):
  """Ulysses with fewer kv heads than devices (p4 MQA, p8 with K = 2) replicates only the kv
  heads each device needs; so does hybrid u4r2 (K = 2 or 1 over U = 4)."""
  check_all_layouts(rng, strategy, mesh_name, HEADS[heads], causal)


@pytest.mark.parametrize("strategy,mesh_name,layout", [
    ("ulysses", "p4", "zigzag"), ("hybrid", "u2r4", "striped"), ("all_gather", "p8", "zigzag")])
def test_public_entry_point_without_segments(rng, strategy, mesh_name, layout):
  """context_parallel_attention end to end (permute, shard_map, unpermute), segment_ids None."""
  q, k, v = make_inputs(rng, h=4, kh=2)
  got = jax.jit(lambda q, k, v: context_parallel_attention(
      q, k, v, mesh=mesh_of(mesh_name), axis=axis_of(mesh_name), layout=layout,
      strategy=strategy, block_q=4, block_k=4))(q, k, v)
  assert float(np.abs(np.asarray(got) - dense_out(q, k, v)).max()) < TOL


@pytest.mark.matrix
@pytest.mark.parametrize("strategy,mesh_name", [
    ("ring", "p8"), ("all_gather", "p8"), ("ulysses", "p4"), ("hybrid", "u2r4")])
def test_explicit_mesh_unsharded_and_sharded_inputs(rng, strategy, mesh_name):
  """`jax.make_mesh` (Explicit axes): unsharded inputs give an unsharded result; inputs sharded
  on the sequence give values and gradients sharded like them (`meshes.run_on_auto_mesh`)."""
  mesh, axis = mesh_of(mesh_name, explicit=True), axis_of(mesh_name)
  q, k, v = make_inputs(rng, h=4, kh=2)
  seg = random_segments(rng, 2, L)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  fn = lambda q, k, v: context_parallel_attention(q, k, v, seg, mesh=mesh, axis=axis,
                                                  strategy=strategy, block_q=4, block_k=4)
  want = oracle(q, k, v, seg, ct)
  assert float(jnp.abs(jax.jit(fn)(q, k, v) - want[0]).max()) < TOL
  seq = axis if isinstance(axis, str) else axis[::-1]  # hybrid: (ring, ulysses)
  sharded = [jax.device_put(x, NamedSharding(mesh, PS(None, seq))) for x in (q, k, v, ct)]

  @jax.jit
  def value_and_vjp(q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(ct)

  got = value_and_vjp(*sharded)
  for name, g, w, x in zip(["out", "dq", "dk", "dv"], got, want, sharded[3:] + sharded[:3]):
    assert float(np.abs(np.asarray(g) - np.asarray(w)).max()) < TOL, name
    assert g.sharding.is_equivalent_to(x.sharding, g.ndim), (name, g.sharding, x.sharding)


def test_explicit_context_mesh(rng):
  """Under `jax.set_mesh` (unsharded inputs are typed on the context mesh)."""
  mesh = mesh_of("p4", explicit=True)
  q, k, v = make_inputs(rng, h=4, kh=2)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda q, k, v: context_parallel_attention(
        q, k, v, mesh=mesh, strategy="ulysses", block_q=4, block_k=4))(q, k, v)
  assert float(np.abs(np.asarray(got) - dense_out(q, k, v)).max()) < TOL


def test_bad_inputs_raise(rng):
  q, k, v = make_inputs(rng, h=4, kh=2)
  mesh, mesh2 = mesh_of("p8"), mesh_of("u2r4")
  with pytest.raises(ValueError, match=r"unknown context-parallel strategy 'tree'.*'ring', "
                                       r"'all_gather', 'ulysses', 'hybrid'"):
    context_parallel_attention(q, k, v, mesh=mesh, strategy="tree")
  assert Strategy.parse("All-Gather") is Strategy.ALL_GATHER
  with pytest.raises(ValueError, match=r"'seq' of size 8 .* num_heads=4 is not divisible by 8"):
    context_parallel_attention(q, k, v, mesh=mesh, strategy="ulysses")
  with pytest.raises(ValueError, match=r"'u' of size 2 .* num_heads=3 is not divisible by 2"):
    context_parallel_attention(q[:, :, :3], k[:, :, :1], v[:, :, :1], mesh=mesh2, axis=("u", "r"),
                               strategy="hybrid")
  with pytest.raises(ValueError, match=r"axis=\(ulysses_axis, ring_axis\).*got axis='seq'.*"
                                       r"\{'u': 2, 'r': 4\}"):
    context_parallel_attention(q, k, v, mesh=mesh2, axis="seq", strategy="hybrid")
  with pytest.raises(ValueError, match=r"no axis 'x'; its axes are \('u', 'r'\)"):
    context_parallel_attention(q, k, v, mesh=mesh2, axis=("u", "x"), strategy="hybrid")
  with pytest.raises(ValueError, match=r"one mesh axis; got axis=\('u', 'r'\)"):
    context_parallel_attention(q, k, v, mesh=mesh2, axis=("u", "r"), strategy="ulysses")
  with pytest.raises(ValueError, match="multiple of 16"):  # zigzag over the R = 8 ring devices
    context_parallel_attention(q[:, :24], k[:, :24], v[:, :24], mesh=mesh, strategy="all_gather")


# one shape, every strategy: P = 4 (hybrid 2 × 4), B = 2, L = 32, H = 4, K = 2 (K < U·R), D = 8
BYTES_CASES = [("ring", "p4", 4), ("all_gather", "p4", 4), ("ulysses", "p4", 4),
               ("hybrid", "u2r4", (2, 4))]


@pytest.mark.parametrize("strategy,mesh_name,size", BYTES_CASES, ids=[c[0] for c in BYTES_CASES])
def test_hlo_bytes_match_formula(strategy, mesh_name, size):
  """Every collective's bytes in the compiled forward and forward+backward programs equal
  `strategy_bytes` within 2%. The fwd+bwd program of all-gather holds both passes of one call,
  so XLA merges the backward's re-gather with the forward's (regather=False; see costs.py)."""
  q = jax.ShapeDtypeStruct((2, L, 4, 8), jnp.float32)
  kv = jax.ShapeDtypeStruct((2, L, 2, 8), jnp.float32)
  tok = jax.ShapeDtypeStruct((2, L), jnp.int32)
  for grad in (False, True) if strategy != "ring" else (True,):  # ring fwd: test_attention_costs
    program, _ = local_program(strategy, mesh_name, 4, 2, True, grad=grad)
    got = collective_bytes(program.lower(q, kv, kv, tok, tok, q).compile().as_text())
    want = strategy_bytes(strategy, 2, L, 4, 2, 8, 4, size, grad=grad, regather=False)
    for kind in want:
      assert abs(got[kind] - want[kind]) <= 0.02 * want[kind], (grad, kind, got, want)


def test_all_gather_regathers_in_the_backward_of_a_layer_scan():
  """Over a scan of 2 layers (the trainer's shape) the backward gathers K/V again rather than
  keeping them: all-gather bytes are 2 × (forward + re-gather), `regather=True`."""
  mesh = mesh_of("p4")
  act, tok = PS(None, "seq", None, None), PS(None, "seq")

  def grads(q, k, v, seg, idx):
    def loss(q, k, v):
      layer = lambda x, _: (all_gather_attention(x, k, v, seg, idx, block_q=4, block_k=4), None)
      return jnp.sum(jax.lax.scan(layer, q, None, length=2)[0] ** 2)
    return jax.grad(loss, (0, 1, 2))(q, k, v)

  fn = jax.jit(jax.shard_map(grads, mesh=mesh, in_specs=(act, act, act, tok, tok),
                             out_specs=(act,) * 3))
  q = jax.ShapeDtypeStruct((2, L, 4, 8), jnp.float32)
  kv = jax.ShapeDtypeStruct((2, L, 2, 8), jnp.float32)
  ids = jax.ShapeDtypeStruct((2, L), jnp.int32)
  got = collective_bytes(fn.lower(q, kv, kv, ids, ids).compile().as_text())
  want = strategy_bytes("all_gather", 2, L, 4, 2, 8, 4, 4, grad=True, regather=True)
  assert got["all-gather"] == 2 * want["all-gather"], (got, want)
  assert got["reduce-scatter"] == 2 * want["reduce-scatter"], (got, want)
