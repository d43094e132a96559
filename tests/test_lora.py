"""LongLoRA (METHODS.md §2): LoRA in the model against merged weights, the LoRA+ trainable set,
and the S²-Attn attention functions against dense attention under the S² mask.

Legend: B batch, L sequence, H query heads, K kv heads, D head dim, G group size.
"""
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from longctx.attention import permute_batch, s2_dense_attention, unpermute
from longctx.attention import AttentionSpec, Tiles
from longctx.model import Llama, ModelConfig, init_params, lora
from longctx.model.lora_params import add_lora_params

CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=64)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LCFG = lora.with_lora(CFG, 4, 8.0, TARGETS)
TOL = 1e-5


@functools.partial(jax.jit, static_argnums=(0, 5))
def _apply(cfg, params, tokens, positions=None, segment_ids=None, attention_fn=None):
  return Llama(cfg, attention_fn).apply({"params": params}, tokens, positions, segment_ids)


def _randomise_b(params, seed):
  """Random B (and A): the adapters then change the function."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32)
      if lora.is_lora_path(lora.path_names(path)) else x, params)


def random_params(cfg, seed=0):
  """Random float32 parameters of `cfg` (norm scales near 1), built in numpy: fast to make."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: ((1.0 if "norm" in jax.tree_util.keystr(path) else 0.0)
                       + 0.1 * rng.standard_normal(x.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def base():
  return random_params(CFG)


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(0).integers(0, 61, (2, 16)).astype(np.int32)


def test_zero_b_leaves_the_model_unchanged(base, tokens):
  params = add_lora_params(base, LCFG, jax.random.PRNGKey(1))
  q = params["layers"]["self_attn"]["q_proj"]
  assert q["lora_a"].shape == (2, 32, 4) and q["lora_b"].shape == (2, 4, 4, 8)
  assert params["layers"]["self_attn"]["o_proj"]["lora_a"].shape == (2, 4, 8, 4)
  assert not np.any(np.asarray(q["lora_b"])) and np.all(np.abs(np.asarray(q["lora_a"])) <= 32**-0.5)
  np.testing.assert_array_equal(np.asarray(_apply(LCFG, params, tokens)),
                                np.asarray(_apply(CFG, base, tokens)))


@pytest.mark.parametrize("targets", [TARGETS, ("o_proj", "gate_proj", "up_proj", "down_proj")])
def test_lora_model_equals_merged_weights(base, tokens, targets):
  cfg = lora.with_lora(CFG, 4, 8.0, targets)
  params = _randomise_b(add_lora_params(base, cfg, jax.random.PRNGKey(1)), 2)
  merged, base_cfg = lora.merge_lora(params, cfg)
  assert base_cfg == CFG
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  ours = _apply(cfg, params, tokens)
  err = float(jnp.abs(ours - _apply(CFG, merged, tokens)).max())
  assert err < TOL, err
  assert float(jnp.abs(ours - _apply(CFG, base, tokens)).max()) > 1e-2  # the adapters matter
  dropped, _ = lora.drop_lora(params, cfg)
  assert jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), dropped, base) == \
      jax.tree.map(lambda _: True, base)


def test_module_params_match_add_lora_params_and_have_logical_axes(base):
  boxed = jax.eval_shape(lambda: Llama(LCFG).init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 4), jnp.int32))["params"])
  specs = nn.get_partition_spec(boxed)["layers"]["self_attn"]
  P = jax.sharding.PartitionSpec
  assert specs["q_proj"]["lora_a"] == P("layers", "embed", "lora_rank")
  assert specs["q_proj"]["lora_b"] == P("layers", "lora_rank", "heads", "head_dim")
  assert specs["o_proj"]["lora_a"] == P("layers", "heads", "head_dim", "lora_rank")
  assert specs["o_proj"]["lora_b"] == P("layers", "lora_rank", "embed")
  added = add_lora_params(base, LCFG, jax.random.PRNGKey(1))
  assert jax.tree.map(jnp.shape, added) == jax.tree.map(jnp.shape, nn.meta.unbox(boxed))
  a = np.asarray(lora.lora_a_init(jax.random.PRNGKey(0), (4, 8, 3)))  # o_proj-like: fan-in 32
  assert np.abs(a).max() <= 32**-0.5 and np.abs(a).max() > 0.8 * 32**-0.5


def test_add_lora_params_keeps_existing_and_checks_shapes(base):
  params = _randomise_b(add_lora_params(base, LCFG, jax.random.PRNGKey(1)), 2)
  again = add_lora_params(params, LCFG, jax.random.PRNGKey(3))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="shape"):
    add_lora_params(params, lora.with_lora(CFG, 2, 8.0, TARGETS), jax.random.PRNGKey(3))
  with pytest.raises(ValueError, match="does not target"):
    add_lora_params(params, lora.with_lora(CFG, 4, 8.0, ("q_proj",)), jax.random.PRNGKey(3))
  with pytest.raises(ValueError, match="lora_rank=0"):
    add_lora_params(base, CFG, jax.random.PRNGKey(3))


def test_lora_config_serialisation():
  restored = ModelConfig.from_dict(json.loads(json.dumps(LCFG.to_dict())))
  assert restored == LCFG and restored.lora_targets == TARGETS
  old = CFG.to_dict()
  for key in ("lora_rank", "lora_alpha", "lora_targets"):
    del old[key]  # a checkpoint written before LoRA existed
  assert ModelConfig.from_dict(old) == CFG
  assert LCFG.to_hf() == CFG.to_hf()
  with pytest.raises(ValueError, match="not projections"):
    lora.with_lora(CFG, 4, 8.0, ("lm_head",))
  with pytest.raises(ValueError, match="rank"):
    lora.with_lora(CFG, 0, 8.0, TARGETS)


def test_trainable_mask_selects_lora_embedding_and_norms(base):
  params = add_lora_params(base, LCFG, jax.random.PRNGKey(1))
  mask = lora.trainable_mask(params, ("embed_tokens", "norm"))
  flat = {"/".join(lora.path_names(p)): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert sorted(k for k, m in flat.items() if m) == sorted(
      ["embed_tokens", "norm/scale", "layers/input_layernorm/scale",
       "layers/post_attention_layernorm/scale"]
      + [f"layers/self_attn/{t}/lora_{x}" for t in TARGETS for x in "ab"])
  assert not flat["lm_head/dense/kernel"]
  with pytest.raises(ValueError, match=r"\['bogus'\] match no parameter"):
    lora.trainable_mask(params, ("embed_tokens", "bogus"))


def test_masked_training_step_changes_only_trainable_leaves(base, tokens):
  params = _randomise_b(add_lora_params(base, LCFG, jax.random.PRNGKey(1)), 2)
  mask = lora.trainable_mask(params, lora.DEFAULT_TRAINABLE)
  labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
  tx = optax.partition({"train": optax.adamw(1e-2), "freeze": optax.set_to_zero()}, labels)

  def loss(p):
    logits = _apply(LCFG, p, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(params):
    grads = jax.grad(loss)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), grads
  new, grads = step(params)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, new)
  assert changed == mask
  assert any(jax.tree.leaves(jax.tree.map(lambda g, m: bool(np.any(g)) and not m, grads, mask)))


# ---- S²-Attn attention functions ---------------------------------------------------------------

G = 8


def _rows(packed: bool):
  """Two rows of L = 32: one document each, or packed (documents of 16 and 8, then padding)."""
  if not packed:
    return np.ones((2, 32), np.int32), np.tile(np.arange(32, dtype=np.int32), (2, 1))
  seg = np.array([[1] * 16 + [2] * 8 + [0] * 8, [1] * 8 + [2] * 24], np.int32)
  pos = np.array([list(range(16)) + list(range(8)) + [0] * 8, list(range(8)) + list(range(24))],
                 np.int32)
  return seg, pos


def _s2_oracle(q, k, v, seg, pos):
  """Dense attention under the S² mask, each document of each row on its own (groups start at
  its first token); padding gives 0. Unpacked rows are exactly `s2_dense_attention`."""
  out = jnp.zeros_like(q)
  for row in range(q.shape[0]):
    for s in np.unique(seg[row]):
      if s == 0:
        continue
      idx = np.flatnonzero(seg[row] == s)
      assert np.array_equal(pos[row, idx], np.arange(len(idx)))
      o = s2_dense_attention(q[row:row + 1, idx], k[row:row + 1, idx], v[row:row + 1, idx],
                             group_size=G)
      out = out.at[row, idx].set(o[0])
  return out


def _value_and_grads(fn, q, k, v, ct):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out,) + vjp(ct)


def _inputs(b=2, l=32, h=4, kh=2, d=8):
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.normal(size=(b, l, n, d)), jnp.float32) for n in (h, kh, kh, h))


@functools.lru_cache(maxsize=None)
def _s2_case(packed: bool, heads: int = 4):
  """(q, k, v, cotangent, segment ids, positions, oracle (out, dq, dk, dv))."""
  q, k, v, ct = _inputs(h=heads)
  seg, pos = _rows(packed)
  if packed:
    oracle = lambda q, k, v: _s2_oracle(q, k, v, seg, pos)  # noqa: E731
  else:
    oracle = lambda q, k, v: s2_dense_attention(q, k, v, seg, group_size=G)  # noqa: E731
  want = jax.jit(lambda q, k, v: _value_and_grads(oracle, q, k, v, ct))(q, k, v)
  return q, k, v, ct, seg, pos, want


def _assert_close(want, got):
  for name, w, g in zip(["out", "dq", "dk", "dv"], want, got):
    err = float(jnp.abs(w - g).max())
    assert err < 2e-5, (name, err)


@pytest.mark.matrix
@pytest.mark.parametrize("packed", [False, True], ids=["one_document", "packed"])
def test_shifted_sparse_matches_dense_s2(packed):
  q, k, v, ct, seg, pos, want = _s2_case(packed)
  fn = AttentionSpec(impl="tiled", tiles=Tiles(4, 4), s2_group=G).function()
  got = jax.jit(lambda q, k, v: _value_and_grads(lambda q, k, v: fn(q, k, v, seg, pos),
                                                 q, k, v, ct))(q, k, v)
  _assert_close(want, got)


@pytest.mark.matrix
@pytest.mark.parametrize("strategy", ["ring", "all_gather", "ulysses"])
@pytest.mark.parametrize("split", ["data", "tensor"])
def test_context_parallel_shifted_sparse_matches_dense_s2(split, strategy):
  """Packed rows (the oracle is `s2_dense_attention` per document) on mesh data=2 × seq=4 (rows
  split over data) or seq=4 × tensor=2 (heads split, one S² half per device), zigzag over seq:
  shifted groups straddle the chunks. Every strategy (Ulysses with 8 heads: it splits each
  half's, or each device's, 4 heads over seq=4)."""
  names = ("data", "seq") if split == "data" else ("seq", "tensor")
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4) if split == "data" else
                           np.array(jax.devices()).reshape(4, 2), names)
  q, k, v, ct, seg, pos, want = _s2_case(True, 8 if strategy == "ulysses" else 4)
  spec = AttentionSpec(strategy=strategy, tiles=Tiles(2, 2), s2_group=G)
  fn = spec.function(mesh, permuted=True,
                     **({"batch_axes": "data"} if split == "data" else {"head_axis": "tensor"}))

  def permuted(q, k, v):
    b = permute_batch({"q": q, "k": k, "v": v, "seg": jnp.asarray(seg), "pos": jnp.asarray(pos)},
                      "zigzag", 4)
    return unpermute(fn(b["q"], b["k"], b["v"], b["seg"], b["pos"]), "zigzag", 4)
  got = jax.jit(lambda q, k, v: _value_and_grads(permuted, q, k, v, ct))(q, k, v)
  _assert_close(want, got)


@pytest.mark.slow
def test_s2_in_the_model_ring_equals_one_device(base):
  """The trainer's path: a LoRA model on a permuted packed batch with the S² ring gives the
  logits of the single-device S² model."""
  params = _randomise_b(add_lora_params(base, LCFG, jax.random.PRNGKey(1)), 2)
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "seq"))
  seg, pos = _rows(True)
  tokens = np.random.default_rng(5).integers(0, 61, (2, 32)).astype(np.int32)
  one = _apply(LCFG, params, tokens, pos, seg,
               AttentionSpec(impl="tiled", s2_group=G).function())
  ring = AttentionSpec(s2_group=G).function(mesh, permuted=True, batch_axes="data")
  b = permute_batch({"t": jnp.asarray(tokens), "p": jnp.asarray(pos), "s": jnp.asarray(seg)},
                    "zigzag", 4)
  logits = _apply(LCFG, params, b["t"], b["p"], b["s"], ring)
  err = float(jnp.abs(unpermute(logits, "zigzag", 4) - one).max())
  assert err < TOL, err
