"""LoRA adapters for LongLoRA's LoRA+ (arXiv 2309.12307; METHODS.md §2).

A targeted projection W (a `Projection` whose name is in `config.lora_targets`) computes

    y = x·W + (x·A)·B · alpha/r          ΔW = A·B·alpha/r

with W frozen. In PEFT's terms A is lora_A [r, in] and B is lora_B [out, r]; here the factors
keep the layout of the DenseGeneral kernel they adapt, so they carry the same logical axes:

    layers/self_attn/q_proj/dense/kernel  [N, E, H, D]  (layers, embed, heads, head_dim)
    layers/self_attn/q_proj/lora_a        [N, E, r]     (layers, embed, lora_rank)
    layers/self_attn/q_proj/lora_b        [N, r, H, D]  (layers, lora_rank, heads, head_dim)
    layers/self_attn/o_proj/lora_a        [N, H, D, r]  (layers, heads, head_dim, lora_rank)
    layers/self_attn/o_proj/lora_b        [N, r, E]     (layers, lora_rank, embed)

(k_proj / v_proj as q_proj at K heads; gate_proj, up_proj [E, r] / [r, M]; down_proj [M, r] /
[r, E].) "lora_rank" maps to no mesh axis. Factors are float32 parameters; the product is computed
in `config.dtype`. Initialisation follows PEFT: B = 0 (the adapted model starts equal to the base)
and A ~ kaiming_uniform(a=√5) over its fan-in, i.e. U(−1/√in, 1/√in) with in = ∏ input dims.

LoRA+ trains the adapters plus the embedding and every RMSNorm; lm_head stays frozen
(`trainable_mask`). `merge_lora` folds ΔW into the kernels for HF export and full-attention eval;
`drop_lora` keeps the frozen base as it is (the base a PEFT adapter loads onto).

Legend: N layers, E hidden, H query heads, K kv heads, D head dim, M mlp hidden, r LoRA rank.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from longctx.model.config import LORA_TARGETS, ModelConfig

LORA_A, LORA_B = "lora_a", "lora_b"
LORA_RANK_AXIS = "lora_rank"
DEFAULT_TRAINABLE = ("embed_tokens", "norm")  # LoRA+: embedding and every RMSNorm


# ---- the model side (called from llama.Projection) ---------------------------------------------

def lora_a_init(key, shape, dtype=jnp.float32):
  """PEFT's default for lora_A: kaiming_uniform(a=√5) on [r, in] = U(−1/√in, 1/√in).

  `shape` is [*in, r] (the layout of the kernel's input dims, then the rank)."""
  bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def lora_delta(module: nn.Module, x, axis: Sequence[int], kernel_axes: Sequence[str]):
  """(x·A)·B·alpha/r for a Projection `module` (call inside its compact __call__).

  x: [..., *in] contracted over `axis`; returns [..., *module.features] in the compute dtype.
  Declares the module's `lora_a` [*in, r] and `lora_b` [r, *out] parameters.
  """
  cfg: ModelConfig = module.config
  r, n_in = cfg.lora_rank, len(axis)
  axis = tuple(a % x.ndim for a in axis)
  in_shape = tuple(x.shape[a] for a in axis)
  a = module.param(LORA_A, nn.with_logical_partitioning(
      lora_a_init, (*kernel_axes[:n_in], LORA_RANK_AXIS)), (*in_shape, r), jnp.float32)
  b = module.param(LORA_B, nn.with_logical_partitioning(
      nn.initializers.zeros_init(), (LORA_RANK_AXIS, *kernel_axes[n_in:])),
                   (r, *module.features), jnp.float32)
  dtype = cfg.compute_dtype
  xa = jnp.tensordot(x.astype(dtype), a.astype(dtype), axes=(axis, tuple(range(n_in))))
  xa = xa * jnp.asarray(lora_scale(cfg), dtype)
  return jnp.tensordot(xa, b.astype(dtype), axes=((xa.ndim - 1,), (0,)))


def lora_scale(cfg: ModelConfig) -> float:
  """alpha / r (PEFT's default scaling, no rsLoRA)."""
  return cfg.lora_alpha / cfg.lora_rank


# ---- configs -----------------------------------------------------------------------------------

def with_lora(model_cfg: ModelConfig, rank: int, alpha: float,
              targets: tuple[str, ...]) -> ModelConfig:
  """The config with LoRA of this rank and alpha on `targets` (names among LORA_TARGETS, or one
  comma-separated string of them, as in the lora config section).

  Raises ValueError for rank < 1, no targets or unknown target names."""
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, found {rank}")
  if isinstance(targets, str):
    targets = tuple(t.strip() for t in targets.split(",") if t.strip())
  return model_cfg.replace(lora_rank=int(rank), lora_alpha=float(alpha),
                           lora_targets=tuple(targets))


def base_config(model_cfg: ModelConfig) -> ModelConfig:
  """The config without LoRA (its LoRA fields back at their defaults)."""
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
              if f.name in ("lora_rank", "lora_alpha", "lora_targets")}
  return model_cfg.replace(**defaults)


# ---- parameter trees ---------------------------------------------------------------------------

def path_names(path) -> tuple[str, ...]:
  """The dict keys of a jax tree path, e.g. ("layers", "self_attn", "q_proj", "lora_a") (flax
  boxes such as nn.Partitioned add non-dict entries, which are skipped)."""
  return tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def is_lora_path(names: Sequence[str]) -> bool:
  return bool(names) and names[-1] in (LORA_A, LORA_B)


def _flat(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  """Nested dicts -> {path: leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflat(flat: dict[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def _as_dict(params) -> dict:
  return params if isinstance(params, dict) else flax.core.unfreeze(params)  # a FrozenDict


def trainable_mask(params, trainable: tuple[str, ...] = DEFAULT_TRAINABLE):
  """A tree of bools like `params`: True for every LoRA leaf and every leaf whose '/'-joined path
  contains one of the `trainable` fragments (("embed_tokens", "norm") selects the embedding,
  input_layernorm, post_attention_layernorm and the final norm; lm_head stays frozen).

  Use with optax.partition / optax.multi_transform (labels from the mask). A tree of flax boxes
  (nn.Partitioned, e.g. from eval_shape of init) gives the same boxes holding bools. Raises
  ValueError naming any fragment that matches no parameter.
  """
  if isinstance(trainable, str):
    trainable = (trainable,)
  seen: set[str] = set()

  def leaf(path, _):
    joined = "/".join(path_names(path))
    hits = {f for f in trainable if f in joined}
    seen.update(hits)
    return bool(hits) or is_lora_path(path_names(path))

  mask = jax.tree_util.tree_map_with_path(leaf, params)
  unmatched = [f for f in trainable if f not in seen]
  if unmatched:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = sorted("/".join(path_names(p)) for p, _ in leaves)
    raise ValueError(f"trainable fragments {unmatched} match no parameter; parameters are "
                     f"{names}")
  return mask


def _lora_modules(params) -> set[str]:
  """Names of the projections that hold LoRA leaves in `params`."""
  return {path[-2] for path in _flat(_as_dict(params)) if is_lora_path(path)}


def _check_lora_params(params, cfg: ModelConfig) -> None:
  have = _lora_modules(params)
  if not cfg.has_lora or have != set(cfg.lora_targets):
    raise ValueError(f"params hold LoRA for {sorted(have)} but the config targets "
                     f"{list(cfg.lora_targets)} with rank {cfg.lora_rank}")


def merge_lora(params, model_cfg_with_lora: ModelConfig) -> tuple[dict, ModelConfig]:
  """(base params with ΔW = A·B·alpha/r added to each adapted kernel, the config without LoRA).

  Kernels keep their dtype (the sum is taken in float32). For HF export and full-attention
  eval: the merged model computes what the LoRA model computes. Raises ValueError if the params'
  LoRA leaves do not match the config.
  """
  cfg = model_cfg_with_lora
  _check_lora_params(params, cfg)
  flat = _flat(_as_dict(params))
  scale = lora_scale(cfg)
  out = {p: v for p, v in flat.items() if not is_lora_path(p)}
  for path in [p for p in flat if p[-1] == LORA_A]:
    module = path[:-1]
    a, b = flat[module + (LORA_A,)], flat[module + (LORA_B,)]
    kernel = flat[module + ("dense", "kernel")]
    delta = _delta(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), module[0] == "layers")
    out[module + ("dense", "kernel")] = (
        jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype)
  return _unflat(out), base_config(cfg)


def _delta(a, b, stacked: bool):
  """A [*in, r] · B [r, *out] -> [*in, *out] (per layer when stacked)."""
  def product(a, b):
    return jnp.tensordot(a, b, axes=1)
  return jax.vmap(product)(a, b) if stacked else product(a, b)


def drop_lora(params, model_cfg_with_lora: ModelConfig) -> tuple[dict, ModelConfig]:
  """(params without their LoRA leaves, the config without LoRA): the frozen base, unmerged,
  which a PEFT adapter (longctx.checkpoint.peft) loads onto."""
  _check_lora_params(params, model_cfg_with_lora)
  flat = _flat(_as_dict(params))
  base = _unflat({p: v for p, v in flat.items() if not is_lora_path(p)})
  return base, base_config(model_cfg_with_lora)


def lora_factors(params, module_path: Sequence[str]):
  """(A [..., *in, r], B [..., r, *out]) of one adapted projection, e.g.
  ("layers", "self_attn", "q_proj")."""
  node = _as_dict(params)
  for k in module_path:
    node = node[k]
  return node[LORA_A], node[LORA_B]


__all__ = ["DEFAULT_TRAINABLE", "LORA_A", "LORA_B", "LORA_TARGETS", "base_config", "drop_lora",
           "is_lora_path", "lora_factors", "lora_scale", "merge_lora", "path_names",
           "trainable_mask", "with_lora"]
