"""The KV cache of sliding-window layers (model.kv_cache): a ring of W slots per windowed layer,
the full layers' S slots. Decoding equals a full forward pass (no cache) at every step for a
left-padded batch whose rows are shorter and longer than the window, one token or several at a
time, many windows past the prompt; a context-parallel prefill fills the same rings; the memory
estimate counts what the cache holds. Tiny models: the file runs in well under a minute."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx.eval import common
from longctx.eval.generate import ContextParallel, SamplingConfig, generate, left_pad, prefill
from longctx.model import Llama, ModelConfig

WINDOW = 5
TOL = 1e-5  # float32 logits
MIXED = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                    num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=WINDOW,
                    layer_types=("full_attention", "sliding_attention", "sliding_attention"))
SLIDING = MIXED.replace(layer_types=())  # every layer slides: no full layer at all
PROMPT_LENGTHS = (3, 9, 6)  # shorter than the window, longer, in between
CHUNKS = (3, 1, 7, 1, 1, 1)  # new tokens per decoding call: 14 in all, 4 windows past the prompt

_prefill = jax.jit(prefill, static_argnums=(0, 5, 6))


@pytest.fixture(scope="module", params=["mixed", "sliding"])
def model(request):
  cfg = {"mixed": MIXED, "sliding": SLIDING}[request.param]
  return Llama(cfg), _params(cfg)


def _params(cfg):
  """Random parameters of std 0.5 (logits of order 1, so 1e-5 is a tight bar); drawn with
  NumPy: initialising the module eagerly takes seconds."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: Llama(cfg).init(jax.random.PRNGKey(0), tokens)["params"])
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), s.dtype),
                      nn.meta.unbox(shapes))


def _prompts(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, MIXED.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


def _ring_entries(cache):
  """Per ring, layer and row: {position: (k, v)} of the filled slots."""
  out = []
  for ring in cache.rings:
    k, v, seg, pos = (np.asarray(x) for x in ring)
    out.append([[{int(pos[b, s]): (k[n, b, s], v[n, b, s]) for s in range(seg.shape[1])
                  if seg[b, s] != 0} for b in range(seg.shape[0])] for n in range(k.shape[0])])
  return out


def test_decoding_equals_a_full_forward_pass_at_every_step(model):
  module, params = model
  cfg = module.config
  tokens, positions, segments, lengths = left_pad(_prompts())
  b, p = tokens.shape
  new = sum(CHUNKS)
  cont = np.random.default_rng(1).integers(1, cfg.vocab_size, (b, new)).astype(np.int32)
  new_positions = lengths[:, None] + np.arange(new, dtype=np.int32)[None]
  want = np.asarray(jax.jit(module.apply)(
      {"params": params}, np.concatenate([tokens, cont], 1),
      np.concatenate([positions, new_positions], 1),
      np.concatenate([segments, np.ones_like(cont)], 1)))[:, p - 1:]
  assert np.abs(want).max() > 1

  last, cache = _prefill(module, params, tokens, positions, segments, new, None)
  n_full = sum(w is None for w in cfg.layer_windows)
  kv = (cfg.num_kv_heads, cfg.head_dim)
  assert cache.k_NBSKD.shape == (n_full, b, p + new, *kv)
  (ring,) = cache.rings
  assert ring.k_NBRKD.shape == (cfg.num_layers - n_full, b, WINDOW, *kv)
  assert ring.segment_ids_BR.shape == ring.positions_BR.shape == (b, WINDOW)
  # a row shorter than the window fills only its tokens' slots; the others hold the last W
  filled = [sorted(row) for row in _ring_entries(cache)[0][0]]
  assert filled == [list(range(max(0, n - WINDOW), n)) for n in PROMPT_LENGTHS]
  np.testing.assert_allclose(np.asarray(last), want[:, 0], atol=TOL, rtol=0)

  decode = jax.jit(lambda params, t, pos, cache: module.apply(
      {"params": params}, t, pos, jnp.ones_like(t), kv_cache=cache))
  done = 0
  for count in CHUNKS:
    logits, cache = decode(params, cont[:, done:done + count],
                           new_positions[:, done:done + count], cache)
    np.testing.assert_allclose(np.asarray(logits), want[:, 1 + done:1 + done + count],
                               atol=TOL, rtol=0, err_msg=f"tokens {done}..{done + count}")
    done += count
  assert int(cache.length) == p + new
  assert [sorted(row) for row in _ring_entries(cache)[0][0]] == [
      list(range(n + new - WINDOW, n + new)) for n in PROMPT_LENGTHS]


def test_a_context_parallel_prefill_fills_the_same_rings_and_generates_the_same():
  """4 devices, zigzag: the prompt's keys reach the rings in layout order, from every device."""
  module, params = Llama(MIXED), _params(MIXED)
  prompts = _prompts(seed=2)
  tokens, positions, segments, _ = left_pad(prompts, multiple=8)
  cp = ContextParallel(jax.sharding.Mesh(np.array(jax.devices()[:4]), ("seq",)))
  last1, cache1 = _prefill(module, params, tokens, positions, segments, 8, None)
  last4, cache4 = _prefill(module, params, tokens, positions, segments, 8, cp)
  np.testing.assert_allclose(np.asarray(last4), np.asarray(last1), atol=TOL, rtol=0)
  for ring1, ring4 in zip(_ring_entries(cache1), _ring_entries(cache4)):
    for layer1, layer4 in zip(ring1, ring4):
      for row1, row4 in zip(layer1, layer4):
        assert sorted(row1) == sorted(row4)
        for position, (k, v) in row1.items():
          np.testing.assert_allclose(row4[position][0], k, atol=TOL, rtol=0)
          np.testing.assert_allclose(row4[position][1], v, atol=TOL, rtol=0)
  assert cache4.k_NBSKD.sharding.spec[2] == "seq"  # the full layers' slots stay split
  sampling = SamplingConfig(max_new_tokens=12)
  assert generate(module, params, prompts, sampling, cp) == generate(module, params, prompts,
                                                                     sampling)


def test_the_memory_estimate_counts_what_the_cache_holds(model):
  module, params = model
  tokens, positions, segments, _ = left_pad(_prompts())
  b, p = tokens.shape
  for new in (1, 12):  # the cache shorter than the window, and longer
    _, cache = jax.eval_shape(
        lambda params: prefill(module, params, tokens, positions, segments, new), params)
    arrays = [cache.k_NBSKD, cache.v_NBSKD] + [x for r in cache.rings for x in r[:2]]
    held = sum(x.size * x.dtype.itemsize for x in arrays)
    assert common.estimate_bytes(module.config, b, p, new)["kv_cache"] == held, new
    assert all(r.k_NBRKD.shape[2] == min(WINDOW, p + new) for r in cache.rings)


def test_ring_slots_keep_each_rows_latest_tokens_of_its_last_document():
  from longctx.model.kv_cache import ring_slots
  positions = jnp.asarray([[0, 0, 0, 1, 2, 3, 4, 5, 6],    # left-padded, 7 tokens
                           [0, 0, 0, 0, 0, 0, 0, 1, 2],    # shorter than the ring
                           [0, 1, 2, 3, 0, 1, 2, 3, 4]])   # packed: two documents
  segments = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1],
                          [0, 0, 0, 0, 0, 0, 1, 1, 1],
                          [1, 1, 1, 1, 2, 2, 2, 2, 2]])
  dropped = 5
  assert ring_slots(positions, segments, 5).tolist() == [
      [dropped, dropped, dropped, dropped, 2, 3, 4, 0, 1],
      [dropped] * 6 + [0, 1, 2],
      [dropped] * 4 + [0, 1, 2, 3, 4]]
