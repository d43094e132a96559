"""The decoder on its own: packed documents, compute dtype, remat, logical axes, attention plug-in."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx.attention.reference import dense_attention
from longctx.model import DynamicRope, Llama, ModelConfig, RematPolicy, init_params

CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=64)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.PRNGKey(0))


def _apply(cfg, params, tokens, positions=None, segment_ids=None, attention_fn=None):
  return Llama(cfg, attention_fn).apply({"params": params}, tokens, positions, segment_ids)


@pytest.mark.slow
def test_packed_documents_equal_separate_documents(params):
  """Segment ids block attention across documents and positions restart: contract 1."""
  rng = np.random.default_rng(0)
  doc_a, doc_b = rng.integers(0, 61, 11), rng.integers(0, 61, 7)
  tokens = np.concatenate([doc_a, doc_b, np.zeros(6, int)])[None].astype(np.int32)
  segment_ids = np.array([[1] * 11 + [2] * 7 + [0] * 6], np.int32)
  positions = np.array([list(range(11)) + list(range(7)) + [0] * 6], np.int32)
  packed = _apply(CFG, params, tokens, positions, segment_ids)
  alone_a = _apply(CFG, params, doc_a[None].astype(np.int32))
  alone_b = _apply(CFG, params, doc_b[None].astype(np.int32))
  np.testing.assert_allclose(packed[0, :11], alone_a[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(packed[0, 11:18], alone_b[0], atol=1e-5, rtol=0)


def test_future_tokens_do_not_change_logits(params):
  tokens = np.random.default_rng(1).integers(0, 61, (1, 16)).astype(np.int32)
  changed = tokens.copy()
  changed[0, 10:] = (changed[0, 10:] + 1) % 61
  a, b = _apply(CFG, params, tokens), _apply(CFG, params, changed)
  np.testing.assert_array_equal(np.asarray(a[0, :10]), np.asarray(b[0, :10]))


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params(params):
  tokens = np.random.default_rng(2).integers(0, 61, (2, 16)).astype(np.int32)
  cfg16 = CFG.replace(dtype="bfloat16")
  boxed = Llama(cfg16).init(jax.random.PRNGKey(0), tokens)["params"]
  assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(boxed))} == {jnp.dtype("float32")}
  out16 = _apply(cfg16, params, tokens)
  out32 = _apply(CFG, params, tokens)
  assert out16.dtype == jnp.float32
  # bf16 has an 8-bit mantissa: logits of this tiny model agree to a few 1e-2, not to 1e-5.
  err = float(jnp.max(jnp.abs(out16 - out32)))
  assert 0 < err < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("policy", [p for p in RematPolicy if p is not RematPolicy.NONE])
def test_remat_policies_give_identical_gradients(params, policy):
  tokens = np.random.default_rng(3).integers(0, 61, (2, 12)).astype(np.int32)

  def loss(p, cfg):
    return jnp.mean(_apply(cfg, p, tokens) ** 2)
  g_ref = jax.grad(loss)(params, CFG)
  g = jax.grad(loss)(params, CFG.replace(remat=policy))
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_every_parameter_has_logical_axes():
  boxed = Llama(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  specs = nn.get_partition_spec(boxed)
  flat = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(leaf, nn.Partitioned) for _, leaf in flat)
  assert specs["embed_tokens"] == jax.sharding.PartitionSpec("vocab", "embed")
  assert specs["layers"]["self_attn"]["q_proj"]["dense"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "heads", "head_dim")
  assert specs["layers"]["self_attn"]["k_proj"]["dense"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "kv_heads", "head_dim")
  assert specs["layers"]["mlp"]["down_proj"]["dense"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "mlp", "embed")


def test_attention_function_is_a_parameter(params):
  calls = []

  def recording_attention(q, k, v, segment_ids, positions):
    calls.append((q.shape, k.shape))
    return dense_attention(q, k, v, segment_ids, causal=True)
  tokens = jnp.zeros((1, 8), jnp.int32)
  out = _apply(CFG, params, tokens, attention_fn=recording_attention)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(_apply(CFG, params, tokens)))
  assert calls and set(calls) == {((1, 8, 4, 8), (1, 8, 2, 8))}  # GQA: K/V arrive at 2 heads


def test_dynamic_rope_uses_the_batch_length():
  """Within max_position_embeddings dynamic RoPE equals the default; beyond, theta grows."""
  cfg = CFG.replace(rope=DynamicRope(10000.0, 2.0, 16))
  inv_short = cfg.rope.inv_freq(8, jnp.arange(16)[None])
  inv_long = cfg.rope.inv_freq(8, jnp.arange(40)[None])
  np.testing.assert_array_equal(np.asarray(inv_short), cfg.rope.static_inv_freq(8))
  assert np.all(np.asarray(inv_long)[1:] < np.asarray(inv_short)[1:])


def test_config_validation():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    ModelConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="Unknown model config keys"):
    ModelConfig.from_dict({"hidden": 3})
  assert ModelConfig.from_dict(CFG.to_dict()) == CFG


@pytest.mark.slow
@pytest.mark.parametrize("permuted", [False, True])
def test_ring_attention_in_the_model_equals_dense(params, permuted):
  """The model on 8 devices with ring attention: logits and gradients equal the dense model's.

  permuted=True is the trainer's path: the whole batch is put in the zigzag layout once and the
  ring uses positions as its mask index."""
  from longctx.attention import permute_batch, unpermute
  from longctx.attention import AttentionSpec
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("seq",))
  rng = np.random.default_rng(4)
  batch = {"inputs": rng.integers(0, 61, (2, 64)).astype(np.int32),
           "segment_ids": np.repeat(np.array([[1] * 30 + [2] * 26 + [0] * 8]), 2, 0).astype(np.int32),
           "positions": np.repeat(np.array([list(range(30)) + list(range(26)) + [0] * 8]), 2,
                                  0).astype(np.int32)}
  ring = AttentionSpec(strategy="ring", layout="zigzag").function(mesh, permuted=permuted)
  if permuted:
    batch_in = permute_batch({k: jnp.asarray(v) for k, v in batch.items()}, "zigzag", 8)
  else:
    batch_in = batch

  def loss(p, fn, b):
    logits = _apply(CFG, p, b["inputs"], b["positions"], b["segment_ids"], attention_fn=fn)
    return jnp.sum(jnp.where(b["segment_ids"][..., None] > 0, logits, 0) ** 2), logits
  (l_ref, logits_ref), g_ref = jax.value_and_grad(loss, has_aux=True)(params, None, batch)
  (l_ring, logits_ring), g_ring = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                          static_argnums=1)(params, ring, batch_in)
  if permuted:
    logits_ring = unpermute(logits_ring, "zigzag", 8)
  np.testing.assert_allclose(np.asarray(logits_ring), np.asarray(logits_ref), atol=2e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_ring)):
    scale = float(jnp.max(jnp.abs(a)))
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * max(scale, 1.0), rtol=0)
