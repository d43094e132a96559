"""The decoder of every model family in flax.linen: RMSNorm (Gemma's 1 + w too, and its norms
on the attention and MLP outputs), SwiGLU or GeGLU, GQA/MQA, RoPE (partial too, or one per kind
of layer), optional q/k norm and biases, scanned layers. What each family sets is a field of
ModelConfig (longctx.model.families).

Parameters are float32 and carry logical axis names (`embed`, `vocab`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `layers`) that `longctx.parallel` maps to mesh axes. Activations are computed in
`config.dtype`. Attention is a parameter: any function
`attention_fn(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL) -> out_BLHD` (contract 3 plus
the positions, which a ring over a pre-permuted batch uses as its mask index), so the dense
reference, tiled attention or a context-parallel strategy (`longctx.attention.AttentionSpec`)
plug in unchanged.

Local and global layers (`config.layer_windows`): the model needs one attention function per
window among its layers (`config.windows`); it asks `attention_fn.with_window(W)` for each
(`AttentionSpec.function` gives such an object, `LayerAttention`). One `nn.scan` runs all N
layers with their parameters stacked [N, ...] as for a uniform model; a scanned int32 [N] kind
index picks each layer's function with `lax.switch`. A model whose layers all have one window
calls its one function directly. A plain function cannot be told a window: it is refused for a
model with windowed layers rather than attend globally there.

Decoding (model.kv_cache): the cache has one part per kind, the full layers' slots
[N_full, B, S, K, D] and per window W a ring of R = min(W, S) slots [N_kind, B, R, K, D]. A
prefill carries the parts through the scan over layers and each layer fills its row; decoding
reads them (each layer its row, in its kind's `lax.switch` branch), the scan stacks the new
tokens' keys/values, and they are written after it.

Legend: B batch, L sequence, E hidden (embed), H query heads, K kv heads, D head dim,
M mlp hidden, V vocab.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax.ad_checkpoint import checkpoint_name

from longctx.model import kv_cache as kv_lib
from longctx.model import lora
from longctx.attention.spec import AttentionFn
from longctx.model.chunking import apply_chunked
from longctx.model.config import ModelConfig, RematPolicy
from longctx.model.kv_cache import KVCache, LayerCache, RingCache  # noqa: F401 (re-exported)
from longctx.model.rope import apply_rope
from longctx.parallel.mesh import constrain

# Logical axes of the residual stream [B, L, E]: rows and tokens where the batch is, the hidden
# dimension whole (parameters shard `embed`; activations do not).
RESIDUAL_AXES = ("batch", "length", None)


def default_attention_fn() -> AttentionFn:
  """The dense reference attention (causal), the oracle of contract 3."""
  from longctx.attention.spec import AttentionSpec
  return AttentionSpec(impl="dense").function()


def layer_attention_fns(attention_fn, config: ModelConfig) -> tuple[AttentionFn, ...]:
  """One attention function per entry of `config.windows` (the distinct windows of the layers,
  None = full): `attention_fn.with_window(W)`. A plain function serves a model of full layers
  only; for windowed layers it raises ValueError naming the windows and what to pass."""
  windows = config.windows
  with_window = getattr(attention_fn, "with_window", None)
  if with_window is not None:
    return tuple(with_window(w) for w in windows)
  if windows != (None,):
    name = getattr(attention_fn, "__name__", type(attention_fn).__name__)
    raise ValueError(
        f"attention_fn {name!r} is a plain function, but the model has sliding-window layers "
        f"(sliding_window={config.sliding_window}, layer windows {list(config.layer_windows)}): "
        "a plain function cannot be told a layer's window and would attend globally there; "
        "pass AttentionSpec(...).function(...), or an object whose with_window(window) gives "
        "the function of a layer with that window (None: full)")
  return (attention_fn,)


def layer_kinds(config: ModelConfig) -> jax.Array | None:
  """Each layer's index into `config.windows`, int32 [N] (None when there is one kind)."""
  windows = config.windows
  if len(windows) == 1:
    return None
  return jnp.asarray([windows.index(w) for w in config.layer_windows], jnp.int32)


def _attend(fns, kind, *args):
  """The layer's attention: its kind's function (`lax.switch` on the traced kind index)."""
  if kind is None:
    (fn,) = fns
    return fn(*args)
  return jax.lax.switch(kind, fns, *args)


def _rotate(cfg: ModelConfig, kind, q_BLHD, k_BLKD, positions_BL):
  """RoPE on queries and keys with the layer's RoPE (`cfg.layer_rope` of its window): one
  for every layer, or with `local_rope_theta` one per kind, picked by `lax.switch`."""
  ropes = [cfg.layer_rope(w) for w in cfg.windows]

  def rotate(rope):
    return lambda q, k: tuple(apply_rope(x, positions_BL, rope, rotary_dim=cfg.rotary_dim)
                              for x in (q, k))
  if kind is None or len(set(ropes)) == 1:
    return rotate(ropes[0])(q_BLHD, k_BLKD)
  return jax.lax.switch(kind, [rotate(r) for r in ropes], q_BLHD, k_BLKD)


def _init(config: ModelConfig, *names):
  return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def _zeros(*names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class RMSNorm(nn.Module):
  """x / rms(x) · scale over the last axis, computed in float32 (as HF does), returned in the
  compute dtype. `axis_name`: the logical axis of the scale (the hidden size, or a head's
  features for the q/k norm). With `config.rms_norm_offset` (Gemma's 1.0) the factor is
  (offset + scale), scale initialised to 1 − offset, and the product is taken in float32 before
  the cast, as transformers' Gemma does (Llama casts first)."""
  config: ModelConfig
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x_BLE):
    offset = self.config.rms_norm_offset
    scale_E = self.param("scale", nn.with_logical_partitioning(
        nn.initializers.constant(1.0 - offset), (self.axis_name,)),
                         (x_BLE.shape[-1],), jnp.float32)
    x32_BLE = x_BLE.astype(jnp.float32)
    var_BL1 = jnp.mean(jnp.square(x32_BLE), axis=-1, keepdims=True)
    dtype = self.config.compute_dtype
    normed_BLE = x32_BLE * jax.lax.rsqrt(var_BL1 + self.config.rms_norm_eps)
    shape = (1,) * (x_BLE.ndim - 1) + (-1,)
    if offset:
      return (normed_BLE * (offset + scale_E).reshape(shape)).astype(dtype)
    return scale_E.astype(dtype).reshape(shape) * normed_BLE.astype(dtype)


class Projection(nn.Module):
  """A DenseGeneral with float32 parameters, logical axes, compute-dtype matmul and optional bias.

  When the module's name is one of `config.lora_targets` (and `lora_rank` > 0) it also holds the
  LoRA factors `lora_a` [*in, r] and `lora_b` [r, *out] next to `dense/kernel` and adds
  (x·A)·B·alpha/r (longctx.model.lora).
  """
  config: ModelConfig
  features: tuple[int, ...]
  axis: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  use_bias: bool

  @nn.compact
  def __call__(self, x):
    y = nn.DenseGeneral(
        features=self.features, axis=self.axis, use_bias=self.use_bias,
        dtype=self.config.compute_dtype, param_dtype=jnp.float32,
        kernel_init=_init(self.config, *self.kernel_axes),
        bias_init=_zeros(*self.kernel_axes[len(self.axis):]), name="dense")(x)
    cfg = self.config
    if cfg.has_lora and self.name in cfg.lora_targets:
      y = y + lora.lora_delta(self, x, self.axis, self.kernel_axes)
    return y


class Attention(nn.Module):
  """attention_fns: one function per entry of `config.windows`; `kind` (None or a traced
  int32) the layer's index into them."""
  config: ModelConfig
  attention_fns: tuple[AttentionFn, ...]

  @nn.compact
  def __call__(self, x_BLE, positions_BL, segment_ids_BL, kind=None, layer_cache=None):
    """Self-attention; with `layer_cache` (a `kv_cache.LayerCache`) it fills the cache
    (prefill: attends with its function) or decodes against it.

    Returns (out_BLE, kv): this call's keys/values (post-RoPE), or in a prefill the cache's
    filled stacks.
    """
    cfg = self.config
    bias = cfg.attention_bias
    qkv_bias = cfg.attention_bias or cfg.qkv_bias
    q_BLHD = Projection(cfg, (cfg.num_heads, cfg.head_dim), (-1,), ("embed", "heads", "head_dim"),
                        qkv_bias, name="q_proj")(x_BLE)
    k_BLKD = Projection(cfg, (cfg.num_kv_heads, cfg.head_dim), (-1,),
                        ("embed", "kv_heads", "head_dim"), qkv_bias, name="k_proj")(x_BLE)
    v_BLKD = Projection(cfg, (cfg.num_kv_heads, cfg.head_dim), (-1,),
                        ("embed", "kv_heads", "head_dim"), qkv_bias, name="v_proj")(x_BLE)
    if cfg.qk_norm:  # Qwen3, Gemma 3: RMSNorm over each head's features, before RoPE
      q_BLHD = RMSNorm(cfg, "head_dim", name="q_norm")(q_BLHD)
      k_BLKD = RMSNorm(cfg, "head_dim", name="k_norm")(k_BLKD)
    q_BLHD, k_BLKD = _rotate(cfg, kind, q_BLHD, k_BLKD, positions_BL)
    if cfg.query_pre_attn_scalar is not None:  # the kernels scale by 1/√D: 1/√scalar instead
      q_BLHD = q_BLHD * jnp.asarray((cfg.head_dim / cfg.query_pre_attn_scalar) ** 0.5,
                                    q_BLHD.dtype)
    q_BLHD, k_BLKD = checkpoint_name(q_BLHD, "qkv"), checkpoint_name(k_BLKD, "qkv")
    v_BLKD = checkpoint_name(v_BLKD, "qkv")
    if layer_cache is None or layer_cache.prefill:
      out_BLHD = _attend(self.attention_fns, kind, q_BLHD, k_BLKD, v_BLKD, segment_ids_BL,
                         positions_BL)
      out_BLHD = checkpoint_name(out_BLHD, "attention")
      kv = ((k_BLKD, v_BLKD) if layer_cache is None
            else layer_cache.fill(cfg.windows, kind, k_BLKD, v_BLKD))
    else:
      out_BLHD, kv = layer_cache.decode(cfg.windows, kind, q_BLHD, k_BLKD, v_BLKD,
                                        segment_ids_BL, positions_BL)
    out_BLE = Projection(cfg, (cfg.hidden_size,), (-2, -1), ("heads", "head_dim", "embed"), bias,
                         name="o_proj")(out_BLHD.astype(cfg.compute_dtype))
    return out_BLE, kv


class Mlp(nn.Module):
  """Gated: down(act(gate(x)) · up(x)), act = `config.hidden_act` (SiLU: SwiGLU; GELU-tanh:
  Gemma's GeGLU)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BLE):
    cfg = self.config
    gate_BLM = Projection(cfg, (cfg.intermediate_size,), (-1,), ("embed", "mlp"), cfg.mlp_bias,
                          name="gate_proj")(x_BLE)
    act = cfg.hidden_act.fn()
    up_BLM = Projection(cfg, (cfg.intermediate_size,), (-1,), ("embed", "mlp"), cfg.mlp_bias,
                        name="up_proj")(x_BLE)
    return Projection(cfg, (cfg.hidden_size,), (-1,), ("mlp", "embed"), cfg.mlp_bias,
                      name="down_proj")(act(gate_BLM) * up_BLM)


class DecoderLayer(nn.Module):
  """One pre-norm block. `emit_kv`: return the new keys/values (decoding) or the filled stacks
  (prefill).

  token_shards: devices splitting each row's tokens (see Llama); the MLP runs over chunks of
  `config.mlp_chunk` tokens per device (model.chunking) when that tiles the length.
  batch_inputs: (positions, segment ids, the layer's `kv_cache.LayerCache` or () without one).
  layer_inputs (scanned over the layers): "kind", the layer's index into attention_fns (only
  with several kinds).
  """
  config: ModelConfig
  attention_fns: tuple[AttentionFn, ...]
  emit_kv: bool = False
  token_shards: int = 1

  @nn.compact
  def __call__(self, x_BLE, batch_inputs, layer_inputs=None):
    positions_BL, segment_ids_BL, layer_cache = batch_inputs
    layer_inputs = layer_inputs or {}
    kind = layer_inputs.get("kind")
    layer_cache = layer_cache or None  # () without a cache
    cfg = self.config
    x_BLE = checkpoint_name(constrain(x_BLE, RESIDUAL_AXES), "layer_input")
    h_BLE = RMSNorm(cfg, name="input_layernorm")(x_BLE)
    attn_BLE, kv = Attention(cfg, self.attention_fns, name="self_attn")(
        h_BLE, positions_BL, segment_ids_BL, kind, layer_cache)
    if cfg.sandwich_norms:  # Gemma: the attention output normed before the residual add
      attn_BLE = RMSNorm(cfg, name="post_attention_layernorm")(attn_BLE)
    x_BLE = constrain(x_BLE + attn_BLE, RESIDUAL_AXES)
    pre_mlp = "pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm"
    h_BLE = checkpoint_name(RMSNorm(cfg, name=pre_mlp)(x_BLE), "mlp_input")
    mlp = Mlp(cfg, name="mlp")
    mlp_BLE = apply_chunked(mlp, h_BLE, self.token_shards, cfg.mlp_chunk)
    if cfg.sandwich_norms:
      mlp_BLE = RMSNorm(cfg, name="post_feedforward_layernorm")(mlp_BLE)
    x_BLE = x_BLE + mlp_BLE
    return constrain(x_BLE, RESIDUAL_AXES), (kv if self.emit_kv else None)


def _single_document(tokens_BL, positions_BL, segment_ids_BL):
  """(positions, segment ids), each defaulting to one unpacked document per row."""
  if tokens_BL.ndim != 2:
    raise ValueError(f"tokens must be [batch, seq_len], found shape {tokens_BL.shape}")
  if positions_BL is None:
    positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1], dtype=jnp.int32), tokens_BL.shape)
  if segment_ids_BL is None:
    segment_ids_BL = jnp.ones(tokens_BL.shape, jnp.int32)
  return positions_BL, segment_ids_BL


def _layer_inputs(cfg: ModelConfig, kv_cache: KVCache | None, positions_BL, segment_ids_BL,
                  return_kv: bool, cache_slots: int | None):
  """(the cache with the new tokens' positions written, the cache as the scan over layers takes
  it (`kv_cache.ScanCache`; None without a cache), the per-layer inputs scanned over the layers
  ("index", the layer's row in its kind's stack, with a cache; "kind" with several kinds))."""
  scan = None
  if kv_cache is not None:
    kv_cache, scan = kv_lib.begin_decode(cfg, kv_cache, positions_BL, segment_ids_BL)
  elif return_kv:
    scan = kv_lib.begin_prefill(cfg, positions_BL, segment_ids_BL, cache_slots,
                                cfg.compute_dtype)
  layer_inputs = {} if scan is None else {"index": scan.index_N}
  kind_N = layer_kinds(cfg)
  if kind_N is not None:
    layer_inputs["kind"] = kind_N
  return kv_cache, scan, layer_inputs


def _scan_body(layer, carry, batch_inputs, *scanned):
  """One layer. carry: (x, a prefill's stacks, which the layers fill, else ()); batch_inputs:
  (positions, segment ids, the cache's (stacks to read when decoding, else None; `Shared`) or
  None); scanned: the layer's inputs, when there are any. Stacks the decoded tokens' k/v."""
  x_BLE, filling = carry
  positions_BL, segment_ids_BL, cache = batch_inputs
  layer_inputs = scanned[0] if scanned else {}
  layer_cache = ()
  if cache is not None:
    stacks, shared = cache
    layer_cache = LayerCache(filling if stacks is None else stacks, layer_inputs["index"],
                             shared)
  x_BLE, kv = layer(x_BLE, (positions_BL, segment_ids_BL, layer_cache), layer_inputs)
  if cache is not None and cache[0] is None:
    return (x_BLE, kv), None
  return (x_BLE, filling), kv


def _run_layers(layer, x_BLE, positions_BL, segment_ids_BL, scan, layer_inputs):
  """The scan over the layers (one module `layer`, its parameters stacked [N, ...]). A prefill
  carries the cache's stacks (they differ in shape between kinds) and fills them; decoding
  reads them and returns the new tokens' keys/values [N, B, T, K, D]. Returns (x, the filled
  stacks or the new keys/values or None)."""
  scan_args = (layer_inputs,) if layer_inputs else ()  # a uniform model scans nothing more
  run = nn.scan(_scan_body, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, 0) if scan_args else nn.broadcast,
                length=layer.config.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
  prefill = scan is not None and scan.prefill
  cache = None if scan is None else (None if prefill else scan.stacks, scan.shared)
  (x_BLE, filled), new_kv = run(layer, (x_BLE, scan.stacks if prefill else ()),
                                (positions_BL, segment_ids_BL, cache), *scan_args)
  return x_BLE, filled if prefill else new_kv


class Llama(nn.Module):
  """The decoder: tokens [B, L] int32 -> logits [B, L, V] float32.

  `positions` restart at 0 at each packed document and `segment_ids` keep attention inside a
  document (contract 1); both default to a single unpacked document per row.

  token_shards: how many devices split each row's tokens (a trainer passes its mesh's `seq`
  size). It changes no value: token chunks (config.mlp_chunk) are taken so that each device
  works on its own tokens (model.chunking).

  attention_fn: contract 3's function, or for a model with sliding-window layers an object
  that also has `with_window` (`AttentionSpec.function`'s `LayerAttention`; see the module
  docstring). None: the dense reference.
  """
  config: ModelConfig
  attention_fn: AttentionFn | None = None
  token_shards: int = 1

  @nn.compact
  def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, *,
               kv_cache: KVCache | None = None, return_kv: bool = False,
               cache_slots: int | None = None, return_hidden: bool = False,
               logits_at: int | None = None):
    """Logits [B, L, V] float32.

    logits_at: only the logits at that index, [B, 1, V] (a prefill needs the last position's:
      no [B, L, V] array is made).
    return_hidden: return the final normed hidden states [B, L, E] (compute dtype) instead of
      the logits, for a loss that applies the head itself (`head_weight`, train.loss).
    return_kv: also return the prompt's `KVCache` (a prefill): the full layers' keys/values in
      L slots (length L), each windowed layer's ring of min(W, cache_slots) slots (None: W)
      holding each row's latest real tokens (model.kv_cache).
    kv_cache: decode the tokens against the cache (their segment ids must already be written
      into `kv_cache.segment_ids_BS`; their positions are written here); returns (logits,
      cache with the new keys/values and positions).
    """
    cfg = self.config
    positions_BL, segment_ids_BL = _single_document(tokens_BL, positions_BL, segment_ids_BL)
    attention_fns = layer_attention_fns(self.attention_fn or default_attention_fn(), cfg)

    embedding_VE = self.param("embed_tokens", _init(cfg, "vocab", "embed"),
                              (cfg.vocab_size, cfg.hidden_size), jnp.float32)
    x_BLE = jnp.take(embedding_VE, tokens_BL, axis=0).astype(cfg.compute_dtype)
    if cfg.scale_embeddings:  # Gemma: by √hidden rounded to the compute dtype, as transformers
      x_BLE = x_BLE * jnp.asarray(cfg.hidden_size ** 0.5, cfg.compute_dtype)

    layer = DecoderLayer
    if cfg.remat is not RematPolicy.NONE:
      layer = nn.remat(DecoderLayer, policy=cfg.jax_remat_policy(), prevent_cse=False)
    kv_cache, scan, layer_inputs = _layer_inputs(cfg, kv_cache, positions_BL, segment_ids_BL,
                                                 return_kv, cache_slots)
    x_BLE, kv = _run_layers(
        layer(cfg, attention_fns, emit_kv=scan is not None, token_shards=self.token_shards,
              name="layers"), x_BLE, positions_BL, segment_ids_BL, scan, layer_inputs)

    x_BLE = RMSNorm(cfg, name="norm")(x_BLE)
    if logits_at is not None:
      x_BLE = jax.lax.dynamic_slice_in_dim(x_BLE, logits_at, 1, axis=1)
    if return_hidden:  # the head is applied by the caller (lm_head's parameters go unused here)
      return constrain(x_BLE, RESIDUAL_AXES)
    if cfg.tie_word_embeddings:
      logits_BLV = jnp.einsum("ble,ve->blv", x_BLE, embedding_VE.astype(cfg.compute_dtype))
    else:
      logits_BLV = Projection(cfg, (cfg.vocab_size,), (-1,), ("embed", "vocab"), False,
                              name="lm_head")(x_BLE)
    logits_BLV = logits_BLV.astype(jnp.float32)
    if scan is None:
      return logits_BLV
    return logits_BLV, kv_lib.end(cfg, kv_cache, scan, kv, positions_BL, segment_ids_BL)


def head_weight(params, config: ModelConfig) -> tuple[jax.Array, bool]:
  """(the output head's weight, vocab_first) from a parameter tree: the embedding [V, E]
  (vocab_first) when tied, else lm_head's kernel [E, V]. lm_head has no LoRA (LORA_TARGETS)."""
  if config.tie_word_embeddings:
    return params["embed_tokens"], True
  return params["lm_head"]["dense"]["kernel"], False
