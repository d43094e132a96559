"""Generation with a KV cache: greedy or sampled (temperature, top-p, seed), batched.

Prompts of different lengths are left-padded into one [B, P] batch: padding has segment id 0
(attended by nothing) and real tokens have positions 0..n−1, so every row sees exactly what it
would see alone. The prompt is prefilled in one forward pass through the model's attention
function (dense, tiled or context parallel), which also returns the KV cache
(`model.kv_cache.KVCache`): every slot of the full layers, and for a sliding-window layer
(window W) a ring of min(W, S) slots holding each row's latest W tokens, so a windowed layer's
cache does not grow with the prompt. Decoding then runs one token per step against that cache
inside a single jitted `lax.scan`.

With a mesh, the prefill runs ring attention over its `seq` axis (the training attention path,
so 100k+-token prompts spread across devices) and the full layers' cache stays sharded along
its slots on that axis: each device holds S/n slots, and a decode step reduces partial
attention results across devices instead of gathering the context on one. The windowed
layers' rings (W slots) are whole on every device: each device scatters its chunk's latest
tokens into them and one all-reduce of W slots per layer completes them.

Legend: B batch, P prompt length, S cache slots (P + new tokens), T new tokens, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from longctx.model.kv_cache import KVCache, RingCache
from longctx.model.llama import Llama


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 is greedy; top_p < 1 samples from the smallest nucleus with mass ≥ top_p."""
  max_new_tokens: int = 32
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  eos_token_id: int | None = None

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be ≥ 1, found {self.max_new_tokens}")
    if self.temperature < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"expected temperature ≥ 0 and 0 < top_p ≤ 1, found {self.temperature}, "
                       f"{self.top_p}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1):
  """(tokens, positions, segment_ids, lengths) of ragged prompts, left-padded to the longest
  rounded up to `multiple` (what a ring layout needs to split the prompt)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  lengths = np.array([len(p) for p in prompts], np.int32)
  width = -(-int(lengths.max()) // multiple) * multiple
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  positions = np.zeros_like(tokens)
  segments = np.zeros_like(tokens)
  for row, prompt in enumerate(prompts):
    n = len(prompt)
    tokens[row, width - n:] = prompt
    positions[row, width - n:] = np.arange(n)
    segments[row, width - n:] = 1
  return tokens, positions, segments, lengths


def sample_token(logits_BV, key, temperature: float, top_p: float):
  """Greedy argmax at temperature 0, else a draw from the temperature-scaled top-p nucleus."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept_BV = mass_before_BV < top_p  # the top token is always kept
    cutoff_B = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1)
    logits_BV = jnp.where(logits_BV >= cutoff_B[:, None], logits_BV, -jnp.inf)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class ContextParallel:
  """Where a long prompt lives: the mesh, its sequence axis, the layout and the context-parallel
  strategy of the prefill (`attention.Strategy`: ring, all_gather or ulysses)."""
  mesh: jax.sharding.Mesh
  axis: str = "seq"
  layout: str = "zigzag"
  strategy: str = "ring"

  @property
  def size(self) -> int:
    return self.mesh.shape[self.axis]

  def cache_sharding(self, cache: KVCache) -> KVCache:
    """The full layers' slots split along the axis; the windowed layers' rings (W slots each)
    whole on every device."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    slots = NamedSharding(self.mesh, P(None, None, self.axis, None, None))
    tokens = NamedSharding(self.mesh, P(None, self.axis))
    whole = NamedSharding(self.mesh, P())
    return KVCache(slots, slots, tokens, tokens, whole,
                   tuple(RingCache(whole, whole, whole, whole) for _ in cache.rings))

  def constrain(self, cache: KVCache) -> KVCache:
    return jax.lax.with_sharding_constraint(cache, self.cache_sharding(cache))


@functools.lru_cache(maxsize=16)
def cp_module(module: Llama, cp: ContextParallel) -> Llama:
  """`module` with context-parallel attention (cp.strategy) over a batch already in
  `cp.layout` (cached: jit sees one static module)."""
  from longctx.attention.spec import AttentionSpec
  spec = AttentionSpec(strategy=cp.strategy, layout=cp.layout)
  return module.clone(attention_fn=spec.function(cp.mesh, seq_axis=cp.axis, permuted=True))


def prefill(module: Llama, params, tokens_BP, positions_BP, segments_BP, new_slots: int,
            cp: ContextParallel | None = None):
  """Runs the prompt once; returns (last logits [B, V], a cache with P + new_slots slots).

  The full layers keep all P + new_slots slots; a windowed layer keeps a ring of
  min(W, P + new_slots) slots filled with each row's latest W prompt tokens (model.kv_cache).
  With `cp`, the prompt's token ids are put in `cp.layout` once (a cheap gather of int32 ids,
  never of activations), every layer runs the ring on device-local chunks, and the cache holds
  the prompt's slots in layout order, sharded along the slots (the rings whole on every
  device). Decoding does not care about the order of the prompt's slots: every one of them
  precedes the new tokens, and a ring is indexed by position.
  """
  last = tokens_BP.shape[1] - 1
  if cp is not None:
    from jax.sharding import NamedSharding, PartitionSpec as P

    from longctx.attention import layouts
    module = cp_module(module, cp)
    tokens_BP, positions_BP, segments_BP = (
        jax.lax.with_sharding_constraint(layouts.permute(x, cp.layout, cp.size),
                                         NamedSharding(cp.mesh, P(None, cp.axis)))
        for x in (tokens_BP, positions_BP, segments_BP))
    last = int(layouts.Layout.parse(cp.layout).inverse(tokens_BP.shape[1], cp.size)[last])
  logits_B1V, cache = module.apply(
      {"params": params}, tokens_BP, positions_BP, segments_BP, return_kv=True,
      cache_slots=tokens_BP.shape[1] + new_slots, logits_at=last)
  cache = cache.with_new_slots(new_slots)  # decoding's tokens are segment 1 (see _generate)
  if cp is not None:
    cache = cp.constrain(cache)
  return logits_B1V[:, 0], cache


@functools.partial(jax.jit, static_argnames=("module", "sampling", "cp"))
def _generate(module: Llama, params, tokens_BP, positions_BP, segments_BP, lengths_B,
              sampling: SamplingConfig, cp: ContextParallel | None = None, first_index=0):
  """New ids [B, T]; the i-th new token is drawn with the key folded by first_index + i."""
  new_slots = sampling.max_new_tokens
  if cp is not None:  # the cache's slots must split evenly over the devices
    new_slots = -(-(tokens_BP.shape[1] + new_slots) // cp.size) * cp.size - tokens_BP.shape[1]
  last_BV, cache = prefill(module, params, tokens_BP, positions_BP, segments_BP, new_slots, cp)
  key = jax.random.PRNGKey(sampling.seed)
  first_B = sample_token(last_BV, jax.random.fold_in(key, first_index), sampling.temperature,
                         sampling.top_p)

  def step(carry, i):
    token_B, cache = carry
    positions_B1 = (lengths_B + i)[:, None]
    logits_B1V, cache = module.apply({"params": params}, token_B[:, None], positions_B1,
                                     jnp.ones_like(positions_B1), kv_cache=cache)
    if cp is not None:
      cache = cp.constrain(cache)
    nxt_B = sample_token(logits_B1V[:, 0], jax.random.fold_in(key, first_index + i + 1),
                         sampling.temperature, sampling.top_p)
    return (nxt_B, cache), token_B

  steps = jnp.arange(sampling.max_new_tokens, dtype=jnp.int32)
  _, tokens_TB = jax.lax.scan(step, (first_B, cache), steps)
  return tokens_TB.T


def generate(module: Llama, params, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig = SamplingConfig(),
             cp: ContextParallel | None = None) -> list[list[int]]:
  """New token ids for each prompt (up to and including EOS when `eos_token_id` is set).

  `cp`: prefill with ring attention over a mesh axis and keep the cache sharded on it.
  """
  vocab = module.config.vocab_size
  if any(t < 0 or t >= vocab for p in prompts for t in p):
    raise ValueError(f"prompt token ids must lie in [0, {vocab})")
  out_BT = _new_tokens(module, params, [list(p) for p in prompts], sampling, cp)
  results = []
  for row in out_BT.tolist():
    if sampling.eos_token_id is not None and sampling.eos_token_id in row:
      row = row[:row.index(sampling.eos_token_id) + 1]
    results.append(row)
  return results


def _new_tokens(module: Llama, params, prompts: list[list[int]], sampling: SamplingConfig,
                cp: ContextParallel | None) -> np.ndarray:
  """New ids [B, max_new_tokens], EOS not cut. A RoPE whose frequencies switch past a length
  (LongRoPE: `switch_length`) gets one forward pass per set: tokens are generated up to the
  switch, then prompt and new tokens are prefilled again with the other set, as transformers'
  Phi-3 drops its cache there, so that every position always has the current length's set."""
  switch = module.config.rope.switch_length
  longest = max(len(p) for p in prompts)
  total = sampling.max_new_tokens
  first = total if switch is None or longest > switch else min(total, switch - longest + 1)

  def run(rows, count, first_index):
    tokens, positions, segments, lengths = left_pad(rows, multiple=1 if cp is None else 2 * cp.size)
    part = dataclasses.replace(sampling, max_new_tokens=count)
    return np.asarray(_generate(module, params, tokens, positions, segments, lengths, part, cp,
                                jnp.int32(first_index)))

  out_BT = run(prompts, first, 0)
  if first == total:
    return out_BT
  rest_BT = run([p + new.tolist() for p, new in zip(prompts, out_BT)], total - first, first)
  return np.concatenate([out_BT, rest_BT], axis=1)


def generate_text(module: Llama, params, tokenizer, prompts: Sequence[str],
                  sampling: SamplingConfig = SamplingConfig(), add_bos: bool = True) -> list[str]:
  """Text in, text out through a longctx.data tokenizer (encode / decode / bos_id / eos_id)."""
  if sampling.eos_token_id is None:
    sampling = dataclasses.replace(sampling, eos_token_id=tokenizer.eos_id)
  encoded = [([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(p).tolist() for p in prompts]
  return [tokenizer.decode([t for t in ids if t != tokenizer.eos_id])
          for ids in generate(module, params, encoded, sampling)]
