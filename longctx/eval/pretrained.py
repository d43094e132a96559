"""`longctx.load_pretrained`: a ready-to-call model from an HF directory or a longctx checkpoint."""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from longctx.checkpoint import hf
from longctx.checkpoint.params import is_longctx_checkpoint, load_params
from longctx.model.config import ModelConfig
from longctx.model.llama import AttentionFn, Llama


class PretrainedModel:
  """A model of any family with its parameters: `model(tokens) -> logits`.

  tokens: int32 [B, L]; optional positions / segment_ids [B, L] int32 (contract 1).
  Returns float32 logits [B, L, vocab]. Parameters are held in float32.
  """

  def __init__(self, config: ModelConfig, params: dict, attention_fn: AttentionFn | None = None,
               mesh: jax.sharding.Mesh | None = None, attention: Any = None):
    self.config = config
    self.mesh = mesh  # a `seq` mesh: inputs sharded along it, generate's default ring
    # what the eval commands attend with (eval.common.EvalAttention), recorded in reports;
    # generate's default strategy and layout when context parallel
    self.attention = attention
    self.params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    self.module = Llama(config, attention_fn)
    self._apply = jax.jit(lambda p, t, pos, seg: self.module.apply({"params": p}, t, pos, seg))

  def __call__(self, tokens, positions=None, segment_ids=None) -> jax.Array:
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
      raise ValueError(f"tokens must be [batch, seq_len]; found shape {tokens.shape} "
                       "(add a batch axis: tokens[None])")
    if np.any(np.asarray(tokens) >= self.config.vocab_size) or np.any(np.asarray(tokens) < 0):
      raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); found "
                       f"min {int(tokens.min())}, max {int(tokens.max())}")
    if self.mesh is not None:  # the whole forward split along the sequence, not only attention
      from jax.sharding import NamedSharding, PartitionSpec as P
      tokens = jax.device_put(tokens, NamedSharding(self.mesh, P(None, "seq")))
    return self._apply(self.params, tokens, positions, segment_ids)

  def generate(self, prompts, *, mesh=None, axis: str = "seq", layout: str | None = None,
               strategy: str | None = None, **sampling) -> list[list[int]]:
    """New token ids for each prompt (a list of token-id lists); see eval.generate.SamplingConfig
    for `max_new_tokens`, `temperature`, `top_p`, `seed`, `eos_token_id`. With `mesh`, the
    prompt is prefilled by context-parallel attention over `axis` (`strategy`: ring, all_gather
    or ulysses; `layout`; None = those of the eval flags, else ring in zigzag) and the KV cache
    stays sharded on it."""
    from longctx.eval.generate import ContextParallel, SamplingConfig, generate
    mesh = self.mesh if mesh is None else mesh
    attention = self.attention
    if strategy is None:
      strategy = attention.strategy if getattr(attention, "context_parallel", False) else "ring"
    if layout is None:
      layout = attention.layout if getattr(attention, "context_parallel", False) else "zigzag"
    cp = None if mesh is None else ContextParallel(mesh, axis, layout, strategy)
    return generate(self.module, self.params, prompts, SamplingConfig(**sampling), cp)

  def __repr__(self) -> str:
    c = self.config
    return (f"PretrainedModel({c.num_layers} layers, hidden {c.hidden_size}, heads {c.num_heads}/"
            f"{c.num_kv_heads}, rope {c.rope.rope_type}, {c.num_params():,} params)")


def load_pretrained(path: str, *, attention_fn: AttentionFn | None = None, dtype: str | None = None,
                    progress: bool = True, mesh: jax.sharding.Mesh | None = None,
                    attention: Any = None, **config_overrides: Any) -> PretrainedModel:
  """Loads `path`, an HF directory of any registered family (config.json + safetensors;
  longctx.model.families) or a longctx checkpoint.

  `dtype` sets the compute dtype ("float32" or "bfloat16"); `config_overrides` replace other
  ModelConfig fields (e.g. `rope=DynamicRope(...)`, `remat=...`).
  """
  if dtype is not None:
    config_overrides["dtype"] = dtype
  if is_longctx_checkpoint(path):
    config, params = load_params(path)
    config = config.replace(**config_overrides)
  elif os.path.isfile(os.path.join(path, "config.json")):
    config = ModelConfig.from_hf(hf.read_hf_config(path), **config_overrides)
    params = hf.read_hf_params(path, config, progress=progress)
  else:
    raise FileNotFoundError(f"{path!r} is neither an HF model directory (config.json + "
                            "*.safetensors) nor a longctx checkpoint (model_config.json + params/)")
  return PretrainedModel(config, params, attention_fn, mesh, attention)
