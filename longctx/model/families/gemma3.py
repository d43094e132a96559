"""Gemma 3, text only (Gemma3ForCausalLM, `model_type` "gemma3_text").

Its decoder differs from Llama's by fields of ModelConfig (see its docstring): RMSNorm by
(1 + w) (`rms_norm_offset` 1.0), the embedding scaled by √hidden (`scale_embeddings`), GELU-tanh
gating (`hidden_activation`), norms before and after attention and the MLP
(`sandwich_norms`), q/k norm, the softmax scale `query_pre_attn_scalar`^−½, and layers that
slide by `sliding_window` (`layer_types`, or the old `sliding_window_pattern`: every n-th layer
full) with their own RoPE.

RoPE: the full layers' is `rope` (5.x `rope_parameters.full_attention`, 4.x `rope_theta` and
`rope_scaling`, default base 1e6); the sliding layers' is a plain RoPE of base
`local_rope_theta` (5.x `rope_parameters.sliding_attention`, 4.x `rope_local_base_freq`,
default 10k). A scaled local RoPE is refused by name. Export writes the 4.x keys, which 5.x reads
into the same two RoPEs.

Refused by name: `use_bidirectional_attention` (an encoder's mask) and the logit soft-caps
(shared refusal; Gemma 3 has none). The vision tower of Gemma3ForConditionalGeneration is not
read: convert its `text_config` and `language_model` weights.
"""
from longctx.model.families.base import Family, HfKeys, register
from longctx.model.rope import DefaultRope

FULL, SLIDING = "full_attention", "sliding_attention"


def _layer_types(keys: HfKeys, fields: dict) -> tuple[str, ...]:
  """transformers' rule: `layer_types` if given, else layer i is full iff (i + 1) is a
  multiple of `sliding_window_pattern` (default 6)."""
  saved = keys.get("_sliding_window_pattern", 6)  # what 5.x writes beside layer_types
  pattern = keys.get("sliding_window_pattern", None) or saved
  given = keys.get("layer_types")
  if given:
    return tuple(given)
  return tuple(SLIDING if (i + 1) % int(pattern) else FULL for i in range(fields["num_layers"]))


def _local_theta(keys: HfKeys) -> float:
  params = keys.get("rope_parameters", None) or {}
  local = params.get(SLIDING) if isinstance(params, dict) else None
  if local is None:
    return float(keys.get("rope_local_base_freq"))
  kind = local.get("rope_type", local.get("type", "default"))
  if kind != "default":
    keys.refuse("rope_parameters", f"the sliding layers' RoPE must be plain (rope_type "
                f"'default'), found {kind!r}; only the full layers' may be scaled", params)
  keys.get("rope_local_base_freq")
  return float(local.get("rope_theta", keys.get("rope_local_base_freq")))


def read(keys: HfKeys, fields: dict) -> dict:
  if keys.get("use_bidirectional_attention"):
    keys.refuse("use_bidirectional_attention", "longctx trains causal decoders")
  window = keys.get("sliding_window")
  kinds = _layer_types(keys, fields)
  if SLIDING in kinds and window is None:
    keys.refuse("sliding_window", "sliding layers need a window", window)
  return dict(attention_bias=bool(keys.get("attention_bias")),
              sliding_window=None if window is None else int(window), layer_types=kinds,
              query_pre_attn_scalar=int(keys.get("query_pre_attn_scalar")),
              local_rope_theta=_local_theta(keys))


def write(cfg) -> dict:
  local = cfg.local_rope_theta
  if local is None and not isinstance(cfg.rope, DefaultRope):
    raise ValueError(f"model.local_rope_theta=None with model.rope={cfg.rope}: Gemma 3's "
                     "sliding layers take a plain RoPE of their own base (rope_local_base_freq); "
                     "set model.local_rope_theta")
  return {"attention_bias": cfg.attention_bias, "sliding_window": cfg.sliding_window,
          "layer_types": [FULL if w is None else SLIDING for w in cfg.layer_windows],
          "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
          "rope_local_base_freq": float(cfg.rope.theta if local is None else local),
          "use_bidirectional_attention": False, "final_logit_softcapping": None,
          "attn_logit_softcapping": None}


FAMILY = register(Family(
    model_type="gemma3_text", architecture="Gemma3ForCausalLM",
    defaults=dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216,
                  num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                  head_dim=256, hidden_activation="gelu_pytorch_tanh",
                  max_position_embeddings=131_072, rms_norm_eps=1e-6, pad_token_id=0,
                  eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, rope_theta=1e6,
                  rope_local_base_freq=10_000.0, attention_bias=False,
                  query_pre_attn_scalar=256, sliding_window=4096),
    fixed=dict(mlp_bias=False, qkv_bias=False, qk_norm=True, partial_rotary_factor=1.0,
               rms_norm_offset=1.0, scale_embeddings=True, sandwich_norms=True),
    reads=("query_pre_attn_scalar", "local_rope_theta"),
    activation_key="hidden_activation", read=read, write=write))
