"""Fresh LoRA leaves for a Llama's parameters (LongLoRA; the factors' layout: model.lora).

Here, not in model.lora: the leaves' shapes come from the Llama module (model.llama), which
itself builds on model.lora's projections, so this sits above both.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from longctx.model.config import ModelConfig
from longctx.model.llama import Llama
from longctx.model.lora import (LORA_A, LORA_B, _as_dict, _flat, _lora_modules, _unflat,
                                is_lora_path)


def _abstract_params(cfg: ModelConfig) -> dict:
  """Shapes of the parameters of a model with this config (nothing materialised)."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda: Llama(cfg).init(jax.random.PRNGKey(0), tokens))["params"]
  return nn.meta.unbox(boxed)


def add_lora_params(params, model_cfg_with_lora: ModelConfig, rng: jax.Array) -> dict:
  """`params` plus freshly initialised LoRA leaves (B = 0: the function is unchanged).

  params: base parameters (e.g. from HF or a previous stage); LoRA leaves already present are
  kept (their shapes must match the config). Works on host arrays, device arrays and under jit.
  Raises ValueError if the config has no LoRA, if `params` do not have the config's shapes, or
  if `params` hold LoRA leaves for projections the config does not target.
  """
  cfg = model_cfg_with_lora
  if not cfg.has_lora:
    raise ValueError("add_lora_params needs a config with LoRA (see with_lora); found lora_rank=0")
  flat = _flat(_as_dict(params))
  stray = _lora_modules(params) - set(cfg.lora_targets)
  if stray:
    raise ValueError(f"params hold LoRA leaves for {sorted(stray)}, which the config does not "
                     f"target ({cfg.lora_targets}); merge_lora them first")
  want = _flat(_abstract_params(cfg))
  missing = sorted("/".join(p) for p in set(want) - set(flat) if not is_lora_path(p))
  if missing:
    raise ValueError(f"params do not match the model config: missing {missing[:5]} "
                     f"({len(missing)} in all)")
  new = []
  for path in sorted(p for p in want if is_lora_path(p)):
    shape = tuple(want[path].shape)
    if path not in flat:
      new.append((path, shape))
    elif tuple(flat[path].shape) != shape:
      raise ValueError(f"{'/'.join(path)}: existing LoRA leaf has shape "
                       f"{tuple(flat[path].shape)}, the config (rank {cfg.lora_rank}) needs "
                       f"{shape}")
  return _unflat({**flat, **_init_leaves(rng, tuple(new))})


@functools.partial(jax.jit, static_argnums=1)
def _init_leaves(rng, leaves):
  """{path: initial value} for (path, shape) in `leaves`: B = 0, A as `lora_a_init` per layer.

  All A leaves come from one uniform draw (one random-number kernel to compile, not one per
  leaf and layer), each scaled by its own 1/√fan_in."""
  out = {path: jnp.zeros(shape, jnp.float32) for path, shape in leaves if path[-1] == LORA_B}
  a_leaves = [(path, shape) for path, shape in leaves if path[-1] == LORA_A]
  sizes = [math.prod(shape) for _, shape in a_leaves]
  u = jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0)
  start = 0
  for (path, shape), size in zip(a_leaves, sizes):
    stacked = path[0] == "layers"  # scanned layers: a leading layer axis, not part of fan-in
    fan_in = math.prod(shape[1 if stacked else 0:-1])
    out[path] = u[start:start + size].reshape(shape) / math.sqrt(fan_in)
    start += size
  return out
